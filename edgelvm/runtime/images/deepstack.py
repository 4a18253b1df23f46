"""DeepStack inputs (``preprocess.deepstack``): image features that also enter the first decoder layers.

Qwen3-VL's vision tower hands the language model, besides each image token's embedding, one more feature per image
token from each of ``layers`` intermediate vision blocks; decoder layer ``i < layers`` adds feature ``i`` to its
output at the image-token positions (HF's ``Qwen3VLTextModel`` with ``deepstack_visual_embeds``). The bundle says so as
data: ``preprocess.deepstack = {"input": name, "layers": L, "feature_dim": E}``. Then:

- the vision graph returns ``[tokens, (1 + L) * E]`` per image: the first ``E`` columns are the tokens' embeddings
  (spliced into the prompt as for every family), the rest the ``L`` deepstack features, layer by layer;
- the decoder graph takes ``input [B, S, L, E]`` every step: each position's deepstack features, zeros at text
  positions, at padding and at generated tokens (so the decoder adds them everywhere: ``x + 0`` is ``x``).

Equal embeddings do not imply equal deepstack features in principle, so the shared prefix of a batch also requires
them equal. A chat turn whose images are already in the KV cache passes no features: its new positions are text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelvm.errors import BundleError


class DeepstackRule:
    """The rule of one bundle (``preprocess.deepstack``)."""

    def __init__(self, section: dict[str, Any], image_token_id: int) -> None:
        try:
            self.name = str(section["input"])
            self.layers = int(section["layers"])
            self.feature_dim = int(section["feature_dim"])
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(
                f"preprocess.deepstack is incomplete ({err!r})",
                where="edgelvm.json: preprocess.deepstack",
                fix="re-export the bundle with `edgelvm export`",
            ) from None
        self.image_token_id = image_token_id

    def inputs(
        self, prompts: list[list[int]], images: Any, features: list[list[np.ndarray]], dtype: Any
    ) -> DeepstackInputs:
        """The loop's per-step inputs for a batch: ``features[r]`` are request ``r``'s images' ``[tokens, (1 + L) E]``
        vision-graph outputs in placeholder order (empty: no image among the positions that will be fed)."""
        width, layers = self.feature_dim, self.layers
        positions, values = [], []
        for ids, row in zip(prompts, features):
            where = np.flatnonzero(np.asarray(ids) == self.image_token_id)
            if not row:
                positions.append(where[:0])
                values.append(np.zeros((0, layers, width), dtype=dtype))
                continue
            wide = np.concatenate([f.reshape(-1, f.shape[-1]) for f in row])
            if wide.shape != (len(where), (1 + layers) * width):
                raise BundleError(
                    f"the vision graph's features are {list(wide.shape)} for {len(where)} image tokens; DeepStack "
                    f"with {layers} layers of width {width} needs [{len(where)}, {(1 + layers) * width}]",
                    where="edgelvm.json: preprocess.deepstack",
                    fix="re-export the bundle with `edgelvm export`",
                )
            positions.append(where)
            values.append(wide[:, width:].reshape(-1, layers, width).astype(dtype, copy=False))
        return DeepstackInputs(self.name, [len(ids) for ids in prompts], positions, values, layers, width, dtype)


@dataclass
class DeepstackInputs:
    """``name [B, S, L, E]`` per step: each row's features at its image positions, zeros elsewhere (left-padded)."""

    name: str
    lengths: list[int]  # per row: prompt length
    positions: list[np.ndarray]  # per row: image-token positions with features
    values: list[np.ndarray]  # per row: [len(positions), L, E]
    layers: int
    width: int
    dtype: Any

    def _dense(self, row: int, start: int, stop: int) -> np.ndarray:
        out = np.zeros((max(stop - start, 0), self.layers, self.width), dtype=self.dtype)
        where = self.positions[row]
        inside = (where >= start) & (where < stop)
        out[where[inside] - start] = self.values[row][inside]
        return out

    def shared_prefix(self) -> int:
        """Leading positions where every row's features are equal (rows without images: all zeros)."""
        length = min(self.lengths)
        first = self._dense(0, 0, length)
        shared = length
        for row in range(1, len(self.lengths)):
            same = (self._dense(row, 0, length) == first).all(axis=(1, 2))
            if not same.all():
                shared = min(shared, int(np.argmin(same)))
        return shared

    def prompt(self, rows: Sequence[int], start: int, stop: int | None = None) -> dict[str, np.ndarray]:
        chunks = [self._dense(r, start, self.lengths[r] if stop is None else min(stop, self.lengths[r])) for r in rows]
        seq = max(len(c) for c in chunks)
        out = np.zeros((len(chunks), seq, self.layers, self.width), dtype=self.dtype)
        for index, chunk in enumerate(chunks):  # left padding, as the backend pads the embeddings
            out[index, seq - len(chunk) :] = chunk
        return {self.name: out}

    def decode(self, step: int) -> dict[str, np.ndarray]:
        """Generated tokens are text: zeros."""
        return {self.name: np.zeros((len(self.lengths), 1, self.layers, self.width), dtype=self.dtype)}


def deepstack_rule(spec: Any) -> DeepstackRule | None:
    """The bundle's DeepStack rule, or None where the vision graph's features are the token embeddings only."""
    section = getattr(spec, "deepstack", None)
    return DeepstackRule(section, spec.image_token_id) if section else None
