"""The integer weights a quantized checkpoint stores, as numpy values: what its sidecars hold and what the ONNX
writers and the torch side both read. numpy only, so they can be inspected, tested and written without torch; how
codes are *chosen* (RTN, AWQ, GPTQ, observers) is the quantize stage's business.

- :class:`Int4Weight`: block-wise INT4, packed the way ONNX Runtime's ``com.microsoft.MatMulNBits`` reads it. A linear
  ``y = x @ W`` with ``W`` of shape ``[K, N]`` is quantized along ``K`` in blocks of ``block_size``: each
  (column, block) has a scale (and, asymmetric, a zero point); codes are 4-bit unsigned, two per byte, low nibble
  first along ``K``. Dequantized: ``(code - zero_point) * scale`` (zero point 8 when symmetric).
- :class:`Int8Linear`: W8A8, per-output-channel symmetric weights and one symmetric input scale, in ONNX's ``MatMul``
  layout (``[K, N]``: the ONNX writer stores ``codes`` as they are and the torch side transposes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
