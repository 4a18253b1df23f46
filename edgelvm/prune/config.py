"""``PruneConfig`` and ``PruneReport``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgelvm.errors import ConfigError
from edgelvm.prune.importance import ActivationImportance, Importance, importance_by_name

GQA_MODES = ("per_group", "kv_groups", "expand")
RANKINGS = ("uniform", "global")


@dataclass
class PruneConfig:
    """Fractions to remove (0 keeps everything). Heads are removed whole; ``head_dim`` never changes."""

    out: str | Path = "pruned"
    vision_heads: float = 0.0
    text_heads: float = 0.0
    vision_mlp: float = 0.0
    text_mlp: float = 0.0
    vision_drop_layers: int = 0  # depth: remove this many whole blocks (lowest 1 - cos(block input, output))
    text_drop_layers: int = 0
    #: a callable ``(adapter, batches) -> Scores`` (:mod:`edgelvm.prune.importance`): ActivationImportance
    #: (Minitron), GradientImportance (Michel et al. head mask), MagnitudeImportance, RandomImportance, or your own;
    #: a built-in's name is accepted as shorthand (``importance_by_name``)
    importance: Importance | str = field(default_factory=ActivationImportance)
    gqa: str = "per_group"  # per_group: the same query heads from every KV group | kv_groups: whole groups | expand
    mlp_ranking: str = "uniform"  # uniform: the same fraction per layer | global: one ranking across a tower's layers
    calib_limit: int = 256
    batch_size: int = 16
    seed: int = 0
    recover_steps: int = 0  # > 0: distil the pruned model from the unpruned one for this many steps
    recover_lr: float = 5e-4
    recover_data: str | Path | None = None  # default: the calibration data
    force: bool = False
    progress: bool = True

    def validate(self) -> None:
        for name in ("vision_heads", "text_heads", "vision_mlp", "text_mlp"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(
                    f"{name}={value} is out of range",
                    where="PruneConfig",
                    fix=f"give {name} as a fraction to remove, 0 <= {name} < 1 (e.g. 0.25)",
                )
        if isinstance(self.importance, str):
            self.importance = importance_by_name(self.importance, self.seed)
        if not callable(self.importance):
            raise ConfigError(
                f"importance {self.importance!r} is not callable",
                where="PruneConfig.importance",
                fix="pass e.g. ActivationImportance() or a function (adapter, batches) -> Scores",
            )
        for name, allowed in (("gqa", GQA_MODES), ("mlp_ranking", RANKINGS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} is unknown", where="PruneConfig", fix=f"use one of {allowed}"
                )
        if self.vision_drop_layers < 0 or self.text_drop_layers < 0:
            raise ConfigError("layers to drop must be >= 0", where="PruneConfig", fix="use 0 to keep every block")
        if (self.vision_drop_layers or self.text_drop_layers) and not getattr(self.importance, "scores_blocks", True):
            raise ConfigError(
                "depth pruning scores blocks on calibration data; this importance scores none",
                where="PruneConfig.importance",
                fix="use --importance activation (or gradient / random) with --*-drop-layers",
            )
        if self.calib_limit < 1 or self.batch_size < 1 or self.recover_steps < 0:
            raise ConfigError(
                "calib_limit and batch_size must be >= 1, recover_steps >= 0", where="PruneConfig", fix="fix the value"
            )


@dataclass
class PruneReport:
    out: str
    source: str
    importance: str
    calibration: dict[str, Any]
    before: dict[str, Any]  # parameters, FLOPs per image and per token
    after: dict[str, Any]
    kept: dict[str, Any]  # per tower: heads and MLP neurons kept per layer
    recovery: dict[str, Any] | None = None
    scores_file: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: Path) -> None:
        from edgelvm.manifest import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, default=str))
