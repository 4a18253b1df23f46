"""The synthetic shapes task: determinism, balance, disjoint splits, answers that match the scene."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgelvm.data import shapes as sh
from edgelvm.data.cli import app
from edgelvm.data.jsonl import load_jsonl_dataset
from edgelvm.errors import ConfigError, DatasetError

N = 60  # a multiple of 10: round-robin qtypes x alternating absent


@pytest.fixture(scope="module")
def split() -> list[sh.Sample]:
    return sh.generate_split(seed=11, n=N)


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = sh.write_split(tmp_path / "a", seed=7, n=10)
    b = sh.write_split(tmp_path / "b", seed=7, n=10)
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys() and len(fa) == 12  # data.jsonl + 10 images + the edgelvm output marker
    assert fa == fb


def test_different_seeds_differ() -> None:
    a, b = sh.generate_split(1, 10), sh.generate_split(2, 10)
    assert {s.key for s in a}.isdisjoint({s.key for s in b})
    assert [s.png for s in a] != [s.png for s in b]


def test_qtype_balance_and_absent_half(split: list[sh.Sample]) -> None:
    mix = Counter(s.qtype for s in split)
    assert set(mix) == set(sh.QTYPES)
    assert len(set(mix.values())) == 1
    exist = [s for s in split if s.qtype == "exist"]
    assert sum(bool(s.absent) for s in exist) * 2 == len(exist)
    assert all(s.absent is None for s in split if s.qtype != "exist")


def test_image_size_and_range(split: list[sh.Sample]) -> None:
    for s in split[:5]:
        assert s.image.size == (96, 96)
    assert sh.generate_sample(3, 0, image_size=66).image.size == (66, 66)
    with pytest.raises(ConfigError):
        sh.generate_sample(3, 0, image_size=300)


def _reading(x: sh.Shape) -> tuple[int, int]:
    return (x.row, x.col)


def _expected_answer(s: sh.Sample) -> str:
    """Recompute the answer from the question text and the scene metadata, independently of the generator."""
    q, scene = s.question, s.scene
    if m := re.fullmatch(r"What (?:color is|is the color of) the (\w+)\?", q):
        matches = [x for x in scene if x.kind == m[1]]
        assert len(matches) == 1, "color question about an ambiguous kind"
        return matches[0].color
    if re.fullmatch(r"How many shapes are (there|in the image)\?", q):
        return str(len(scene))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
        return str(sum(x.color == m[1] for x in scene))
    if m := re.fullmatch(r"How many (\w+) are there\?", q):
        return str(sum(sh.PLURALS[x.kind] == m[1] for x in scene))
    if m := re.fullmatch(r"(?:Where is|In which part of the image is) the (\w+) (\w+)\?", q):
        (x,) = [x for x in scene if (x.color, x.kind) == (m[1], m[2])]
        rows, cols = ("top", "", "bottom"), ("left", "", "right")
        return " ".join(p for p in (rows[x.row], cols[x.col]) if p) or "center"
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)(?: in the image)?\?", q):
        return "yes" if any((x.color, x.kind) == (m[1], m[2]) for x in scene) else "no"
    if m := re.fullmatch(r"Is there a (\w+)\?", q):
        return "yes" if any(x.kind == m[1] for x in scene) else "no"
    if q in ("Describe the image.", "What shapes are in the image?"):
        names = [f"{'an' if x.color == 'orange' else 'a'} {x.color} {x.kind}" for x in sorted(scene, key=_reading)]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    raise AssertionError(f"unexpected question {q!r}")


def test_answers_match_scene(split: list[sh.Sample]) -> None:
    for s in sh.generate_split(seed=12, n=200):
        assert _expected_answer(s) == s.answer, s
        assert s.answer == s.answer.lower().strip()
        assert len(s.scene) == len({(x.row, x.col) for x in s.scene}), "two shapes share a cell"
        assert len(s.scene) == len({(x.color, x.kind) for x in s.scene}), "ambiguous (color, kind)"
        if s.qtype == "exist":
            assert s.answer == ("no" if s.absent else "yes")


def test_caption_reading_order() -> None:
    scene = [sh.Shape("cross", "orange", "small", 2, 0), sh.Shape("circle", "red", "large", 0, 2)]
    assert sh.caption(scene) == "a red circle and an orange cross"


def test_shipped_splits_disjoint() -> None:
    splits = sh.generate_shipped_splits({"train": 40, "val": 20, "test": 20})
    keys = {name: {s.key for s in samples} for name, samples in splits.items()}
    assert keys["train"].isdisjoint(keys["val"]) and keys["train"].isdisjoint(keys["test"])
    assert keys["val"].isdisjoint(keys["test"])
    assert {name: len(v) for name, v in splits.items()} == {"train": 40, "val": 20, "test": 20}
    assert len(set(sh.SPLIT_SEEDS.values())) == 3


def test_dedup_redraws_collisions_deterministically() -> None:
    base = sh.generate_split(5, 10)
    excluded = {s.key for s in base}
    again = sh.generate_split(5, 10, exclude=excluded)  # every index collides at attempt 0
    assert {s.key for s in again}.isdisjoint(excluded)
    assert [s.qtype for s in again] == [s.qtype for s in base]  # mix preserved
    assert [s.key for s in again] == [s.key for s in sh.generate_split(5, 10, exclude=excluded)]


def test_write_refuses_non_empty_and_force_replaces_only_a_dataset_edgelvm_wrote(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        sh.write_split(out, seed=1, n=5)
    with pytest.raises(DatasetError, match="only a directory edgelvm wrote"):
        sh.write_split(out, seed=1, n=5, force=True)  # the user's folder: never deleted
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    sh.write_split(out, seed=1, n=5)
    sh.write_split(out, seed=2, n=3, force=True)  # our own dataset: replaced
    assert len(load_jsonl_dataset(out)) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temp dirs left behind


def test_written_records_roundtrip(tmp_path: Path, split: list[sh.Sample]) -> None:
    out = sh.write_split(tmp_path / "ds", seed=11, n=N)
    records = load_jsonl_dataset(out)
    assert [(r.question, r.answer, r.qtype) for r in records] == [(s.question, s.answer, s.qtype) for s in split]
    assert all(r.image_path is not None and r.image_path.is_absolute() for r in records)
    assert records[0].image_path.read_bytes() == split[0].png
    exist = [r for r in records if r.qtype == "exist"]
    assert all(isinstance(r.metadata["absent"], bool) for r in exist)
    assert [sh.Shape.from_dict(d) for d in records[0].metadata["scene"]] == list(split[0].scene)


def test_cli_shapes(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(app, ["shapes", "-o", str(out), "--seed", "4", "--n", "10"])
    assert res.exit_code == 0, res.output
    assert "10 records" in res.output
    assert len(load_jsonl_dataset(out)) == 10
    res = runner.invoke(app, ["shapes", "-o", str(out), "--seed", "4", "--n", "10"])
    assert res.exit_code != 0 and "--force" in res.output
    res = runner.invoke(app, ["shapes", "-o", str(out), "--seed", "4", "--n", "5", "--force"])
    assert res.exit_code == 0 and len(load_jsonl_dataset(out)) == 5
