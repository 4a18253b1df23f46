"""edgelvm prune on tiny random-weight LLaVA checkpoints: heads (vision + GQA language model) and MLP neurons are
removed, the checkpoint reloads, exports, and the runtime's greedy tokens equal Hugging Face greedy of the pruned
model. Quality on the shipped teacher (importance vs random, recovery) is ``benchmarks/prune_shapes.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from edgelvm.errors import ConfigError, DatasetError, UnsupportedModelError  # noqa: E402
from edgelvm.prune import (  # noqa: E402
    GradientImportance,
    MagnitudeImportance,
    PruneConfig,
    RandomImportance,
    prune,
)


@pytest.fixture(scope="module")
def gqa8_checkpoint(tmp_path_factory) -> Path:
    """Qwen2 with 8 query heads over 2 KV heads (groups of 4), so 25% and 50% are both realisable per group."""
    from edgelvm.models.synthetic import build_tiny_llava

    overrides = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2}
    return build_tiny_llava(tmp_path_factory.mktemp("gqa8") / "ckpt", text="qwen2", vision="clip",
                            text_overrides=overrides)  # fmt: skip


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    from edgelvm.data import write_split

    return write_split(tmp_path_factory.mktemp("calib") / "calib", seed=31, n=12)


def _greedy_equal(checkpoint: Path, bundle: Path, images, prompts) -> int:
    from transformers import AutoProcessor

    from edgelvm.models import load_model
    from edgelvm.runtime import VLM

    model = load_model(str(checkpoint)).model
    processor = AutoProcessor.from_pretrained(checkpoint)
    vlm = VLM.load(bundle)
    eos = set(vlm.manifest.generation["eos_token_ids"])
    compared = 0
    for image in images:
        for prompt in prompts:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = processor.apply_chat_template(msgs, add_generation_prompt=True)
            inputs = processor(images=[image], text=[text], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
            ids = out[0, inputs["input_ids"].shape[1] :].tolist()
            for i, t in enumerate(ids):
                if t in eos:
                    ids = ids[: i + 1]
                    break
            vlm.generate(image, prompt, max_new_tokens=12)
            assert vlm.last_output_ids[0] == ids, prompt
            compared += len(ids)
    return compared


# 0.5 in the slow suite: the fast 0.25 case takes the same path, and the fast depth-pruning test below exports a
# text_heads=0.5 pruning of this checkpoint and checks it against HF
@pytest.mark.parametrize("text_heads", [0.25, pytest.param(0.5, marks=pytest.mark.slow)])
def test_pruned_gqa_checkpoint_reloads_exports_and_matches_hf(
    gqa8_checkpoint, calib, text_heads, tmp_path, test_images
):
    from edgelvm.export import ExportConfig, export
    from edgelvm.models import load_model

    out = tmp_path / "pruned"
    cfg = PruneConfig(out=out, vision_heads=0.5, text_heads=text_heads, text_mlp=0.25, vision_mlp=0.25, progress=False)
    report = prune(str(gqa8_checkpoint), calib, cfg)
    kept = report.kept
    assert all(layer["heads"] == 2 for layer in kept["vision"])  # 4 -> 2
    assert all(layer["heads"] == int(8 * (1 - text_heads)) and layer["kv_heads"] == 2 for layer in kept["text"])
    assert report.after["parameters"] < report.before["parameters"]
    assert report.after["flops_per_token"] < report.before["flops_per_token"]
    assert report.after["flops_per_image"] < report.before["flops_per_image"]
    assert (out / "prune_scores.json").is_file()
    adapter = load_model(str(out))  # edgelvm's loader rebuilds the head-pruned CLIP tower
    assert adapter.model.model.language_model.layers[0].self_attn.q_proj.out_features == int(8 * (1 - text_heads)) * 16
    bundle = export(out, tmp_path / "bundle", ExportConfig(max_length=128)).bundle_dir
    assert _greedy_equal(out, bundle, test_images, ["Describe the image.", "What is it?"]) >= 8


def test_language_side_reloads_with_plain_from_pretrained(tiny_checkpoints, calib, tmp_path):
    """Uniform head + neuron pruning of the language model only: transformers itself reloads it."""
    from transformers import LlavaForConditionalGeneration

    from edgelvm.models import load_model

    out = tmp_path / "pruned"
    prune(
        str(tiny_checkpoints["llama-clip"]), calib, PruneConfig(out=out, text_heads=0.5, text_mlp=0.5, progress=False)
    )
    plain = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ours = load_model(str(out)).model
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, ours(input_ids=ids).logits)
    assert plain.config.text_config.num_attention_heads == 2 and plain.config.text_config.head_dim == 16


def test_pruning_keeps_the_highest_scoring_units(tiny_checkpoints, calib, tmp_path):
    out = tmp_path / "p"
    report = prune(str(tiny_checkpoints["llama-clip"]), calib,
                   PruneConfig(out=out, text_mlp=0.5, vision_heads=0.5, progress=False))  # fmt: skip
    scores = json.loads((out / "prune_scores.json").read_text())
    text0 = torch.tensor(scores["neurons"]["text.0"])
    n = report.kept["text"][0]["intermediate"]
    assert n == len(text0) // 2
    # the kept neurons' weights are the teacher's rows of the top-n scores, in order
    from edgelvm.models import load_model

    original = load_model(str(tiny_checkpoints["llama-clip"])).model.model.language_model.layers[0].mlp.up_proj.weight
    pruned = load_model(str(out)).model.model.language_model.layers[0].mlp.up_proj.weight
    top = sorted(torch.argsort(text0, descending=True)[:n].tolist())
    assert torch.equal(pruned, original[top])


@pytest.mark.parametrize("importance", [GradientImportance(), MagnitudeImportance(), RandomImportance(seed=3)])
def test_other_importance_measures(tiny_checkpoints, calib, tmp_path, importance):
    report = prune(str(tiny_checkpoints["qwen2-siglip"]), calib,
                   PruneConfig(out=tmp_path / "p", text_heads=0.5, vision_heads=0.5, importance=importance,
                               progress=False))  # fmt: skip
    assert report.kept["text"][0]["heads"] == 2
    assert report.importance == importance.name


def test_a_custom_importance_callable_scores_the_units(tiny_checkpoints, calib, tmp_path):
    """An injected importance gets the calibration batches and its scores decide what is kept: here a unit's
    score is its index, so the upper half of every MLP survives."""
    import numpy as np

    rows_seen = []

    def by_index(adapter, batches):
        rows_seen.append(sum(rows for _inputs, _labels, rows in batches))
        scores = MagnitudeImportance()(adapter, None)
        scores.heads = {k: np.arange(len(v), dtype=float) for k, v in scores.heads.items()}
        scores.neurons = {k: np.arange(len(v), dtype=float) for k, v in scores.neurons.items()}
        return scores

    out = tmp_path / "p"
    report = prune(str(tiny_checkpoints["llama-clip"]), calib,
                   PruneConfig(out=out, text_mlp=0.5, importance=by_index, progress=False))  # fmt: skip
    assert rows_seen == [12] and report.importance == "by_index"
    assert report.calibration["records"] == 12
    from edgelvm.models import load_model

    original = load_model(str(tiny_checkpoints["llama-clip"])).model.model.language_model.layers[0].mlp.up_proj.weight
    pruned = load_model(str(out)).model.model.language_model.layers[0].mlp.up_proj.weight
    n = original.shape[0]
    assert torch.equal(pruned, original[n // 2 :])
    with pytest.raises(ConfigError, match="importance 'l2' is unknown"):
        PruneConfig(importance="l2").validate()


def test_kv_group_removal(gqa8_checkpoint, calib, tmp_path):
    report = prune(str(gqa8_checkpoint), calib,
                   PruneConfig(out=tmp_path / "p", text_heads=0.5, gqa="kv_groups", progress=False))  # fmt: skip
    assert all(x["heads"] == 4 and x["kv_heads"] == 1 for x in report.kept["text"])


def test_recovery_distils_the_pruned_model(tiny_checkpoints, calib, tmp_path):
    cfg = PruneConfig(out=tmp_path / "p", text_heads=0.5, recover_steps=2, batch_size=4, progress=False)
    report = prune(str(tiny_checkpoints["llama-clip"]), calib, cfg)
    assert report.recovery["steps"] == 2
    from edgelvm.models import load_model

    load_model(str(tmp_path / "p"))


def test_bad_input_is_a_clear_error(tiny_checkpoints, gqa8_checkpoint, calib, tmp_path):
    with pytest.raises(ConfigError, match="out of range"):
        PruneConfig(text_heads=1.2).validate()
    with pytest.raises(ConfigError, match=r"(?s)impossible.*use 0.25 or 0.5"):
        prune(str(gqa8_checkpoint), calib, PruneConfig(out=tmp_path / "a", text_heads=0.4, progress=False))
    with pytest.raises(ConfigError, match="impossible"):  # 4 heads over 2 KV heads: 25% cannot come from each group
        prune(str(tiny_checkpoints["qwen2-siglip"]), calib,
              PruneConfig(out=tmp_path / "b", text_heads=0.25, progress=False))  # fmt: skip
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match="empty"):
        prune(str(tiny_checkpoints["llama-clip"]), empty, PruneConfig(out=tmp_path / "c", text_heads=0.5))
    unknown = tmp_path / "kosmos"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "kosmos-2"}))  # a family with no adapter
    with pytest.raises(UnsupportedModelError):
        prune(str(unknown), calib, PruneConfig(out=tmp_path / "d", text_heads=0.5))
    for name in "abcd":
        assert not (tmp_path / name).exists()


def test_cli_prune(tiny_checkpoints, calib, tmp_path):
    from typer.testing import CliRunner

    from edgelvm.cli import app

    out = tmp_path / "nested" / "cli"  # a parent that does not exist yet
    args = ["prune", str(tiny_checkpoints["llama-clip"]), "--calib", str(calib), "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--vision-heads", "0.5", "--text-heads", "0.25"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "prune_report.json").read_text())["kept"]["text"][0]["heads"] == 3


@pytest.mark.parametrize(("gqa", "ratio"), [("per_group", 0.25), ("kv_groups", 0.5), ("expand", 0.375)])
def test_removing_heads_equals_zeroing_their_output(gqa8_checkpoint, calib, tmp_path, gqa, ratio):
    """Exactness of the surgery: the pruned model computes what the original computes with the removed heads'
    outputs zeroed at o_proj's input (text-only input, so only the language model is involved)."""
    from edgelvm.models import load_model

    out = tmp_path / "p"
    config = PruneConfig(out=out, text_heads=ratio, gqa=gqa, importance=MagnitudeImportance(), progress=False)
    report = prune(str(gqa8_checkpoint), calib, config)
    scores = json.loads((out / "prune_scores.json").read_text())["heads"]
    original = load_model(str(gqa8_checkpoint)).model
    for i, layer in enumerate(original.model.language_model.layers):
        kept_heads = report.kept["text"][i]["heads"]
        assert kept_heads == 8 - int(8 * ratio)
        s = torch.tensor(scores[f"text.{i}"])
        removed = set(range(8)) - set(_kept_by_mode(s, gqa, kept_heads))
        with torch.no_grad():
            for h in removed:
                layer.self_attn.o_proj.weight[:, h * 16 : (h + 1) * 16] = 0
    pruned = load_model(str(out)).model
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 40]])
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    if gqa == "expand":
        assert report.kept["text"][0]["kv_heads"] in (kept_heads, 2)


def _kept_by_mode(scores, gqa: str, n_keep: int) -> list[int]:
    if gqa == "per_group":
        per = n_keep // 2
        return [
            g * 4 + int(j) for g in range(2) for j in torch.argsort(scores[g * 4 : g * 4 + 4], descending=True)[:per]
        ]
    if gqa == "kv_groups":
        g = int(torch.argmax(scores.reshape(2, 4).sum(1)))
        return list(range(g * 4, g * 4 + 4))
    return torch.argsort(scores, descending=True)[:n_keep].tolist()


def test_expanded_gqa_with_a_head_count_transformers_refuses_still_reloads_and_exports(
    tiny_checkpoints, calib, tmp_path, test_images
):
    """4 query heads over 2 KV heads minus 25% = 3 heads with 3 KV copies in a 64-wide model: transformers' config
    validation refuses 64 % 3, so the record carries the shape and edgelvm's loader restores it."""
    from edgelvm.export import ExportConfig, export

    out = tmp_path / "p"
    report = prune(str(tiny_checkpoints["qwen2-siglip"]), calib,
                   PruneConfig(out=out, text_heads=0.25, gqa="expand", progress=False))  # fmt: skip
    assert all(x["heads"] == 3 and x["kv_heads"] == 3 for x in report.kept["text"])
    bundle = export(out, tmp_path / "bundle", ExportConfig(max_length=128)).bundle_dir
    assert _greedy_equal(out, bundle, test_images[:1], ["Describe the image."]) >= 4


def test_depth_pruning_drops_the_least_influential_blocks(gqa8_checkpoint, calib, tmp_path, test_images):
    from edgelvm.export import ExportConfig, export
    from edgelvm.models import load_model

    out = tmp_path / "p"
    cfg = PruneConfig(out=out, text_drop_layers=1, vision_drop_layers=1, text_heads=0.5, progress=False)
    report = prune(str(gqa8_checkpoint), calib, cfg)
    blocks = json.loads((out / "prune_scores.json").read_text())["blocks"]
    for side in ("vision", "text"):
        influence = {int(k.split(".")[1]): v for k, v in blocks.items() if k.startswith(side)}
        assert report.kept["dropped_blocks"][side] == [min(influence, key=influence.get)]
        assert len(report.kept[side]) == 1
    adapter = load_model(str(out))
    assert adapter.text_config.num_hidden_layers == 1
    bundle = export(out, tmp_path / "bundle", ExportConfig(max_length=128)).bundle_dir
    assert _greedy_equal(out, bundle, test_images[:1], ["Describe the image."]) >= 4
