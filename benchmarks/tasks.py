"""The synthetic task a compression benchmark runs on, and the paired comparisons that rank its variants.

``shapes`` (the shipped 5.6M teacher, 1000 test questions) is fast but saturated: every variant scores 99-100%.
``scenes`` (``edgelvm data scenes``, 2400 test questions) is the task built to rank methods; its teacher is
trained by ``scripts/train_teacher.py --task scenes`` into ``models/scenes-teacher``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BenchTask:
    name: str
    teacher: Path
    max_new_tokens: int  # enough for the longest answer (scenes captions list up to 14 objects)
    image_size: int
    train_size: int | None = None  # records of the train split written (None: the task's shipped size)

    def write_splits(self, data: Path, train: int | None = None) -> None:
        """The shipped train/val/test splits under ``data`` (train cut to ``train`` records when given)."""
        if (data / "test" / "data.jsonl").is_file():
            return
        train = train if train is not None else self.train_size
        sizes = {"train": train} if train is not None else None
        if self.name == "shapes":
            from edgelvm.data import write_shipped_splits
        else:
            from edgelvm.data.scenes import write_shipped_splits
        write_shipped_splits(data, sizes=sizes, force=True)


TASKS: dict[str, BenchTask] = {
    "shapes": BenchTask("shapes", ROOT / "models" / "shapes-teacher", 24, 96),
    # 20000 train records (recovery and distillation read fewer than that), not the shipped 50000: ~7 min to draw
    "scenes": BenchTask("scenes", ROOT / "models" / "scenes-teacher", 64, 192, train_size=20000),
}


def correctness(report: Any) -> list[int]:
    """Per-question 0/1 of an :class:`~edgelvm.eval.EvalReport`, in the data's order (for paired intervals)."""
    return [int(item.correct) for item in report.items]


def paired_rows(scores: dict[str, list[int]], pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """``a − b`` in exact-match points with its paired 95% bootstrap interval, for each pair present in
    ``scores``; ``significant`` when the interval excludes 0."""
    from edgelvm.eval.intervals import paired_difference

    rows = []
    for a, b in pairs:
        if a in scores and b in scores:
            diff, low, high = paired_difference(scores[a], scores[b])
            interval = [round(100 * low, 2), round(100 * high, 2)]
            significant = bool(low > 0 or high < 0)
            rows.append({"a": a, "b": b, "diff_points": round(100 * diff, 2), "ci95_points": interval,
                         "significant": significant})  # fmt: skip
    return rows


def paired_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    lines = ["| A | B | A − B (points) | paired 95% interval | interval excludes 0 |", "|" + " --- |" * 5]
    for r in rows:
        low, high = r["ci95_points"]
        lines.append(f"| {r['a']} | {r['b']} | {r['diff_points']:+.2f} | [{low:+.2f}, {high:+.2f}] | "
                     f"{'yes' if r['significant'] else 'no'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def interval_text(metrics: dict[str, Any]) -> str:
    low, high = metrics.get("exact_match_ci95") or (float("nan"), float("nan"))
    return f"[{low:.1%}, {high:.1%}]"
