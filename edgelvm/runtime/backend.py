"""The seam between the generation loop and what runs the graphs: every backend (ONNX Runtime, TensorRT)
implements :class:`Backend` and its caches :class:`KVCache` in full, so the loop never asks what a backend can do.

What a backend cannot run (a fused decoder with a family's extra inputs, a TensorRT engine with vision inputs it
does not feed) is refused when it is constructed, not discovered per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

#: No extra graph inputs (the default of :meth:`Backend.step` and :meth:`Backend.encode_images`).
NO_INPUTS: Mapping[str, np.ndarray] = MappingProxyType({})


class KVCache(Protocol):
    """One generation's key/value cache, ``batch`` rows."""

    #: Whether :meth:`crop` and :meth:`fill_from` work (host caches); a device cache is prefilled in full instead.
    supports_reuse: bool
    #: Whether it holds fixed-size states (hybrid decoders) that absorb every position fed, padding included: it
    #: then rewinds only to saved points (:meth:`rewind_point`) and a shared prefix is forked only when every row's
    #: own tokens follow it without a padding gap.
    recurrent: bool

    @property
    def length(self) -> int:
        """Positions cached (the longest row)."""

    def rewind_point(self, length: int) -> int:
        """The longest prefix of at most ``length`` positions :meth:`crop` can keep (``length`` for keys and
        values; a hybrid cache's states only rewind to where they were saved: the end of its last prompt)."""

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (a chat history that did not change); a :meth:`rewind_point`."""

    def fill_from(self, prefix: Any) -> None:
        """Start every row from row 0 of a batch-1 cache of the same kind (a prefix a batch shares)."""


class Backend(Protocol):
    """Runs one bundle's vision and decoder graphs."""

    name: str

    @property
    def embed_dtype(self) -> Any:
        """The dtype of the decoder's ``inputs_embeds``."""

    def encode_images(self, pixel_values: np.ndarray, inputs: Mapping[str, np.ndarray] = NO_INPUTS) -> np.ndarray:
        """The vision graph's features; ``inputs``: its inputs besides ``pixel_values`` by name (patch positions)."""

    def new_cache(self, batch: int) -> KVCache:
        """An empty cache for ``batch`` rows, sized for the bundle's context."""

    def step(self, rows: list[np.ndarray], cache: Any, inputs: Mapping[str, np.ndarray] = NO_INPUTS) -> np.ndarray:
        """Append ``rows[r]`` (``[S_r, E]`` embeddings) to row ``r`` of ``cache``, left-padded; return each row's
        last logits ``[B, vocab]``. ``inputs``: the decoder graph's further inputs by name, batched and left-padded
        like the embeddings (M-RoPE ``position_ids``, which replace the 1-D positions counted from the mask;
        cross-attention states and mask)."""
