"""Block-wise INT4 weights: one representation, packed the way ONNX Runtime's ``com.microsoft.MatMulNBits`` reads it.

A linear layer ``y = x @ W`` with ``W`` of shape ``[K, N]`` is quantized along ``K`` in blocks of ``block_size``:
each (column, block) has a scale (and, asymmetric, a zero point); codes are 4-bit unsigned, stored two per byte,
low nibble first along ``K``. Dequantized: ``(code - zero_point) * scale`` (zero point 8 when symmetric).

This module is numpy only, so the representation can be inspected, tested and written without torch; RTN lives
here, the calibrated algorithms (AWQ, GPTQ) produce the same :class:`Int4Weight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgelvm.errors import ConfigError

BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass
class Int4Weight:
    packed: np.ndarray  # uint8 [N, k_blocks, block_size // 2]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, k_blocks] (unpacked codes), None = symmetric (8)
    k: int
    n: int
    block_size: int

    @property
    def k_blocks(self) -> int:
        return self.packed.shape[1]

    def codes(self) -> np.ndarray:
        """Unpacked codes ``[N, k_blocks * block_size]`` (padding included)."""
        low = self.packed & 0x0F
        high = self.packed >> 4
        return np.stack([low, high], axis=-1).reshape(self.n, -1)

    def dequantize(self) -> np.ndarray:
        """The float weight ``[K, N]`` this represents (what a reference matmul multiplies by)."""
        codes = self.codes().reshape(self.n, self.k_blocks, self.block_size).astype(np.float32)
        zp = 8.0 if self.zero_points is None else self.zero_points[..., None].astype(np.float32)
        w = (codes - zp) * self.scales[..., None]
        return w.reshape(self.n, -1)[:, : self.k].T.copy()

    def zero_points_packed(self) -> np.ndarray | None:
        """Zero points as MatMulNBits' uint8 input: two 4-bit values per byte, ``[N * ceil(k_blocks / 2)]``."""
        if self.zero_points is None:
            return None
        zp = self.zero_points
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.full((self.n, 1), 8, np.uint8)], axis=1)
        return (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


def concat_columns(weights: list[Int4Weight]) -> Int4Weight:
    """Side-by-side ``[K, N1 + N2 + ...]`` (e.g. q, k, v fused into one matmul): exact, since every column keeps its
    own blocks."""
    first = weights[0]
    if any(w.k != first.k or w.block_size != first.block_size for w in weights):
        raise ValueError("only weights with the same K and block size can be concatenated")
    if len({w.zero_points is None for w in weights}) > 1:
        raise ValueError("cannot mix symmetric and asymmetric weights")
    zp = None if first.zero_points is None else np.concatenate([w.zero_points for w in weights])
    return Int4Weight(
        np.concatenate([w.packed for w in weights]),
        np.concatenate([w.scales for w in weights]),
        zp,
        first.k,
        sum(w.n for w in weights),
        first.block_size,
    )


def check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ConfigError(
            f"block size {block_size} is not supported",
            where="--group-size",
            fix=f"use one of {', '.join(map(str, BLOCK_SIZES))} (MatMulNBits needs a power of two >= 16)",
        )


def int4_params(
    w: np.ndarray, block_size: int = 128, symmetric: bool = True, clip: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Block scales ``[N, k_blocks]`` (and asymmetric zero points) for ``w`` (``[K, N]``), each block's range
    optionally shrunk by ``clip`` (``[N, k_blocks]`` ratios in (0, 1]; AWQ's clipping search picks them)."""
    blocks, _ = _blocks(w, block_size)
    ratio = 1.0 if clip is None else np.asarray(clip, np.float32)
    if symmetric:
        absmax = np.abs(blocks).max(-1) * ratio
        return np.where(absmax > 0, absmax / 7.0, 1.0).astype(np.float32), None
    lo = np.minimum(blocks.min(-1), 0.0) * ratio
    hi = np.maximum(blocks.max(-1), 0.0) * ratio
    scales = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
    return scales, np.clip(np.rint(-lo / scales), 0, 15).astype(np.uint8)


def quantize_with_params(
    w: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, block_size: int
) -> Int4Weight:
    """Codes of ``w`` (``[K, N]``) for given block scales / zero points (None = symmetric, 8): round to nearest and
    saturate. Exact for a ``w`` that already lies on the grid (GPTQ's output)."""
    blocks, k = _blocks(w, block_size)
    n, k_blocks, _ = blocks.shape
    zp = 8 if zero_points is None else zero_points[..., None]
    codes = np.clip(np.rint(blocks / scales[..., None]) + zp, 0, 15).astype(np.uint8)
    flat = codes.reshape(n, k_blocks, block_size // 2, 2)
    packed = (flat[..., 0] | (flat[..., 1] << 4)).astype(np.uint8)
    # contiguous: safetensors.numpy writes an array's buffer as is
    zero_points = None if zero_points is None else np.ascontiguousarray(zero_points)
    return Int4Weight(np.ascontiguousarray(packed), np.ascontiguousarray(scales), zero_points, k, n, block_size)


def quantize_rtn(
    w: np.ndarray, block_size: int = 128, symmetric: bool = True, clip: np.ndarray | None = None
) -> Int4Weight:
    """Round-to-nearest INT4 of ``w`` (``[K, N]``). ``K`` not divisible by ``block_size`` is zero-padded (the
    padding is quantized exactly to zero and multiplies nothing)."""
    scales, zero_points = int4_params(w, block_size, symmetric, clip)
    return quantize_with_params(w, scales, zero_points, block_size)


def _blocks(w: np.ndarray, block_size: int) -> tuple[np.ndarray, int]:
    """``w`` (``[K, N]``) as ``[N, k_blocks, block_size]``, K zero-padded; and the true K."""
    check_block_size(block_size)
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((k_blocks * block_size, n), np.float32)
    padded[:k] = w
    return padded.T.reshape(n, k_blocks, block_size), k


def matmul_nbits_node(
    name: str, activation: str, output: str, weight: Int4Weight, accuracy_level: int = 0
) -> tuple[object, list[object]]:
    """An ONNX ``com.microsoft.MatMulNBits`` node and its initializers for ``activation @ weight``."""
    from onnx import helper, numpy_helper

    inits = [
        numpy_helper.from_array(weight.packed, f"{name}.q4"),
        numpy_helper.from_array(weight.scales.reshape(-1), f"{name}.scales"),
    ]
    inputs = [activation, f"{name}.q4", f"{name}.scales"]
    zp = weight.zero_points_packed()
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, f"{name}.zp"))
        inputs.append(f"{name}.zp")
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        [output],
        name=name,
        domain="com.microsoft",
        K=weight.k,
        N=weight.n,
        bits=4,
        block_size=weight.block_size,
        accuracy_level=accuracy_level,
    )
    return node, inits
