"""INT8 W8A8 linear layers: per-output-channel symmetric weights, one symmetric scale for the input activation.

Symmetric (zero point 0) on both sides because that is what TensorRT's explicit-quantization path accepts and what
ONNX Runtime's QDQ fusions turn into integer kernels; per-channel weights because ViT weight rows differ in range by
orders of magnitude. The layout is ONNX's ``MatMul`` layout (``y = x @ W``, ``W`` of shape ``[K, N]``), so the
ONNX writer (``edgelvm.export.qdq``) stores ``codes`` as they are and the torch side transposes. The stored form is
the checkpoint's :class:`~edgelvm.models.checkpoint.codes.Int8Linear`; this module chooses its values (numpy only).
"""

from __future__ import annotations

import numpy as np

QMAX = 127


def quantize_weight_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric INT8 of ``w`` (``[K, N]``): ``(codes int8 [K, N], scales float32 [N])``.

    A channel of zeros gets scale 1 (its codes are 0 either way) so nothing divides by zero downstream."""
    w = np.asarray(w, dtype=np.float32)
    absmax = np.abs(w).max(axis=0)
    scales = np.where(absmax > 0, absmax / QMAX, 1.0).astype(np.float32)
    codes = np.clip(np.rint(w / scales[None, :]), -QMAX, QMAX).astype(np.int8)
    return np.ascontiguousarray(codes), np.ascontiguousarray(scales)


def fake_quantize_activation(x: np.ndarray, scale: float) -> np.ndarray:
    """What ``QuantizeLinear`` → ``DequantizeLinear`` (int8, zero point 0) computes: round half to even, saturate."""
    return np.clip(np.rint(x / np.float32(scale)), -128, 127).astype(np.float32) * np.float32(scale)


def activation_scale(amax: float) -> float:
    """The per-tensor scale for an observed (clipped) absolute maximum."""
    return float(amax) / QMAX if amax > 0 else 1.0
