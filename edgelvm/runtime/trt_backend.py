"""Native TensorRT backend: the engines ``edgelvm build`` wrote for this GPU, driven through ``cuda-python``.

**This module has never run on hardware.** It is written against the documented TensorRT 10.x / 11.x Python API —
version differences live in ``edgelvm.tensorrt_compat``, TensorRT < 10 is refused —
(``Runtime.deserialize_cuda_engine``, ``IExecutionContext.set_input_shape / set_tensor_address /
execute_async_v3 / set_optimization_profile_async``) and the CUDA runtime bindings of ``cuda-python``
(``cudaMalloc``, ``cudaMemcpyAsync``, ``cudaStreamCreate``), and kept behind the same seam as ``OrtBackend``
(:class:`~edgelvm.runtime.backend.Backend`), so the generation loop does not change.
``benchmarks/gpu_check.sh`` is its first real test.

Why cuda-python: it is NVIDIA's thin, torch-free binding for the CUDA runtime (what TensorRT's own samples use);
pycuda needs a compiler at install time, cupy is a large array library we would use only for ``malloc``.

Design:
- One CUDA stream; every copy and launch is queued on it; ``step`` synchronises once, after copying the logits back.
- The decoder engine has two optimization profiles (0 prefill, 1 decode). Each has its own execution context,
  so switching costs nothing per token; the two share one activation scratch buffer (user-managed device memory,
  sized for the larger profile), since they never run at the same time.
- Inputs (embeddings, mask, positions) and the logits go through device buffers allocated once for the engine's
  largest shapes; the KV cache is two device buffers per layer and key/value sized for the full context that the
  decoder reads from and writes to alternately (the graph concatenates past and new keys, so present cannot alias
  past). Nothing is allocated per token.
- Host staging in page-locked memory (``cudaMallocHost``), as NVIDIA's samples do: an async copy from pageable memory
  is staged by the driver through its own pinned buffer synchronously; from pinned memory it is one DMA. Each decoder
  input and the logits have their own pinned buffer (sized for the largest shapes), so no copy can overwrite one
  still in flight before the step's single synchronisation; where pinned memory cannot be had, pageable copies.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgelvm import tensorrt_compat as compat
from edgelvm.errors import BackendError
from edgelvm.manifest import LOGITS_KEEP, KVCacheSpec, Manifest
from edgelvm.runtime.backend import NO_INPUTS, LastLogitsLimit, check_last
from edgelvm.runtime.kv_cache import LeftPadState, no_reuse

log = logging.getLogger(__name__)

ENGINES_DIR = "engines"  # same layout as edgelvm.build (not imported: the runtime never imports the build side)
ENGINES_MANIFEST = "engines.json"
PREFILL, DECODE = 0, 1


def _cudart() -> Any:
    try:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python ≥ 12.6 layout
        except ImportError:
            from cuda import cudart  # older cuda-python
    except ImportError as err:
        raise BackendError(
            f"the TensorRT backend needs cuda-python ({err})",
            where="backend",
            fix="install the cuda-python major matching the driver's CUDA major: CUDA 12 (JetPack 6, drivers before "
            'r580) `pip install "cuda-python>=12.6,<13"`, CUDA 13 `pip install "cuda-python>=13,<14"` '
            f"({compat.HARDWARE_DOC})",
        ) from None
    return cudart


def _bindings_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("cuda-bindings", "cuda-python"):  # older cuda-python has no separate cuda-bindings distribution
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "0"


class _Cuda:
    """The handful of CUDA runtime calls the backend needs, with errors turned into BackendError."""

    def __init__(self, rt: Any = None) -> None:
        self.rt = rt if rt is not None else _cudart()
        driver = self.rt.cudaDriverGetVersion()  # a CUDA 13 cuda-python on a CUDA 12 driver fails at the first call
        if int(driver[0]) == 0 and (message := compat.cuda_python_driver_mismatch(_bindings_version(), driver[1])):
            raise BackendError(message, where="cuda-python", fix=f"see {compat.HARDWARE_DOC}")
        self.stream = self.check(self.rt.cudaStreamCreate(), "cudaStreamCreate")
        self.stream_handle = compat.native_handle(self.stream)
        self.pinned: list[int] = []

    def check(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            code = int(err)
            name = getattr(err, "name", f"CUDA error {code}")
            raise BackendError(
                f"{what} failed: {name} ({code})",
                where="cuda",
                fix=compat.CUDA_ERROR_HINTS.get(code, "check the GPU and driver (nvidia-smi)"),
            )
        return rest[0] if len(rest) == 1 else (rest or None)

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})"))

    def malloc_host(self, nbytes: int) -> np.ndarray | None:
        """``nbytes`` of page-locked host memory as a uint8 array (freed by :meth:`free_host`), or None where the
        driver refuses (the caller then copies from pageable memory)."""
        import ctypes

        result = self.rt.cudaMallocHost(max(int(nbytes), 1))
        if int(result[0]) != 0:
            log.info("cudaMallocHost(%d) failed (%s): pageable host copies", nbytes, result[0])
            return None
        ptr = int(result[1])
        self.pinned.append(ptr)
        return np.ctypeslib.as_array((ctypes.c_uint8 * max(int(nbytes), 1)).from_address(ptr))

    def free_host(self) -> None:
        for ptr in self.pinned:
            self.rt.cudaFreeHost(ptr)
        self.pinned.clear()

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def to_device(self, ptr: int, array: np.ndarray, staging: np.ndarray | None = None) -> None:
        """Queue a copy of ``array`` (C-contiguous) to ``ptr``, through the pinned ``staging`` buffer when given."""
        if staging is not None and staging.nbytes >= array.nbytes:
            staged = staging[: array.nbytes]
            staged[:] = array.reshape(-1).view(np.uint8)
            array = staged
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream), "H2D copy")

    def to_host(self, array: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, self.stream), "D2H copy")

    def sync(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")


class TrtKVCache:
    """Ping-pong device KV buffers for one generation: ``[batch, kv_heads, length, head_dim]`` as a flat prefix.

    Crop / prefix sharing (chat KV reuse, batch prefix fork) would need strided device copies; until they are
    written the runtime prefills in full with this cache (``supports_reuse = False``).
    """

    supports_reuse = False
    recurrent = False  # hybrid bundles are refused by TrtBackend

    def __init__(self, cuda: _Cuda, spec: KVCacheSpec, batch: int, dtype: Any) -> None:
        self.cuda, self.spec, self.batch, self.length = cuda, spec, batch, 0
        self.nbytes_each = batch * spec.num_kv_heads * spec.max_length * spec.head_dim * np.dtype(dtype).itemsize
        self._ptrs = [[cuda.malloc(self.nbytes_each) for _ in range(2 * spec.num_layers)] for _ in range(2)]
        self._read = 0
        self.pad = LeftPadState(batch, spec.max_length)

    def past(self, index: int) -> int:
        return self._ptrs[self._read][index]

    def target(self, index: int) -> int:
        return self._ptrs[1 - self._read][index]

    def shape(self, length: int) -> tuple[int, int, int, int]:
        return (self.batch, self.spec.num_kv_heads, length, self.spec.head_dim)

    def advance(self, new_length: int) -> None:
        self._read, self.length = 1 - self._read, new_length
        self.pad.length = new_length

    def rewind_point(self, length: int) -> int:
        return 0  # nothing is kept: supports_reuse is False

    def crop(self, length: int) -> None:
        no_reuse(self)

    def drop(self, count: int) -> None:
        no_reuse(self)

    def fill_from(self, prefix: Any) -> None:
        no_reuse(self)

    def __del__(self) -> None:
        for pair in getattr(self, "_ptrs", []):
            for ptr in pair:
                self.cuda.free(ptr)


def find_engine_dir(bundle_dir: Path, trt_version: str) -> Path:
    """``bundle/engines/<fingerprint of this GPU>``; a clear error listing what exists when it is absent."""
    from edgelvm.devices.fingerprint import current_fingerprint

    name = current_fingerprint(trt_version)
    path = bundle_dir / ENGINES_DIR / name
    if not (path / ENGINES_MANIFEST).is_file():
        root = bundle_dir / ENGINES_DIR
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise BackendError(
            f"no TensorRT engines for this GPU ({name}); the bundle has: {', '.join(have) or 'none'}",
            where=bundle_dir,
            fix=f"run `edgelvm build {bundle_dir}` on this device (engines are specific to the GPU and TensorRT "
            "version)",
        )
    return path


class TrtBackend:
    """Runs a bundle's TensorRT engines. Same interface as ``OrtBackend``. Never run on hardware (see module doc)."""

    name = "tensorrt"
    #: Engines return each row's last logits only: TensorRT's ONNX parser takes the decoder's ``logits_keep`` (an
    #: input with a default) as a constant of one element, and where an engine has it as an input it is fed one.
    max_last_logits = 1
    caches_crop = False  # TrtKVCache: device buffers, no strided device copies yet
    _last_limit: LastLogitsLimit = (
        "TensorRT engines compute each row's last logits only (the decoder's logits_keep is one position in them)",
        "step with last=1, or run the bundle with ONNX Runtime (backend='auto') for several positions' logits",
    )

    def __init__(self, bundle_dir: Path, manifest: Manifest, *, engine_dir: Path | None = None) -> None:
        if manifest.kv_cache.states:
            raise BackendError(
                "the TensorRT backend has no cache for a hybrid decoder's recurrent / convolution states yet",
                where="backend",
                fix="use backend='auto' (ONNX Runtime)",
            )
        if manifest.kv_cache.windows:
            raise BackendError(
                "the TensorRT backend has no window-sized cache for sliding-window layers (kv_cache.windows) yet",
                where="backend",
                fix="use backend='auto' (ONNX Runtime CPU)",
            )
        if manifest.preprocess.image_placement == "cross_attention":
            raise BackendError(
                "the TensorRT backend does not feed a cross-attention decoder's image inputs yet "
                "(preprocess.image_placement 'cross_attention', e.g. Idefics)",
                where="backend",
                fix="use backend='auto' (ONNX Runtime)",
            )
        if manifest.attention == "image_bidirectional":
            raise BackendError(
                "the TensorRT backend does not feed the decoder's image_blocks input yet (attention "
                "'image_bidirectional', e.g. Gemma 3)",
                where="backend",
                fix="use backend='auto' (ONNX Runtime)",
            )
        if extra := [spec.name for spec in manifest.graphs["vision"].inputs[1:]]:
            raise BackendError(
                f"the TensorRT backend does not feed vision inputs besides pixel_values ({', '.join(extra)}) yet",
                where="backend",
                fix="use backend='auto' (ONNX Runtime) for this bundle",
            )
        try:
            import tensorrt as trt
        except ImportError as err:
            raise BackendError(
                f"TensorRT is not installed ({err})",
                where="backend",
                fix="install TensorRT (JetPack ships it: use a venv made with --system-site-packages; x86-64: "
                f"`pip install \"edgelvm[tensorrt]\"`, {compat.HARDWARE_DOC}), or use backend='auto'",
            ) from None
        compat.check_tensorrt_version(trt, BackendError, where="backend")
        self.trt, self.manifest, self.kv_spec = trt, manifest, manifest.kv_cache
        bundle_dir = Path(bundle_dir)
        self.engine_dir = Path(engine_dir) if engine_dir else find_engine_dir(bundle_dir, trt.__version__)
        self.info = json.loads((self.engine_dir / ENGINES_MANIFEST).read_text(encoding="utf-8"))
        self._check_fresh(manifest)
        self.cuda = _Cuda()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.vision = self._load("vision")
        self.decoder = self._load("decoder")
        self._vision_ctx = self.vision.create_execution_context()
        self._contexts, self._scratch = self._decoder_contexts()
        self._in_names = [spec.name for spec in manifest.graphs["decoder"].inputs if spec.name != LOGITS_KEEP]
        self._out_names = [spec.name for spec in manifest.graphs["decoder"].outputs]
        engine_io = {self.decoder.get_tensor_name(i) for i in range(self.decoder.num_io_tensors)}
        self._feeds_keep = LOGITS_KEEP in engine_io  # usually not: the parser made it a constant
        self.embed_dtype = trt.nptype(self.decoder.get_tensor_dtype("inputs_embeds"))
        self._kv_dtype = trt.nptype(self.decoder.get_tensor_dtype(self._in_names[3]))
        self._logits_dtype = trt.nptype(self.decoder.get_tensor_dtype(self._out_names[0]))
        self.max_batch = int(self.info["config"]["max_batch"])
        self.prefill_past_max = int(self.info["config"].get("prefill_past_max", 0))
        #: engines built with a prefill chunk take at most that many tokens per step (runtime/generate.prefill
        #: chunks longer prompts), after any number of cached ones
        self.max_step_tokens = self.info["config"].get("prefill_chunk")
        engine_length = int(self.info["config"].get("max_length") or manifest.kv_cache.max_length)
        if self.max_step_tokens is not None and self.max_step_tokens < engine_length:
            self.prefill_past_max = engine_length - 1
        self._hidden = int(manifest.graphs["decoder"].inputs[0].shape[-1])
        self._vocab = int(manifest.graphs["decoder"].outputs[0].shape[-1])
        sizes = self._buffer_bytes(manifest)
        self._bufs = {name: self.cuda.malloc(size) for name, size in sizes.items()}
        # a pinned host twin per decoder buffer (None: pageable copies)
        self._staging = {name: self.cuda.malloc_host(size) for name, size in sizes.items()}
        self._vision_bufs: dict[int, tuple[int, int]] = {}  # batch → (pixels ptr, features ptr)
        log.info("TensorRT %s engines from %s", trt.__version__, self.engine_dir)

    def _buffer_bytes(self, manifest: Manifest) -> dict[str, int]:
        """The decoder's I/O buffers at their largest shapes (position_ids: ``[B, S]``, or ``[rows, B, S]`` for
        M-RoPE, ``manifest.positions.rows``)."""
        batch, length = self.max_batch, self.kv_spec.max_length
        return {
            "inputs_embeds": batch * length * self._hidden * np.dtype(self.embed_dtype).itemsize,
            "attention_mask": batch * length * 8,
            "position_ids": int(manifest.positions.get("rows", 1)) * batch * length * 8,
            "logits": batch * self._vocab * np.dtype(self._logits_dtype).itemsize,
            LOGITS_KEEP: 8,  # one int64, fed only where the engine has the input
        }

    # ---- loading -------------------------------------------------------------------------------------------------
    def _check_fresh(self, manifest: Manifest) -> None:
        for graph, entry in self.info.get("engines", {}).items():
            expected = manifest.files.get(entry.get("source", ""))
            if expected and entry.get("source_sha256") != expected:
                raise BackendError(
                    f"the {graph} engine was built from a different {entry['source']} (the bundle was re-exported)",
                    where=self.engine_dir,
                    fix="rebuild: `edgelvm build BUNDLE --force`",
                )

    def _load(self, graph: str) -> Any:
        path = self.engine_dir / self.info["engines"][graph]["file"]
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(
                "TensorRT cannot load the engine (built by another TensorRT version or for another GPU?)",
                where=path,
                fix="rebuild on this device: `edgelvm build BUNDLE --force`",
            )
        return engine

    def _decoder_contexts(self) -> tuple[list[Any], int]:
        trt, engine = self.trt, self.decoder
        size = compat.engine_device_memory_size(engine)  # the largest profile's scratch: both contexts share it
        scratch = self.cuda.malloc(size)
        contexts = []
        for profile in (PREFILL, DECODE):
            context = compat.create_user_managed_context(trt, engine)
            compat.set_context_device_memory(context, scratch, size)
            context.set_optimization_profile_async(profile, self.cuda.stream_handle)
            contexts.append(context)
        self.cuda.sync()
        return contexts, scratch

    # ---- backend interface ---------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: np.ndarray, inputs: Mapping[str, np.ndarray] = NO_INPUTS) -> np.ndarray:
        """``inputs`` is always empty: bundles whose vision graph takes more are refused at construction."""
        trt, ctx = self.trt, self._vision_ctx
        in_name = self.manifest.graphs["vision"].inputs[0].name
        out_name = self.manifest.graphs["vision"].outputs[0].name
        pixels = np.ascontiguousarray(pixel_values, dtype=trt.nptype(self.vision.get_tensor_dtype(in_name)))
        ctx.set_input_shape(in_name, pixels.shape)
        out_shape = tuple(ctx.get_tensor_shape(out_name))
        features = np.empty(out_shape, dtype=trt.nptype(self.vision.get_tensor_dtype(out_name)))
        batch = pixels.shape[0]
        if batch not in self._vision_bufs:
            self._vision_bufs[batch] = (self.cuda.malloc(pixels.nbytes), self.cuda.malloc(features.nbytes))
        src, dst = self._vision_bufs[batch]
        self.cuda.to_device(src, pixels)
        ctx.set_tensor_address(in_name, src)
        ctx.set_tensor_address(out_name, dst)
        if not ctx.execute_async_v3(self.cuda.stream_handle):
            raise BackendError("the vision engine failed to run", where=self.engine_dir, fix="see TensorRT's log")
        self.cuda.to_host(features, dst)
        self.cuda.sync()
        return features

    def new_cache(self, batch: int) -> TrtKVCache:
        if batch > self.max_batch:
            raise BackendError(
                f"batch {batch} exceeds the engines' max_batch {self.max_batch}",
                where=self.engine_dir,
                fix=f"rebuild with `edgelvm build BUNDLE --max-batch {batch} --force`, or send smaller batches",
            )
        return TrtKVCache(self.cuda, self.kv_spec, batch, self._kv_dtype)

    def step(
        self, rows: list[np.ndarray], cache: Any, inputs: Mapping[str, np.ndarray] = NO_INPUTS, *, last: int = 1
    ) -> np.ndarray:
        """See :meth:`edgelvm.runtime.backend.Backend.step`; ``inputs``: M-RoPE ``position_ids`` at most
        (cross-attention bundles are refused at construction); ``last``: 1 only (:attr:`max_last_logits`)."""
        check_last(last, rows, self.max_last_logits, self._last_limit, self.engine_dir)
        embeds, attention_mask, positions = cache.pad.pack(rows, self.embed_dtype)
        positions = inputs.get("position_ids", positions)
        batch, seq = embeds.shape[:2]
        past, new_length = cache.length, cache.length + seq
        profile = DECODE if seq == 1 else PREFILL
        if profile == PREFILL and past > self.prefill_past_max:
            raise BackendError(
                f"a {seq}-token step after {past} cached tokens needs chunked prefill, which these engines were not "
                f"built for (prefill_past_max {self.prefill_past_max})",
                where=self.engine_dir,
                fix="rebuild with a larger prefill_past_max, or prefill in one step",
            )
        ctx = self._contexts[profile]
        host = {
            "inputs_embeds": np.ascontiguousarray(embeds, dtype=self.embed_dtype),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
            "position_ids": np.ascontiguousarray(positions, dtype=np.int64),
        }
        if self._feeds_keep:  # profiled at one element in both profiles (edgelvm build)
            host[LOGITS_KEEP] = np.zeros(1, dtype=np.int64)
        for name, array in host.items():  # host arrays (or their pinned copies) stay untouched until the sync
            self.cuda.to_device(self._bufs[name], array, self._staging[name])
            ctx.set_input_shape(name, array.shape)
            ctx.set_tensor_address(name, self._bufs[name])
        for index, (past_name, present_name) in enumerate(zip(self._in_names[3:], self._out_names[1:])):
            ctx.set_input_shape(past_name, cache.shape(past))
            ctx.set_tensor_address(past_name, cache.past(index))
            ctx.set_tensor_address(present_name, cache.target(index))
        ctx.set_tensor_address(self._out_names[0], self._bufs["logits"])
        if not ctx.execute_async_v3(self.cuda.stream_handle):
            raise BackendError("the decoder engine failed to run", where=self.engine_dir, fix="see TensorRT's log")
        logits = np.empty((batch, self._vocab), dtype=self._logits_dtype)
        pinned = self._staging["logits"]
        landing = logits if pinned is None else pinned[: logits.nbytes].view(self._logits_dtype).reshape(logits.shape)
        self.cuda.to_host(landing, self._bufs["logits"])
        self.cuda.sync()
        if pinned is not None:
            logits[:] = landing
        cache.advance(new_length)
        return logits

    def __del__(self) -> None:
        cuda = getattr(self, "cuda", None)
        if cuda is None:
            return
        for ptr in [*getattr(self, "_bufs", {}).values(), getattr(self, "_scratch", 0)]:
            if ptr:
                cuda.free(ptr)
        for src, dst in getattr(self, "_vision_bufs", {}).values():
            cuda.free(src)
            cuda.free(dst)
        cuda.free_host()
