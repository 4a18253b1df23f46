"""The scenes task: deterministic, balanced, and every answer follows from the scene it was drawn on."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgelvm.cli import app
from edgelvm.data import scenes as sc
from edgelvm.data.jsonl import load_jsonl_dataset

N = 120  # 20 per question type


@pytest.fixture(scope="module")
def split() -> list:
    return sc.generate_split(seed=5, n=N)


def test_same_seed_same_samples(split):
    again = sc.generate_split(seed=5, n=12)
    assert [(s.png, s.question, s.answer) for s in again] == [(s.png, s.question, s.answer) for s in split[:12]]
    assert sc.generate_sample(6, 0).png != split[0].png


def test_question_types_and_existence_probes_are_balanced(split):
    assert Counter(s.qtype for s in split) == {q: N // len(sc.QTYPES) for q in sc.QTYPES}
    exist = [s for s in split if s.qtype == "exist"]
    assert sum(s.absent for s in exist) == len(exist) // 2
    assert Counter(s.answer for s in exist) == {"yes": len(exist) // 2, "no": len(exist) // 2}


def test_answers_follow_from_the_scene(split):
    for s in split:
        scene = s.scene
        if s.qtype == "count":
            words = s.question.split()
            if s.question == "How many objects are there?":
                expected = len(scene)
            elif words[3] == "objects":
                expected = sum(o.color == words[2] for o in scene)
            else:
                expected = sum(sc.PLURALS[o.kind] == words[2] for o in scene)
            assert s.answer == str(expected), s.question
        elif s.qtype == "caption":
            ordered = sorted(scene, key=lambda o: (o.row, o.col))
            assert s.answer.replace(" and ", ", ").split(", ") == [sc.describe(o) for o in ordered]
        elif s.qtype == "exist":
            color, kind = s.question.removesuffix("?").split()[-2:]
            assert (s.answer == "yes") == any((o.color, o.kind) == (color, kind) for o in scene)
        elif s.qtype == "binding":
            words = s.question.removesuffix("?").split()
            if words[1] == "color":  # What color is the SIZE KIND
                (match,) = [o for o in scene if (o.size, o.kind) == (words[4], words[5])]
                assert s.answer == match.color
            else:  # What shape is the SIZE COLOR object
                (match,) = [o for o in scene if (o.size, o.color) == (words[4], words[5])]
                assert s.answer == match.kind
        elif s.qtype == "relation":
            words = s.question.removesuffix("?").split()
            color, kind = words[-2:]
            (anchor,) = [o for o in scene if (o.color, o.kind) == (color, kind)]
            step = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}[words[3]]
            along = [o for o in scene if o is not anchor and _on_ray(anchor, o, step)]
            nearest = min(along, key=lambda o: abs(o.row - anchor.row) + abs(o.col - anchor.col), default=None)
            assert s.answer == (sc.describe(nearest) if nearest else "nothing"), s.question
        elif s.qtype == "read":
            assert s.answer.isdigit() and 0 <= int(s.answer) < 1000
            assert all((o.row, o.col) not in sc.SIGN_CELLS for o in scene)  # the sign is not covered


def _on_ray(anchor, other, step) -> bool:
    dr, dc = other.row - anchor.row, other.col - anchor.col
    if step[0] == 0:
        return dr == 0 and dc * step[1] > 0
    return dc == 0 and dr * step[0] > 0


def test_counts_reach_nine_and_beyond_and_relations_are_mostly_answerable():
    samples = [sc.generate_sample(9, i) for i in range(0, 600, len(sc.QTYPES))]  # count questions
    totals = [int(s.answer) for s in samples if s.question == "How many objects are there?"]
    assert max(totals) >= 12 and sum(t >= 9 for t in totals) >= len(totals) // 4
    relations = [sc.generate_sample(9, i).answer for i in range(1, 600, len(sc.QTYPES))]
    assert 0.05 < relations.count("nothing") / len(relations) < 0.3


def test_cli_writes_a_loadable_dataset_and_refuses_a_foreign_folder(tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "scenes"
    result = runner.invoke(app, ["data", "scenes", "-o", str(out), "--n", "12"])
    assert result.exit_code == 0, result.output
    records = load_jsonl_dataset(out)
    assert len(records) == 12 and {r.qtype for r in records} == set(sc.QTYPES)
    first = json.loads((out / "data.jsonl").read_text().splitlines()[0])
    assert first["conversations"][0]["value"].startswith("<image>\n")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    result = runner.invoke(app, ["data", "scenes", "-o", str(foreign), "--n", "6", "--force"])
    assert result.exit_code == 2 and (foreign / "notes.txt").read_text() == "keep"


def test_referents_are_the_objects_each_question_names():
    """``referents``: existence names the asked-about objects (none when the answer is no), binding exactly the one
    object whose colour or shape is the answer, counting as many objects as the answer, a relation its anchor;
    captions and signs name none; a question of no template is refused."""
    seen = set()
    for index in range(240):
        s = sc.generate_sample(7, index)
        named = sc.referents(s.qtype, s.question, s.scene)
        seen.add(s.qtype)
        if s.qtype == "exist":
            assert (len(named) > 0) == (s.answer == "yes")
            assert all(sc.describe(o).endswith(s.question.split(" ", 3)[-1].rstrip("?")) for o in named)
        elif s.qtype == "binding":
            assert len(named) == 1 and s.answer in (named[0].color, named[0].kind)
        elif s.qtype == "count":
            assert len(named) == int(s.answer)
        elif s.qtype == "relation":
            assert len(named) == 1 and f"{named[0].color} {named[0].kind}" in s.question
        else:
            assert named is None
    assert seen == set(sc.QTYPES)
    with pytest.raises(ValueError, match="no template"):
        sc.referents("exist", "Is it raining?", ())
