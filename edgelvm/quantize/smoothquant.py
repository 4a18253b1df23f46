"""SmoothQuant (Xiao et al., 2023): W8A8 for the language model by moving activation outliers into the weights.

LLM activations have a few channels with outliers far beyond the rest, which a per-tensor INT8 range cannot hold;
weights are flat. Dividing each input channel by ``s_j = max|x_j|^α / max|W_:,j|^(1-α)`` (folded exactly into the
producing norm / linear, as AWQ does) and multiplying the weights' columns by it balances the two, after which
both quantize to INT8: per-channel weights, a static per-tensor input range. The smoothed range is known exactly from
the per-channel maxima the calibration pass collected (``max_j max|x_j| / s_j``), so no second pass is needed.

The result runs as QDQ in the portable decoder (ONNX Runtime fuses it into integer matmuls; TensorRT reads it);
the ONNX Runtime–fused decoder has no W8A8 form and is not written for such a checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgelvm.models.checkpoint.codes import Int8Linear
from edgelvm.quantize.int8 import activation_scale, quantize_weight_int8


def smooth_and_quantize(adapter: Any, linears: dict[str, Any], stats: Any, alpha: float, report: Any) -> dict:
    import torch

    from edgelvm.quantize.folding import fold_scales, producer_name
    from edgelvm.quantize.llm_int4 import layer_error_row

    originals = {name: m.weight.detach().float().clone() for name, m in linears.items()}
    smoothing: dict[str, Any] = {}
    for group in adapter.text_scale_groups():
        names = [n for n in group.linears if n in linears]
        if not names:
            continue
        x_max = stats.layers[names[0]].abs_max.float()
        w_max = torch.stack([group.linears[n].weight.detach().float().abs().amax(0) for n in names]).amax(0)
        s = (x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
        s = torch.where(x_max > 0, s, torch.ones_like(s))
        fold_scales(group, names, s)
        for n in names:
            smoothing[n] = s
        producer = producer_name(group, linears)
        if producer is not None:  # its float rows were divided: that is the reference now
            originals[producer] = originals[producer] / s[:, None]

    out: dict[str, Int8Linear] = {}
    for name, linear in linears.items():
        s = smoothing.get(name)
        amax = stats.layers[name].abs_max.float()
        smoothed_max = float((amax / s).max()) if s is not None else float(amax.max())
        codes, w_scales = quantize_weight_int8(linear.weight.detach().float().numpy().T)
        deq = torch.from_numpy((codes.astype(np.float32) * w_scales[None, :]).T.copy())
        with torch.no_grad():
            linear.weight.copy_(deq.to(linear.weight.dtype))
        out[name] = Int8Linear(codes, w_scales, activation_scale(smoothed_max))
        effective = deq if s is None else deq / s
        gram = stats.gram(name) if stats.layers[name].gram_key is not None else None
        row = layer_error_row(name, originals[name], effective, gram)
        row.update(bits=8, K=int(codes.shape[0]), N=int(codes.shape[1]), input_scale=out[name].input_scale)
        report.layers.append(row)
        report.weight_bytes_before += originals[name].numel() * 4
        report.weight_bytes_after += codes.size + w_scales.size * 4
    return out
