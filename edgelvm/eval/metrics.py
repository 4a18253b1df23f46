"""Task metrics for VQA-style data: exact match per question type and the hallucination rate, each with its 95%
bootstrap interval over questions (torch-free)."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgelvm.eval.intervals import bootstrap_interval


def normalize_answer(text: str) -> str:
    """Lower-case, trim, drop a trailing period and collapse whitespace: "Red." and "red" match."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text[:-1].rstrip() if text.endswith(".") else text


@dataclass
class ScoredItem:
    id: str
    qtype: str
    question: str
    answer: str
    prediction: str
    correct: bool
    absent: bool | None = None


def summarize(items: list[ScoredItem]) -> dict[str, Any]:
    """Overall and per-type exact match; hallucination = share of "yes" answers to questions about absent objects."""
    by_type: dict[str, list[ScoredItem]] = defaultdict(list)
    for item in items:
        by_type[item.qtype].append(item)
    absent = [i for i in items if i.absent]
    said_yes = [normalize_answer(i.prediction) == "yes" for i in absent]
    return {
        "n": len(items),
        "exact_match": sum(i.correct for i in items) / len(items) if items else math.nan,
        "exact_match_ci95": list(bootstrap_interval([i.correct for i in items])),
        "per_type": {
            qtype: {
                "n": len(group),
                "exact_match": sum(i.correct for i in group) / len(group),
                "exact_match_ci95": list(bootstrap_interval([i.correct for i in group])),
            }
            for qtype, group in sorted(by_type.items())
        },
        "hallucination_rate": sum(said_yes) / len(absent) if absent else None,
        "hallucination_rate_ci95": list(bootstrap_interval(said_yes)) if absent else None,
        "n_absent_probes": len(absent),
    }


def agreement(reference_logits: np.ndarray, student_logits: np.ndarray) -> tuple[int, float]:
    """Top-1 matches and summed KL(reference ‖ student) over positions (both ``[T, vocab]``)."""
    matches = int((reference_logits.argmax(-1) == student_logits.argmax(-1)).sum())
    ref = _log_softmax(reference_logits.astype(np.float64))
    stu = _log_softmax(student_logits.astype(np.float64))
    kl = float((np.exp(ref) * (ref - stu)).sum())
    return matches, kl


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def item_dicts(items: list[ScoredItem]) -> list[dict[str, Any]]:
    return [asdict(i) for i in items]
