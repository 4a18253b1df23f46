"""`edgelvm eval`: metrics, bundle-vs-checkpoint agreement, and bad datasets."""

from __future__ import annotations

import json

import pytest

from edgelvm.errors import DatasetError
from edgelvm.eval import EvalConfig, evaluate
from edgelvm.eval.metrics import ScoredItem, normalize_answer, summarize


@pytest.fixture(scope="module")
def shapes_split(tmp_path_factory):
    from edgelvm.data import write_split

    out = tmp_path_factory.mktemp("shapes") / "split"
    write_split(out, seed=11, n=10)
    return out


def test_summarize_per_type_and_hallucination():
    def item(qtype, answer, prediction, absent=None):
        return ScoredItem(
            "i", qtype, "q", answer, prediction, normalize_answer(answer) == normalize_answer(prediction), absent
        )

    items = [
        item("color", "red", "Red."),
        item("color", "blue", "green"),
        item("exist", "no", "yes", absent=True),
        item("exist", "no", "no", absent=True),
        item("exist", "yes", "yes", absent=False),
    ]
    m = summarize(items)
    assert m["exact_match"] == pytest.approx(3 / 5)
    # one right, one wrong: every resample of two questions scores 0, 0.5 or 1, so the 95% interval is all of [0, 1]
    assert m["per_type"]["color"] == {"n": 2, "exact_match": 0.5, "exact_match_ci95": [0.0, 1.0]}
    assert m["hallucination_rate"] == pytest.approx(0.5) and m["n_absent_probes"] == 2
    assert m["hallucination_rate_ci95"] == [0.0, 1.0]
    low, high = m["exact_match_ci95"]
    assert 0.0 <= low < 3 / 5 < high <= 1.0


def test_bundle_and_checkpoint_answer_identically(tiny_bundles, tiny_checkpoints, shapes_split, tmp_path):
    config = EvalConfig(max_new_tokens=12, batch_size=4)
    on_bundle = evaluate(
        tiny_bundles["qwen2-siglip"],
        shapes_split,
        EvalConfig(max_new_tokens=12, batch_size=4, reference=tiny_checkpoints["qwen2-siglip"]),
    )
    on_checkpoint = evaluate(tiny_checkpoints["qwen2-siglip"], shapes_split, config)
    assert [i.prediction for i in on_bundle.items] == [i.prediction for i in on_checkpoint.items]
    assert on_bundle.metrics["n"] == 10
    ref = on_bundle.metrics["reference"]
    assert ref["n_tokens"] > 0 and ref["top1_agreement"] == 1.0 and ref["mean_kl"] < 1e-6
    on_bundle.write(tmp_path / "report")
    saved = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert saved["metrics"]["n"] == 10 and "exact match" in (tmp_path / "report" / "eval.md").read_text()


def test_different_models_disagree(tiny_bundles, tiny_checkpoints, shapes_split):
    """The agreement metric can fail: two unrelated random models do not agree."""
    from edgelvm.models.synthetic import build_tiny_llava

    report = evaluate(
        tiny_bundles["llama-clip"],
        shapes_split,
        EvalConfig(max_new_tokens=8, limit=4, reference=tiny_checkpoints["llama-clip"]),
    )
    assert report.metrics["reference"]["top1_agreement"] == 1.0
    other = build_tiny_llava(shapes_split.parent / "other", seed=123)
    report = evaluate(tiny_bundles["llama-clip"], shapes_split, EvalConfig(max_new_tokens=8, limit=4, reference=other))
    assert report.metrics["reference"]["top1_agreement"] < 0.9 and report.metrics["reference"]["mean_kl"] > 0.01


def test_bad_datasets(tiny_bundles, shapes_split, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(shapes_split, broken)
    lines = (broken / "data.jsonl").read_text().splitlines()
    (broken / "data.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(DatasetError, match="line 2"):
        evaluate(tiny_bundles["llama-clip"], broken)
    (broken / "data.jsonl").write_text("\n".join(lines) + "\n")
    first_image = json.loads(lines[0])["image"]
    (broken / first_image).unlink()
    with pytest.raises(DatasetError, match="line 1"):
        evaluate(tiny_bundles["llama-clip"], broken)
    (broken / "data.jsonl").write_text("")
    with pytest.raises(DatasetError, match="empty"):
        evaluate(tiny_bundles["llama-clip"], broken)
