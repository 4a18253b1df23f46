"""Bandwidth roofline: decode reads every decoder weight once per token, so tokens/s ≤ bandwidth / weight bytes.

numpy-only, so the runtime side of a benchmark can call it without torch.
"""

from __future__ import annotations

import statistics
import time

import numpy as np


def measure_read_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes/s this machine streams from memory: median over repeats of a large array copy, counting the bytes
    read plus the bytes written (a copy is the simplest loop numpy runs at memory speed on every core count)."""
    source = np.ones(megabytes * (1 << 20) // 4, dtype=np.float32)
    target = np.empty_like(source)
    np.copyto(target, source)  # fault the pages in
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        rates.append(2 * source.nbytes / (time.perf_counter() - started))
    return statistics.median(rates)


def measure_threaded_read_bandwidth(megabytes: int = 512, repeats: int = 7, threads: int | None = None) -> float:
    """Bytes/s read by ``threads`` threads (default: the CPUs this process may use) each summing its slice of a large
    array (numpy releases the GIL in the reduction) — the access pattern of decode, which only reads weights. Median
    over repeats, after one warm-up pass."""
    import os
    import threading

    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    data = np.ones(megabytes * (1 << 20) // 4, dtype=np.float32)
    slices = np.array_split(data, max(1, threads))

    def one_pass() -> float:
        workers = [threading.Thread(target=np.add.reduce, args=(part,)) for part in slices]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return data.nbytes / (time.perf_counter() - started)

    one_pass()
    return statistics.median(one_pass() for _ in range(repeats))


def measure_host_bandwidth(megabytes: int = 512, repeats: int = 7) -> dict[str, float]:
    """Both measurements, bytes/s: ``copy`` (:func:`measure_read_bandwidth`), ``read`` (threaded read-only) and
    ``max``. Which is larger depends on the CPU (a copy's write-allocate traffic is not counted; one core may not
    saturate the memory controller), so a roofline meant to be an upper bound uses ``max``."""
    copy = measure_read_bandwidth(megabytes, repeats)
    read = measure_threaded_read_bandwidth(megabytes, repeats)
    return {"copy": copy, "read": read, "max": max(copy, read)}


def roofline_tokens_per_s(weight_bytes_per_token: float, bandwidth_bytes_per_s: float) -> float:
    return bandwidth_bytes_per_s / weight_bytes_per_token
