"""Left padding for decoder graphs that take ``attention_mask`` + ``position_ids`` (concatenating KV caches).

The cache remembers which of its positions hold real tokens in each row. A step appends ``max(len(row))`` positions
to every row, left-padding the shorter rows; positions count only real tokens (``cumsum(mask) - 1``), so a padding
gap anywhere — before a prompt, or between a shared prefix and a row's own suffix — changes nothing for real tokens.
Families whose positions are not 1-D (M-RoPE) pass them explicitly per row; padding then gets position 0, hidden by
the mask.
"""

from __future__ import annotations

import numpy as np


class LeftPadState:
    def __init__(self, batch: int, capacity: int) -> None:
        self.mask = np.zeros((batch, capacity), dtype=np.int64)
        self.length = 0

    def pack(
        self, rows: list[np.ndarray], dtype: np.dtype, positions: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(inputs_embeds [B, S, E], attention_mask [B, length + S], position_ids)`` for ``rows``.

        ``positions``: explicit per-row positions ``[P, S_r]`` (M-RoPE, ``runtime/positions.py``), left-padded into
        ``position_ids [P, B, S]`` (0 at padding, which the mask hides); without them ``position_ids [B, S]`` count
        the real tokens."""
        seq = max(len(r) for r in rows)
        start, end = self.length, self.length + seq
        embeds = np.zeros((len(rows), seq, rows[0].shape[-1]), dtype=dtype)
        self.mask[:, start:end] = 0
        for index, row in enumerate(rows):
            if len(row):
                embeds[index, seq - len(row) :] = row
                self.mask[index, end - len(row) : end] = 1
        mask = np.ascontiguousarray(self.mask[:, :end])
        if positions is not None:
            explicit = np.zeros((positions[0].shape[0], len(rows), seq), dtype=np.int64)
            for index, (row, pos) in enumerate(zip(rows, positions)):
                if pos.shape[1] != len(row):
                    raise ValueError(f"row {index}: {pos.shape[1]} positions for {len(row)} embeddings")
                if len(row):
                    explicit[:, index, seq - len(row) :] = pos
            return embeds, mask, explicit
        positions_1d = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, start:end]
        return embeds, mask, np.ascontiguousarray(positions_1d)

    def commit(self, new_length: int) -> None:
        self.length = new_length

    def crop(self, length: int) -> None:
        self.mask[:, length:] = 0
        self.length = min(self.length, length)

    def fill_from(self, prefix: LeftPadState) -> None:
        self.mask[:, : prefix.length] = prefix.mask[0, : prefix.length]
        self.length = prefix.length
