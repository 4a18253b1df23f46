"""``build_engines``: TensorRT engines for a bundle's vision and decoder graphs, built on the device itself.

Why on the device: a TensorRT engine is tuned for (and only loads on) one GPU model and one TensorRT version, so
engines are build artefacts of the device, not of the export. They go to
``bundle/engines/<fingerprint>/`` (``edgelvm.devices.fingerprint``), next to a small ``engines.json`` that records
the optimization profiles, precision, builder flags, TensorRT version and the sha256 of the ONNX graph each engine
came from, so a stale engine (re-exported bundle) is detected instead of silently used.

Optimization profiles, read from the decoder's dynamic dims in the manifest
(``inputs_embeds [batch, seq, hidden]``, ``attention_mask [batch, total]``, ``position_ids [batch, seq]``,
``past_key_values.{i}.{key,value} [batch, kv_heads, past, head_dim]``, ``logits_keep [keep]`` at one element: the
engines return each row's last logits only — TensorRT's ONNX parser takes that input, which has a default, as a
constant, and it is then left out of the profiles):

- profile 0 "prefill": seq 1..max_length (opt: one image's tokens + 64 text tokens), past 0..prefill_past_max
  (default 0: the runtime prefills in one step). With ``prefill_chunk`` C: seq 1..C and past 0..max_length-1 — the
  runtime feeds longer prompts in chunks of C (``TrtBackend.max_step_tokens``), and TensorRT sizes the attention
  scratch for C × max_length instead of max_length² (on an 8 GB Jetson that is memory the KV cache needs);
- profile 1 "decode": seq 1, past 0..max_length-1 (opt: half the context).

Precision: fp16 by default (``BuilderFlag.FP16`` lets TensorRT pick fp16 kernels for an fp32 graph). A graph the
quantize stage rewrote (manifest precision ``int8`` / ``int4``: Q/DQ layers, block-wise INT4 weights) is built as
TensorRT documents explicit quantization: a strongly typed network and no precision flags — the Q/DQ layers and the
graph's own dtypes decide (export ``--dtype fp16`` for fp16 around the quantized matmuls). TensorRT 11 removed the
precision flags and builds every network strongly typed: there the graph's dtype is the engine's precision (an fp32
graph gives an fp32 engine; ``precision="fp16"`` on an fp32 graph is refused with the fix — export ``--dtype fp16``).
What differs between TensorRT 10.x and 11.x lives in ``edgelvm.tensorrt_compat``; TensorRT < 10 is refused.

Memory: the builder's WORKSPACE and TACTIC_DRAM pools default to TensorRT's own limits (all device memory, 75% of
it) — on an 8 GB Jetson that is memory the builder's copy of the weights needs. Unless given, both limits are sized
from the device (``BuildConfig.device`` profile, else the detected GPU's memory, else the bundle's export target):
:func:`default_pool_limits`, an estimate that has not been measured on a device.

Everything that needs no TensorRT (profile shapes, directory naming, writing, the errors) is plain Python and
tested here; the TensorRT calls follow the documented Python API (Builder, OnnxParser, BuilderConfig,
IOptimizationProfile, set_memory_pool_limit, timing cache, build_serialized_network) and have NOT been run on
hardware in this repository.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgelvm import __version__
from edgelvm import tensorrt_compat as compat
from edgelvm.errors import EdgeLVMError, UnsupportedModelError
from edgelvm.fsutil import make_staging, swap_into_place
from edgelvm.manifest import LOGITS_KEEP, Manifest, sha256_file, verify_bundle_files

log = logging.getLogger(__name__)

ENGINES_DIR = "engines"
ENGINES_MANIFEST = "engines.json"
ENGINES_FORMAT_VERSION = "1.0"
TIMING_CACHE = "timing.cache"
PRECISIONS = ("auto", "fp16", "fp32")


class TensorRTUnavailableError(EdgeLVMError):
    """TensorRT (or a GPU for it) is not available on this machine."""


class EngineBuildError(EdgeLVMError):
    """TensorRT could not parse a graph or build an engine from it."""


@dataclass
class BuildConfig:
    """How to build.

    ``max_length``: the longest context the decoder engine accepts (default and upper bound: the bundle's KV cache
    length). ``max_batch``: largest batch of both engines (``vision_max_batch`` overrides it for the vision engine:
    images per call). ``workspace_bytes`` / ``tactic_dram_bytes``: TensorRT's WORKSPACE / TACTIC_DRAM pool limits
    (None: sized from the device, :func:`default_pool_limits`; 0: TensorRT's own default). ``device``: a device
    profile name (``edgelvm devices``) whose usable memory sizes those limits. ``timing_cache``: a file reused
    across builds (default: ``timing.cache`` beside the engines; pass a shared path to reuse it across bundles on
    the same device). ``fingerprint``: override the detected one.
    """

    max_batch: int = 1
    max_length: int | None = None
    vision_max_batch: int | None = None
    opt_prefill_length: int | None = None
    prefill_past_max: int = 0
    prefill_chunk: int | None = None
    precision: str = "auto"
    workspace_bytes: int | None = None
    tactic_dram_bytes: int | None = None
    device: str | None = None
    timing_cache: Path | None = None
    fingerprint: str | None = None
    force: bool = False
    verify: bool = True


@dataclass
class OptimizationProfile:
    """One TensorRT optimization profile: for each input, its min / opt / max shape."""

    name: str
    shapes: dict[str, dict[str, list[int]]]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": self.shapes}


@dataclass
class EngineInfo:
    graph: str
    file: str
    source: str
    source_sha256: str
    profiles: list[OptimizationProfile]
    precision: str = ""
    flags: list[str] = field(default_factory=list)
    sha256: str = ""
    size_bytes: int = 0
    build_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["profiles"] = [p.to_dict() for p in self.profiles]
        return data


@dataclass
class BuildReport:
    engine_dir: Path
    fingerprint: str
    tensorrt_version: str
    engines: dict[str, EngineInfo]
    seconds: float
    timing_cache: Path | None


# ---- profile shapes (pure) -----------------------------------------------------------------------------------------
Range = tuple[int, int, int]


def _shape(spec_shape: list[int | str], dims: dict[str, Range], where: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"min": [], "opt": [], "max": []}
    for dim in spec_shape:
        if isinstance(dim, int):
            rng: Range = (dim, dim, dim)
        elif dim in dims:
            rng = dims[dim]
        else:
            raise EngineBuildError(
                f"input dimension {dim!r} has no rule for a TensorRT optimization profile (known: {', '.join(dims)})",
                where=where,
                fix="re-export the bundle with this edgelvm version (its decoder uses batch/seq/past/total)",
            )
        for key, value in zip(("min", "opt", "max"), rng):
            out[key].append(int(value))
    return out


def decoder_profiles(manifest: Manifest, config: BuildConfig) -> list[OptimizationProfile]:
    """Prefill and decode profiles for every decoder input, from the manifest's dynamic dims."""
    max_length = _max_length(manifest, config)
    batch: Range = (1, 1, config.max_batch)
    chunk = max_length
    if config.prefill_chunk is not None:
        if not 1 <= config.prefill_chunk <= max_length:
            raise EngineBuildError(f"prefill chunk {config.prefill_chunk} is outside 1..{max_length}",
                                   where="--prefill-chunk", fix=f"pick a value up to {max_length}")  # fmt: skip
        chunk = config.prefill_chunk
    opt_seq = config.opt_prefill_length or min(max_length, manifest.preprocess.tokens_per_image + 64)
    opt_seq = max(1, min(opt_seq, chunk))
    past_max = max(0, min(config.prefill_past_max, max_length - 1))
    if chunk < max_length:  # later chunks come after up to max_length - 1 cached tokens
        past_max = max_length - 1
    one: Range = (1, 1, 1)  # logits_keep: each row's last logits only (TrtBackend.max_last_logits)
    prefill = {
        "batch": batch,
        "seq": (1, opt_seq, chunk),
        "past": (0, 0, past_max),
        "total": (1, opt_seq, max_length),
        "keep": one,
    }
    half = max(1, max_length // 2)
    decode = {
        "batch": batch,
        "seq": (1, 1, 1),
        "past": (0, half - 1, max_length - 1),
        "total": (1, half, max_length),
        "keep": one,
    }
    inputs = manifest.graphs["decoder"].inputs
    where = f"decoder ({manifest.graphs['decoder'].file})"
    standard = ("inputs_embeds", "attention_mask", "position_ids", LOGITS_KEEP)
    extra = [t.name for t in inputs if t.name not in standard and not t.name.startswith("past")]
    if extra:  # e.g. cross-attention states: the TensorRT backend does not feed those yet
        raise EngineBuildError(
            f"the decoder graph takes inputs besides embeddings, mask, positions and the cache ({', '.join(extra)}), "
            "which edgelvm's TensorRT path does not support yet",
            where=where,
            fix="run this bundle with onnxruntime (`VLM.load(bundle)`, CUDA or CPU)",
        )
    return [
        OptimizationProfile(name, {spec.name: _shape(spec.shape, dims, where) for spec in inputs})
        for name, dims in (("prefill", prefill), ("decode", decode))
    ]


def vision_profiles(manifest: Manifest, config: BuildConfig) -> list[OptimizationProfile]:
    # A tiling bundle sends each image as several views (at most tiling_params.max_views) through the vision graph.
    views = int((manifest.preprocess.tiling_params or {}).get("max_views", 1))
    batch = config.vision_max_batch or config.max_batch * views
    spec = manifest.graphs["vision"]
    extra = [t.name for t in spec.inputs if t.name != "pixel_values"]
    if extra:  # native-resolution patches, a Q-Former's prompt: the TensorRT backend does not feed those yet
        raise EngineBuildError(
            f"the vision graph takes inputs besides pixel_values ({', '.join(extra)}), which edgelvm's TensorRT "
            "path does not support yet",
            where=f"vision ({spec.file})",
            fix="run this bundle with onnxruntime (`VLM.load(bundle)`, CUDA or CPU)",
        )
    dims = {"batch": (1, 1, batch)}
    where = f"vision ({spec.file})"
    return [OptimizationProfile("vision", {t.name: _shape(t.shape, dims, where) for t in spec.inputs})]


def _max_length(manifest: Manifest, config: BuildConfig) -> int:
    bundle_max = manifest.kv_cache.max_length
    if config.max_length is None:
        return bundle_max
    if not 1 <= config.max_length <= bundle_max:
        raise EngineBuildError(
            f"max_length {config.max_length} is outside 1..{bundle_max} (the bundle's KV cache length)",
            where="max_length",
            fix=f"pass at most {bundle_max}, or re-export with a larger --max-length",
        )
    return config.max_length


def for_network(profile: OptimizationProfile, network_inputs: dict[str, tuple[int, ...]]) -> OptimizationProfile:
    """``profile`` without ``logits_keep`` where the parsed network has no such input: the graph gives it a default
    (an initializer of the same name), which TensorRT's ONNX parser imports as a constant, not an input."""
    if LOGITS_KEEP in profile.shapes and LOGITS_KEEP not in network_inputs:
        return OptimizationProfile(profile.name, {k: v for k, v in profile.shapes.items() if k != LOGITS_KEEP})
    return profile


def check_network_inputs(network_inputs: dict[str, tuple[int, ...]], profile: OptimizationProfile, where: str) -> None:
    """Every dynamic (-1) network input has a profile shape, and every profiled name is an input."""
    missing = [n for n, shape in network_inputs.items() if -1 in shape and n not in profile.shapes]
    extra = [n for n in profile.shapes if n not in network_inputs]
    if missing or extra:
        raise EngineBuildError(
            f"graph inputs and manifest disagree (no profile for: {missing or 'none'}; not in the graph: "
            f"{extra or 'none'})",
            where=where,
            fix="re-export the bundle; do not edit edgelvm.json or the graphs by hand",
        )


# ---- directory and engines manifest (pure) --------------------------------------------------------------------------
def engine_dir(bundle_dir: str | Path, fingerprint: str) -> Path:
    return Path(bundle_dir) / ENGINES_DIR / fingerprint


def engines_manifest(
    fingerprint: str,
    trt_version: str,
    engines: dict[str, EngineInfo],
    config: BuildConfig,
    gpu: dict | None = None,
    memory_pool_limits: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    cfg = asdict(config)
    cfg["timing_cache"] = str(config.timing_cache) if config.timing_cache else None
    return {
        "format_version": ENGINES_FORMAT_VERSION,
        "edgelvm_version": __version__,
        "fingerprint": fingerprint,
        "tensorrt_version": trt_version,
        "gpu": gpu or {},
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg,
        "memory_pool_limits": dict(memory_pool_limits or {}),
        "engines": {name: info.to_dict() for name, info in engines.items()},
    }


def check_target(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise EngineBuildError(
            "engines for this device already exist",
            where=target,
            fix="pass force=True (`edgelvm build --force`) to rebuild them",
        )


#: Engines are written (and hashed) in slices of this size, straight from TensorRT's buffer.
_WRITE_SLICE = 64 << 20


class EngineDirWriter:
    """The engines directory, staged next to ``target``: each engine goes to disk as soon as it is built, straight
    from TensorRT's ``IHostMemory`` (no second host copy, and freed before the next build: an 8 GB Orin Nano holds
    one serialized engine at a time, not all of them twice); the manifest and timing cache last, then one swap.

    A failed or interrupted build leaves the previous engines untouched (the staging directory is removed);
    ``force`` replaces an existing directory only once the new one is complete.
    """

    def __init__(self, target: Path, *, force: bool) -> None:
        check_target(target, force)
        self.target = target
        self.staging = make_staging(target)

    def __enter__(self) -> EngineDirWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)

    def add_engine(self, name: str, serialized: Any) -> tuple[int, str]:
        """Write one serialized engine (any buffer: ``IHostMemory``, bytes); returns ``(size, sha256)``."""
        import hashlib

        view = memoryview(serialized).cast("B")
        digest = hashlib.sha256()
        with open(self.staging / name, "wb") as f:
            for offset in range(0, len(view), _WRITE_SLICE):
                piece = view[offset : offset + _WRITE_SLICE]
                f.write(piece)
                digest.update(piece)
        return len(view), digest.hexdigest()

    def commit(self, manifest: dict[str, Any], timing_cache: bytes | None = None) -> Path:
        if timing_cache is not None:
            (self.staging / TIMING_CACHE).write_bytes(timing_cache)
        (self.staging / ENGINES_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        swap_into_place(self.staging, self.target)
        return self.target


def read_engines_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / ENGINES_MANIFEST
    if not path.is_file():
        raise EngineBuildError(
            f"{ENGINES_MANIFEST} is missing", where=directory, fix="build the engines with `edgelvm build BUNDLE`"
        )
    return json.loads(path.read_text(encoding="utf-8"))


#: Manifest precisions of graphs with explicit quantization (written by the quantize stage's rewrites).
QUANTIZED = ("int8", "int4")


def resolve_precision(
    requested: str,
    has_qdq: bool,
    quantized: str | None = None,
    *,
    graph_dtype: str = "float32",
    trt_major: int = 10,
) -> tuple[str, list[str]]:
    """(precision label, builder flag names) for a requested precision, whether the parsed graph has Q/DQ layers,
    the manifest's quantized precision, the graph's float dtype and the TensorRT major version. Explicitly quantized
    graphs take no precision flags (strong typing); TensorRT 11 has no precision flags at all (always strongly typed:
    the graph's dtype is the engine's)."""
    if requested not in PRECISIONS:
        raise EngineBuildError(
            f"unknown precision {requested!r}", where="precision", fix=f"use one of: {', '.join(PRECISIONS)}"
        )
    if quantized in QUANTIZED:
        return quantized, []
    if trt_major >= 11:
        graph_precision = "fp16" if graph_dtype == "float16" else "fp32"
        if requested != "auto" and requested != graph_precision:
            raise EngineBuildError(
                f"TensorRT {trt_major} builds strongly typed networks only (no FP16 builder flag), so this "
                f"{graph_dtype} graph gives a {graph_precision} engine, not the {requested} one asked for",
                where="precision",
                fix="re-export the bundle with `--dtype fp16` for an fp16 engine (or `--dtype fp32` for fp32), "
                "build with --precision auto, or use TensorRT 10.x, whose FP16 flag lowers an fp32 graph",
            )
        if has_qdq:
            return "int8", []
        if graph_precision == "fp32":
            log.warning(
                "TensorRT %d is always strongly typed: this float32 graph gives an fp32 engine (slower and twice "
                "the memory of fp16); re-export with --dtype fp16 for an fp16 engine",
                trt_major,
            )
        return graph_precision, []
    flags = [] if requested == "fp32" else ["FP16"]
    if has_qdq:  # Q/DQ from elsewhere (a graph edgelvm did not quantize): the weakly typed INT8 path
        flags.append("INT8")
    label = "int8" if has_qdq else ("fp32" if requested == "fp32" else "fp16")
    return label, flags


# ---- TensorRT (lazy) ----------------------------------------------------------------------------------------------
def import_tensorrt() -> Any:
    """``tensorrt``, checked to be 10.x or newer (8.x is refused: no INT64, no strong typing)."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise TensorRTUnavailableError(
            f"TensorRT's Python package is not installed ({err})",
            where="tensorrt",
            fix="on Jetson it ships with JetPack (`sudo apt install python3-libnvinfer`, then use the system Python "
            "or a venv made with `python3 -m venv --system-site-packages`); on x86-64 with a CUDA 12 driver "
            '`pip install "edgelvm[tensorrt]"` (= `pip install tensorrt-cu12 "cuda-python>=12.6,<13"`; CUDA 13: '
            f"tensorrt-cu13 and cuda-python 13) — exact commands per platform: {compat.HARDWARE_DOC}",
        ) from None
    compat.check_tensorrt_version(trt, TensorRTUnavailableError)
    return trt


#: Bounds of the default WORKSPACE pool (TensorRT's own default is all device memory).
WORKSPACE_FLOOR = 256 << 20
WORKSPACE_CAP = 4 << 30
GIB = 1 << 30


def default_pool_limits(usable_bytes: int | None) -> dict[str, int | None]:
    """WORKSPACE: a quarter of the usable memory within 256 MiB..4 GiB; TACTIC_DRAM: half of it (TensorRT's own
    defaults: all of the device's memory and 75%). On a Jetson the CPU, the OS and the builder's copy of the weights
    share that memory. An estimate, not measured on a device; ``--workspace-gb`` overrides it."""
    if not usable_bytes or usable_bytes <= 0:
        return {"WORKSPACE": None, "TACTIC_DRAM": None}
    return {
        "WORKSPACE": int(min(WORKSPACE_CAP, max(WORKSPACE_FLOOR, usable_bytes // 4))),
        "TACTIC_DRAM": int(usable_bytes // 2),
    }


def usable_memory_for_build(
    config: BuildConfig, manifest: Manifest, gpu: dict[str, Any] | None = None
) -> tuple[int | None, str]:
    """(usable bytes, where the figure came from): the ``config.device`` profile, else the detected GPU's memory
    less 0.5 GiB (Jetson: system memory less 1 GiB, shared), else the bundle's export target, else unknown."""
    if config.device:
        from edgelvm.devices.profiles import load_profile

        profile = load_profile(config.device)
        return profile.usable_memory_bytes, f"device profile {profile.name}"
    total = (gpu or {}).get("memory_total_bytes")
    if total:
        reserve = GIB if "device-tree" in str((gpu or {}).get("source", "")) else GIB // 2
        return max(int(total) - reserve, 0), f"detected GPU memory ({(gpu or {}).get('name', '?')})"
    target = manifest.target or {}
    if target.get("usable_bytes"):
        return int(target["usable_bytes"]), f"the bundle's export target {target.get('profile', '?')}"
    return None, "unknown"


def pool_limits(config: BuildConfig, manifest: Manifest, gpu: dict[str, Any] | None = None) -> dict[str, int | None]:
    """Explicit limits win (0: leave TensorRT's default); the rest come from :func:`default_pool_limits`."""
    usable, source = usable_memory_for_build(config, manifest, gpu)
    limits = default_pool_limits(usable)
    if usable is None:
        log.warning("device memory unknown: TensorRT's default memory pools (all device memory); pass --device")
    else:
        log.info("memory pool limits from %s (%.1f GiB usable)", source, usable / GIB)
    for name, explicit in (("WORKSPACE", config.workspace_bytes), ("TACTIC_DRAM", config.tactic_dram_bytes)):
        if explicit is not None:
            limits[name] = int(explicit) or None
    return limits


def network_has_qdq(network: Any, trt: Any) -> bool:
    """True when the parsed network has Quantize/Dequantize layers (explicit quantization)."""
    kinds = {trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE}
    return any(network.get_layer(i).type in kinds for i in range(network.num_layers))


def _parse_errors_fix(errors: list[str]) -> str:
    text = " ".join(errors)
    if "MatMulNBits" in text:
        return (
            "this decoder uses onnxruntime's MatMulNBits (INT4) operator, which TensorRT cannot parse: quantize "
            "it with QDQ (INT4 weight-only) for TensorRT, or run it with an onnxruntime backend"
        )
    return "check the TensorRT version against the bundle's opset (20); re-export the bundle, or report the operator"


def _build_graph(
    trt: Any,
    logger: Any,
    onnx_path: Path,
    profiles: list[OptimizationProfile],
    config: BuildConfig,
    cache_blob: bytes | None,
    quantized: str | None = None,
    graph_dtype: str = "float32",
    limits: dict[str, int | None] | None = None,
) -> tuple[Any, str, list[str], bytes]:
    """The serialized engine (TensorRT's ``IHostMemory``, not copied), its precision and flags, the timing cache."""
    builder = trt.Builder(logger)
    network = builder.create_network(compat.network_creation_flags(trt, strongly_typed=quantized in QUANTIZED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a file, so external weight data next to it is found
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(
            f"TensorRT cannot parse the graph: {'; '.join(errors[:3]) or 'no details'}",
            where=onnx_path,
            fix=_parse_errors_fix(errors),
        )
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    profiles = [for_network(profile, inputs) for profile in profiles]
    for profile in profiles:
        check_network_inputs(inputs, profile, str(onnx_path))
    precision, flag_names = resolve_precision(
        config.precision,
        network_has_qdq(network, trt),
        quantized,
        graph_dtype=graph_dtype,
        trt_major=compat.tensorrt_major(trt),
    )
    builder_config = builder.create_builder_config()
    compat.set_memory_pool_limits(trt, builder_config, limits or {})
    for flag in compat.builder_flags(trt, flag_names):
        builder_config.set_flag(flag)
    cache = builder_config.create_timing_cache(cache_blob or b"")
    if not compat.set_timing_cache(builder_config, cache):  # a cache from another device: start from an empty one
        builder_config.set_timing_cache(builder_config.create_timing_cache(b""), ignore_mismatch=False)
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for tensor, shape in profile.shapes.items():
            trt_profile.set_shape(tensor, shape["min"], shape["opt"], shape["max"])
        builder_config.add_optimization_profile(trt_profile)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise EngineBuildError(
            "TensorRT returned no engine (see the TensorRT log above)",
            where=onnx_path,
            fix="usually out of memory while building: close other programs, add swap, or lower max_length / "
            "max_batch; on other errors rerun with -vv for TensorRT's verbose log",
        )
    return serialized, precision, flag_names, bytes(builder_config.get_timing_cache().serialize())


def build_engines(bundle_dir: str | Path, config: BuildConfig | None = None) -> BuildReport:
    """Build ``vision.engine`` and ``decoder.engine`` for this machine's GPU under ``bundle/engines/<fingerprint>/``."""
    config = config or BuildConfig()
    started = time.perf_counter()
    bundle = Path(bundle_dir)
    manifest = Manifest.load(bundle)
    verify_bundle_files(bundle, manifest, check_hashes=config.verify)
    if manifest.kv_cache.states:
        raise UnsupportedModelError(
            f"{manifest.family}: a hybrid decoder (recurrent / convolution states besides the KV cache) has no "
            "TensorRT profiles or runtime cache yet",
            where=bundle,
            fix="run this bundle with ONNX Runtime (`edgelvm serve/bench --backend auto`); CUDA works through its "
            "CUDA execution provider",
        )
    if manifest.kv_cache.windows:
        raise UnsupportedModelError(
            f"{manifest.family}: sliding-window layers with window-sized caches (kv_cache.windows) have no TensorRT "
            "profiles or runtime cache yet",
            where=bundle,
            fix="run this bundle with ONNX Runtime CPU, or re-export with --max-length up to the sliding window",
        )
    plans = {"vision": vision_profiles(manifest, config), "decoder": decoder_profiles(manifest, config)}
    trt = import_tensorrt()
    trt_version = str(trt.__version__)
    gpu_info: dict[str, Any] = {}
    fingerprint = config.fingerprint
    if fingerprint is None:
        from edgelvm.devices.fingerprint import detect_gpu
        from edgelvm.devices.fingerprint import fingerprint as make_fingerprint

        gpu = detect_gpu()
        gpu_info = asdict(gpu)
        fingerprint = make_fingerprint(gpu, trt_version)
    target = engine_dir(bundle, fingerprint)
    check_target(target, config.force)  # fail before a long build, not after it
    cache_path = config.timing_cache or target / TIMING_CACHE
    cache_blob = cache_path.read_bytes() if cache_path.is_file() else None
    limits = pool_limits(config, manifest, gpu_info)
    logger = trt.Logger(trt.Logger.INFO if log.isEnabledFor(logging.DEBUG) else trt.Logger.WARNING)
    engines: dict[str, EngineInfo] = {}
    with EngineDirWriter(target, force=config.force) as writer:
        for graph, profiles in plans.items():
            source = manifest.graphs[graph].file
            onnx_path = bundle / source
            log.info("building %s engine from %s (%d profile(s))", graph, source, len(profiles))
            t0 = time.perf_counter()
            quantized = manifest.graphs[graph].precision
            graph_dtype = manifest.graphs[graph].inputs[0].dtype if graph == "vision" else _float_dtype(manifest)
            serialized, precision, flags, cache_blob = _build_graph(
                trt, logger, onnx_path, profiles, config, cache_blob, quantized, graph_dtype, limits
            )
            name = f"{graph}.engine"
            size, digest = writer.add_engine(name, serialized)
            del serialized  # TensorRT's buffer: freed before the next graph is built
            engines[graph] = EngineInfo(
                graph=graph,
                file=name,
                source=source,
                source_sha256=manifest.files.get(source) or sha256_file(onnx_path),
                profiles=profiles,
                precision=precision,
                flags=flags,
                sha256=digest,
                size_bytes=size,
                build_seconds=round(time.perf_counter() - t0, 1),
            )
        writer.commit(engines_manifest(fingerprint, trt_version, engines, config, gpu_info, limits), cache_blob)
    if config.timing_cache is not None and cache_blob is not None:
        config.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        config.timing_cache.write_bytes(cache_blob)
    return BuildReport(target, fingerprint, trt_version, engines, time.perf_counter() - started, cache_path)


def _float_dtype(manifest: Manifest) -> str:
    """The decoder's float dtype: its embeddings input (``inputs_embeds``)."""
    return manifest.graphs["decoder"].inputs[0].dtype
