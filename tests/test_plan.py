"""`edgelvm plan`: the fit check from the config alone (no weights read, no torch model built), equal to the fit
check `edgelvm export --target` computes from the loaded model; `export --target` refuses before loading weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgelvm.cli import app
from edgelvm.devices.profiles import list_profiles
from edgelvm.errors import EdgeLVMError

runner = CliRunner(env={"COLUMNS": "240"})
GIB = 1 << 30
NANO_USABLE = int(6.5 * GIB)  # 6_979_321_856 B
ACTIVATIONS, OVERHEAD = GIB // 2, 3 * GIB // 4  # DEFAULT_ACTIVATION_BYTES, RUNTIME_OVERHEAD_BYTES


def write_real_shapes(root: Path) -> dict[str, Path]:
    """Config-only directories (config.json alone) with the public config.json values of four checkpoints."""
    from transformers import (
        CLIPVisionConfig,
        InternVLConfig,
        LlamaConfig,
        LlavaConfig,
        Qwen2Config,
        Qwen2VLConfig,
        SmolVLMConfig,
    )

    configs = {
        "llava-1.5-7b": LlavaConfig(  # llava-hf/llava-1.5-7b-hf
            text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                                    max_position_embeddings=4096, rms_norm_eps=1e-5),
            vision_config=CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                           num_hidden_layers=24, num_attention_heads=16, projection_dim=768),
            vision_feature_layer=-2, vision_feature_select_strategy="default", image_token_id=32000,
        ),
        "qwen2-vl-2b": Qwen2VLConfig(  # Qwen/Qwen2-VL-2B-Instruct
            text_config=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                             num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                             rope_theta=1e6, tie_word_embeddings=True,
                             rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
            vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, in_chans=3,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
            tie_word_embeddings=True,
        ),
        "internvl3-1b": InternVLConfig(  # OpenGVLab/InternVL3-1B-hf
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=[448, 448], patch_size=[14, 14], norm_type="layer_norm",
                               use_qk_norm=False, layer_scale_init_value=0.1, use_mean_pooling=True),
            text_config=Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                    num_attention_heads=14, num_key_value_heads=2, vocab_size=151674,
                                    max_position_embeddings=32768, tie_word_embeddings=True),
            downsample_ratio=0.5, vision_feature_layer=-1,
        ),
        "smolvlm-500m": SmolVLMConfig(  # HuggingFaceTB/SmolVLM-500M-Instruct
            text_config=dict(model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                             num_attention_heads=15, num_key_value_heads=5, vocab_size=49280,
                             max_position_embeddings=8192, rope_theta=100000, tie_word_embeddings=False),
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=512, patch_size=16),
            scale_factor=4,
        ),
    }  # fmt: skip
    for name, config in configs.items():
        config.save_pretrained(root / name)
    return {name: root / name for name in configs}


@pytest.fixture(scope="module")
def real_shapes(tmp_path_factory) -> dict[str, Path]:
    return write_real_shapes(tmp_path_factory.mktemp("real-shapes"))


def plan_json(*args: str) -> dict:
    result = runner.invoke(app, ["plan", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_plan_answers_every_profile_from_the_config_alone(real_shapes):
    names = [p.name for p in list_profiles()]
    for name, path in real_shapes.items():
        assert sorted(p.name for p in path.iterdir()) == ["config.json"]  # nothing else: no weights, no processor
        started = time.perf_counter()
        answer = plan_json(str(path), "--precision", "int4")
        print(f"edgelvm plan {name}: {time.perf_counter() - started:.3f} s in process")  # reported, not asserted
        assert [row["profile"] for row in answer["targets"]] == names
        for row in answer["targets"]:
            assert {"fits", "headroom_bytes", "predicted_decode_tokens_per_s", "build_peak_bytes"} <= set(row)
            assert row["predicted_decode_tokens_per_s_at_max_length"] < row["predicted_decode_tokens_per_s"]
            assert 0 <= row["longest_fitting_context"] <= answer["max_position_embeddings"]
    table = runner.invoke(app, ["plan", str(real_shapes["llava-1.5-7b"]), "--precision", "int4"])
    assert table.exit_code == 0, table.output
    assert "jetson-orin-nano-8gb" in table.output and "h200" in table.output and "tok/s@max" in table.output


def test_the_lm_head_counts_in_its_own_precision(real_shapes):
    """``edgelvm quantize`` keeps the head float unless ``--lm-head``: by default the INT4 plan counts LLaVA-1.5-7B's
    32064 × 4096 head (131_334_144 params) in fp16 and the rest at 4.5 bits:
    (6_607_605_760 − 131_334_144) × 4.5 / 8 + 131_334_144 × 2 = 3_905_571_072 B (+188.8 MB against an INT4 head)."""

    def llm_bytes(*extra: str) -> int:
        result = runner.invoke(app, ["plan", str(real_shapes["llava-1.5-7b"]), "--precision", "int4", "--target",
                                     "jetson-orin-nano-8gb", "--max-length", "2048", "--json", *extra])  # fmt: skip
        return json.loads(result.stdout)["targets"][0]["budget_bytes"]["LLM weights"]

    assert llm_bytes() == 3_905_571_072
    assert llm_bytes("--lm-head-precision", "int8") == 3_642_902_784 + 131_334_144
    assert llm_bytes("--lm-head-precision", "int4") == 3_716_778_240


def test_config_counts_equal_a_model_built_on_the_meta_device(real_shapes):
    """Each adapter's arithmetic against the modules transformers builds (on `meta`: no memory, no weights)."""
    from edgelvm.models.base import VLMAdapter
    from edgelvm.models.registry import adapter_for_model_type, load_config

    for path in real_shapes.values():
        config, source = load_config(path)
        adapter = adapter_for_model_type(config.model_type).for_config(config, source)
        assert adapter.config_parameter_counts() == VLMAdapter.config_parameter_counts(adapter), path.name


def test_llava_15_7b_int4_at_2048_is_refused_on_orin_nano_8gb(real_shapes):
    """By hand. Vision: CLIP ViT-L/336 (303.5M) + projector 1024→4096→4096 (21.0M) = 324_487_168 params, fp16
    = 648_974_336 B (0.60 GiB). Decoder: 32 × 202_383_360 (q/k/v/o 4 × 4096², gate/up/down 3 × 4096 × 11008,
    2 norms) + 4096 (norm) + 32064 × 4096 (lm_head) = 6_607_605_760 params (embedding table excluded), INT4 at
    4.5 bits = 3_716_778_240 B (3.46 GiB). KV: 32 layers × 2 × 32 heads × 128 × 2 B = 512 KiB/token × 2048 × 2
    buffers = 2 GiB. + 0.5 GiB activations + 0.75 GiB overhead = 7_855_413_504 B = 7.32 GiB > 6.5 GiB usable.
    (``--lm-head-precision int4``: the head quantized too; by default it stays fp16, see the next test.)"""
    result = runner.invoke(app, ["plan", str(real_shapes["llava-1.5-7b"]), "--precision", "int4", "--max-length",
                                 "2048", "--target", "jetson-orin-nano-8gb", "--json",
                                 "--lm-head-precision", "int4"])  # fmt: skip
    assert result.exit_code == 1, result.output  # a named target that does not fit: exit code 1
    answer = json.loads(result.stdout)
    assert answer["parameters"]["vision"] == 324_487_168
    assert answer["parameters"]["decoder"] == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096 + 32064 * 4096
    assert answer["kv_cache"]["bytes_per_token"] == 32 * 2 * 32 * 128 * 2 == 524_288
    (row,) = answer["targets"]
    vision, llm, kv = 648_974_336, 3_716_778_240, 524_288 * 2048 * 2
    assert row["budget_bytes"] == {
        "vision weights": vision,
        "LLM weights": llm,
        "KV cache (2048 tok × 1 × 2 buf)": kv,
        "activations": ACTIVATIONS,
        "runtime overhead": OVERHEAD,
    }
    assert row["total_bytes"] == 7_855_413_504 and f"{row['total_bytes'] / GIB:.2f}" == "7.32"

    assert row["fits"] is False and row["headroom_bytes"] == NANO_USABLE - 7_855_413_504  # short by 0.82 GiB
    # the longest context that fits: (6.5 GiB − 5_707_929_856 B fixed) / 1 MiB per token = 1212 → 1024
    assert row["longest_fitting_context"] == 1024
    assert any("--max-length 1024" in s for s in row["suggestions"])
    text = runner.invoke(app, ["plan", str(real_shapes["llava-1.5-7b"]), "--precision", "int4", "--max-length",
                               "2048", "--target", "jetson-orin-nano-8gb", "--lm-head-precision",
                               "int4"]).output  # fmt: skip
    assert "does NOT fit (short by 0.82 GiB)" in text


def test_qwen2_vl_2b_int4_fits_orin_nano_8gb_with_its_predicted_speed(real_shapes):
    """By hand. Vision (fp16): patch conv 3×2×14²×1280 + 32 blocks × 19_677_440 + merger (LN, 5120², 5120×1536)
    = 665_271_296 params = 1_330_542_592 B. Decoder: 28 × 47_480_320 (q 1536², k/v 1536×256 with biases,
    o 1536², 3 × 1536 × 8960, 2 norms) + 1536 + 151936 × 1536 (lm_head, tied to the embedding: counted once)
    = 1_543_714_304 params, INT4 = 868_339_296 B. KV: 28 × 2 × 2 KV heads × 128 × 2 B = 28_672 B/token × 2048 × 2
    = 117_440_512 B. Total 1_330_542_592 + 868_339_296 + 117_440_512 + 0.5 GiB + 0.75 GiB = 3_658_499_680 B
    (3.41 GiB) ≤ 6.5 GiB: fits, 3.09 GiB headroom. Roofline at 68 GB/s: 68e9 / 868_339_296 = 78.3 tok/s on an
    empty context, 68e9 / (868_339_296 + 28_672 × 2048) = 73.4 tok/s at 2048. Build peak 4 × 1_330_542_592 +
    0.75 GiB = 6_127_476_736 B (5.71 GiB) fits too. Longest context: (6.5 GiB − 3_541_059_168) / 57_344 = 59_959
    tokens → capped at max_position_embeddings 32768. (The head INT4 as well: ``--lm-head-precision int4``.)"""
    result = runner.invoke(app, ["plan", str(real_shapes["qwen2-vl-2b"]), "--precision", "int4", "--max-length",
                                 "2048", "--target", "jetson-orin-nano-8gb", "--json",
                                 "--lm-head-precision", "int4"])  # fmt: skip
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["parameters"] == {"vision": 665_271_296, "decoder": 1_543_714_304, "checkpoint": None}
    (row,) = answer["targets"]
    assert row["total_bytes"] == 3_658_499_680 and row["fits"] is True
    assert row["headroom_bytes"] == NANO_USABLE - 3_658_499_680
    assert row["predicted_decode_tokens_per_s"] == round(68e9 / 868_339_296, 2) == 78.31
    assert row["predicted_decode_tokens_per_s_at_max_length"] == round(68e9 / (868_339_296 + 28_672 * 2048), 2) == 73.35
    assert row["build_peak_bytes"] == 6_127_476_736 and row["build_fits"] is True
    assert row["longest_fitting_context"] == 32768


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_plan_from_config_equals_the_fit_check_on_the_loaded_model(family, tiny_checkpoints, tmp_path):
    """Random-weight checkpoints: the plan `edgelvm plan` computes from config.json, the one `export --target`
    runs before loading, and the one it computes from the loaded modules (written to the manifest) are equal."""
    from edgelvm.export.bundle import ExportConfig, _plan_target, _plan_target_from_config
    from edgelvm.models import load_model

    if family == "llava":
        checkpoint = tiny_checkpoints["qwen2-siglip"]
    else:
        from tests.fixtures.qwen2_vl import build_tiny_qwen2_vl

        checkpoint = build_tiny_qwen2_vl(tmp_path / "qwen2-vl")
    for dtype in ("fp32", "fp16"):
        config = ExportConfig(dtype=dtype, max_length=256, target="jetson-orin-nano-4gb")
        before = _plan_target_from_config(checkpoint, config).to_manifest()
        adapter = load_model(checkpoint, dtype="float16" if dtype == "fp16" else "float32")
        kv = adapter.kv_cache_spec(max_length=256, dtype="float16" if dtype == "fp16" else "float32")
        loaded = _plan_target(adapter, kv, config).to_manifest()
        assert before == loaded
        (row,) = plan_json(str(checkpoint), "--precision", dtype, "--max-length", "256", "--target",
                           "jetson-orin-nano-4gb")["targets"]  # fmt: skip
        assert {k: row[k] for k in loaded} == loaded
    answer = plan_json(str(checkpoint))
    assert answer["parameters"]["checkpoint"] is not None and answer["notes"] == []  # headers agree with the config


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelvm.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "240", **(env or {})})  # fmt: skip


def test_export_target_refuses_from_the_config_before_loading_weights(real_shapes, tmp_path):
    """The real entry point: LLaVA-1.5-7B (config.json alone) in fp16 on an Orin Nano is refused from its config,
    without weights (no traceback, nothing written)."""
    result = run_cli("export", str(real_shapes["llava-1.5-7b"]), "-o", str(tmp_path / "b"), "--target",
                     "jetson-orin-nano-8gb", "--dtype", "fp16")  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "the model does not fit on Jetson Orin Nano 8GB" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "b").exists()


def test_missing_weights_unsupported_family_and_broken_configs_are_clear_errors(tiny_checkpoints, tmp_path):
    import shutil

    source = tiny_checkpoints["llama-clip"]
    no_weights = tmp_path / "no-weights"
    shutil.copytree(source, no_weights, ignore=shutil.ignore_patterns("*.safetensors*"))
    result = runner.invoke(app, ["export", str(no_weights), "-o", str(tmp_path / "b"), "--target",
                                 "jetson-orin-nano-8gb", "--dtype", "fp16"])  # fmt: skip
    assert isinstance(result.exception, EdgeLVMError), result.output
    assert "no weights" in str(result.exception) and "edgelvm plan" in str(result.exception.fix)
    assert plan_json(str(no_weights))["parameters"]["checkpoint"] is None  # the plan itself needs no weights

    cases = {
        "truncated": ('{"model_type": "llava", "text_config": {"hidden_si', "not valid JSON"),
        "list": ("[1, 2]", "not an object"),
        "unknown family": ('{"model_type": "whisper"}', "model_type 'whisper' is not supported"),
        "bad values": ('{"model_type": "llava", "text_config": {"model_type": "llama", "hidden_size": "wide"}}', ""),
    }
    for name, (text, expected) in cases.items():
        directory = tmp_path / name.replace(" ", "-")
        directory.mkdir()
        (directory / "config.json").write_text(text)
        result = runner.invoke(app, ["plan", str(directory)])
        assert isinstance(result.exception, EdgeLVMError), (name, result.output, result.exception)
        assert expected in str(result.exception), (name, str(result.exception))


def test_hub_id_offline_is_a_clear_error():
    result = run_cli("plan", "some-org/not-a-cached-model", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot fetch the config" in result.stdout + result.stderr and "Traceback" not in result.stderr
