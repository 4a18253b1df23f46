"""Image inputs of cross-attention decoders (``preprocess.image_placement = "cross_attention"``).

Flamingo-style models (Idefics) do not splice image features into the token embeddings: every decoder step takes
the images' states and, per position, which images it attends to. This module builds both from the manifest's
``preprocess.cross_attention`` section:

- ``states [B, I, L, D]``: each request's images' features (``L = preprocess.tokens_per_image``), zero-padded to the
  batch's largest image count ``I`` (at least 1: a request without images attends to nothing);
- ``mask [B, S, I]`` (int64 0/1) by the section's ``mask_rule``; generated tokens repeat the prompt's last row.

Mask rules (``MASK_RULES``):

- ``latest_image``: a position attends to the latest image at or before it (its image token included); after a
  ``reset_token_ids`` token (end of document) it attends to none until the next image token. This is
  ``IdeficsProcessor``'s ``image_attention_mask``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelvm.errors import BundleError
from edgelvm.runtime.kv_cache import left_pad


def latest_image_mask(
    ids: list[int], num_images: int, columns: int, image_token_id: int, reset_token_ids: list[int]
) -> np.ndarray:
    """``[len(ids), columns]``: one-hot of the latest image seen (none before the first image or after a reset)."""
    mask = np.zeros((len(ids), columns), dtype=np.int64)
    count, reset = -1, False
    resets = set(reset_token_ids)
    for position, token in enumerate(ids):
        if token == image_token_id:
            count += 1
            reset = False
        if not reset and 0 <= count < min(num_images, columns):
            mask[position, count] = 1
        if token in resets:
            reset = True
    return mask


MASK_RULES = {"latest_image": latest_image_mask}


class CrossAttentionInputs:
    """The rule of one bundle (``preprocess.cross_attention``)."""

    def __init__(self, section: dict[str, Any], image_token_id: int, tokens_per_image: int) -> None:
        rule = section.get("mask_rule")
        if rule not in MASK_RULES:
            raise BundleError(
                f"cross-attention mask rule {rule!r} is not implemented by this edgelvm (it knows: "
                f"{', '.join(MASK_RULES)})",
                where="edgelvm.json: preprocess.cross_attention.mask_rule",
                fix="upgrade edgelvm (`pip install -U edgelvm`)",
            )
        self.states_name, self.mask_name = section["inputs"]
        self.rule = MASK_RULES[rule]
        self.reset_token_ids = [int(t) for t in section.get("reset_token_ids", [])]
        self.feature_dim = int(section["feature_dim"])
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image

    def inputs(self, prompts: list[list[int]], images: Any, features: list[list[np.ndarray]], dtype: Any) -> CrossBatch:
        """The loop's per-step inputs (a :class:`~edgelvm.runtime.generate.StepInputs`) for a batch."""
        return self.batch(prompts, features, dtype)

    def batch(self, prompts: list[list[int]], features: list[list[np.ndarray]], dtype: Any) -> CrossBatch:
        """The inputs of one generation: ``features[r]`` are request ``r``'s images' ``[L, D]`` features."""
        columns = max(1, max(len(f) for f in features))
        states = np.zeros((len(prompts), columns, self.tokens_per_image, self.feature_dim), dtype=dtype)
        for row, images in enumerate(features):
            for index, image in enumerate(images):
                states[row, index] = image.reshape(self.tokens_per_image, self.feature_dim)
        masks = [
            self.rule(ids, len(images), columns, self.image_token_id, self.reset_token_ids)
            for ids, images in zip(prompts, features)
        ]
        return CrossBatch(self.states_name, self.mask_name, states, masks)


@dataclass
class CrossBatch:
    states_name: str
    mask_name: str
    states: np.ndarray  # [B, I, L, D]
    masks: list[np.ndarray]  # per row [S_r, I]

    def shared_prefix(self) -> int:
        """0: equal token embeddings do not mean equal images here, so a batch never shares a prefill."""
        return 0

    def prompt(self, rows: Sequence[int], start: int, stop: int | None = None) -> dict[str, np.ndarray]:
        """Inputs for a step feeding ``masks[r][start:stop]``, left-padded as the backend pads the embeddings."""
        mask = left_pad([self.masks[r][start:stop] for r in rows], axis=0)
        return {self.states_name: self.states[list(rows)], self.mask_name: mask}

    def prefill(self, cached: int) -> dict[str, np.ndarray]:
        """Every row's prompt after its first ``cached`` positions."""
        return self.prompt(range(len(self.masks)), cached)

    def decode(self, step: int) -> dict[str, np.ndarray]:
        """Inputs for a one-token step: each row's last prompt row of the mask."""
        mask = np.stack([m[-1:] for m in self.masks])
        return {self.states_name: self.states, self.mask_name: mask}


def cross_attention_inputs(spec: Any) -> CrossAttentionInputs | None:
    """The bundle's cross-attention inputs, or None where image features are spliced into the embeddings."""
    if spec.image_placement != "cross_attention":
        return None
    if not spec.cross_attention:
        raise BundleError(
            "image_placement is 'cross_attention' but the preprocess section has no 'cross_attention' entry",
            where="edgelvm.json: preprocess",
            fix="re-export the bundle with `edgelvm export`",
        )
    return CrossAttentionInputs(spec.cross_attention, spec.image_token_id, spec.tokens_per_image)
