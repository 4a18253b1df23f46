"""``DistillConfig`` and ``DistillReport``: the distill stage's options and its result."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgelvm.distill.losses import DIVERGENCES
from edgelvm.errors import ConfigError


@dataclass
class DistillConfig:
    """Options of :func:`edgelvm.distill.distill`. Loss weights multiply terms that are each ~1 at the start."""

    out: str | Path = "student"
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-4
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | js
    temperature: float = 1.0
    kd_weight: float = 1.0  # divergence on response-token logits
    ce_weight: float = 0.0  # cross-entropy on the ground truth (or the teacher's generated response)
    visual_kd_weight: float = 0.0  # divergence on image-token positions (LLaVA-KD); needs the same image layout
    feature_weight: float = 0.0  # MSE on the projector's image features, through a learned projection
    hidden_weight: float = 0.0  # MSE on the last hidden state at response positions, through a learned projection
    top_k: int | None = None  # online KD on the teacher's top-k only (None: full vocabulary)
    cache_teacher: str | Path | None = None  # build/use an offline top-k cache here; the teacher is then freed
    cache_top_k: int = 64
    cache_shard_size: int = 1024
    teacher_generate: bool = False  # responses = the teacher's greedy answers (sequence-level KD)
    max_new_tokens: int = 64
    val_data: str | Path | None = None
    eval_every: int = 0  # 0: only at the end (when val_data is given)
    eval_limit: int = 500
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    stop_after: int | None = None  # stop this invocation after N steps with a resumable checkpoint (time-boxed jobs)
    mixed_precision: str = "no"  # no | bf16 | fp16 (Accelerate autocast where the device supports it)
    progress: bool = True

    def validate(self) -> None:
        def bad(name: str, why: str, fix: str) -> ConfigError:
            return ConfigError(f"{name}={getattr(self, name)!r}: {why}", where="DistillConfig", fix=fix)

        for name in ("steps", "batch_size", "grad_accum", "save_every", "cache_top_k", "cache_shard_size"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be at least 1", f"set {name} to a positive integer")
        if self.lr <= 0:
            raise bad("lr", "must be positive", "a typical value is 1e-4 .. 1e-3")
        if self.divergence not in DIVERGENCES:
            raise bad("divergence", "unknown", f"use one of {', '.join(DIVERGENCES)}")
        if self.temperature <= 0:
            raise bad("temperature", "must be positive", "use 1.0 (default) or 2.0")
        weights = ("kd_weight", "ce_weight", "visual_kd_weight", "feature_weight", "hidden_weight")
        if any(getattr(self, w) < 0 for w in weights):
            raise bad("kd_weight", "loss weights must be >= 0", "set negative weights to 0")
        if not any(getattr(self, w) > 0 for w in weights):
            raise bad("kd_weight", "every loss weight is 0: nothing to train", "set kd_weight (default 1.0)")
        if self.top_k is not None and self.top_k < 1:
            raise bad("top_k", "must be >= 1", "leave it unset for the full vocabulary")
        if self.cache_teacher is not None and (self.visual_kd_weight > 0 or self.hidden_weight > 0):
            raise bad(
                "cache_teacher",
                "the cache holds response-token logits and image features only",
                "drop visual_kd_weight / hidden_weight, or train online (no cache)",
            )
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise bad("mixed_precision", "unknown", "use no, bf16 or fp16")

    def fingerprint(self) -> dict[str, Any]:
        """The options that define a run (a resumed run must match them); progress/paths excluded."""
        d = asdict(self)
        transient = ("out", "resume", "stop_after", "progress", "eval_every", "eval_limit", "save_every", "log_every")
        for k in (*transient, "val_data"):
            d.pop(k)
        d["cache_teacher"] = d["cache_teacher"] is not None
        return d


@dataclass
class DistillReport:
    out: str
    teacher: str
    student_params: int
    teacher_params: int
    steps: int
    samples: int
    wall_seconds: float
    samples_per_second: float
    data: dict[str, Any]
    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None
    finished: bool = True  # False when stop_after ended the invocation early (resume with --resume)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: Path) -> None:
        from edgelvm.manifest import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, default=str))
