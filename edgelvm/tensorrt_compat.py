"""What differs between the TensorRT (and cuda-python) versions edgelvm supports, in one place, without importing them.

Both the builder (``edgelvm.build``) and the runtime (``edgelvm.runtime.trt_backend``) go through these helpers, which
take the imported ``tensorrt`` module (or an engine / context / builder config) as an argument and look an API up
only where it exists — never ``getattr(obj, new, obj.old)``, whose default is evaluated eagerly and raises on a version
that removed ``old``. Tests drive them with fake modules holding exactly the attributes each version documents.

Supported range: TensorRT 10.x and 11.x (``MIN_TENSORRT``). Written against NVIDIA's documentation (TensorRT 10.x
Python API, the "Migrating from TensorRT 10.x to 11.x" guide and its removed-Python-API list) and **never run on
hardware in this repository**:

- TensorRT 11 removed every precision-enabling ``BuilderFlag`` (``FP16``, ``BF16``, ``INT8``, ``FP8``, ``INT4``,
  ``FP4``, ``OBEY/PREFER_PRECISION_CONSTRAINTS``): networks are always strongly typed, so the graph's own dtypes decide
  (an fp32 ONNX graph gives an fp32 engine; export ``--dtype fp16`` for an fp16 one). TensorRT 10 builds weakly typed
  networks unless ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is passed (edgelvm does for Q/DQ graphs it wrote).
- TensorRT 11 removed ``ICudaEngine.device_memory_size`` (use ``device_memory_size_v2``, added in 10.1) and the
  ``device_memory`` property setter of an execution context (use ``set_device_memory(ptr, size)``, added in 10.1).
- TensorRT < 10 (8.x): no INT64 tensors and no strong typing, while the runtime feeds int64 masks and positions:
  refused with a message rather than half-supported.
- cuda-python: ``int(cuda_obj)`` for a handle's address is deprecated since cuda-bindings 12.9.1 / 13.0.0
  (``cuda.bindings.utils.get_cuda_native_handle`` replaces it); cuda-bindings 13.x links the CUDA 13 runtime, which
  needs a CUDA 13 driver (r580+), so a CUDA 12 system (JetPack 6: CUDA 12.6) needs ``cuda-python>=12.6,<13``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from edgelvm.errors import EdgeLVMError

log = logging.getLogger(__name__)

MIN_TENSORRT = (10, 0)
#: Majors whose documented API this module was written against. Newer majors are tried with a warning.
KNOWN_MAJORS = (10, 11)
#: Builder flags that exist only while TensorRT builds weakly typed networks (removed in 11).
WEAK_TYPING_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4")

HARDWARE_DOC = "docs/hardware.md"


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.3.0.26"`` → ``(10, 3, 0, 26)``; non-numeric tails (``"11.0.0rc1"``) are cut at the first non-digit."""
    parts = []
    for piece in str(version).split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts) or (0,)


def tensorrt_major(trt: Any) -> int:
    return version_tuple(getattr(trt, "__version__", "0"))[0]


def check_tensorrt_version(trt: Any, error: type[EdgeLVMError] = EdgeLVMError, where: str = "tensorrt") -> int:
    """The TensorRT major version, or ``error`` below :data:`MIN_TENSORRT` (8.x: no INT64, no strong typing)."""
    version = str(getattr(trt, "__version__", "unknown"))
    parsed = version_tuple(version)
    if parsed < MIN_TENSORRT:
        raise error(
            f"TensorRT {version} is too old: edgelvm's TensorRT path needs TensorRT 10 or newer (its decoder takes "
            "int64 masks and positions, and quantized graphs need strongly typed networks; TensorRT 8.x has neither)",
            where=where,
            fix='JetPack 6.1/6.2 (TensorRT 10.3) on Jetson; on x86-64 `pip install "edgelvm[tensorrt]"` '
            f"(see {HARDWARE_DOC}); or run the bundle with onnxruntime (`VLM.load(bundle)`)",
        )
    if parsed[0] not in KNOWN_MAJORS:
        log.warning(
            "TensorRT %s: edgelvm was written against TensorRT %s; trying anyway",
            version,
            " and ".join(f"{m}.x" for m in KNOWN_MAJORS),
        )
    return parsed[0]


def always_strongly_typed(trt: Any) -> bool:
    """TensorRT 11+: every network is strongly typed and the precision flags are gone."""
    return tensorrt_major(trt) >= 11


def network_creation_flags(trt: Any, strongly_typed: bool) -> int:
    """Flags for ``Builder.create_network``: STRONGLY_TYPED on 10.x when asked (11.x: the default, nothing to pass;
    EXPLICIT_BATCH is ignored from 10.0 and never passed)."""
    if not strongly_typed or always_strongly_typed(trt):
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def builder_flags(trt: Any, names: list[str]) -> list[Any]:
    """``trt.BuilderFlag`` members by name; a name this TensorRT does not have is an error naming the version."""
    flags, missing = [], []
    for name in names:
        flag = getattr(trt.BuilderFlag, name, None)
        (missing if flag is None else flags).append(name if flag is None else flag)
    if missing:
        raise EdgeLVMError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no builder flag(s) {', '.join(missing)} "
            "(TensorRT 11 removed the precision flags: networks are strongly typed)",
            where="tensorrt",
            fix="this is an edgelvm bug (flags are chosen per TensorRT version): please report it",
        )
    return flags


def memory_pool_types(trt: Any) -> dict[str, Any]:
    """The ``MemoryPoolType`` members edgelvm sets, those this TensorRT has (``TACTIC_DRAM`` came with 8.6)."""
    pools = getattr(trt, "MemoryPoolType", None)
    return {name: getattr(pools, name) for name in ("WORKSPACE", "TACTIC_DRAM") if hasattr(pools, name)}


def set_memory_pool_limits(trt: Any, builder_config: Any, limits: dict[str, int | None]) -> dict[str, int]:
    """Apply ``{"WORKSPACE": bytes, "TACTIC_DRAM": bytes}`` (None: TensorRT's default); returns what was set."""
    pools, applied = memory_pool_types(trt), {}
    for name, value in limits.items():
        if value is None:
            continue
        if name not in pools:
            log.warning("TensorRT %s has no memory pool %s; its limit is not set", trt.__version__, name)
            continue
        builder_config.set_memory_pool_limit(pools[name], int(value))
        applied[name] = int(value)
    return applied


def set_timing_cache(builder_config: Any, cache: Any) -> bool:
    """``set_timing_cache`` returns False for a cache it rejects (built on another device / TensorRT): say so."""
    ok = builder_config.set_timing_cache(cache, ignore_mismatch=False)
    if ok is False:
        log.warning("TensorRT rejected the timing cache (another GPU or TensorRT version?): building without it")
    return ok is not False


def engine_device_memory_size(engine: Any) -> int:
    """Activation scratch an execution context needs: ``device_memory_size_v2`` (10.1+; the only one in 11) or the
    10.0 ``device_memory_size`` — looked up in that order, never both evaluated."""
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


def create_user_managed_context(trt: Any, engine: Any) -> Any:
    """An execution context without its own activation memory (the caller sets one shared buffer)."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:  # 10.0+
        return engine.create_execution_context(strategy.USER_MANAGED)
    return engine.create_execution_context_without_device_memory()


def set_context_device_memory(context: Any, ptr: int, size: int) -> None:
    if hasattr(context, "set_device_memory"):  # 10.1+ (the only form in 11)
        context.set_device_memory(ptr, size)
    else:  # 10.0
        context.device_memory = ptr


# ---- cuda-python ----------------------------------------------------------------------------------------------------
#: cudaError_t values whose message needs more than "CUDA error N".
CUDA_ERROR_HINTS = {
    35: "cudaErrorInsufficientDriver: cuda-python's CUDA runtime is newer than this driver supports — install the "
    "cuda-python major that matches the driver's CUDA major (CUDA 12 / JetPack 6: `pip install "
    '"cuda-python>=12.6,<13"`; cuda-python 13 needs a CUDA 13 driver, r580+)',
    100: "cudaErrorNoDevice: no CUDA GPU is visible (check nvidia-smi / CUDA_VISIBLE_DEVICES)",
    2: "cudaErrorMemoryAllocation: out of GPU memory",
}


def native_handle(obj: Any) -> int:
    """A cuda-python handle's address: ``get_cuda_native_handle`` where it exists (cuda-bindings 12.9.1+ / 13), else
    ``int(obj)`` (older releases, where that was the documented way)."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def cuda_python_driver_mismatch(bindings_version: str, driver_version: int) -> str | None:
    """A message when cuda-python's CUDA major is newer than the driver's (``cudaDriverGetVersion``: 12060 = 12.6)."""
    bindings_major = version_tuple(bindings_version)[0]
    driver_major = int(driver_version) // 1000
    if bindings_major and driver_major and bindings_major > driver_major:
        return (
            f"cuda-python {bindings_version} needs a CUDA {bindings_major} driver; this driver supports CUDA "
            f'{driver_major}.{int(driver_version) % 1000 // 10}: `pip install "cuda-python>={driver_major}.0,'
            f'<{driver_major + 1}"` (see {HARDWARE_DOC})'
        )
    return None
