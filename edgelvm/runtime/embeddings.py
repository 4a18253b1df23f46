"""The token embedding table: a memory-mapped ``.npy`` of float rows, or of integer codes with per-block scales.

Why the runtime gathers (numpy, no graph call): a prompt reads a few hundred rows of a table that can be hundreds of
MB, so only those pages are touched. A coded table (``GraphSpec.codes``: INT8 rows, or a tied LM head's block-wise
INT4/INT8 codes) is gathered the same way and dequantized row by row: ``(code - zero_point) * scale``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.manifest import GraphSpec


class EmbeddingTable:
    def __init__(self, bundle_dir: Path, spec: GraphSpec) -> None:
        self.data = np.load(bundle_dir / spec.file, mmap_mode="r")
        self.codes = spec.codes
        if self.codes is not None:
            self.scales = np.load(bundle_dir / self.codes["scales"], mmap_mode="r")
            zero_points = self.codes.get("zero_points")
            self.zero_points = np.load(bundle_dir / zero_points, mmap_mode="r") if zero_points else None

    @property
    def width(self) -> int:
        return int(self.codes["width"]) if self.codes is not None else int(self.data.shape[-1])

    def rows(self, ids: np.ndarray, dtype: Any) -> np.ndarray:
        """``[len(ids), width]`` rows of ``ids`` (any integer array, flattened) in ``dtype``."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.codes is None:
            return np.asarray(self.data[ids], dtype=dtype)
        bits, block = int(self.codes["bits"]), int(self.codes["block_size"])
        packed = np.asarray(self.data[ids])  # [n, blocks, block * bits / 8]
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1) if bits == 4 else packed
        codes = codes.reshape(len(ids), -1, block).astype(np.float32)
        zero = float(1 << (bits - 1)) if self.zero_points is None else self.zero_points[ids][..., None]
        rows = (codes - zero) * np.asarray(self.scales[ids])[..., None]
        return rows.reshape(len(ids), -1)[:, : self.width].astype(dtype, copy=False)
