"""The KV caches of the ONNX Runtime backend, and the left padding of decoders that take a mask and positions.

- :class:`PingPongCache` (CPU, portable decoder): for each layer and key/value, two flat buffers sized for the full
  context. A step binds the first ``past`` positions of one as input and the first ``past + seq`` of the other as
  output (the ``[batch, heads, len, dim]`` tensor is a flat prefix of the buffer, so both views are contiguous), then
  the two swap. Nothing is allocated per token.
- :class:`DeviceCache` (CUDA, portable decoder): present outputs stay on the device and become the next past.
- :class:`InPlaceKVCache` (CPU, fused decoder): one buffer per layer and key/value, each row packed from position 0
  with its own length (GroupQueryAttention's right padding); a step writes only the new positions.
- :class:`SlidingWindows` (inside a :class:`PingPongCache` whose spec has ``windows``): the local layers' rolling
  windows, at most ``window - 1`` columns each, with their positions (the graph's ``window_positions``).

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
from edgelvm.manifest import WINDOW_POSITIONS, KVCacheSpec


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


class SlidingWindows:
    """The sliding-window (local) layers' keys and values of a :class:`PingPongCache` (``KVCacheSpec.windows``).

    Each local layer keeps, per row, the ``window - 1`` most recent positions: all that the next query at the row's
    next position can see (keys at positions ``> q - window``). ``positions [batch, kept]`` says which position each
    kept column holds (-1: none); the graph masks the local layers with it, so a column's place does not matter and
    rows need not line up. A step binds the kept columns as past and ``kept + seq`` columns of the other buffer as
    present; afterwards the columns each row still needs are selected: when that is every column the two buffers
    swap (no copy), otherwise they are copied back (one read of the window per local layer). A buffer grows for a
    step longer than it holds (a prefill) and shrinks back after it.

    Positions older than the window are gone, so the cache can crop only while no row has dropped one yet
    (:attr:`complete`), or to the end of its latest multi-token step (a prompt's end), where it keeps a copy of the
    windows (the recurrent states' rewind protocol: :meth:`PingPongCache.rewind_point`)."""

    def __init__(self, spec: KVCacheSpec, batch: int, dtype: Any) -> None:
        window = spec.window
        if window is None:
            raise BackendError(
                f"kv_cache.windows {spec.windows} does not give one sliding window for the local layers",
                where="KV cache",
                fix="re-export the bundle with this edgelvm",
            )
        self.window, self.keep, self.batch, self.dtype = window, window - 1, batch, dtype
        self._row = (spec.num_kv_heads, spec.head_dim)
        #: the cache's tensor indices (key, value of each pair) that are local
        self.indices = [2 * i + k for i, w in enumerate(spec.windows or []) if w is not None for k in (0, 1)]
        self._capacity = [self.window, self.window]  # columns each side holds: the kept window + a decode step
        self._buffers = {i: [self._alloc(self.window), self._alloc(self.window)] for i in self.indices}
        self._read = 0
        self.positions = np.full((batch, 0), -1, dtype=np.int64)
        #: no row has dropped a position yet: the whole history is held and any crop works
        self.complete = True
        self._pending: np.ndarray | None = None
        self._snapshot: tuple[int, np.ndarray, bool, dict[int, np.ndarray]] | None = None

    def _alloc(self, columns: int) -> np.ndarray:
        return np.zeros(self.batch * self._row[0] * columns * self._row[1], dtype=self.dtype)

    def _view(self, side: int, index: int, columns: int) -> np.ndarray:
        shape = (self.batch, self._row[0], columns, self._row[1])
        return self._buffers[index][side][: int(np.prod(shape))].reshape(shape)

    def _resize(self, side: int, columns: int) -> None:
        if self._capacity[side] != columns:
            for index in self.indices:
                self._buffers[index][side] = self._alloc(columns)
            self._capacity[side] = columns

    @property
    def kept(self) -> int:
        return int(self.positions.shape[1])

    def step_positions(self, mask: np.ndarray, start: int) -> np.ndarray:
        """``window_positions`` for a step that appends columns ``start:`` of the left-padded ``mask`` (``[batch,
        start + seq]``): the kept columns' positions, then each new column's (its row's count of real tokens so
        far, -1 for padding). Sizes the present buffers for it."""
        new = np.where(mask[:, start:] > 0, np.cumsum(mask, axis=1)[:, start:] - 1, -1)
        self._pending = np.concatenate([self.positions, new], axis=1)
        if self._capacity[1 - self._read] < self._pending.shape[1]:
            self._resize(1 - self._read, self._pending.shape[1])
        return self._pending

    def past(self, index: int) -> np.ndarray:
        return self._view(self._read, index, self.kept)

    def target(self, index: int) -> np.ndarray:
        if self._pending is None:
            raise BackendError("a local layer's present was asked for before the step's positions", where="KV cache",
                               fix=f"feed {WINDOW_POSITIONS} from cache.window_positions(mask) first")  # fmt: skip
        return self._view(1 - self._read, index, self._pending.shape[1])

    def advance(self, length: int) -> None:
        """After a step: keep each row's last ``window - 1`` positions."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        fed = pending.shape[1] - self.kept
        last = pending.max(axis=1, keepdims=True)
        needed = (pending >= 0) & (pending > last - self.keep)  # what a query at `last + 1` (or later) sees
        self.complete = self.complete and bool((needed == (pending >= 0)).all())
        written, other = 1 - self._read, self._read
        columns = pending.shape[1]
        first = int(np.argmax(needed.any(axis=0))) if needed.any() else columns  # the oldest column any row needs
        if columns - first <= self.keep:
            if first == 0:  # every column stays: the present becomes the past
                self._read = written
            else:  # a common suffix: one slice copy per tensor
                for index in self.indices:
                    self._view(other, index, columns - first)[...] = self._view(written, index, columns)[:, :, first:]
            self.positions = np.where(needed, pending, -1)[:, first:]
        else:  # rows with a padding gap (a shared prefix, then suffixes of different lengths): row by row
            kept = int(needed.sum(axis=1).max(initial=0))
            self.positions = np.full((self.batch, kept), -1, dtype=np.int64)
            for index in self.indices:
                source, target = self._view(written, index, columns), self._view(other, index, kept)
                target[...] = 0
                for row in range(self.batch):
                    cols = np.flatnonzero(needed[row])
                    target[row, :, kept - len(cols) :] = source[row][:, cols]
            for row in range(self.batch):
                cols = np.flatnonzero(needed[row])
                self.positions[row, kept - len(cols) :] = pending[row, cols]
        if self._capacity[1 - self._read] > self.window:  # a prefill's buffer: back to a decode step's size
            self._resize(1 - self._read, self.window)
        if fed > 1:  # the end of a prompt: where a chat turn can rewind to
            self._save(length)

    def _save(self, length: int) -> None:
        arrays = {index: self.past(index).copy() for index in self.indices}
        self._snapshot = (length, self.positions.copy(), self.complete, arrays)

    def rewind_point(self, length: int, current: int) -> int:
        if length >= current or self.complete:
            return min(length, current)
        saved = self._snapshot[0] if self._snapshot is not None else 0
        return saved if saved <= length else 0

    def crop(self, length: int, mask: np.ndarray) -> None:
        """Keep what the first ``length`` columns of the cache (``mask``: its left-padding mask) hold."""
        if length == 0:
            self.positions, self.complete, self._snapshot = np.full((self.batch, 0), -1, dtype=np.int64), True, None
            return
        if self._snapshot is not None and length == self._snapshot[0]:
            _, positions, self.complete, arrays = self._snapshot
            self.positions = positions.copy()
            self._resize(self._read, max(self.window, self.kept))
            for index, array in arrays.items():
                self.past(index)[...] = array
            return
        if not self.complete:
            raise BackendError(
                f"the sliding-window layers cannot be cropped to {length} positions: they hold only the last "
                f"{self.keep} of each row, and a copy at {self._snapshot[0] if self._snapshot else 0}",
                where="KV cache",
                fix="crop to cache.rewind_point(length)",
            )
        self._snapshot = None  # it held positions past the crop
        counts = mask[:, :length].sum(axis=1, keepdims=True)  # each row's positions below the crop
        keep = (self.positions >= 0) & (self.positions < counts)
        kept = int(keep.sum(axis=1).max(initial=0))
        positions = np.full((self.batch, kept), -1, dtype=np.int64)
        for index in self.indices:
            past = self.past(index)
            rows = [past[row][:, np.flatnonzero(keep[row])] for row in range(self.batch)]  # copies
            view = self._view(self._read, index, kept)
            view[...] = 0
            for row, kept_row in enumerate(rows):
                view[row, :, kept - kept_row.shape[1] :] = kept_row
        for row in range(self.batch):
            cols = np.flatnonzero(keep[row])
            positions[row, kept - len(cols) :] = self.positions[row, cols]
        self.positions = positions

    def fill_from(self, prefix: SlidingWindows) -> None:
        """Every row starts from row 0 of a batch-1 cache's windows."""
        self._resize(self._read, max(self.window, prefix.kept))
        self.positions = np.repeat(prefix.positions[:1], self.batch, axis=0)
        for index in self.indices:
            self.past(index)[...] = prefix.past(index)[:1]
        self.complete, self._snapshot = prefix.complete, None


class PingPongCache:
    """Preallocated ping-pong key/value buffers for one generation (CPU); a hybrid decoder's fixed-size states
    ping-pong the same way (two zero-initialised buffers each, read one, write the other).

    States summarise every position fed, so they cannot be cropped like keys and values. The cache keeps a copy of
    them as they were after its latest multi-token step (a prefill: the end of a prompt) and can rewind exactly
    there (:meth:`rewind_point`): a chat turn whose history re-renders differently after the last prompt (the
    answer's tokens) restarts from that prompt's end instead of from scratch. The copy costs the states' bytes once
    (constant in context length).

    Sliding-window layers (``spec.windows``) keep window-sized buffers instead (:class:`SlidingWindows`, which
    rewinds by the same protocol); the others are sized for the full context."""

    supports_reuse = True

    def __init__(self, spec: KVCacheSpec, batch: int, dtype: Any) -> None:
        self.spec, self.batch, self.length, self._read = spec, batch, 0, 0
        self.windows = SlidingWindows(spec, batch, dtype) if spec.windows else None
        self._locals = local = set(self.windows.indices if self.windows else [])
        size = batch * spec.num_kv_heads * spec.max_length * spec.head_dim
        self._buffers = [[np.empty(0 if i in local else size, dtype=dtype) for i in range(2 * spec.num_layers)]
                         for _ in range(2)]  # fmt: skip
        self._global = [i for i in range(2 * spec.num_layers) if i not in local]
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
        if index in self._locals:
            return self.windows.past(index)  # type: ignore[union-attr]
        return self._view(self._read, index, self.length)

    def target(self, index: int, new_length: int) -> np.ndarray:
        if index in self._locals:
            return self.windows.target(index)  # type: ignore[union-attr]
        return self._view(1 - self._read, index, new_length)

    def window_positions(self, mask: np.ndarray) -> np.ndarray:
        """The decoder's ``window_positions`` for a step whose attention mask (``pad.pack``) is ``mask``; call it
        before binding the step's tensors."""
        if self.windows is None:
            raise BackendError("this cache has no sliding-window layers", where="KV cache",
                               fix="feed window_positions only when kv_cache.windows is set")  # fmt: skip
        return self.windows.step_positions(mask, self.length)

    def advance(self, new_length: int) -> None:
        fed = new_length - self.length
        self._read, self.length = 1 - self._read, new_length
        self.pad.length = new_length
        if self.windows is not None:
            self.windows.advance(new_length)
        if self.recurrent and fed > 1:  # the end of a prompt: where a chat turn can rewind to
            self._snapshot = (new_length, [state.copy() for state in self._states[self._read]])

    def rewind_point(self, length: int) -> int:
        """The longest prefix of at most ``length`` positions that :meth:`crop` can keep."""
        if self.windows is not None:
            length = self.windows.rewind_point(length, self.length)
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
        if self.windows is not None:
            self.windows.crop(length, self.pad.mask)
        for index in self._global:
            self.target(index, length)[...] = self.past(index)[:, :, :length]
        self.pad.crop(length)
        self.advance(length)

    def drop(self, count: int) -> None:
        """Forget the last ``count`` positions (left padding: every row ends at the same column)."""
        self.crop(self.length - count)

    def fill_from(self, prefix: Any) -> None:
        """Start every row from the same (batch-1) prefix: several questions about one image share its prefill."""
        for index in [*self._global, *range(2 * self.spec.num_layers, 2 * self.spec.num_layers
                                             + len(self.spec.states or []))]:  # fmt: skip
            self.target(index, prefix.length)[...] = prefix.past(index)  # broadcasts over the batch
        if self.windows is not None:
            self.windows.fill_from(prefix.windows)
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

    def drop(self, count: int) -> None:
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

    def drop(self, count: int) -> None:
        """Forget each row's last ``count`` positions (rows hold their own lengths: right padding)."""
        np.maximum(self.lengths - count, 0, out=self.lengths)

    def fill_from(self, prefix: Any) -> None:
        """Every row starts from row 0 of a batch-1 ``prefix`` (a shared image + prompt head)."""
        n = int(prefix.lengths[0])
        for mine, theirs in zip(self.buffers, prefix.buffers):
            mine[:, :, :n] = theirs[:1, :, :n]
        self.lengths[:] = n
