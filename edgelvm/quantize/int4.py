"""Block-wise INT4 (and INT8) quantization: block scales / zero points and codes for a weight ``[K, N]``, round to
nearest.

The representation (packed the way ONNX Runtime's ``com.microsoft.MatMulNBits`` reads it) is the checkpoint's
:class:`~edgelvm.models.checkpoint.codes.Int4Weight`. This module is numpy only; RTN lives here, the calibrated
algorithms (AWQ, GPTQ) produce the same :class:`Int4Weight`.
"""

from __future__ import annotations

import numpy as np

from edgelvm.errors import ConfigError
from edgelvm.models.checkpoint.codes import Int4Weight

BLOCK_SIZES = (16, 32, 64, 128, 256)


def check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ConfigError(
            f"block size {block_size} is not supported",
            where="--group-size",
            fix=f"use one of {', '.join(map(str, BLOCK_SIZES))} (MatMulNBits needs a power of two >= 16)",
        )


def int4_params(
    w: np.ndarray, block_size: int = 128, symmetric: bool = True, clip: np.ndarray | None = None, bits: int = 4
) -> tuple[np.ndarray, np.ndarray | None]:
    """Block scales ``[N, k_blocks]`` (and asymmetric zero points) for ``w`` (``[K, N]``), each block's range
    optionally shrunk by ``clip`` (``[N, k_blocks]`` ratios in (0, 1]; AWQ's clipping search picks them)."""
    blocks, _ = _blocks(w, block_size)
    ratio = 1.0 if clip is None else np.asarray(clip, np.float32)
    top = (1 << bits) - 1  # 15 for INT4, 255 for INT8
    if symmetric:
        absmax = np.abs(blocks).max(-1) * ratio
        return np.where(absmax > 0, absmax / (top // 2), 1.0).astype(np.float32), None
    lo = np.minimum(blocks.min(-1), 0.0) * ratio
    hi = np.maximum(blocks.max(-1), 0.0) * ratio
    scales = np.where(hi > lo, (hi - lo) / top, 1.0).astype(np.float32)
    return scales, np.clip(np.rint(-lo / scales), 0, top).astype(np.uint8)


def quantize_with_params(
    w: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, block_size: int, bits: int = 4
) -> Int4Weight:
    """Codes of ``w`` (``[K, N]``) for given block scales / zero points (None = symmetric: 8, or 128 for INT8):
    round to nearest and saturate. Exact for a ``w`` that already lies on the grid (GPTQ's output)."""
    blocks, k = _blocks(w, block_size)
    n, k_blocks, _ = blocks.shape
    top = (1 << bits) - 1
    zp = (top + 1) // 2 if zero_points is None else zero_points[..., None]
    codes = np.clip(np.rint(blocks / scales[..., None]) + zp, 0, top).astype(np.uint8)
    if bits == 8:
        packed = codes
    else:
        flat = codes.reshape(n, k_blocks, block_size // 2, 2)
        packed = (flat[..., 0] | (flat[..., 1] << 4)).astype(np.uint8)
    # contiguous: safetensors.numpy writes an array's buffer as is
    zero_points = None if zero_points is None else np.ascontiguousarray(zero_points)
    return Int4Weight(np.ascontiguousarray(packed), np.ascontiguousarray(scales), zero_points, k, n, block_size, bits)


def quantize_rtn(
    w: np.ndarray, block_size: int = 128, symmetric: bool = True, clip: np.ndarray | None = None, bits: int = 4
) -> Int4Weight:
    """Round-to-nearest block-wise INT4 (``bits=8``: INT8) of ``w`` (``[K, N]``). ``K`` not divisible by
    ``block_size`` is zero-padded (the padding is quantized exactly to zero and multiplies nothing)."""
    if bits not in (4, 8):
        raise ConfigError(f"{bits}-bit weights", where="bits", fix="use 4 or 8")
    scales, zero_points = int4_params(w, block_size, symmetric, clip, bits)
    return quantize_with_params(w, scales, zero_points, block_size, bits)


def per_channel_block(k: int) -> int:
    """The block size that gives each output channel one scale (``K`` rounded up to even, for INT4 packing)."""
    return k + (k % 2)


def _blocks(w: np.ndarray, block_size: int) -> tuple[np.ndarray, int]:
    """``w`` (``[K, N]``) as ``[N, k_blocks, block_size]``, K zero-padded; and the true K. ``block_size`` is one of
    MatMulNBits' sizes, or :func:`per_channel_block` (tables gathered by the runtime, never a MatMulNBits input)."""
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    if block_size != per_channel_block(k):
        check_block_size(block_size)
    k_blocks = -(-k // block_size)
    padded = np.zeros((k_blocks * block_size, n), np.float32)
    padded[:k] = w
    return padded.T.reshape(n, k_blocks, block_size), k
