"""Distillation quality on the shipped teacher (slow): a <= 25%-size student, distilled within 15 CPU-minutes,
keeps >= 95% of the teacher's test accuracy. Same recipe as ``benchmarks/distill_shapes.py`` (which also trains the
ground-truth-only baseline beside it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "models" / "shapes-teacher"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (TEACHER / "config.json").is_file(), reason="models/shapes-teacher is not in this tree"),
]


def test_distilled_student_keeps_95_percent_of_the_teacher(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import distill_shapes

    # 2000 steps (~10 min here; val 98% at step 2000 in the benchmark's 2500-step run): margin under the 15-minute
    # budget on a slower CI machine
    argv = ["--out", str(tmp_path), "--recipes", "distilled", "--steps", "2000", "--quiet"]
    args = distill_shapes.parser().parse_args(argv)
    summary = distill_shapes.run(args)
    student = summary["results"]["distilled"]
    assert student["params_vs_teacher"] <= 0.25, student
    assert student["train_minutes"] <= 15, student
    assert student["accuracy_vs_teacher"] >= 0.95, summary["results"]
