"""Next-token choice: greedy (the default, reproducible) or seeded temperature / top-k / top-p sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgelvm.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 → greedy
    top_k: int = 0  # 0 → off
    top_p: float = 1.0  # 1 → off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and math.isfinite(self.top_p)):
            raise ConfigError(
                f"temperature and top_p must be finite numbers, got {self.temperature} and {self.top_p}",
                where="temperature" if not math.isfinite(self.temperature) else "top_p",
                fix="use a temperature in [0, 2] and a top_p in (0, 1]",
            )
        if self.seed is not None and not 0 <= self.seed < 2**128:
            raise ConfigError(f"seed must be ≥ 0, got {self.seed}", where="seed", fix="use a non-negative integer")
        if self.temperature < 0:
            raise ConfigError(
                f"temperature must be ≥ 0, got {self.temperature}",
                where="temperature",
                fix="use 0 for greedy decoding or a positive value such as 0.7",
            )
        if self.top_k < 0:
            raise ConfigError(f"top_k must be ≥ 0, got {self.top_k}", where="top_k", fix="use 0 to disable")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}", where="top_p", fix="use 1.0 to disable")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """``logits [batch, vocab] -> token ids [batch]``."""
        if self.config.greedy:
            return logits.argmax(axis=-1)
        return self.draw(self.probs(logits))

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution sampling draws from: ``logits [..., vocab]`` after temperature, top-k and top-p (float64;
        speculative decoding's rejection test compares the target's and the draft's)."""
        # Shift by the maximum before dividing: a tiny temperature (1e-320) then gives 0 for the best token and -inf
        # for the others (greedy in the limit) instead of inf - inf = NaN probabilities.
        scores = logits.astype(np.float64)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            scores = (scores - scores.max(axis=-1, keepdims=True)) / self.config.temperature
        scores = np.nan_to_num(scores, nan=-np.inf, neginf=-np.inf)
        if self.config.top_k and self.config.top_k < scores.shape[-1]:
            kth = np.partition(scores, -self.config.top_k, axis=-1)[..., -self.config.top_k][..., None]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = _softmax(scores)
        if self.config.top_p < 1.0:
            order = np.argsort(-probs, axis=-1)
            sorted_probs = np.take_along_axis(probs, order, axis=-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
            keep_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs < self.config.top_p
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, axis=-1)
            probs = _softmax(np.where(keep, scores, -np.inf))
        return probs

    def draw(self, probs: np.ndarray) -> np.ndarray:
        """One token per row of ``probs [batch, vocab]``."""
        return np.array([self.rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)

    def uniform(self) -> float:
        """A draw in [0, 1) from this sampler's stream (the rejection test)."""
        return float(self.rng.random())


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
