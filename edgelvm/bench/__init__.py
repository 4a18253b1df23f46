"""``edgelvm bench``: latency, throughput, memory and power of bundles, against the bandwidth roofline (torch-free)."""

from edgelvm.bench.runner import BenchConfig, BenchReport, BenchResult, bench

__all__ = ["BenchConfig", "BenchReport", "BenchResult", "bench"]
