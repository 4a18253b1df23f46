"""Importance of every attention head and MLP neuron, from calibration data or from the weights.

An importance is any callable ``importance(adapter, batches) -> Scores`` (Torch-Pruning's injected importance):
``batches`` yields ``(model inputs, labels, rows)`` — the caller owns the data loop — or is None for a data-free
one. Optional attributes: ``name`` (for the report), ``needs_data`` (default True), ``scores_blocks`` (whether it
scores whole blocks for depth pruning; default True). The built-ins, by the name the CLI gives them
(:data:`IMPORTANCES`, :func:`importance_by_name`):

- ``activation`` (Minitron): at the input of ``o_proj`` (per head) and of ``down_proj``/``fc2`` (per neuron), the
  mean ``|x|`` over a sample's valid positions, then the L2 norm over samples; a head's score is the L2 norm of
  its channels' scores.
- ``gradient`` (Michel et al., 2019): ``|dL/d mask_h|`` for a mask multiplying head ``h``'s output (equal to
  ``sum_t,d g * x`` over that head's channels), summed over samples, with L the answer-token loss; neurons alike.
- ``magnitude``: weight norms (heads: the ``o_proj`` columns; neurons: ``down`` column x ``up`` rows); no data.
- ``random``: the baseline any importance measure must beat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from edgelvm.errors import ConfigError


@dataclass
class Scores:
    heads: dict[str, np.ndarray] = field(default_factory=dict)  # "vision.3" -> [heads]
    neurons: dict[str, np.ndarray] = field(default_factory=dict)  # "text.1" -> [intermediate]
    blocks: dict[str, float] = field(default_factory=dict)  # "text.2" -> mean (1 - cos(block input, output))
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "heads": {k: [round(float(x), 6) for x in v] for k, v in self.heads.items()},
            "neurons": {k: [round(float(x), 6) for x in v] for k, v in self.neurons.items()},
            "blocks": {k: round(float(v), 6) for k, v in self.blocks.items()},
            "calibration": self.calibration,
        }


def key(side: str, layer: int) -> str:
    return f"{side}.{layer}"


def magnitude_scores(adapter: Any) -> Scores:
    import torch

    scores = Scores()
    with torch.no_grad():
        for b in adapter.attention_blocks():
            w = b.o.weight.float().reshape(b.o.weight.shape[0], b.heads, b.head_dim)
            scores.heads[key(b.side, b.layer)] = w.pow(2).sum(dim=(0, 2)).sqrt().numpy()
        for m in adapter.mlp_blocks():
            down = m.down.weight.float().norm(dim=0)
            up = torch.stack([u.weight.float().norm(dim=1) for u in m.up]).prod(dim=0)
            scores.neurons[key(m.side, m.layer)] = (down * up).numpy()
    return scores


def random_scores(adapter: Any, seed: int) -> Scores:
    rng = np.random.default_rng(seed)
    scores = Scores()
    for b in adapter.attention_blocks():
        scores.heads[key(b.side, b.layer)] = rng.random(b.heads)
    for m in adapter.mlp_blocks():
        scores.neurons[key(m.side, m.layer)] = rng.random(m.down.in_features)
    for side, stack in adapter.layer_stacks().items():
        for i in range(len(stack)):
            scores.blocks[key(side, i)] = float(rng.random())
    return scores


class _Collector:
    """Hooks on every ``o``/``down`` input accumulating activation or gradient statistics per channel."""

    def __init__(self, adapter: Any, method: str) -> None:
        self.method = method
        self.mask: Any = None  # [B, T] attention mask of the current text batch
        self.acc: dict[str, Any] = {}
        self.handles = []
        self.geometry: dict[str, tuple[str, int]] = {}  # key -> ("heads", head_dim) or ("neurons", 1)
        for b in adapter.attention_blocks():
            self._hook(b.o, f"h:{key(b.side, b.layer)}", b.side, ("heads", b.head_dim))
        for m in adapter.mlp_blocks():
            self._hook(m.down, f"n:{key(m.side, m.layer)}", m.side, ("neurons", 1))
        self.block_sum: dict[str, float] = {}
        self.block_n: dict[str, int] = {}
        for side, stack in adapter.layer_stacks().items():
            for i, block in enumerate(stack):
                self.handles.append(block.register_forward_hook(self._block_hook(key(side, i), side)))

    def _block_hook(self, name: str, side: str) -> Any:
        """Block influence (ShortGPT / Minitron depth): 1 - cos(input, output) per valid token."""
        import torch

        def hook(_module: Any, args: tuple, output: Any) -> None:
            x = args[0] if args else None
            y = output[0] if isinstance(output, tuple) else output
            if x is None or not torch.is_tensor(x) or y.shape != x.shape or x.dim() != 3:
                return  # not a [batch, tokens, dim] block (e.g. a tower that packs patches as [patches, dim])
            cos = torch.nn.functional.cosine_similarity(x.detach().float(), y.detach().float(), dim=-1)  # [B, T]
            valid = self._valid(x, side)[..., 0]
            self.block_sum[name] = self.block_sum.get(name, 0.0) + float(((1 - cos) * valid).sum())
            self.block_n[name] = self.block_n.get(name, 0) + int(valid.sum())

        return hook

    def _hook(self, module: Any, name: str, side: str, geometry: tuple[str, int]) -> None:
        self.geometry[name] = geometry

        def pre_hook(_module: Any, args: tuple) -> None:
            x = args[0]
            valid = self._valid(x, side)
            if self.method == "activation":
                per_sample = (x.detach().abs() * valid).sum(1) / valid.sum(1).clamp(min=1)  # [B, C]
                self._add(name, per_sample.pow(2).sum(0))
            elif x.requires_grad:
                saved = x.detach()

                def grad_hook(g: Any, saved: Any = saved, valid: Any = valid) -> None:
                    prod = (g * saved * valid).sum(1)  # [B, C]
                    if geometry[0] == "heads":
                        prod = prod.reshape(prod.shape[0], -1, geometry[1]).sum(-1)
                    self._add(name, prod.abs().sum(0))

                x.register_hook(grad_hook)

        self.handles.append(module.register_forward_pre_hook(pre_hook))

    def _valid(self, x: Any, side: str) -> Any:
        if side == "text" and self.mask is not None and self.mask.shape[:2] == x.shape[:2]:
            return self.mask[..., None].to(x.dtype)
        return x.new_ones(x.shape[0], x.shape[1], 1)

    def _add(self, name: str, value: Any) -> None:
        value = value.detach().float().cpu()
        self.acc[name] = value if name not in self.acc else self.acc[name] + value

    def scores(self) -> Scores:
        out = Scores()
        for name, value in self.acc.items():
            kind, k = name.split(":", 1)
            kind_name, head_dim = self.geometry[name]
            v = value.sqrt() if self.method == "activation" else value
            if kind_name == "heads" and self.method == "activation":
                v = v.reshape(-1, head_dim).pow(2).sum(-1).sqrt()
            (out.heads if kind == "h" else out.neurons)[k] = v.numpy()
        out.blocks = {k: self.block_sum[k] / max(1, self.block_n[k]) for k in self.block_sum}
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def calibration_scores(adapter: Any, batches: Iterable[tuple[dict, Any, int]], method: str) -> Scores:
    """Run ``batches`` through the model (with gradients for ``gradient``) and score every unit."""
    import torch

    model = adapter.model
    model.eval()
    collector = _Collector(adapter, method)
    try:
        for inputs, labels, _rows in batches:
            collector.mask = inputs["attention_mask"]
            if method == "gradient":
                model.zero_grad(set_to_none=True)
                loss = model(**inputs, labels=labels).loss
                loss.backward()
            else:
                with torch.no_grad():
                    model(**inputs)
    finally:
        collector.close()
        model.zero_grad(set_to_none=True)
    return collector.scores()


class Importance(Protocol):
    """What :func:`edgelvm.prune.prune` calls (see the module docstring for the optional attributes)."""

    def __call__(self, adapter: Any, batches: Iterable[tuple[dict, Any, int]] | None) -> Scores: ...


@dataclass(frozen=True)
class ActivationImportance:
    """Minitron: mean |x| at each unit's output per sample, L2 over samples."""

    name: ClassVar[str] = "activation"
    needs_data: ClassVar[bool] = True
    scores_blocks: ClassVar[bool] = True

    def __call__(self, adapter: Any, batches: Iterable[tuple[dict, Any, int]] | None) -> Scores:
        return calibration_scores(adapter, _required(batches, self.name), "activation")


@dataclass(frozen=True)
class GradientImportance:
    """Michel et al.: |dL/d mask| of each unit on the answer-token loss."""

    name: ClassVar[str] = "gradient"
    needs_data: ClassVar[bool] = True
    scores_blocks: ClassVar[bool] = True

    def __call__(self, adapter: Any, batches: Iterable[tuple[dict, Any, int]] | None) -> Scores:
        return calibration_scores(adapter, _required(batches, self.name), "gradient")


@dataclass(frozen=True)
class MagnitudeImportance:
    """Weight norms; no data, so no block scores."""

    name: ClassVar[str] = "magnitude"
    needs_data: ClassVar[bool] = False
    scores_blocks: ClassVar[bool] = False

    def __call__(self, adapter: Any, batches: Iterable[tuple[dict, Any, int]] | None = None) -> Scores:
        return magnitude_scores(adapter)


@dataclass(frozen=True)
class RandomImportance:
    """The baseline any importance must beat."""

    seed: int = 0
    name: ClassVar[str] = "random"
    needs_data: ClassVar[bool] = False
    scores_blocks: ClassVar[bool] = True

    def __call__(self, adapter: Any, batches: Iterable[tuple[dict, Any, int]] | None = None) -> Scores:
        return random_scores(adapter, self.seed)


#: the built-in importances by the name ``--importance`` takes
IMPORTANCES: dict[str, Callable[..., Importance]] = {
    "activation": ActivationImportance,
    "gradient": GradientImportance,
    "magnitude": MagnitudeImportance,
    "random": RandomImportance,
}


def importance_by_name(name: str, seed: int = 0) -> Importance:
    """The built-in importance ``name`` (``random`` seeded with ``seed``)."""
    if name not in IMPORTANCES:
        raise ConfigError(f"importance {name!r} is unknown", where="--importance",
                          fix=f"use one of {', '.join(IMPORTANCES)}, or pass a callable")  # fmt: skip
    return RandomImportance(seed) if name == "random" else IMPORTANCES[name]()


def importance_name(importance: Any) -> str:
    """What the report calls ``importance``: its ``name``, else its function or class name."""
    return str(getattr(importance, "name", None) or getattr(importance, "__name__", type(importance).__name__))


def _required(batches: Any, name: str) -> Any:
    if batches is None:
        raise ConfigError(
            f"{name} importance scores units on calibration data, and none was given",
            where="--calib",
            fix="pass a jsonl dataset (or 'shapes'), or use --importance magnitude",
        )
    return batches
