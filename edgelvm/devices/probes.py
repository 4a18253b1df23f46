"""Memory and power probes that sample in a background thread while a benchmark runs.

Why a thread: power and GPU memory change within one generation (prefill spikes, decode plateaus), and neither
tegrastats nor NVML keeps a history, so we sample at a fixed interval and integrate. What a machine cannot report
stays ``None`` and the report prints "not reported" — never a made-up zero.

- Jetson: ``tegrastats --interval MS`` (a line per sample: RAM used/total in MB, power rails in mW). Total board
  input power is ``VDD_IN`` (Orin Nano / NX) or ``POM_5V_IN`` (older modules); AGX Orin has no single input rail,
  so the sum of its rails is used and labelled as such. RAM is shared with the CPU, so "GPU memory" there is
  system RAM in use.
- Desktop / datacenter GPUs: NVML (``pynvml``, optional): power (mW), memory used, and the energy counter (mJ)
  where the GPU has one. ``nvmlDeviceGetPowerUsage`` is, on Ampere and newer (except GA100), an average over about
  one second, not an instantaneous reading: fine for the mean power and energy of a run of seconds, meaningless for
  one 50 ms sample — the energy counter (Volta+) is preferred when present. Memory and power are read separately, so
  a GPU that refuses one still reports the other.
- Host: peak RSS of this process from ``/proc/self/status`` (VmHWM), reset per measurement where the kernel allows.
"""

from __future__ import annotations

import contextlib
import logging
import re
import resource
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%")
# "VDD_IN 4406mW/4406mW" (JetPack 5/6) or "POM_5V_IN 2086/2086" (JetPack 4): current / running average.
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")


@dataclass
class TegraSample:
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    swap_used_mb: int | None = None
    gpu_util_percent: int | None = None
    rails_mw: dict[str, int] = field(default_factory=dict)  # instantaneous mW per rail
    total_power_mw: int | None = None
    power_source: str | None = None  # which rail(s) total_power_mw is


def parse_tegrastats(line: str) -> TegraSample:
    """One tegrastats line → numbers. Unknown fields are ignored; missing ones stay None."""
    sample = TegraSample()
    if m := _RAM.search(line):
        sample.ram_used_mb, sample.ram_total_mb = int(m.group(1)), int(m.group(2))
    if m := _SWAP.search(line):
        sample.swap_used_mb = int(m.group(1))
    if m := _GR3D.search(line):
        sample.gpu_util_percent = int(m.group(1))
    for name, current, _average in _RAIL.findall(line):
        if name in ("RAM", "SWAP", "IRAM"):
            continue
        sample.rails_mw[name] = int(current)
    for rail in TOTAL_RAILS:
        if rail in sample.rails_mw:
            sample.total_power_mw, sample.power_source = sample.rails_mw[rail], rail
            break
    else:
        if sample.rails_mw:
            sample.total_power_mw = sum(sample.rails_mw.values())
            sample.power_source = "sum of " + "+".join(sorted(sample.rails_mw))
    return sample


# ---- host memory ----------------------------------------------------------------------------------------------------
def peak_rss_bytes(status: Path = Path("/proc/self/status")) -> int | None:
    """This process's peak resident set (VmHWM); falls back to getrusage's ru_maxrss (KiB on Linux)."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (OSError, ValueError):
        return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs). False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---- samplers --------------------------------------------------------------------------------------------------------
@dataclass
class ProbeSummary:
    """What a probe saw between start and stop. ``None`` = this machine does not report it."""

    source: str = "none"
    samples: int = 0
    seconds: float = 0.0
    peak_memory_bytes: int | None = None  # GPU memory in use (Jetson: system RAM in use), whole device
    mean_power_w: float | None = None
    energy_j: float | None = None
    power_source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def integrate_energy_j(times_s: list[float], power_w: list[float]) -> float | None:
    """Trapezoidal ∫P dt over the samples (None with fewer than two)."""
    if len(times_s) < 2:
        return None
    return sum((t1 - t0) * (p0 + p1) / 2 for t0, t1, p0, p1 in zip(times_s, times_s[1:], power_w, power_w[1:]))


class _Sampler:
    """Common start/stop and bookkeeping; subclasses implement ``_read() -> (memory_bytes|None, power_w|None)``."""

    source = "none"

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.times: list[float] = []
        self.memory: list[int] = []
        self.power: list[float] = []
        self.power_source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def start(self) -> _Sampler:
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name=f"probe-{self.source}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._record()
            self._stop.wait(self.interval_s)

    def _record(self) -> None:
        try:
            memory, power = self._read()
        except Exception as err:  # a probe must never break the benchmark it observes
            log.debug("probe %s failed: %s", self.source, err)
            return
        now = time.perf_counter()
        if memory is not None:
            self.memory.append(memory)
        if power is not None:
            self.times.append(now)
            self.power.append(power)

    def _read(self) -> tuple[int | None, float | None]:
        return None, None

    def stop(self) -> ProbeSummary:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._record()  # one last sample so short runs still have an end point
        self._close()
        return ProbeSummary(
            source=self.source,
            samples=max(len(self.memory), len(self.power)),
            seconds=time.perf_counter() - self._started,
            peak_memory_bytes=max(self.memory) if self.memory else None,
            mean_power_w=sum(self.power) / len(self.power) if self.power else None,
            energy_j=integrate_energy_j(self.times, self.power),
            power_source=self.power_source,
        )

    def _close(self) -> None:
        pass


class NullProbe(_Sampler):
    """Nothing to sample here: every figure is "not reported"."""

    def _loop(self) -> None:
        self._stop.wait()


class NvmlProbe(_Sampler):
    source = "nvml"

    def __init__(self, interval_s: float = 0.05, index: int = 0) -> None:
        import pynvml

        super().__init__(interval_s)
        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.power_source = "nvmlDeviceGetPowerUsage"
        self._energy_start = self._energy_mj()

    def _energy_mj(self) -> int | None:
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception:  # not supported before Volta or on Jetson
            return None

    def _read(self) -> tuple[int | None, float | None]:
        memory: int | None = None
        power: float | None = None
        try:
            memory = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        except Exception as err:  # NVMLError_NotSupported on some boards: keep the power sample
            log.debug("NVML memory read failed: %s", err)
        try:
            power = self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0
        except Exception as err:  # a failed power read must not drop the memory sample
            log.debug("NVML power read failed: %s", err)
        return memory, power

    def stop(self) -> ProbeSummary:
        summary = super().stop()
        end = self._energy_mj()
        if self._energy_start is not None and end is not None:  # the hardware counter beats sampling
            summary.energy_j = (end - self._energy_start) / 1000.0
            summary.power_source = "nvmlDeviceGetTotalEnergyConsumption"
        return summary

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


class TegrastatsProbe(_Sampler):
    """Runs ``tegrastats`` as a child process; its own interval drives the samples."""

    source = "tegrastats"

    def __init__(self, interval_s: float = 0.1, executable: str = "tegrastats") -> None:
        super().__init__(interval_s)
        self._proc = subprocess.Popen(
            [executable, "--interval", str(max(10, int(interval_s * 1000)))],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def _loop(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if self._stop.is_set():
                break
            self.feed(line)

    def feed(self, line: str) -> None:
        sample = parse_tegrastats(line)
        now = time.perf_counter()
        if sample.ram_used_mb is not None:
            self.memory.append(sample.ram_used_mb * (1 << 20))
        if sample.total_power_mw is not None:
            self.times.append(now)
            self.power.append(sample.total_power_mw / 1000.0)
            self.power_source = sample.power_source

    def _record(self) -> None:  # samples arrive through feed()
        pass

    def _close(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()


def start_probe(interval_s: float = 0.05, gpu_index: int = 0) -> _Sampler:
    """The best probe this machine has, already started: tegrastats (Jetson) > NVML > none."""
    if shutil.which("tegrastats"):
        try:
            return TegrastatsProbe(max(interval_s, 0.1)).start()
        except OSError as err:
            log.info("tegrastats did not start: %s", err)
    try:
        return NvmlProbe(interval_s, gpu_index).start()
    except Exception as err:  # ImportError, or NVMLError when there is no GPU / driver
        log.info("NVML not available (%s): GPU memory and power not reported", err)
    return NullProbe(interval_s).start()
