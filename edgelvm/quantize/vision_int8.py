"""INT8 W8A8 of the vision encoder and projector: per-channel weights, per-tensor input ranges from an observer.

Only the linear layers are quantized (their matmuls are where the time goes); LayerNorm, Softmax, GELU, the residual
adds, the attention's activation-by-activation matmuls and the patch-embedding convolution stay in float — the
ranges of LayerNorm inputs span orders of magnitude per channel in ViTs (FQ-ViT), and TensorRT keeps the same ops
in higher precision in its own INT8 recipes.

The torch side simulates exactly what the QDQ graph computes
(:func:`edgelvm.models.checkpoint.activations.fake_quantize`): the observer sweep through :func:`fake_quant_inputs`,
a loaded checkpoint through the quantizers :func:`edgelvm.models.load_model` installs
(:mod:`edgelvm.models.checkpoint.activations`), which export's parity check uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelvm.calibration.observers import OBSERVERS, observe
from edgelvm.models.checkpoint.codes import Int8Linear
from edgelvm.quantize.int8 import activation_scale, quantize_weight_int8

#: What stays in float, for the report.
KEPT_FLOAT = {
    "patch embedding (Conv2d)": "the writer quantizes MatMul weights only; one conv per image, not where the time goes",
    "LayerNorm / Softmax / GELU / residual adds": "kept in higher precision by design (wide per-channel ranges)",
    "attention Q·Kᵀ and P·V": "activation-by-activation matmuls: kept float (no weights to quantize)",
}


def vision_linears(adapter: Any) -> dict[str, Any]:
    """Linear layers of the export-facing vision module, by their path in it — the names the traced graph carries."""
    import torch

    module = adapter.vision_encoder()
    return {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def quantize_weights(modules: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel INT8 of every weight; the torch weights are replaced by their dequantized values (so the
    checkpoint computes what the INT8 graph computes)."""
    import torch

    out = {}
    for name, linear in modules.items():
        codes, scales = quantize_weight_int8(linear.weight.detach().float().numpy().T)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy((codes.astype(np.float32) * scales[None, :]).T.copy()))
        out[name] = (codes, scales)
    return out


@contextlib.contextmanager
def fake_quant_inputs(modules: dict[str, Any], input_scales: dict[str, float]) -> Iterator[None]:
    """While active, each listed linear sees its input as QuantizeLinear → DequantizeLinear (int8, zero point 0)
    would give it: round half to even, saturate (:func:`~edgelvm.models.checkpoint.activations.fake_quantize`, the
    function a loaded W8A8 checkpoint's quantizers apply). For trying scales (the observer sweep); a loaded checkpoint
    already carries its own (:mod:`edgelvm.models.checkpoint.activations`)."""
    from edgelvm.models.checkpoint.activations import fake_quantize

    def hook_for(scale: float) -> Any:
        def hook(_module: Any, args: tuple) -> tuple:
            return (fake_quantize(args[0], scale), *args[1:])

        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(s)) for n, s in input_scales.items() if n in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def input_scales_for(stats: Any, names: list[str], observer: str) -> dict[str, float]:
    return {name: activation_scale(observe(stats.layers[name].histogram, observer)) for name in names}


@dataclass
class SweepResult:
    chosen: str
    metric: str
    scores: dict[str, float]  # observer -> metric (higher is better)


def sweep_observers(
    adapter: Any, modules: dict[str, Any], stats: Any, encoder_inputs: list[dict[str, Any]], reference: list[Any],
    candidates: tuple[str, ...] = OBSERVERS,
) -> SweepResult:  # fmt: skip
    """Try each observer on the calibration images and keep the one whose features are closest (mean cosine per
    image token) to the float encoder's ``reference`` features."""
    import torch

    encoder = adapter.vision_encoder()
    scores = {}
    for observer in candidates:
        scales = input_scales_for(stats, list(modules), observer)
        cosines = []
        with torch.no_grad(), fake_quant_inputs(modules, scales):
            for inputs, ref in zip(encoder_inputs, reference):
                got = encoder(**inputs).float()
                cosines.append(torch.nn.functional.cosine_similarity(got, ref, dim=-1).flatten())
        scores[observer] = float(torch.cat(cosines).mean())
    chosen = max(scores, key=lambda k: scores[k])
    return SweepResult(chosen, "feature cosine vs fp32 (mean over image tokens)", scores)


def sweep_observers_on_answers(
    adapter: Any, modules: dict[str, Any], stats: Any, eval_set: Any, batch_size: int,
    candidates: tuple[str, ...] = OBSERVERS,
) -> SweepResult:  # fmt: skip
    """Like :func:`sweep_observers`, scored by the task instead: the whole model's teacher-forced answer-token
    accuracy on ``eval_set`` (the next-token argmax at each answer position against the reference answer)."""
    import torch

    from edgelvm.calibration.dataset import iter_labeled_batches

    batches = list(iter_labeled_batches(adapter, eval_set, batch_size))
    scores = {}
    for observer in candidates:
        scales = input_scales_for(stats, list(modules), observer)
        hits = total = 0
        with torch.no_grad(), fake_quant_inputs(modules, scales):
            for inputs, labels, _rows in batches:
                logits = adapter.model(**inputs).logits[:, :-1]
                target = labels[:, 1:]
                valid = target != -100
                hits += int(((logits.argmax(-1) == target) & valid).sum())
                total += int(valid.sum())
        scores[observer] = hits / max(total, 1)
    chosen = max(scores, key=lambda k: scores[k])
    return SweepResult(chosen, "answer-token accuracy on the eval data (teacher-forced)", scores)


def records(weights: dict[str, tuple[np.ndarray, np.ndarray]], scales: dict[str, float]) -> dict[str, Int8Linear]:
    return {name: Int8Linear(codes, w_scales, float(scales[name])) for name, (codes, w_scales) in weights.items()}
