"""The GPU fingerprint that names an engine directory: ``<gpu-name>-sm<cc>-trt<version>``.

Why: TensorRT engines are specific to the GPU model and the TensorRT version that built them, so a
bundle can carry engines for several devices side by side, and the runtime picks the directory that matches.
On Jetson every module reports the GPU as "Orin", so the board model from the device tree
(``/proc/device-tree/model``, e.g. "NVIDIA Jetson Orin Nano Developer Kit") is used as the name instead: an Orin Nano
engine is tuned for fewer SMs than an AGX Orin one.

Sources, first that answers wins: NVML (``pynvml``, optional), ``nvidia-smi``, ``cuda-python``. Each is a plain
function returning ``GpuInfo | None`` so tests can pass fakes.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgelvm.errors import EdgeLVMError

log = logging.getLogger(__name__)

DEVICE_TREE_MODEL = Path("/proc/device-tree/model")


class NoGpuError(EdgeLVMError):
    """No NVIDIA GPU could be found (or none of the ways to ask for one is installed)."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.7"
    memory_total_bytes: int | None = None
    source: str = ""


def sanitize(text: str) -> str:
    """Lower-case, ``[a-z0-9.]`` runs joined by single dashes: safe as a directory name everywhere."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"


def fingerprint(gpu: GpuInfo, trt_version: str) -> str:
    return f"{sanitize(gpu.name)}-sm{gpu.compute_capability.replace('.', '')}-trt{sanitize(trt_version)}"


def parse_nvidia_smi(output: str, index: int = 0) -> GpuInfo | None:
    """Parse ``nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader,nounits``."""
    rows = [line for line in output.strip().splitlines() if line.strip()]
    if len(rows) <= index:
        return None
    parts = [p.strip() for p in rows[index].split(",")]
    if len(parts) < 2 or not re.fullmatch(r"\d+\.\d+", parts[1]):
        return None
    memory = int(float(parts[2]) * (1 << 20)) if len(parts) > 2 and re.fullmatch(r"[\d.]+", parts[2]) else None
    return GpuInfo(name=parts[0], compute_capability=parts[1], memory_total_bytes=memory, source="nvidia-smi")


def from_nvidia_smi(index: int = 0) -> GpuInfo | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError) as err:
        log.debug("nvidia-smi failed: %s", err)
        return None
    return parse_nvidia_smi(out, index)


def from_nvml(index: int = 0) -> GpuInfo | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            try:
                memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            except pynvml.NVMLError:  # Jetson's NVML has no memory info
                memory = None
        finally:
            pynvml.nvmlShutdown()
    except Exception as err:  # pynvml raises NVMLError subclasses, or OSError when libnvidia-ml is missing
        log.debug("NVML unavailable: %s", err)
        return None
    name = name.decode() if isinstance(name, bytes) else name
    return GpuInfo(name=name, compute_capability=f"{major}.{minor}", memory_total_bytes=memory, source="nvml")


def from_cuda_python(index: int = 0) -> GpuInfo | None:
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
    except ImportError:
        return None
    err, props = cudart.cudaGetDeviceProperties(index)
    if int(err) != 0:
        return None
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name, f"{props.major}.{props.minor}", int(props.totalGlobalMem), source="cuda-python")


def jetson_model(path: Path = DEVICE_TREE_MODEL) -> str | None:
    """The board name on a Jetson ("NVIDIA Jetson AGX Orin Developer Kit"), else None."""
    try:
        text = path.read_bytes().decode(errors="replace").strip("\x00 \n")
    except OSError:
        return None
    return text if "jetson" in text.lower() else None


DEFAULT_SOURCES: tuple[Callable[[int], GpuInfo | None], ...] = (from_nvml, from_nvidia_smi, from_cuda_python)


def detect_gpu(
    index: int = 0,
    sources: Sequence[Callable[[int], GpuInfo | None]] = DEFAULT_SOURCES,
    board: Callable[[], str | None] = jetson_model,
) -> GpuInfo:
    """The GPU at ``index``; on a Jetson its name is the board model. Raises :class:`NoGpuError` when none."""
    for source in sources:
        info = source(index)
        if info is not None:
            model = board()
            if model:
                info = GpuInfo(model, info.compute_capability, info.memory_total_bytes, f"{info.source}+device-tree")
            log.info("GPU %d: %s (sm %s) via %s", index, info.name, info.compute_capability, info.source)
            return info
    raise NoGpuError(
        "no NVIDIA GPU found (asked NVML, nvidia-smi and cuda-python)",
        where=f"GPU {index}",
        fix="run on the device with its NVIDIA driver loaded; install `nvidia-ml-py` or `cuda-python` if nvidia-smi "
        "is absent (some containers), or pass the fingerprint explicitly",
    )


def current_fingerprint(trt_version: str, index: int = 0) -> str:
    return fingerprint(detect_gpu(index), trt_version)
