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


def roofline_tokens_per_s(weight_bytes_per_token: float, bandwidth_bytes_per_s: float) -> float:
    return bandwidth_bytes_per_s / weight_bytes_per_token
