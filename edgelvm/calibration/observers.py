"""Observers: a histogram of |x| → the clipping value ``amax`` of a symmetric INT8 range (scale = amax / 127).

- ``minmax``: the largest |x| seen (no clipping; outliers stretch the step for everyone).
- ``percentile:P``: the |x| below which P% of the values fall (99.9, 99.99, 99.999).
- ``entropy``: TensorRT's calibrator — the threshold whose 128-level quantized distribution has the smallest KL
  divergence from the observed one.
- ``mse``: the threshold with the smallest expected squared error (rounding noise inside, clipping outside).

Which one is best depends on the layer and the model (FQ-ViT, TensorRT's docs), so ``--calibrator auto`` tries them
all and keeps the one with the best downstream metric (see :mod:`edgelvm.quantize.vision_int8`).
"""

from __future__ import annotations

import numpy as np

from edgelvm.calibration.stats import AbsHistogram
from edgelvm.errors import ConfigError

OBSERVERS = ("minmax", "percentile:99.9", "percentile:99.99", "percentile:99.999", "entropy", "mse")
_LEVELS = 128  # |x| maps to codes 0..127 of a symmetric int8 range


def check_observer(name: str) -> None:
    if name in OBSERVERS or name == "auto":
        return
    if name.startswith("percentile:"):
        try:
            value = float(name.split(":", 1)[1])
        except ValueError:
            value = -1.0
        if 50.0 < value < 100.0:
            return
    raise ConfigError(
        f"unknown calibrator {name!r}",
        where="--calibrator",
        fix=f"use auto, or one of {', '.join(OBSERVERS)} (percentile:P takes any 50 < P < 100)",
    )


def observe(hist: AbsHistogram, name: str) -> float:
    """The clipping value ``amax`` that observer ``name`` picks from ``hist``."""
    check_observer(name)
    if hist.max <= 0.0 or hist.counts.sum() == 0:
        return 0.0
    if name == "minmax":
        return float(hist.max)
    if name.startswith("percentile:"):
        return _percentile(hist, float(name.split(":", 1)[1]))
    if name == "entropy":
        return _entropy(hist)
    if name == "mse":
        return _mse(hist)
    raise ConfigError(f"observer {name!r} picks no single range", where="--calibrator", fix="use a named observer")


def _used(hist: AbsHistogram) -> tuple[np.ndarray, float]:
    """Counts up to the last non-empty bin, and the bin width."""
    last = int(np.nonzero(hist.counts)[0].max()) + 1
    return hist.counts[:last], hist.width


def _percentile(hist: AbsHistogram, percent: float) -> float:
    counts, width = _used(hist)
    cdf = np.cumsum(counts) / counts.sum()
    index = int(np.searchsorted(cdf, percent / 100.0))
    return float(min((index + 1) * width, hist.max))


def _entropy(hist: AbsHistogram) -> float:
    """TensorRT's entropy calibration: for each candidate threshold ``i`` bins, clip the tail into the last bin
    (P), merge the ``i`` bins into 128 levels and spread each level back over its non-empty bins (Q); minimise
    KL(P || Q)."""
    counts, width = _used(hist)
    n = counts.size
    if n <= _LEVELS:
        return float(hist.max)
    best_i, best_kl = n, np.inf
    for i in range(_LEVELS, n + 1):
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()
        level = (np.arange(i) * _LEVELS) // i  # which of the 128 levels each bin merges into
        nonzero = (counts[:i] > 0).astype(np.float64)
        level_sum = np.bincount(level, weights=counts[:i], minlength=_LEVELS)
        level_used = np.bincount(level, weights=nonzero, minlength=_LEVELS)
        q = np.where(nonzero > 0, level_sum[level] / np.maximum(level_used[level], 1), 0.0)
        pn, qn = _smooth(p / p.sum()), _smooth(q / max(q.sum(), 1e-30))
        mask = pn > 0
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask])))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(min(best_i * width, hist.max))


def _smooth(d: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Give empty bins a little mass taken from the others, so that KL(P || Q) stays finite where Q has a hole
    under P's support (a clipped outlier landing in an empty bin) — as TensorRT's and ONNX Runtime's calibrators do."""
    zeros = d == 0
    n_zero, n_nonzero = int(zeros.sum()), int((~zeros).sum())
    if n_zero == 0 or n_nonzero == 0:
        return d
    return np.maximum(d + eps * zeros - (eps * n_zero / n_nonzero) * ~zeros, 1e-12)


def _mse(hist: AbsHistogram, candidates: int = 256) -> float:
    """Expected squared error of quantizing the histogram's values (at bin centres) with threshold ``c``:
    rounding noise step²/12 inside the range, the clipped distance outside."""
    counts, width = _used(hist)
    centres = (np.arange(counts.size) + 0.5) * width
    top = min(counts.size * width, hist.max)
    best_c, best_err = top, np.inf
    for c in np.linspace(top / candidates, top, candidates):
        step = c / (_LEVELS - 1)
        inside = centres <= c
        err = counts[inside].sum() * step * step / 12.0 + np.sum(counts[~inside] * (centres[~inside] - c) ** 2)
        if err < best_err:
            best_err, best_c = err, c
    return float(best_c)
