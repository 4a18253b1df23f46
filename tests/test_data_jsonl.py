"""LLaVA-format jsonl loading: validation errors that name the file, the line and the fix; the task tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgelvm.data import shapes as sh
from edgelvm.data.jsonl import load_jsonl_dataset, strip_image_marker
from edgelvm.errors import DatasetError


def _record(i: int, image: str | None = "img.png", **extra: object) -> dict:
    rec: dict = {
        "id": f"r{i}",
        "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"}],
        **extra,
    }
    if image is not None:
        rec["image"] = image
    return rec


def _write(d: Path, lines: list[str], name: str = "data.jsonl") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "img.png").write_bytes(sh.generate_sample(1, 0).png)
    (d / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def test_loads_directory_or_file(tmp_path: Path) -> None:
    d = _write(tmp_path / "ds", [json.dumps(_record(0)), "", json.dumps(_record(1, qtype="color"))])
    for target in (d, d / "data.jsonl"):
        recs = load_jsonl_dataset(target)
        assert [r.id for r in recs] == ["r0", "r1"]
        assert recs[0].question == "What is it?" and recs[0].answer == "a cat"
        assert recs[0].image_path == (d / "img.png").resolve() and recs[0].qtype is None
        assert recs[1].qtype == "color"


def test_malformed_line_names_line_number(tmp_path: Path) -> None:
    d = _write(tmp_path / "ds", [json.dumps(_record(0)), json.dumps(_record(1)), '{"id": "broken", '])
    with pytest.raises(DatasetError) as e:
        load_jsonl_dataset(d)
    msg = str(e.value)
    assert "line 3" in msg and "data.jsonl" in msg and "Fix:" in msg


def test_missing_field_names_line(tmp_path: Path) -> None:
    d = _write(tmp_path / "ds", [json.dumps(_record(0)), json.dumps({"id": "x", "image": "img.png"})])
    with pytest.raises(DatasetError, match=r"line 2: missing or empty field 'conversations'"):
        load_jsonl_dataset(d)
    bad_turn = _record(0, conversations=[{"from": "human", "value": "<image>\nQ?"}])
    d2 = _write(tmp_path / "ds2", [json.dumps(bad_turn)])
    with pytest.raises(DatasetError, match="line 1: conversations need"):
        load_jsonl_dataset(d2)


def test_missing_image_names_line_and_path(tmp_path: Path) -> None:
    d = _write(tmp_path / "ds", [json.dumps(_record(0)), json.dumps(_record(1, image="images/nope.png"))])
    with pytest.raises(DatasetError) as e:
        load_jsonl_dataset(d)
    assert "line 2" in str(e.value) and "nope.png" in str(e.value)
    assert len(load_jsonl_dataset(d, check_images=False)) == 2


def test_empty_dataset(tmp_path: Path) -> None:
    d = _write(tmp_path / "ds", ["", "   "])
    with pytest.raises(DatasetError, match="empty"):
        load_jsonl_dataset(d)
    with pytest.raises(DatasetError, match=r"no data\.jsonl"):
        load_jsonl_dataset(tmp_path)


def test_real_llava_format(tmp_path: Path) -> None:
    """LLaVA-665k style: a .json array, multi-turn, a text-only record, images under a separate root."""
    root = tmp_path / "images_root"
    (root / "coco").mkdir(parents=True)
    (root / "coco" / "1.png").write_bytes(sh.generate_sample(1, 1).png)
    items = [
        {
            "id": "000000033471",
            "image": "coco/1.png",
            "conversations": [
                {"from": "human", "value": "What are the colors?\n<image>"},
                {"from": "gpt", "value": "Red and blue."},
                {"from": "human", "value": "And the shape?"},
                {"from": "gpt", "value": "A circle."},
            ],
        },
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    f = tmp_path / "llava_mix.json"
    f.write_text(json.dumps(items), encoding="utf-8")
    recs = load_jsonl_dataset(f, image_root=root)
    assert recs[0].question == "What are the colors?" and recs[0].answer == "Red and blue."
    assert len(recs[0].conversations) == 4 and recs[0].turns[2] == ("user", "And the shape?")
    assert recs[1].image_path is None


def test_strip_image_marker() -> None:
    assert strip_image_marker("<image>\nQ?") == strip_image_marker("Q?\n<image>") == "Q?"


# ---------------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    pytest.importorskip("transformers")
    from edgelvm.data.vocab_tokenizer import build_shapes_tokenizer

    return build_shapes_tokenizer()


def test_tokenizer_roundtrips_every_task_text(tok) -> None:
    texts = set(sh.task_texts())
    texts |= {t for s in sh.generate_split(21, 100) for t in (s.question, s.answer)}
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text
    assert len(tok) < 400


def test_tokenizer_special_tokens(tok) -> None:
    assert tok.convert_tokens_to_ids("<image>") == tok.image_token_id
    assert tok("<image>", add_special_tokens=False)["input_ids"] == [tok.image_token_id]
    assert tok("<image><image>red", add_special_tokens=False)["input_ids"][:2] == [tok.image_token_id] * 2
    for t in ("<s>", "</s>", "<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")


def test_answer_ids_independent_of_prompt(tok) -> None:
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes are there?"}]}]
    text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|assistant|>") and text.count("<image>") == 1 and text.startswith("<s>")
    full = tok.apply_chat_template([*prompt, {"role": "assistant", "content": "3"}], tokenize=False)
    p_ids = tok(text, add_special_tokens=False)["input_ids"]
    f_ids = tok(full, add_special_tokens=False)["input_ids"]
    assert f_ids[: len(p_ids)] == p_ids
    assert f_ids[len(p_ids) :] == [*tok("3", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<s><|user|>hi<|end|>"


def test_tokenizer_is_deterministic() -> None:
    from edgelvm.data.vocab_tokenizer import build_shapes_tokenizer_object

    assert build_shapes_tokenizer_object().to_str() == build_shapes_tokenizer_object().to_str()
