"""The shipped teacher (``models/shapes-teacher``) meets its model card, and its bundle answers like PyTorch.

Slow: generating the shipped splits (the test split is de-duplicated against train and val, so all three are drawn)
takes about a minute, exporting a few seconds, evaluating 1000 questions with the runtime well under a minute.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("torch")

TEACHER = Path(__file__).resolve().parents[1] / "models" / "shapes-teacher"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (TEACHER / "config.json").is_file(), reason="models/shapes-teacher is not in this tree"),
]


@pytest.fixture(scope="module")
def shipped_test_split(tmp_path_factory) -> Path:
    from edgelvm.data import write_shipped_splits

    return write_shipped_splits(tmp_path_factory.mktemp("shapes"))["test"]


@pytest.fixture(scope="module")
def teacher_bundle(tmp_path_factory) -> Path:
    from edgelvm.export import ExportConfig, export

    return export(TEACHER, tmp_path_factory.mktemp("teacher") / "bundle", ExportConfig(max_length=128)).bundle_dir


def _card_numbers() -> dict[str, float]:
    """Per-type exact match as printed in the model card's table (``| color | 200 | 99.5% |``)."""
    card = (TEACHER / "README.md").read_text()
    rows = re.findall(r"^\| \**([a-z]+)\** \| \d+ \| \**([\d.]+)%\** \|$", card, flags=re.M)
    return {name: float(value) / 100 for name, value in rows}


def test_teacher_accuracy_meets_the_target_and_its_card(teacher_bundle, shipped_test_split):
    from edgelvm.eval import EvalConfig, evaluate

    metrics = evaluate(teacher_bundle, shipped_test_split, EvalConfig(max_new_tokens=24, batch_size=50)).metrics
    assert metrics["n"] == 1000
    assert metrics["exact_match"] >= 0.95, metrics
    for qtype, row in metrics["per_type"].items():
        assert row["exact_match"] >= 0.90, (qtype, row)
    card = _card_numbers()
    assert card["all"] == pytest.approx(metrics["exact_match"], abs=0.0015)  # the card rounds to 0.1%
    for qtype, row in metrics["per_type"].items():
        assert card[qtype] == pytest.approx(row["exact_match"], abs=0.0015), qtype


def test_bundle_answers_equal_pytorch_generate(teacher_bundle, shipped_test_split):
    from edgelvm.eval import EvalConfig, evaluate

    cfg = EvalConfig(max_new_tokens=24, batch_size=50, limit=300)
    runtime = evaluate(teacher_bundle, shipped_test_split, cfg).items
    torch_side = evaluate(TEACHER, shipped_test_split, cfg).items
    assert len(runtime) == len(torch_side) == 300
    differ = [(a.id, a.prediction, b.prediction) for a, b in zip(runtime, torch_side) if a.prediction != b.prediction]
    assert not differ, differ[:5]
