"""edgelvm distill on tiny random-weight LLaVA checkpoints: student derivation, losses, cache, resume, errors.

The quality claim (a 25%-size student keeps >= 95% of the shipped teacher's accuracy) is measured by
``benchmarks/distill_shapes.py`` and ``tests/test_teacher.py``'s slow distillation test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from edgelvm.distill import DistillConfig, StudentSpec, distill  # noqa: E402
from edgelvm.distill.losses import TeacherTargets, divergence  # noqa: E402
from edgelvm.errors import ConfigError, DatasetError, UnsupportedModelError  # noqa: E402

SMALL = StudentSpec(text_layers=1, text_hidden=32, text_intermediate=64, vision_layers=1, vision_hidden=24)


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> dict[str, Path]:
    from edgelvm.data import write_split

    root = tmp_path_factory.mktemp("shapes")
    return {"train": write_split(root / "train", seed=21, n=24), "val": write_split(root / "val", seed=22, n=10)}


def _cfg(out: Path, **kw) -> DistillConfig:
    base = {"out": out, "steps": 3, "batch_size": 4, "save_every": 100, "progress": False, "warmup": 1}
    return DistillConfig(**{**base, **kw})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ------------------------------------------------------------------------------------------------ students


def test_full_size_derivation_reproduces_the_teacher(tiny_checkpoints, variant):
    """Deriving with every size unchanged must copy the teacher exactly (checks the tensor mapping)."""
    from edgelvm.distill.student import derive_student
    from edgelvm.models import load_model

    teacher = load_model(str(tiny_checkpoints[variant]))
    student, maps = derive_student(teacher, StudentSpec())
    assert maps["text"] == list(range(teacher.text_config.num_hidden_layers))
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        ref = teacher.model(input_ids=ids).logits
        got = student(input_ids=ids).logits
    assert torch.equal(ref, got)


def test_derived_student_keeps_head_dim_and_gqa_groups(tiny_checkpoints):
    from edgelvm.distill.student import derive_student
    from edgelvm.models import load_model

    teacher = load_model(str(tiny_checkpoints["qwen2-siglip"]))
    t_text = teacher.text_config
    t_head_dim = t_text.hidden_size // t_text.num_attention_heads
    student, maps = derive_student(teacher, SMALL)
    s_text = student.config.text_config
    assert (s_text.num_hidden_layers, s_text.hidden_size, s_text.head_dim) == (1, 32, t_head_dim)
    assert s_text.num_attention_heads // s_text.num_key_value_heads == (
        t_text.num_attention_heads // t_text.num_key_value_heads
    )
    assert maps["text"] == [0]
    # the leading slice of a teacher tensor was copied
    t_q = teacher.model.model.language_model.layers[0].self_attn.q_proj.weight
    s_q = student.model.language_model.layers[0].self_attn.q_proj.weight
    assert torch.equal(s_q, t_q[: s_q.shape[0], : s_q.shape[1]])
    assert sum(p.numel() for p in student.parameters()) < 0.5 * sum(p.numel() for p in teacher.model.parameters())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("text_hidden=24", "whole number of"),
        ("text_hidden=16", "GQA group"),
        ("text_layers=9", "larger than the teacher"),
        ("text_depth=2", "bad student size"),
    ],
)
def test_impossible_student_sizes_are_clear_errors(tiny_checkpoints, spec, message):
    from edgelvm.distill.student import derive_config
    from edgelvm.models import load_model

    teacher = load_model(str(tiny_checkpoints["qwen2-siglip"]))
    with pytest.raises(ConfigError, match=message):
        derive_config(teacher, StudentSpec.parse(spec))


# ------------------------------------------------------------------------------------------------ losses


def test_divergences():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 50, generator=g), torch.randn(6, 50, generator=g)
    for kind in ("forward_kl", "reverse_kl", "js"):
        assert float(divergence(t, TeacherTargets(t), kind)) == pytest.approx(0.0, abs=1e-6)
        assert float(divergence(s, TeacherTargets(t), kind)) > 0.01
    # top-k with k = vocabulary is the full divergence
    full = divergence(s, TeacherTargets(t), "forward_kl", 2.0)
    assert float(divergence(s, TeacherTargets.from_logits(t, 50), "forward_kl", 2.0)) == pytest.approx(float(full))
    # JS is symmetric; forward KL is not
    js_st = divergence(s, TeacherTargets(t), "js")
    js_ts = divergence(t, TeacherTargets(s), "js")
    assert float(js_st) == pytest.approx(float(js_ts), rel=1e-5)
    # manual forward KL
    p, log_q = torch.softmax(t, -1), torch.log_softmax(s, -1)
    manual = (p * (torch.log(p) - log_q)).sum(-1).mean()
    assert float(divergence(s, TeacherTargets(t))) == pytest.approx(float(manual), rel=1e-5)


# ------------------------------------------------------------------------------------------------ training runs


def test_distill_writes_a_loadable_student_and_report(tiny_checkpoints, shapes_data, tmp_path):
    from edgelvm.models import load_model

    out = tmp_path / "student"
    cfg = _cfg(out, steps=4, ce_weight=0.5, feature_weight=1.0, hidden_weight=0.5, val_data=shapes_data["val"])
    report = distill(str(tiny_checkpoints["llama-clip"]), SMALL, shapes_data["train"], cfg)
    assert report.finished and report.steps == 4 and report.samples == 16
    assert report.student_params < report.teacher_params
    assert {"kd", "ce", "features", "hidden", "loss"} <= set(report.history[-1])
    assert report.evals and "val_exact_match" in report.evals[-1]
    saved = json.loads((out / "distill_report.json").read_text())
    assert saved["steps"] == 4
    student = load_model(str(out))  # a normal Hugging Face checkpoint with its processor
    assert student.text_config.hidden_size == 32
    assert not (out / ".distill" / "checkpoint").exists()


def test_bf16_teacher_teaches_an_fp32_student(tiny_checkpoints, shapes_data, tmp_path):
    """--teacher-dtype bf16 halves the teacher's memory (issue 19): its outputs reach the losses in fp32, the student
    derived from it trains and is saved in fp32, and the first step's losses are the fp32 teacher's within bf16
    rounding."""
    teacher = str(tiny_checkpoints["llama-clip"])
    kw = {"steps": 2, "log_every": 1, "feature_weight": 1.0, "hidden_weight": 0.5, "ce_weight": 0.5}
    full = distill(teacher, SMALL, shapes_data["train"], _cfg(tmp_path / "fp32", **kw))
    half = distill(teacher, SMALL, shapes_data["train"], _cfg(tmp_path / "bf16", teacher_dtype="bf16", **kw))
    assert half.finished and half.steps == 2
    for term in ("kd", "features", "hidden"):
        assert half.history[0][term] == pytest.approx(full.history[0][term], rel=0.05), term
    assert half.history[0] != full.history[0]  # the teacher did run in bf16
    assert {w.dtype for w in _weights(tmp_path / "bf16").values()} == {torch.float32}
    with pytest.raises(ConfigError, match="teacher_dtype"):
        distill(teacher, SMALL, shapes_data["train"], _cfg(tmp_path / "bad", teacher_dtype="int8"))


def test_training_reduces_the_divergence(tiny_checkpoints, shapes_data, tmp_path):
    cfg = _cfg(tmp_path / "s", steps=12, lr=3e-3, log_every=1)
    report = distill(str(tiny_checkpoints["qwen2-siglip"]), SMALL, shapes_data["train"], cfg)
    first, last = report.history[0]["kd"], report.history[-1]["kd"]
    assert last < 0.7 * first, (first, last)


def test_resume_continues_exactly(tiny_checkpoints, shapes_data, tmp_path):
    teacher = str(tiny_checkpoints["llama-clip"])
    kw = {"steps": 6, "grad_accum": 2, "save_every": 2}
    straight = distill(teacher, SMALL, shapes_data["train"], _cfg(tmp_path / "a", **kw))
    first = distill(teacher, SMALL, shapes_data["train"], _cfg(tmp_path / "b", stop_after=3, **kw))
    assert not first.finished and first.steps == 3
    assert not (tmp_path / "b" / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="--resume"):
        distill(teacher, SMALL, shapes_data["train"], _cfg(tmp_path / "b", **kw))
    resumed = distill(teacher, SMALL, shapes_data["train"], _cfg(tmp_path / "b", resume=True, **kw))
    assert resumed.finished and resumed.resumed_from == 3 and straight.steps == resumed.steps == 6
    assert _max_diff(_weights(tmp_path / "a"), _weights(tmp_path / "b")) <= 1e-6


def test_training_from_the_cache_matches_online_top_k(tiny_checkpoints, shapes_data, tmp_path):
    teacher = str(tiny_checkpoints["qwen2-siglip"])
    kw = {"steps": 3, "feature_weight": 1.0}
    distill(teacher, SMALL, shapes_data["train"], _cfg(tmp_path / "online", top_k=8, **kw))
    cache = tmp_path / "cache"
    cached = _cfg(tmp_path / "cached", cache_teacher=cache, cache_top_k=8, cache_shard_size=10, **kw)
    distill(teacher, SMALL, shapes_data["train"], cached)
    assert len(list(cache.glob("shard-*.safetensors"))) == 3
    assert json.loads((cache / "meta.json").read_text())["complete"] is True
    assert _max_diff(_weights(tmp_path / "online"), _weights(tmp_path / "cached")) <= 1e-6
    # a cache built with another k is refused, not mixed
    with pytest.raises(ConfigError, match="built for something else"):
        distill(teacher, SMALL, shapes_data["train"], _cfg(tmp_path / "other", cache_teacher=cache, cache_top_k=4))


def test_teacher_generated_responses_replace_the_ground_truth(tiny_checkpoints, shapes_data, tmp_path):
    """Sequence-level KD: the answers trained on are the teacher's greedy answers, stored for a resume."""
    from edgelvm.data.jsonl import load_jsonl_dataset
    from edgelvm.eval.answerers import HFAnswerer
    from edgelvm.models import load_model

    out = tmp_path / "s"
    cfg = _cfg(out, steps=1, teacher_generate=True, max_new_tokens=6)
    distill(str(tiny_checkpoints["llama-clip"]), SMALL, shapes_data["train"], cfg)
    stored = json.loads((out / ".distill" / "teacher_responses.json").read_text())
    records = load_jsonl_dataset(shapes_data["train"])
    assert set(stored) == {r.id for r in records}
    expected = HFAnswerer.from_adapter(load_model(str(tiny_checkpoints["llama-clip"]))).answer(records[:4], 6)
    assert [stored[r.id] for r in records[:4]] == [text for text, _ in expected]
    assert any(stored[r.id] != r.answer for r in records)  # random teacher: not the ground truth


# ------------------------------------------------------------------------------------------------ bad input


def test_output_directory_holding_other_things_is_refused(tiny_checkpoints, shapes_data, tmp_path):
    teacher = str(tiny_checkpoints["llama-clip"])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no distillation run"):
        distill(teacher, SMALL, shapes_data["train"], _cfg(busy))
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]  # nothing half-written

    done = tmp_path / "done"
    distill(teacher, SMALL, shapes_data["train"], _cfg(done, steps=1))
    with pytest.raises(ConfigError, match="finished distillation"):
        distill(teacher, SMALL, shapes_data["train"], _cfg(done, steps=1))

    other = tmp_path / "other"
    distill(teacher, SMALL, shapes_data["train"], _cfg(other, steps=4, stop_after=1))
    with pytest.raises(ConfigError, match="another run"):
        distill(teacher, SMALL, shapes_data["train"], _cfg(other, steps=4, lr=1e-2, resume=True))


def test_student_with_another_tokenizer_is_refused(tiny_checkpoints, shapes_data, tmp_path):
    from transformers import AutoProcessor

    student = tmp_path / "student"
    shutil.copytree(tiny_checkpoints["llama-clip"], student)
    processor = AutoProcessor.from_pretrained(student)
    processor.tokenizer.add_tokens(["<extra_token>"])
    processor.save_pretrained(student)
    with pytest.raises(ConfigError, match="tokenizer differs"):
        distill(str(tiny_checkpoints["llama-clip"]), str(student), shapes_data["train"], _cfg(tmp_path / "o"))

    config = json.loads((student / "config.json").read_text())
    config["text_config"]["vocab_size"] += 7
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="vocab_size"):
        distill(
            str(tiny_checkpoints["llama-clip"]), str(bare / "config.json"), shapes_data["train"], _cfg(tmp_path / "p")
        )


def test_student_of_an_unsupported_family_is_refused(tiny_checkpoints, shapes_data, tmp_path):
    bare = tmp_path / "kosmos"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "kosmos-2"}))
    with pytest.raises(UnsupportedModelError, match="kosmos-2"):
        distill(str(tiny_checkpoints["llama-clip"]), str(bare), shapes_data["train"], _cfg(tmp_path / "o"))


def test_bad_datasets_are_clear_errors(tiny_checkpoints, shapes_data, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match="empty"):
        distill(str(tiny_checkpoints["llama-clip"]), SMALL, empty, _cfg(tmp_path / "o"))
    missing = tmp_path / "missing"
    shutil.copytree(shapes_data["train"], missing)
    next((missing / "images").iterdir()).unlink()
    with pytest.raises(DatasetError, match="image"):
        distill(str(tiny_checkpoints["llama-clip"]), SMALL, missing, _cfg(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_cli_distill(tiny_checkpoints, shapes_data, tmp_path):
    from typer.testing import CliRunner

    from edgelvm.cli import app

    out = tmp_path / "cli-student"
    args = ["distill", str(tiny_checkpoints["llama-clip"]), "-d", str(shapes_data["train"]), "-o", str(out)]
    args += ["--derive", "text_layers=1,text_hidden=32,vision_hidden=24", "--steps", "2", "--batch-size", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "distill_report.json").is_file()


def test_two_process_accelerate_run_gives_a_student_that_exports_and_evaluates(tiny_checkpoints, shapes_data, tmp_path):
    """DDP over two CPU processes (torchrun + gloo, which ``accelerate launch --multi_gpu`` uses without a GPU)."""
    import os
    import subprocess
    import sys

    from edgelvm.eval import EvalConfig, evaluate
    from edgelvm.export import ExportConfig, export

    out = tmp_path / "ddp-student"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["-m", "edgelvm.cli", "distill", str(tiny_checkpoints["qwen2-siglip"]), "-d", str(shapes_data["train"])]
    cmd += ["-o", str(out), "--derive", "text_layers=1,text_hidden=32", "--steps", "2", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "distill_report.json").read_text())
    assert report["samples"] == 2 * 2 * 2  # steps x batch x processes: both ranks trained
    bundle = export(out, tmp_path / "bundle", ExportConfig(max_length=128)).bundle_dir
    result = evaluate(bundle, shapes_data["val"], EvalConfig(max_new_tokens=4, batch_size=8))
    assert result.metrics["n"] == 10
