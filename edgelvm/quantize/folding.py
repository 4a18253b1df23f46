"""Per-channel scales moved exactly between a scale group's linear layers and the op producing their input.

AWQ and SmoothQuant both multiply the input columns of the linears that read one tensor by ``s`` and divide that
tensor's producer — a norm's weight (and bias), or a preceding linear's output rows (and bias) — by the same ``s``,
which leaves the float model's function unchanged. Which groups exist and what produces them is the adapter's
knowledge (:meth:`~edgelvm.models.base.VLMAdapter.text_scale_groups`).
"""

from __future__ import annotations

from typing import Any


def fold_scales(group: Any, names: list[str], s: Any) -> None:
    """Scale the named linears' input columns by ``s`` and divide the group's producer by it (in place)."""
    import torch

    with torch.no_grad():
        for name in names:
            weight = group.linears[name].weight
            weight.mul_(s[None, :].to(weight.dtype))
        p = group.producer
        if group.producer_kind == "norm":
            p.weight.div_(s.to(p.weight.dtype))
        elif group.producer_kind == "linear":
            p.weight.div_(s[:, None].to(p.weight.dtype))
        else:  # pragma: no cover - adapters only declare the two kinds
            raise ValueError(f"unknown producer kind {group.producer_kind!r}")
        if getattr(p, "bias", None) is not None:
            p.bias.div_(s.to(p.bias.dtype))


def producer_name(group: Any, linears: dict[str, Any]) -> str | None:
    """The name in ``linears`` of the group's producer when it is one of them (its float rows were divided)."""
    return next((name for name, module in linears.items() if module is group.producer), None)
