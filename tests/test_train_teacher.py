"""The teacher-training script's pieces for the scenes task: the task tokenizer, the probe's labels, the answer
weighting, and that splitting a batch by answer length leaves its gradient unchanged."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import train_teacher as tt  # noqa: E402

from edgelvm.data import scenes as sc  # noqa: E402
from edgelvm.data.vocab_tokenizer import build_shapes_tokenizer, build_shapes_tokenizer_object  # noqa: E402


def test_shapes_tokenizer_is_the_shipped_teachers():
    """Adding the scenes task must not move a single id of the tokenizer the shipped teacher was trained with."""
    shipped = json.loads((ROOT / "models" / "shapes-teacher" / "tokenizer.json").read_text())["model"]["vocab"]
    assert build_shapes_tokenizer_object("shapes").get_vocab() == shipped


def test_scenes_tokenizer_reads_numbers_digit_by_digit_and_round_trips():
    tok = build_shapes_tokenizer("scenes")
    for text in ("What number is on the sign?", "a red circle, a blue cross and a green square", "907", "14"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(tok("907", add_special_tokens=False)["input_ids"])
    assert [p for p in pieces if p != "▁"] == ["9", "0", "7"]
    question = tok("What shape is the large purple object?", add_special_tokens=False)["input_ids"]
    assert len(question) == 8  # every task word is one token
    with pytest.raises(ValueError, match="unknown task"):
        build_shapes_tokenizer_object("nope")


def _read_sample() -> sc.Sample:
    for i in range(4, 400, len(sc.QTYPES)):  # index % 6 == 4: a "read" question, which always has a sign
        s = sc.generate_sample(99, i)
        if s.number is not None and s.number >= 100:
            return s
    raise AssertionError("no three-digit sign drawn")


def test_scene_cell_labels_follow_the_scene_and_the_sign():
    sample = _read_sample()
    labels = tt.cell_labels([sample], "scenes")
    assert labels["kind"].shape == (1, sc.GRID * sc.GRID)
    occupied = {s.row * sc.GRID + s.col: s for s in sample.scene}
    for cell in range(sc.GRID * sc.GRID):
        shape = occupied.get(cell)
        expect_kind = len(sc.KINDS) if shape is None else sc.KINDS.index(shape.kind)
        expect_size = len(sc.SIZES) if shape is None else sc.SIZES.index(shape.size)
        assert labels["kind"][0, cell] == expect_kind
        assert labels["size"][0, cell] == expect_size
    units, tens, hundreds = labels["digits"][0].tolist()
    assert 100 * hundreds + 10 * tens + units == sample.number
    no_sign = next(s for i in range(0, 60, len(sc.QTYPES)) if (s := sc.generate_sample(98, i)).number is None)
    assert tt.cell_labels([no_sign], "scenes")["digits"].tolist() == [[10, 10, 10]]


def test_sqrt_weighting_gives_each_sample_sqrt_of_its_answer_length():
    logits = torch.randn(2, 6, 5)
    labels = torch.tensor([[-100, -100, 1, -100, -100, -100], [-100, 0, 1, 2, 3, -100]])  # 1 and 4 answer tokens
    total, weight = tt.answer_loss(logits, labels, "sqrt")
    ce = torch.nn.functional.cross_entropy
    first = ce(logits[0, 1:2], labels[0, 2:3])
    second = ce(logits[1, 0:4], labels[1, 1:5])  # mean over its 4 tokens
    assert weight == pytest.approx(1 + 2)
    assert total.item() == pytest.approx(first.item() * 1 + second.item() * 2, rel=1e-5)
    total_mean, weight_mean = tt.answer_loss(logits, labels, "mean")
    assert weight_mean == 5 and total_mean.item() == pytest.approx(first.item() + 4 * second.item(), rel=1e-5)


def test_length_groups_split_captions_from_short_answers():
    samples = [sc.generate_sample(97, i) for i in range(12)]
    groups = tt.length_groups(samples)
    assert sorted(s.index for g in groups for s in g) == list(range(12))
    assert len(groups) == 2 and all(s.qtype == "caption" for s in groups[1])


@pytest.mark.parametrize("weighting", ["mean", "sqrt"])
def test_split_batch_gradient_equals_the_padded_batch_gradient(weighting):
    cfg = tt.TrainConfig(task="scenes", image_size=192, patch_size=32, vision_hidden=32, vision_layers=1,
                         vision_heads=2, text_hidden=32, text_layers=1, text_heads=2, text_kv_heads=1,
                         text_intermediate=64, answer_weight=weighting)  # fmt: skip
    tok = build_shapes_tokenizer("scenes")
    model = tt.build_model(cfg, tok)
    model.config.text_config._attn_implementation = "eager"  # padding-exact reference
    batcher = tt.Batcher(tt.build_processor(cfg, tok), (192 // 32) ** 2)
    loss_fn = tt.TeacherLoss(cfg, model)
    samples = [sc.generate_sample(96, i) for i in range(8)]

    def grads(parts):
        model.zero_grad()
        for p in loss_fn.parameters():
            p.grad = None
        batches = [(part, batcher.train_batch(part)) for part in parts]
        norm = sum(loss_fn.answer_weight(b["labels"]) for _, b in batches)
        for part, b in batches:
            loss, _ = loss_fn(model, b, part, norm=norm, share=len(part) / len(samples))
            loss.backward()
        return torch.cat([p.grad.flatten() for p in [*model.parameters(), *loss_fn.parameters()] if p.grad is not None])

    whole = grads([samples])
    split = grads(tt.length_groups(samples))
    assert len(tt.length_groups(samples)) == 2
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-6)


def test_the_curriculum_draws_small_scenes_only_before_its_step():
    """``--easy-until N --easy-objects K``: batches before step N have scenes of 1 to K objects, later ones the
    task's own 4 to 14; the shipped splits never change (they do not take the option)."""
    cfg = tt.TrainConfig(task="scenes", image_size=192, batch_size=24, easy_until=3, easy_objects=3)
    early = tt.train_samples(cfg, 2, set())
    late = tt.train_samples(cfg, 3, set())
    assert {s.qtype for s in early} == set(sc.QTYPES)
    assert max(len(s.scene) for s in early) <= 3 and min(len(s.scene) for s in early) >= 1
    assert min(len(s.scene) for s in late) >= sc.MIN_OBJECTS
    plain = tt.train_samples(tt.TrainConfig(task="scenes", image_size=192, batch_size=24), 3, set())
    assert [s.key for s in late] == [s.key for s in plain]  # the same stream once the easy phase is over


def test_the_question_mix_weights_types_and_keeps_existence_balanced():
    """``--qtype-mix exist:3,count:1``: the stream draws only the named types, in about those proportions, half the
    existence questions about absent objects (answer ``no``); deterministic per step (resume replays it); the
    shipped splits keep their round robin; a bad mix is refused by name."""
    cfg = tt.TrainConfig(task="scenes", image_size=192, batch_size=400, qtype_mix="exist:3,count:1")
    samples = tt.train_samples(cfg, 5, set())
    kinds = Counter(s.qtype for s in samples)
    assert set(kinds) == {"exist", "count"}
    assert 0.65 < kinds["exist"] / len(samples) < 0.85
    answers = Counter(s.answer for s in samples if s.qtype == "exist")
    assert 0.4 < answers["no"] / kinds["exist"] < 0.6
    assert all((s.answer == "no") == s.absent for s in samples if s.qtype == "exist")
    assert [s.key for s in tt.train_samples(cfg, 5, set())[:20]] == [s.key for s in samples[:20]]
    assert [s.qtype for s in sc.generate_split(sc.SPLIT_SEEDS["val"], 12)] == list(sc.QTYPES) * 2
    for bad in ("exist:3,colour:1", "exist", "exist:0", "exist:-1,count:2"):
        with pytest.raises(SystemExit, match="--qtype-mix"):
            tt.parse_qtype_mix(bad)


def test_the_lookup_attention_targets_the_named_objects_and_trains():
    """``--lookup-loss``: each question that names objects gets the image positions of exactly those objects (BOS
    when the named object is absent; nothing for captions and signs); a gradient step on the loss alone lowers it;
    the model's attention implementation is restored after the call."""
    cfg = tt.TrainConfig(task="scenes", image_size=192, batch_size=12, vision_hidden=32, vision_layers=1,
                         vision_heads=2, text_hidden=32, text_layers=2, text_heads=2, text_kv_heads=1,
                         text_intermediate=64, lookup_loss=1.0, lookup_layer=1)  # fmt: skip
    tokenizer = build_shapes_tokenizer("scenes")
    model = tt.build_model(cfg, tokenizer)
    lookup = tt.LookupAttention(model, 1)
    batcher = tt.Batcher(tt.build_processor(cfg, tokenizer), 36)
    samples = tt.train_samples(cfg, 0, set())
    batch = batcher.train_batch(samples)
    labels = batch.pop("labels")
    rows, queries, keys = lookup.targets(samples, batch["input_ids"], labels)
    assert {samples[r].qtype for r in rows} == {"count", "relation", "binding", "exist"}
    for row, query, key in zip(rows, queries, keys, strict=True):
        sample = samples[row]
        assert batch["input_ids"][row, query] == tokenizer.convert_tokens_to_ids("<|assistant|>")
        named = sc.referents(sample.qtype, sample.question, sample.scene)
        if sample.qtype == "exist" and sample.answer == "no":
            assert key == [0]
        else:
            assert len(key) == len(named) > 0
            assert all(batch["input_ids"][row, k] == model.config.image_token_index for k in key)
            assert sorted(k - 2 for k in key) == sorted(s.row * sc.GRID + s.col for s in named)  # BOS, <|user|>
    implementation = model.config.text_config._attn_implementation
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        out = lookup.forward(model, batch)
        loss = lookup.loss(out.attentions, samples, batch["input_ids"], labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    assert model.config.text_config._attn_implementation == implementation
    with pytest.raises(SystemExit, match="--lookup-layer"):
        tt.LookupAttention(model, 2)


def test_word_alignment_pulls_cells_towards_their_words():
    """``--align-loss``: the loss reads the projector's output through a hook and the words' input embeddings; a
    gradient step on it alone lowers it, moving both the projector and the colour / kind / size word embeddings."""
    cfg = tt.TrainConfig(task="scenes", image_size=192, batch_size=4, vision_hidden=32, vision_layers=1,
                         vision_heads=2, text_hidden=32, text_layers=1, text_heads=2, text_kv_heads=1,
                         text_intermediate=64, align_loss=1.0)  # fmt: skip
    tokenizer = build_shapes_tokenizer("scenes")
    model = tt.build_model(cfg, tokenizer)
    alignment = tt.WordAlignment("scenes", model)
    assert sorted(alignment.words) == ["color", "kind", "size"]
    batcher = tt.Batcher(tt.build_processor(cfg, tokenizer), 36)
    samples = tt.train_samples(cfg, 0, set())
    batch = batcher.train_batch(samples)
    batch.pop("labels")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        model(**batch)
        loss = alignment.loss(model, samples)
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        grad = model.get_input_embeddings().weight.grad
        assert grad[alignment.words["color"]].abs().sum() > 0 and grad[0].abs().sum() == 0
        optimizer.step()
    assert losses[-1] < 0.6 * losses[0]
