"""The KV caches of the ONNX Runtime backend, and the left padding of decoders that take a mask and positions.

- :class:`PingPongCache` (CPU, portable decoder): for each layer and key/value, two flat buffers sized for the full
  context. A step binds the first ``past`` positions of one as input and the first ``past + seq`` of the other as
  output (the ``[batch, heads, len, dim]`` tensor is a flat prefix of the buffer, so both views are contiguous), then
  the two swap. Nothing is allocated per token.
- :class:`DeviceCache` (CUDA, portable decoder): present outputs stay on the device and become the next past.
- :class:`InPlaceKVCache` (CPU, fused decoder): one buffer per layer and key/value, each row packed from position 0
  with its own length (GroupQueryAttention's right padding); a step writes only the new positions.

:class:`LeftPadState`: a step appends ``max(len(row))`` positions to every row, left-padding the shorter ones; 1-D
positions count only real tokens (``cumsum(mask) - 1``), so a padding gap anywhere — before a prompt, or between a
shared prefix and a row's own suffix — changes nothing for real tokens. A family's own per-row inputs (M-RoPE
positions, cross-attention masks) are left-padded the same way with :func:`left_pad`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgelvm.errors import BackendError
from edgelvm.manifest import KVCacheSpec


def left_pad(rows: Sequence[np.ndarray], axis: int, dtype: Any = np.int64) -> np.ndarray:
    """Stack per-row arrays along a new batch axis placed before ``axis`` (their sequence axis), each left-padded
    with zeros to the longest: ``[P, S_r]`` rows with ``axis=1`` → ``[P, B, S]``; ``[S_r, I]`` with ``axis=0`` →
    ``[B, S, I]``."""
    seq = max(r.shape[axis] for r in rows)
    shape = list(rows[0].shape)
    shape[axis] = seq
    shape.insert(axis, len(rows))
    out = np.zeros(shape, dtype=dtype)
    for index, row in enumerate(rows):
        target = (slice(None),) * axis + (index, slice(seq - row.shape[axis], seq))
        out[target] = row
    return out


class LeftPadState:
    """Which cached positions of each row hold real tokens."""

    def __init__(self, batch: int, capacity: int) -> None:
        self.mask = np.zeros((batch, capacity), dtype=np.int64)
        self.length = 0

    def pack(self, rows: list[np.ndarray], dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(inputs_embeds [B, S, E], attention_mask [B, length + S], position_ids [B, S])`` for ``rows``."""
        seq = max(len(r) for r in rows)
        start, end = self.length, self.length + seq
        embeds = np.zeros((len(rows), seq, rows[0].shape[-1]), dtype=dtype)
        self.mask[:, start:end] = 0
        for index, row in enumerate(rows):
            if len(row):
                embeds[index, seq - len(row) :] = row
                self.mask[index, end - len(row) : end] = 1
        mask = np.ascontiguousarray(self.mask[:, :end])
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, start:end]
        return embeds, mask, np.ascontiguousarray(positions)

    def crop(self, length: int) -> None:
        self.mask[:, length:] = 0
        self.length = min(self.length, length)

    def fill_from(self, prefix: LeftPadState) -> None:
        self.mask[:, : prefix.length] = prefix.mask[0, : prefix.length]
        self.length = prefix.length


def _np_dtype(name: str) -> Any:
    return {"float32": np.float32, "float16": np.float16}[name]


class PingPongCache:
    """Preallocated ping-pong key/value buffers for one generation (CPU); a hybrid decoder's fixed-size states
    ping-pong the same way (two zero-initialised buffers each, read one, write the other).

    States summarise every position fed, so they cannot be cropped like keys and values. The cache keeps a copy of
    them as they were after its latest multi-token step (a prefill: the end of a prompt) and can rewind exactly
    there (:meth:`rewind_point`): a chat turn whose history re-renders differently after the last prompt (the
    answer's tokens) restarts from that prompt's end instead of from scratch. The copy costs the states' bytes once
    (constant in context length)."""

    supports_reuse = True

    def __init__(self, spec: KVCacheSpec, batch: int, dtype: Any) -> None:
        self.spec, self.batch, self.length, self._read = spec, batch, 0, 0
        size = batch * spec.num_kv_heads * spec.max_length * spec.head_dim
        self._buffers = [[np.empty(size, dtype=dtype) for _ in range(2 * spec.num_layers)] for _ in range(2)]
        self._states = [[np.zeros((batch, *s.shape), _np_dtype(s.dtype)) for s in spec.states or []] for _ in range(2)]
        self._snapshot: tuple[int, list[np.ndarray]] = (0, [np.zeros_like(a) for a in self._states[0]])
        self.pad = LeftPadState(batch, spec.max_length)

    @property
    def recurrent(self) -> bool:
        """Whether fixed-size states absorb every position fed (padding included): then the cache cannot be cropped,
        and a row's own tokens must follow a shared prefix without a padding gap."""
        return bool(self.spec.states)

    def _view(self, which: int, index: int, length: int) -> np.ndarray:
        if index >= 2 * self.spec.num_layers:
            return self._states[which][index - 2 * self.spec.num_layers]
        shape = (self.batch, self.spec.num_kv_heads, length, self.spec.head_dim)
        return self._buffers[which][index][: int(np.prod(shape))].reshape(shape)

    def past(self, index: int) -> np.ndarray:
        return self._view(self._read, index, self.length)

    def target(self, index: int, new_length: int) -> np.ndarray:
        return self._view(1 - self._read, index, new_length)

    def advance(self, new_length: int) -> None:
        fed = new_length - self.length
        self._read, self.length = 1 - self._read, new_length
        self.pad.length = new_length
        if self.recurrent and fed > 1:  # the end of a prompt: where a chat turn can rewind to
            self._snapshot = (new_length, [state.copy() for state in self._states[self._read]])

    def rewind_point(self, length: int) -> int:
        """The longest prefix of at most ``length`` positions that :meth:`crop` can keep."""
        if not self.recurrent or length >= self.length:
            return min(length, self.length)
        return self._snapshot[0] if self._snapshot[0] <= length else 0

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (e.g. the part of a chat history that did not change); with states,
        ``length`` must be a :meth:`rewind_point`."""
        if length >= self.length:
            return
        if self.recurrent:
            if length not in (0, self._snapshot[0]):
                raise BackendError(
                    f"this decoder's recurrent / convolution states cannot be cropped to {length} positions: they "
                    f"summarise every position fed, and were saved only at {self._snapshot[0]}",
                    where="KV cache",
                    fix="crop to cache.rewind_point(length)",
                )
            saved = self._snapshot[1] if length else [np.zeros_like(a) for a in self._snapshot[1]]
            for mine, theirs in zip(self._states[1 - self._read], saved):
                mine[...] = theirs
        for index in range(2 * self.spec.num_layers):
            self.target(index, length)[...] = self.past(index)[:, :, :length]
        self.pad.crop(length)
        self.advance(length)

    def fill_from(self, prefix: Any) -> None:
        """Start every row from the same (batch-1) prefix: several questions about one image share its prefill."""
        for index in range(2 * self.spec.num_layers + len(self.spec.states or [])):
            self.target(index, prefix.length)[...] = prefix.past(index)  # broadcasts over the batch
        self.pad.fill_from(prefix.pad)
        self.advance(prefix.length)


def no_reuse(cache: Any) -> None:
    """``crop`` / ``fill_from`` of a device cache (``supports_reuse = False``): the loop never calls them."""
    raise BackendError(
        f"{type(cache).__name__} cannot crop or share a prefix (it needs device-side copies)",
        where="KV cache",
        fix="check cache.supports_reuse before reusing a cache",
    )


class DeviceCache:
    """CUDA: present tensors stay on the device and become the next step's past (ORT allocates them). Crop and
    prefix sharing need device-side copies that the ORT Python API does not offer: the runtime prefills in full."""

    supports_reuse = False

    def __init__(self, spec: KVCacheSpec, batch: int, dtype: Any) -> None:
        import onnxruntime as ort

        self.spec, self.batch, self.length = spec, batch, 0
        self.pad = LeftPadState(batch, spec.max_length)
        empty = (batch, spec.num_kv_heads, 0, spec.head_dim)
        self.values = [
            ort.OrtValue.ortvalue_from_shape_and_type(empty, dtype, "cuda", 0) for _ in range(2 * spec.num_layers)
        ]
        self.values += [  # a hybrid decoder's states start at zero
            ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, *s.shape), _np_dtype(s.dtype)), "cuda", 0)
            for s in spec.states or []
        ]

    @property
    def recurrent(self) -> bool:
        return bool(self.spec.states)

    def bind(self, binding: Any, past_names: list[str], present_names: list[str]) -> None:
        for value, past_name, present_name in zip(self.values, past_names, present_names):
            binding.bind_ortvalue_input(past_name, value)
            binding.bind_output(present_name, "cuda", 0)

    def collect(self, binding: Any, new_length: int) -> None:
        self.values = list(binding.get_outputs()[1:])
        self.length = self.pad.length = new_length

    def rewind_point(self, length: int) -> int:
        return 0  # nothing is kept: supports_reuse is False

    def crop(self, length: int) -> None:
        no_reuse(self)

    def fill_from(self, prefix: Any) -> None:
        no_reuse(self)


class InPlaceKVCache:
    """The fused decoder's cache: ``[batch, kv_heads, capacity, head_dim]`` per layer and key/value, written in place
    (no copy per token, half the memory of the ping-pong cache)."""

    supports_reuse = True
    recurrent = False  # the fused decoder is written for attention-only (Llama-family) models

    def __init__(self, spec: KVCacheSpec, batch: int, dtype: Any) -> None:
        self.spec, self.batch = spec, batch
        shape = (batch, spec.num_kv_heads, spec.max_length, spec.head_dim)
        self.buffers = [np.zeros(shape, dtype=dtype) for _ in range(2 * spec.num_layers)]
        self.lengths = np.zeros(batch, dtype=np.int64)
        #: the backend's decode-step I/O binding over these buffers, built once (``OrtBackend``)
        self.decode_binding: Any = None

    @property
    def length(self) -> int:
        return int(self.lengths.max(initial=0))

    def rewind_point(self, length: int) -> int:
        return min(length, self.length)

    def crop(self, length: int) -> None:
        """Forget positions from ``length`` on (they are overwritten by the next step)."""
        np.minimum(self.lengths, length, out=self.lengths)

    def fill_from(self, prefix: Any) -> None:
        """Every row starts from row 0 of a batch-1 ``prefix`` (a shared image + prompt head)."""
        n = int(prefix.lengths[0])
        for mine, theirs in zip(self.buffers, prefix.buffers):
            mine[:, :, :n] = theirs[:1, :, :n]
        self.lengths[:] = n
