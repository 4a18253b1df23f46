"""INT4 weight-only quantization of the language model's linear layers: RTN, AWQ or GPTQ → :class:`Int4Weight`
(one function per method, registered as handlers in :mod:`edgelvm.quantize.handlers`).

Each method leaves the torch model computing exactly the quantized weights (dequantized in place; AWQ's scales
folded into the producing norms / linears, which stay float) and returns the codes by ``layers.{i}.<path>``.
The report gets, per layer, the relative weight error and — with calibration — the relative output error on the
calibration tokens, ``sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))``, both measured in the original input space.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edgelvm.models.checkpoint.codes import Int4Weight
from edgelvm.quantize.int4 import quantize_rtn

log = logging.getLogger(__name__)


def quantize_rtn_layers(adapter: Any, linears: dict[str, Any], stats: Any, cfg: Any, report: Any) -> dict:
    """Round to nearest (``cfg``: :class:`~edgelvm.quantize.methods.RTNConfig`); ``stats`` may be None."""
    return _quantize_each(linears, stats, report, lambda _name, w, _gram, _s: quantize_rtn(
        w.numpy().T, cfg.group_size, cfg.symmetric))  # fmt: skip


def quantize_gptq_layers(adapter: Any, linears: dict[str, Any], stats: Any, cfg: Any, report: Any) -> dict:
    """GPTQ (``cfg``: :class:`~edgelvm.quantize.methods.GPTQConfig`) from each layer's calibration Gram matrix."""
    from edgelvm.quantize.gptq import gptq_quantize

    return _quantize_each(linears, stats, report, lambda _name, w, gram, _s: gptq_quantize(
        w, gram, cfg.group_size, cfg.symmetric, damp=cfg.damp, act_order=cfg.act_order))  # fmt: skip


def quantize_awq_layers(adapter: Any, linears: dict[str, Any], stats: Any, cfg: Any, report: Any) -> dict:
    """AWQ (``cfg``: :class:`~edgelvm.quantize.methods.AWQConfig`): scales folded into the producers, then
    round to nearest with each block's clipping searched (q/k never clipped)."""
    from edgelvm.quantize.awq import scaled_input, search_clip

    originals = _originals(linears)
    # AWQ changes a group's input space by 1/s: keep each layer's scale to map errors back to the original one.
    input_scale, row_scale = _apply_awq_scales(adapter, linears, stats, cfg)
    for name, r in row_scale.items():  # a producer's float rows were divided exactly: that is the reference now
        originals[name] = originals[name] / r[:, None]

    def one(name: str, w: Any, gram: Any, s: Any) -> Int4Weight:
        clip = None
        if cfg.clip and not _is_query_or_key(name):
            scaled = gram if s is None else scaled_input(gram, s)
            clip = search_clip(w, scaled, cfg.group_size, cfg.symmetric).numpy()
        return quantize_rtn(w.numpy().T, cfg.group_size, cfg.symmetric, clip)

    return _quantize_each(linears, stats, report, one, input_scale, originals)


def _originals(linears: dict[str, Any]) -> dict[str, Any]:
    return {name: m.weight.detach().float().clone() for name, m in linears.items()}


def _quantize_each(
    linears: dict[str, Any], stats: Any, report: Any, quantize_one: Any, input_scale: dict | None = None,
    originals: dict | None = None,
) -> dict[str, Int4Weight]:  # fmt: skip
    """``quantize_one(name, w, gram, s)`` -> :class:`Int4Weight` per layer; the torch weight becomes its
    dequantized value and the report gets the layer's errors in the original input space (``w`` was scaled by
    ``s`` along its input, when ``input_scale`` has it)."""
    import torch

    originals = originals if originals is not None else _originals(linears)
    input_scale = input_scale or {}
    out: dict[str, Int4Weight] = {}
    for name, linear in linears.items():
        w = linear.weight.detach().float()  # [N, K], scaled by AWQ when it applies
        s = input_scale.get(name)
        gram = stats.gram(name) if stats is not None else None  # one float64 copy at a time
        q = quantize_one(name, w, gram, s)
        deq = torch.from_numpy(q.dequantize().T.copy())
        with torch.no_grad():
            linear.weight.copy_(deq.to(linear.weight.dtype))
        out[name] = q
        effective = deq if s is None else deq / s  # in the original input space
        report.layers.append(layer_error_row(name, originals[name], effective, gram))
        report.weight_bytes_before += originals[name].numel() * 4
        zero_point_bytes = 0 if q.zero_points is None else q.zero_points_packed().size
        report.weight_bytes_after += q.packed.size + q.scales.size * 4 + zero_point_bytes
    return out


def _is_query_or_key(name: str) -> bool:
    # AutoAWQ does not clip q/k: their products go through softmax, where a clipped outlier changes the attention
    return name.endswith(("q_proj", "k_proj"))


def _apply_awq_scales(adapter: Any, linears: dict[str, Any], stats: Any, cfg: Any) -> tuple[dict, dict]:
    """Search and fold the per-channel scales of every group. Returns each scaled layer's input scale ``s`` and,
    for producers that are linear layers, the scale their output rows were divided by."""
    from edgelvm.quantize.awq import search_scales
    from edgelvm.quantize.folding import fold_scales, producer_name

    applied: dict[str, Any] = {}
    rows: dict[str, Any] = {}
    alphas = []
    for group in adapter.text_scale_groups():
        names = [n for n in group.linears if n in linears]
        if not names:
            continue
        first = names[0]
        gram = stats.gram(first)
        result = search_scales([group.linears[n].weight.detach() for n in names], gram,
                               stats.layers[first].abs_mean, cfg.group_size, cfg.symmetric)  # fmt: skip
        s = result.scales
        alphas.append(result.alpha)
        fold_scales(group, names, s)
        for n in names:
            applied[n] = s
        producer = producer_name(group, linears)
        if producer is not None:
            rows[producer] = s
    if alphas:
        log.info("AWQ: mean alpha %.2f over %d groups", float(np.mean(alphas)), len(alphas))
    return applied, rows


def layer_error_row(name: str, w: Any, effective: Any, gram: Any) -> dict[str, Any]:
    """The report row of one quantized linear: relative weight error and (with ``gram``) relative output error on
    the calibration tokens, ``w`` the reference and ``effective`` the quantized weight in the same input space."""
    from edgelvm.quantize.awq import output_error

    delta = effective - w
    row = {
        "name": name, "side": "text", "bits": 4, "K": int(w.shape[1]), "N": int(w.shape[0]),
        "weight_error": round(float(delta.norm() / (w.norm() + 1e-12)), 6), "output_error": None,
    }  # fmt: skip
    if gram is not None:
        row["output_error"] = round(float(np.sqrt(output_error(delta, gram) / max(output_error(w, gram), 1e-30))), 6)
    return row
