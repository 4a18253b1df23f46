"""ONNX Runtime session settings chosen for the device the runtime runs on, each overridable.

Why per device: ORT's defaults suit a dedicated server. On a robot or camera the model shares the CPU with control
loops, and ORT's worker threads spin-wait between kernels by default, which burns a core and power while idle
between tokens. Measured on the 2-vCPU x86-64 build machine (realistic-shape fused decoder, fp32, median of 3):
2 threads + spinning 63.9 tok/s, 2 threads without spinning 53.8, 1 thread 37.8 — so a host defaults to all usable
cores with spinning. On a Jetson (detected by /etc/nv_tegra_release) the CPU path is the fallback and shares the SoC
with the GPU and the robot's own processes, so spinning is off there (a guess, not measured: no Jetson here).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

#: Room left besides an upcast graph's fp32 weights: KV cache, activations, the rest of the process.
UPCAST_MARGIN = 1.25


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def is_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists()


@dataclass(frozen=True)
class SessionSettings:
    threads: int  # intra-op threads
    spinning: bool  # worker threads spin-wait between kernels (lower latency, burns CPU while idle)
    memory_arena: bool = True  # reuse ORT's CPU allocations between runs
    #: How ORT computes the INT4 ``DequantizeLinear → MatMul`` pairs of a portable INT4 decoder, which its CPU
    #: optimizer fuses into MatMulNBits: ORT's default there is 4 (int8 activations, ~2e-3 off the exported and
    #: parity-checked numerics); 0 keeps them in fp32. The fused decoder carries its own level (export option).
    qdq_int4_accuracy_level: int = 0
    #: INT8 QDQ matmuls (the INT8 vision graph, a SmoothQuant decoder), which ORT fuses into ``MatMulIntegerToFloat``:
    #: on x86-64 with AVX2 but no VNNI its default u8s8 kernel sums pairs of products in saturating int16
    #: (``vpmaddubsw``) — measured on the build machine (AVX2 only), a tiny SmolVLM's INT8 vision graph came out
    #: 0.11 (relative) off the QDQ graph's own definition (ORT with fusions off), enough to change greedy answers.
    #: ``session.x64quantprecision=1`` makes the same integer kernels exact (measured 5e-7); no effect elsewhere.
    precise_int8: bool = True
    #: An fp16 graph on ONNX Runtime's CPU provider, which has no fp16 MatMul on x86-64: at full optimization ORT
    #: converts its weights to fp32 copies when the session loads (measured: a 1.07 GB fp16 decoder → 2.12 GB of
    #: anonymous memory, the file pages dropped), so a 14 GB fp16 7B bundle needs 28 GB. ``mapped`` keeps the
    #: weights memory-mapped in fp16 and converts them at each run instead (optimizations up to EXTENDED, no
    #: arena: ~0 anonymous memory, measured 8× slower per decode step); ``auto`` upcasts when twice the graph's
    #: bytes fit in the memory available (with :data:`UPCAST_MARGIN`), else maps and says why it is slow.
    fp16_weights: Literal["auto", "upcast", "mapped"] = "auto"

    @classmethod
    def for_this_device(cls, **overrides: Any) -> SessionSettings:
        """Defaults for the machine we run on; keyword overrides (``threads=2``, ``spinning=False``) win."""
        base = cls(threads=_usable_cores(), spinning=not is_jetson())
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def apply(self, options: Any) -> Any:
        options.intra_op_num_threads = self.threads
        options.enable_cpu_mem_arena = self.memory_arena
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        return self.apply_numerics(options)

    def fp16_mode(self, graph_bytes: int, available: int | None = None) -> Literal["upcast", "mapped"]:
        """How to load an fp16 graph of ``graph_bytes`` on the CPU provider (see :attr:`fp16_weights`)."""
        if self.fp16_weights != "auto":
            return self.fp16_weights
        available = available_memory() if available is None else available
        if available is None or 2 * graph_bytes * UPCAST_MARGIN <= available:
            return "upcast"
        log.warning(
            "an fp16 graph of %.1f GB would take %.1f GB as fp32 on ONNX Runtime CPU, more than the %.1f GB "
            "available: keeping its weights memory-mapped in fp16 and converting them at each step (several times "
            "slower). For CPU inference export with --dtype fp32 or quantize the language model to INT4.",
            graph_bytes / 1e9, 2 * graph_bytes / 1e9, available / 1e9,
        )  # fmt: skip
        return "mapped"

    def cpu_fp16_options(self, ort: Any, mode: Literal["upcast", "mapped"]) -> Any:
        """Session options for an fp16 graph on the CPU provider loaded as ``mode``."""
        options = self.apply(ort.SessionOptions())
        options.log_severity_level = 3
        if mode == "mapped":  # ORT_ENABLE_ALL's CPU transformers make the fp32 copies; EXTENDED keeps the casts
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            options.enable_cpu_mem_arena = False  # each step's converted weights are freed, not pooled
            # and converted just before their matmul: in the default order the weight casts (no activation inputs)
            # may all run first — measured on a 2-layer 7B-shape decoder, peak anonymous memory 1546 MB vs 556 MB
            options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        else:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return options

    def apply_numerics(self, options: Any) -> Any:
        """Only the settings that change what a graph computes (export's parity sessions use these too)."""
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(self.qdq_int4_accuracy_level))
        options.add_session_config_entry("session.x64quantprecision", "1" if self.precise_int8 else "0")
        return options


def available_memory() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes (None where there is none: not Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def graph_file_bytes(path: Path) -> int:
    """A graph's bytes on disk: its ``.onnx`` file and the external data files named after it."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())
