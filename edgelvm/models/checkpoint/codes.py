"""The integer weights a quantized checkpoint stores, as numpy values: what its sidecars hold and what the ONNX
writers and the torch side both read. numpy only, so they can be inspected, tested and written without torch; how
codes are *chosen* (RTN, AWQ, GPTQ, observers) is the quantize stage's business.

- :class:`Int4Weight`: block-wise INT4, packed the way ONNX Runtime's ``com.microsoft.MatMulNBits`` reads it. A linear
  ``y = x @ W`` with ``W`` of shape ``[K, N]`` is quantized along ``K`` in blocks of ``block_size``: each
  (column, block) has a scale (and, asymmetric, a zero point); codes are 4-bit unsigned, two per byte, low nibble
  first along ``K``. Dequantized: ``(code - zero_point) * scale`` (zero point 8 when symmetric). The same class holds
  block-wise INT8 (``bits=8``: one code per byte, zero point 128 when symmetric; MatMulNBits reads it with
  ``bits=8``) — the LM head's and the embedding table's 8-bit option.
- :class:`Int8Linear`: W8A8, per-output-channel symmetric weights and one symmetric input scale, in ONNX's ``MatMul``
  layout (``[K, N]``: the ONNX writer stores ``codes`` as they are and the torch side transposes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Int4Weight:
    packed: np.ndarray  # uint8 [N, k_blocks, block_size * bits // 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, k_blocks] (unpacked codes), None = symmetric (2 ** (bits - 1))
    k: int
    n: int
    block_size: int
    bits: int = 4  # 4 (two codes per byte) or 8

    @property
    def k_blocks(self) -> int:
        return self.packed.shape[1]

    @property
    def symmetric_zero_point(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads: codes, scales and packed zero points."""
        zp = self.zero_points_packed()
        return self.packed.nbytes + self.scales.nbytes + (0 if zp is None else zp.nbytes)

    def codes(self) -> np.ndarray:
        """Unpacked codes ``[N, k_blocks * block_size]`` (padding included)."""
        if self.bits == 8:
            return self.packed.reshape(self.n, -1)
        low = self.packed & 0x0F
        high = self.packed >> 4
        return np.stack([low, high], axis=-1).reshape(self.n, -1)

    def dequantize(self) -> np.ndarray:
        """The float weight ``[K, N]`` this represents (what a reference matmul multiplies by)."""
        return self.dequantize_rows(slice(None)).T.copy()

    def dequantize_rows(self, rows: Any) -> np.ndarray:
        """Rows ``[len(rows), K]`` of the ``[N, K]`` weight (a gather from an embedding table stored this way)."""
        packed = self.packed[rows]
        count = packed.shape[0]
        if self.bits == 8:
            codes = packed.astype(np.float32)
        else:
            codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).astype(np.float32)
        codes = codes.reshape(count, self.k_blocks, self.block_size)
        zp = self.symmetric_zero_point if self.zero_points is None else self.zero_points[rows][..., None]
        w = (codes - zp) * self.scales[rows][..., None]
        return w.reshape(count, -1)[:, : self.k]

    def zero_points_packed(self) -> np.ndarray | None:
        """Zero points as MatMulNBits' uint8 input: two 4-bit values per byte, ``[N * ceil(k_blocks / 2)]``."""
        if self.zero_points is None:
            return None
        zp = self.zero_points
        if self.bits == 8:
            return np.ascontiguousarray(zp).reshape(-1)
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.full((self.n, 1), 8, np.uint8)], axis=1)
        return (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


def concat_columns(weights: list[Int4Weight]) -> Int4Weight:
    """Side-by-side ``[K, N1 + N2 + ...]`` (e.g. q, k, v fused into one matmul): exact, since every column keeps its
    own blocks."""
    first = weights[0]
    if any(w.k != first.k or w.block_size != first.block_size or w.bits != first.bits for w in weights):
        raise ValueError("only weights with the same K, block size and bits can be concatenated")
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
        first.bits,
    )


@dataclass
class Int8Linear:
    codes: np.ndarray  # int8 [K, N]
    weight_scales: np.ndarray  # float32 [N] (one per output channel)
    input_scale: float  # x ≈ clip(round(x / input_scale), -128, 127) * input_scale
    bias: np.ndarray | None = None  # float32 [N], kept in float (added after the matmul)

    @property
    def k(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n(self) -> int:
        return int(self.codes.shape[1])

    def dequantize(self) -> np.ndarray:
        """The float weight ``[K, N]`` the integer matmul stands for."""
        return self.codes.astype(np.float32) * self.weight_scales[None, :]
