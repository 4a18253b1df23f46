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

from edgelvm.errors import BackendError

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

    def drop(self, count: int) -> None:
        """Forget the last ``count`` positions of every row (drafted tokens the target rejected); rows may hold
        different lengths (the fused decoder's right-padded cache), so this is not a :meth:`crop` to one length."""

    def fill_from(self, prefix: Any) -> None:
        """Start every row from row 0 of a batch-1 cache of the same kind (a prefix a batch shares)."""


class Backend(Protocol):
    """Runs one bundle's vision and decoder graphs."""

    name: str
    #: Whether :meth:`new_cache` gives caches that crop (host memory): speculative decoding rewinds rejected tokens
    caches_crop: bool
    #: The largest ``last`` :meth:`step` takes: 1 where the decoder returns each row's last logits only (a bundle
    #: exported before ``logits_keep``, a TensorRT engine, a prefix-LM decoder), else the context length.
    max_last_logits: int

    @property
    def embed_dtype(self) -> Any:
        """The dtype of the decoder's ``inputs_embeds``."""

    def encode_images(self, pixel_values: np.ndarray, inputs: Mapping[str, np.ndarray] = NO_INPUTS) -> np.ndarray:
        """The vision graph's features; ``inputs``: its inputs besides ``pixel_values`` by name (patch positions)."""

    def new_cache(self, batch: int) -> KVCache:
        """An empty cache for ``batch`` rows, sized for the bundle's context."""

    def step(
        self, rows: list[np.ndarray], cache: Any, inputs: Mapping[str, np.ndarray] = NO_INPUTS, *, last: int = 1
    ) -> np.ndarray:
        """Append ``rows[r]`` (``[S_r, E]`` embeddings) to row ``r`` of ``cache``, left-padded; return each row's
        last logits ``[B, vocab]``, or with ``last > 1`` the logits of each row's last ``last`` positions ``[B,
        last, vocab]`` (in order; speculative decoding verifies drafted tokens with them). ``last`` is at most the
        fewest tokens a row feeds and at most :attr:`max_last_logits` (:func:`check_last` says why not). ``inputs``:
        the decoder graph's further inputs by name, batched and left-padded like the embeddings (M-RoPE
        ``position_ids``, which replace the 1-D positions counted from the mask; cross-attention states and
        mask)."""


#: Why a backend's :attr:`Backend.max_last_logits` is 1, and the fix: ``(message, fix)``.
LastLogitsLimit = tuple[str, str]


def check_last(last: int, rows: list[np.ndarray], most: int, limit: LastLogitsLimit | None, where: Any) -> None:
    """Refuse a ``last`` a backend cannot return: beyond ``most`` (``limit``: why, and the fix), or beyond the
    tokens a row feeds (its earlier positions would be padding or the previous step's)."""
    if last == 1:
        return
    if not isinstance(last, (int, np.integer)) or last < 1:
        raise BackendError(f"last must be a positive int, got {last!r}", where="step(last=...)",
                           fix="ask for the logits of at least the last position (last=1)")  # fmt: skip
    if last > most:
        why, fix = limit or (f"the context holds {most} positions", "ask for fewer positions")
        raise BackendError(f"last={last}: {why}", where=where, fix=fix)
    fewest = min((len(row) for row in rows), default=0)
    if last > fewest:
        raise BackendError(
            f"last={last} is more positions than the step feeds ({fewest} tokens in its shortest row)",
            where="step(last=...)",
            fix="feed at least `last` tokens in every row of the step",
        )
