"""The scenes teacher (``models/scenes-teacher``), the yardstick that can rank compression methods: strong but not
perfect (85-95% exact match on the shipped test split, as its model card says), a decoder larger than a 32 MB L3
cache, and a bundle that answers like PyTorch.

Slow: drawing the 2400-question test split takes about a minute, evaluating it with the runtime a few minutes.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

TEACHER = Path(__file__).resolve().parents[1] / "models" / "scenes-teacher"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (TEACHER / "config.json").is_file(), reason="models/scenes-teacher is not in this tree"),
]


@pytest.fixture(scope="module")
def test_split(tmp_path_factory) -> Path:
    from edgelvm.data.scenes import SPLIT_SEEDS, SPLIT_SIZES, write_split

    return write_split(tmp_path_factory.mktemp("scenes") / "test", SPLIT_SEEDS["test"], SPLIT_SIZES["test"])


@pytest.fixture(scope="module")
def teacher_bundle(tmp_path_factory) -> Path:
    from edgelvm.export import ExportConfig, export

    out = tmp_path_factory.mktemp("scenes-teacher") / "bundle"
    return export(TEACHER, out, ExportConfig(max_length=160)).bundle_dir


def _card_numbers() -> dict[str, float]:
    """Per-type exact match as printed in the model card's table (``| count | 400 | 91.5% | [..] |``)."""
    card = (TEACHER / "README.md").read_text()
    rows = re.findall(r"^\| \**([a-z]+)\** \| \d+ \| \**([\d.]+)%\** \|", card, flags=re.M)
    return {name: float(value) / 100 for name, value in rows}


def test_strong_but_imperfect_as_its_card_says_with_a_decoder_beyond_l3(teacher_bundle, test_split):
    from safetensors import safe_open

    from edgelvm.eval import EvalConfig, evaluate

    metrics = evaluate(teacher_bundle, test_split, EvalConfig(max_new_tokens=64, batch_size=48)).metrics
    assert metrics["n"] == 2400
    assert 0.85 <= metrics["exact_match"] <= 0.95, metrics["exact_match"]
    low, high = metrics["exact_match_ci95"]
    assert high - low < 0.04  # 2400 questions: intervals narrow enough to rank methods a few points apart
    card = _card_numbers()
    assert card["all"] == pytest.approx(metrics["exact_match"], abs=0.0015)  # the card rounds to 0.1%
    for qtype, row in metrics["per_type"].items():
        assert card[qtype] == pytest.approx(row["exact_match"], abs=0.0015), qtype
    with safe_open(str(TEACHER / "model.safetensors"), framework="np") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys() if "language_model" in k or "lm_head" in k]  # noqa: SIM118
    decoder = sum(int(np.prod(shape)) for shape in shapes)
    assert decoder * 4 > 32 * 2**20, decoder  # fp32 bytes read per decoded token exceed a 32 MB L3


def test_bundle_answers_equal_pytorch_generate(teacher_bundle, test_split):
    from edgelvm.eval import EvalConfig, evaluate

    cfg = EvalConfig(max_new_tokens=64, batch_size=48, limit=240)
    runtime = evaluate(teacher_bundle, test_split, cfg).items
    torch_side = evaluate(TEACHER, test_split, cfg).items
    assert len(runtime) == len(torch_side) == 240
    differ = [(a.id, a.prediction, b.prediction) for a, b in zip(runtime, torch_side) if a.prediction != b.prediction]
    assert not differ, differ[:5]
