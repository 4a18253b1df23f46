"""Which heads and neurons to keep, per layer, under the model's structural constraints.

GQA: query heads are grouped onto KV heads (``group = heads / kv_heads``). ``per_group`` removes the same number of
query heads from every group (KV heads all stay; the group shrinks); ``kv_groups`` removes whole groups (a KV head
with its query heads); ``expand`` removes any query heads: when the survivors no longer form equal groups, each
keeps its own copy of its KV head (exact, but the KV cache grows to one head per query head; the report says so).
With multi-head attention (group of 1) all three mean "remove heads". A ratio that the layout cannot realise
exactly is refused with the nearest ratios it can.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from edgelvm.errors import ConfigError


@dataclass
class LayerPlan:
    keep_heads: list[int] | None = None  # query heads kept (sorted), None: untouched
    keep_kv_heads: list[int] | None = None
    keep_neurons: list[int] | None = None


@dataclass
class PrunePlan:
    layers: dict[str, LayerPlan] = field(default_factory=dict)  # "vision.0" -> plan

    def layer(self, k: str) -> LayerPlan:
        return self.layers.setdefault(k, LayerPlan())


def valid_head_ratios(heads: int, kv_heads: int, mode: str) -> list[Fraction]:
    group = heads // kv_heads
    if group == 1 or mode == "expand":
        return [Fraction(n, heads) for n in range(heads)]
    if mode == "kv_groups":
        units = kv_heads if group > 1 else heads
        return [Fraction(n, units) for n in range(units)]
    return [Fraction(r, group) for r in range(group)]


def _check_ratio(ratio: float, heads: int, kv_heads: int, mode: str, where: str) -> Fraction:
    valid = valid_head_ratios(heads, kv_heads, mode)
    for f in valid:
        if abs(float(f) - ratio) < 1e-9:
            return f
    nearest = sorted(valid, key=lambda f: abs(float(f) - ratio))[:2]
    shown = " or ".join(f"{float(f):.4g}" for f in sorted(nearest))
    layout = f"{heads} query heads over {kv_heads} KV heads" if heads != kv_heads else f"{heads} heads"
    raise ConfigError(
        f"removing {ratio:g} of the heads is impossible with {layout} ({mode})",
        where=where,
        fix=f"use {shown}" + ("" if mode == "expand" or heads == kv_heads else ", or --gqa kv_groups / expand"),
    )


def plan_heads(scores: np.ndarray, heads: int, kv_heads: int, ratio: float, mode: str, where: str) -> LayerPlan:
    frac = _check_ratio(ratio, heads, kv_heads, mode, where)
    if frac == 0:
        return LayerPlan()
    group = heads // kv_heads
    if group == 1:
        n_keep = heads - int(frac * heads)
        keep = sorted(np.argsort(-scores, kind="stable")[:n_keep].tolist())
        return LayerPlan(keep_heads=keep, keep_kv_heads=keep if kv_heads == heads else None)
    if mode == "expand":
        keep = sorted(np.argsort(-scores, kind="stable")[: heads - int(frac * heads)].tolist())
        counts = {g: sum(1 for h in keep if h // group == g) for g in range(kv_heads)}
        present = [g for g, c in counts.items() if c]
        if len({counts[g] for g in present}) == 1:  # still equal groups: plain GQA, no copies
            return LayerPlan(keep_heads=keep, keep_kv_heads=present)
        return LayerPlan(keep_heads=keep, keep_kv_heads=[h // group for h in keep])
    if mode == "kv_groups":
        group_scores = scores.reshape(kv_heads, group).sum(1)
        n_keep = kv_heads - int(frac * kv_heads)
        kv_keep = sorted(np.argsort(-group_scores, kind="stable")[:n_keep].tolist())
        keep = [g * group + j for g in kv_keep for j in range(group)]
        return LayerPlan(keep_heads=keep, keep_kv_heads=kv_keep)
    per_group = group - int(frac * group)
    keep = []
    for g in range(kv_heads):
        members = scores[g * group : (g + 1) * group]
        keep += sorted((g * group + np.argsort(-members, kind="stable")[:per_group]).tolist())
    return LayerPlan(keep_heads=keep, keep_kv_heads=list(range(kv_heads)))


def plan_neurons(scores: dict[str, np.ndarray], ratio: float, ranking: str, multiple: int = 1) -> dict[str, list[int]]:
    """Neurons kept per layer; ``global`` ranks a tower's neurons together (each layer's scores are normalised by
    their mean so layers of different activation scale compete fairly) and keeps at least ``multiple`` per layer."""
    if ratio == 0:
        return {}
    if ranking == "uniform":
        out = {}
        for k, s in scores.items():
            n_keep = max(multiple, round(len(s) * (1 - ratio) / multiple) * multiple)
            out[k] = sorted(np.argsort(-s, kind="stable")[:n_keep].tolist())
        return out
    normed = {k: s / (s.mean() + 1e-12) for k, s in scores.items()}
    flat = np.concatenate([normed[k] for k in normed])
    n_keep_total = round(len(flat) * (1 - ratio))
    threshold = np.sort(flat)[::-1][max(0, n_keep_total - 1)]
    out = {}
    for k, s in normed.items():
        keep = np.flatnonzero(s >= threshold)
        if len(keep) < multiple:
            keep = np.argsort(-s, kind="stable")[:multiple]
        out[k] = sorted(keep.tolist())
    return out
