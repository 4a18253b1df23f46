"""Bidirectional attention within each image's tokens (``manifest.attention = "image_bidirectional"``, Gemma 3).

transformers' ``token_type_ids`` make the tokens of one image (a run of image tokens) attend to each other both
ways, the rest causally. The decoder graph takes ``image_blocks [batch, seq]`` (int64): 0 for a text token, ``k > 0``
for the tokens of the ``k``-th image of the row; it masks ``causal OR same block`` within the step. Two rules follow
for the loop, both enforced here:

- an image's tokens are fed in ONE decoder step (a token cannot attend to keys that are not computed yet): a step
  that would start or stop inside an image's run is refused (:class:`~edgelvm.errors.BackendError`);
- a batch shares a prefix (prefilled once) only up to the first image that is not the same in every row, and never
  into an image's run.

Generated tokens are text: their ``image_blocks`` are 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelvm.errors import BackendError
from edgelvm.manifest import Manifest
from edgelvm.runtime.kv_cache import left_pad

#: The decoder graph's input (``models/gemma3.py`` exports it under this name).
IMAGE_BLOCKS = "image_blocks"


def image_blocks(ids: Sequence[int], image_token_id: int) -> np.ndarray:
    """``[len(ids)]`` int64: 0 for text, ``k`` (1-based) for the ``k``-th run of image tokens
    (transformers' ``get_block_sequence_ids_for_mask`` + 1)."""
    is_image = np.asarray(ids, dtype=np.int64) == image_token_id
    starts = is_image & ~np.concatenate([[False], is_image[:-1]])
    return np.where(is_image, np.cumsum(starts), 0).astype(np.int64)


class ImageBlockRule:
    """The rule of one bundle: which token id marks an image's positions."""

    def __init__(self, image_token_id: int) -> None:
        self.image_token_id = int(image_token_id)

    def inputs(self, prompts: list[list[int]], images: Any, features: list[list[np.ndarray]], dtype: Any) -> Blocks:
        """The loop's per-step inputs (a :class:`~edgelvm.runtime.generate.StepInputs`) for a batch."""
        return Blocks([image_blocks(ids, self.image_token_id) for ids in prompts], prompts, features)


@dataclass
class Blocks:
    blocks: list[np.ndarray]  # per row [S_r]
    prompts: list[list[int]]
    features: list[list[np.ndarray]]  # per row, its images' features ([] where the caller has none at hand)

    def shared_prefix(self) -> int:
        """Leading positions whose ids are equal in every row, cut back to the start of the first image that is not
        bitwise the same image in every row or that the cut would split."""
        length = min(len(p) for p in self.prompts)
        first = np.asarray(self.prompts[0][:length])
        same = np.ones(length, dtype=bool)
        for ids in self.prompts[1:]:
            same &= np.asarray(ids[:length]) == first
        shared = int(length if same.all() else np.argmin(same))
        blocks = self.blocks[0]
        for k in range(1, int(blocks[:shared].max(initial=0)) + 1):
            run = np.flatnonzero(blocks == k)
            start, end = int(run[0]), int(run[-1]) + 1
            if end > shared or not self._same_image(k - 1):
                return start
        return shared

    def _same_image(self, index: int) -> bool:
        try:
            mine = [features[index] for features in self.features]
        except IndexError:  # features not given (a chat turn's plan): assume different
            return False
        return all(f.shape == mine[0].shape and np.array_equal(f, mine[0]) for f in mine[1:])

    def prompt(self, rows: Sequence[int], start: int, stop: int | None = None) -> dict[str, np.ndarray]:
        for row in rows:
            blocks = self.blocks[row]
            for cut in (start, stop):
                if cut is not None and 0 < cut < len(blocks) and blocks[cut - 1] == blocks[cut] > 0:
                    raise BackendError(
                        f"a decoder step would start or stop at position {cut}, inside image {int(blocks[cut])}'s "
                        "tokens, which attend to each other both ways and must be fed in one step",
                        where="prefill",
                        fix="feed the prompt in one step (rebuild TensorRT engines with a --prefill-chunk that "
                        "holds the whole prompt)",
                    )
        return {IMAGE_BLOCKS: left_pad([self.blocks[r][start:stop] for r in rows], axis=0)}

    def decode(self, step: int) -> dict[str, np.ndarray]:
        return {IMAGE_BLOCKS: np.zeros((len(self.blocks), 1), dtype=np.int64)}


def image_block_rule(manifest: Manifest) -> ImageBlockRule | None:
    """The rule for ``attention = "image_bidirectional"``; None for the other attention kinds."""
    if manifest.attention != "image_bidirectional":
        return None
    return ImageBlockRule(manifest.preprocess.image_token_id)
