"""ONNX Runtime backend: CPU here; CUDA and ORT's TensorRT execution provider where the install has them.

KV cache on CPU: for each layer and key/value, two flat buffers sized for the bundle's full context are allocated
once per generation (``KVCache``). A decode step binds the first ``past`` positions of one buffer as input and the
first ``past + seq`` positions of the other as output (IO binding, zero copy), then the two swap. Both views are
contiguous because the ``[batch, heads, len, dim]`` tensor is laid out as a flat prefix of the buffer. Nothing is
allocated per token. The graph still concatenates past and new keys (a plain transformers export); an in-place
cache with fused attention is a later graph change that keeps this backend's interface.

On CUDA the cache stays on the device: present outputs are bound to device memory and fed back as the next past.
(That path is written against the ORT IO-binding API and was not run on hardware in this repository.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.errors import BackendError
from edgelvm.manifest import KVCacheSpec, Manifest
from edgelvm.runtime.inplace_cache import InPlaceKVCache
from edgelvm.runtime.padding import LeftPadState
from edgelvm.runtime.session_settings import SessionSettings

log = logging.getLogger(__name__)

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}

#: Backend names accepted by ``VLM.load(backend=...)`` and the ORT providers each one asks for, in order.
BACKENDS: dict[str, list[str]] = {
    "onnxruntime-cpu": ["CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_ALIASES = {"cpu": "onnxruntime-cpu", "cuda": "onnxruntime-cuda", "ort": "onnxruntime-cpu"}


def resolve_backend(name: str) -> tuple[str, list[str]]:
    """Map a backend name to ORT providers, checking that this onnxruntime install has them."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    name = _ALIASES.get(name, name)
    if name == "auto":
        name = "onnxruntime-cuda" if "CUDAExecutionProvider" in available else "onnxruntime-cpu"
    if name not in BACKENDS:
        raise BackendError(
            f"unknown backend {name!r}",
            where="backend",
            fix=f"use one of: auto, tensorrt, {', '.join(BACKENDS)}",
        )
    wanted = BACKENDS[name][0]
    if wanted not in available:
        fix = (
            "reinstall onnxruntime"
            if wanted == "CPUExecutionProvider"
            else "install `edgelvm[gpu]` (x86_64) or NVIDIA's onnxruntime build for Jetson"
        )
        raise BackendError(
            f"backend {name!r} needs {wanted}, which this onnxruntime lacks (it has: {', '.join(available)})",
            where="backend",
            fix=fix,
        )
    return name, [p for p in BACKENDS[name] if p in available]


@dataclass
class KVCache:
    """Preallocated ping-pong key/value buffers for one generation (CPU)."""

    spec: KVCacheSpec
    batch: int
    dtype: Any
    length: int = 0
    _buffers: list[list[np.ndarray]] = field(default_factory=list)  # [2][2 * layers] flat arrays
    _read: int = 0

    def __post_init__(self) -> None:
        size = self.batch * self.spec.num_kv_heads * self.spec.max_length * self.spec.head_dim
        self._buffers = [[np.empty(size, dtype=self.dtype) for _ in range(2 * self.spec.num_layers)] for _ in range(2)]
        self.pad = LeftPadState(self.batch, self.spec.max_length)

    def view(self, which: int, index: int, length: int) -> np.ndarray:
        shape = (self.batch, self.spec.num_kv_heads, length, self.spec.head_dim)
        return self._buffers[which][index][: int(np.prod(shape))].reshape(shape)

    def past(self, index: int) -> np.ndarray:
        return self.view(self._read, index, self.length)

    def target(self, index: int, new_length: int) -> np.ndarray:
        return self.view(1 - self._read, index, new_length)

    def advance(self, new_length: int) -> None:
        self._read = 1 - self._read
        self.length = new_length
        self.pad.commit(new_length)

    supports_reuse = True

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (e.g. the part of a chat history that did not change)."""
        if length >= self.length:
            return
        for index in range(2 * self.spec.num_layers):
            self.target(index, length)[...] = self.past(index)[:, :, :length]
        self.pad.crop(length)
        self.advance(length)

    def fill_from(self, prefix: KVCache) -> None:
        """Start every row from the same (batch-1) prefix: several questions about one image share its prefill."""
        for index in range(2 * self.spec.num_layers):
            self.target(index, prefix.length)[...] = prefix.past(index)  # broadcasts over the batch
        self.pad.fill_from(prefix.pad)
        self.advance(prefix.length)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for pair in self._buffers for b in pair)


class OrtBackend:
    """Runs a bundle's vision and decoder graphs in ONNX Runtime."""

    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest,
        backend: str = "auto",
        threads: int | None = None,
        fused: bool | None = None,
        settings: SessionSettings | None = None,
    ) -> None:
        """``fused``: use the bundle's ORT-fused decoder (in-place KV, GroupQueryAttention) when it has one
        (default), or force the portable traced decoder (``False``)."""
        import onnxruntime as ort

        self.name, self.providers = resolve_backend(backend)
        self.manifest = manifest
        self.kv_spec = manifest.kv_cache
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.settings = settings or SessionSettings.for_this_device(threads=threads)
        self.settings.apply(options)
        self.vision = self._session(ort, bundle_dir / manifest.graphs["vision"].file, options)
        self.device = "cpu" if self.providers[0] == "CPUExecutionProvider" else "cuda"
        # The fused graph's in-place cache is bound from host memory: CPU only until a device-side variant exists.
        self.fused = "decoder_ort" in manifest.graphs and self.device == "cpu" and fused is not False
        graph = manifest.graphs["decoder_ort" if self.fused else "decoder"]
        self.decoder = self._session(ort, bundle_dir / graph.file, options)
        self._out_names = [o.name for o in self.decoder.get_outputs()]
        self._kv_inputs = [i.name for i in self.decoder.get_inputs() if i.name.startswith("past")]
        self._embed_dtype = _NP_DTYPES[graph.inputs[0].dtype]
        self._kv_dtype = _NP_DTYPES[self.kv_spec.dtype]
        self._logits_dtype = _NP_DTYPES[graph.outputs[0].dtype]
        self._vocab = int(graph.outputs[0].shape[-1])

    def _session(self, ort: Any, path: Path, options: Any) -> Any:
        try:
            return ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as err:  # onnxruntime raises its own exception types, with long messages
            raise BackendError(
                f"onnxruntime cannot load the graph ({str(err).splitlines()[0]})",
                where=path,
                fix="re-export the bundle; check that onnxruntime is at least the version that exported it",
            ) from None

    @property
    def embed_dtype(self) -> Any:
        return self._embed_dtype

    # ---- vision --------------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: np.ndarray, inputs: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Run the vision graph; ``inputs``: its inputs besides ``pixel_values`` (native-resolution graphs take the
        patches' rotary positions), by name."""
        dtype = _NP_DTYPES[self.manifest.graphs["vision"].inputs[0].dtype]
        return self.vision.run(None, {"pixel_values": pixel_values.astype(dtype, copy=False), **(inputs or {})})[0]

    # ---- decoder -------------------------------------------------------------------------------------------------
    def new_cache(self, batch: int) -> Any:
        if self.fused:
            return InPlaceKVCache(self.kv_spec, batch, self._kv_dtype)
        if self.device == "cpu":
            return KVCache(self.kv_spec, batch, self._kv_dtype)
        return _DeviceCache(self.kv_spec, batch, self._kv_dtype)

    def step(
        self,
        rows: list[np.ndarray],
        cache: Any,
        positions: list[np.ndarray] | None = None,
        inputs: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Append ``rows[r]`` (``[S_r, E]`` embeddings) to row ``r`` of the cache; return each row's last logits.

        ``positions``: explicit per-row position ids ``[P, S_r]`` for bundles whose positions are not 1-D
        (``manifest.positions``); without them the positions count the real tokens of each row.
        ``inputs``: the decoder graph's further inputs by name, already batched (cross-attention image states and
        mask, ``runtime/cross_attention.py``)."""
        if self.fused:
            if inputs:
                raise BackendError(
                    f"the fused decoder has no inputs {', '.join(inputs)}",
                    where="decoder_ort",
                    fix="load the bundle with decoder='portable'",
                )
            if positions is not None:
                raise BackendError(
                    "the fused decoder takes 1-D positions only",
                    where="decoder_ort",
                    fix="load the bundle with decoder='portable'",
                )
            return self._fused_step(rows, cache)
        embeds, attention_mask, positions = cache.pad.pack(rows, self._embed_dtype, positions)
        batch, seq = embeds.shape[:2]
        new_length = cache.length + seq
        binding = self.decoder.io_binding()
        binding.bind_cpu_input("inputs_embeds", embeds)
        binding.bind_cpu_input("attention_mask", attention_mask)
        binding.bind_cpu_input("position_ids", positions)
        for name, value in (inputs or {}).items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        logits = np.empty((batch, self._vocab), dtype=self._logits_dtype)
        binding.bind_output("logits", "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)
        if isinstance(cache, KVCache):
            for index, (past_name, present_name) in enumerate(zip(self._kv_inputs, self._out_names[1:])):
                past = cache.past(index)
                target = cache.target(index, new_length)
                binding.bind_input(past_name, "cpu", 0, past.dtype, past.shape, past.ctypes.data)
                binding.bind_output(present_name, "cpu", 0, target.dtype, target.shape, target.ctypes.data)
            self.decoder.run_with_iobinding(binding)
            cache.advance(new_length)
        else:
            cache.bind(binding, self._kv_inputs, self._out_names[1:])
            self.decoder.run_with_iobinding(binding)
            cache.collect(binding, new_length)
        return logits

    def _fused_step(self, rows: list[np.ndarray], cache: InPlaceKVCache) -> np.ndarray:
        """GroupQueryAttention takes a batch in one call for a first prompt (right-padded) or a decode step (one
        token per row); a multi-token step after cached tokens must run row by row (an ORT restriction)."""
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        if cache.length == 0 or (lengths == 1).all():
            return self._fused_run(rows, cache, slice(None))
        return np.concatenate([self._fused_run([row], cache, slice(i, i + 1)) for i, row in enumerate(rows)])

    def _fused_run(self, rows: list[np.ndarray], cache: InPlaceKVCache, which: slice) -> np.ndarray:
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        batch, seq = len(rows), int(lengths.max())
        embeds = np.zeros((batch, seq, rows[0].shape[-1]), dtype=self._embed_dtype)
        for index, row in enumerate(rows):
            embeds[index, : len(row)] = row  # right padding
        totals = cache.lengths[which] + lengths
        binding = self.decoder.io_binding()
        binding.bind_cpu_input("inputs_embeds", embeds)
        binding.bind_cpu_input("seqlens_k", (totals - 1).astype(np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(totals.max(), dtype=np.int32))
        binding.bind_cpu_input("logits_index", np.arange(batch, dtype=np.int64) * seq + lengths - 1)
        logits = np.empty((batch, self._vocab), dtype=self._logits_dtype)
        binding.bind_output("logits", "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)
        for name, present, buffer in zip(self._kv_inputs, self._out_names[1:], cache.buffers):
            view = buffer[which]  # rows are the outer axis: a row range is contiguous
            binding.bind_input(name, "cpu", 0, view.dtype, view.shape, view.ctypes.data)
            binding.bind_output(present, "cpu", 0, view.dtype, view.shape, view.ctypes.data)
        self.decoder.run_with_iobinding(binding)
        cache.lengths[which] = totals
        return logits


class _DeviceCache:
    """CUDA: present tensors stay on the device and become the next step's past (ORT allocates them).

    Crop and prefix sharing need device-side copies that the ORT Python API does not offer; the runtime falls back
    to a full prefill on this cache (``supports_reuse = False``).
    """

    supports_reuse = False

    def __init__(self, spec: KVCacheSpec, batch: int, dtype: Any) -> None:
        import onnxruntime as ort

        self.spec, self.batch, self.dtype, self.length = spec, batch, dtype, 0
        self.pad = LeftPadState(batch, spec.max_length)
        empty = (batch, spec.num_kv_heads, 0, spec.head_dim)
        self.values = [
            ort.OrtValue.ortvalue_from_shape_and_type(empty, dtype, "cuda", 0) for _ in range(2 * spec.num_layers)
        ]

    def bind(self, binding: Any, past_names: list[str], present_names: list[str]) -> None:
        for value, past_name, present_name in zip(self.values, past_names, present_names):
            binding.bind_ortvalue_input(past_name, value)
            binding.bind_output(present_name, "cuda", 0)

    def collect(self, binding: Any, new_length: int) -> None:
        outputs = binding.get_outputs()
        self.values = list(outputs[1:])
        self.length = new_length
        self.pad.commit(new_length)
