"""The quantize stage: observers, one-pass statistics, AWQ / GPTQ against RTN, the INT8 vision + INT4 LLM
checkpoint through export (QDQ, block-wise DequantizeLinear, MatMulNBits) into the runtime, and bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from edgelvm.calibration.observers import OBSERVERS, observe
from edgelvm.calibration.stats import AbsHistogram
from edgelvm.errors import ConfigError, DatasetError


def _hist(values: np.ndarray) -> AbsHistogram:
    import torch

    hist = AbsHistogram()
    for chunk in np.array_split(values, 7):  # several adds: the range grows while it fills
        hist.add(torch.from_numpy(np.abs(chunk)))
    return hist


def test_histogram_grows_without_losing_counts_and_percentiles_follow_numpy():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(size=5000) * 0.1, rng.normal(size=5000) * 3.0]).astype(np.float32)
    hist = _hist(values)
    assert hist.counts.sum() == values.size
    assert hist.max == pytest.approx(np.abs(values).max())
    a = np.abs(values)
    for p in (99.0, 99.9):
        picked = observe(hist, f"percentile:{p}")
        assert np.mean(a <= picked) >= p / 100  # at least P% below it ...
        assert np.mean(a <= picked - 2 * hist.width) < p / 100  # ... and it is the smallest such bin edge


def test_observers_clip_outliers_that_minmax_keeps():
    rng = np.random.default_rng(1)
    values = rng.normal(size=200_000).astype(np.float32)
    values[:5] = 80.0  # a few outliers
    hist = _hist(values)
    picked = {name: observe(hist, name) for name in OBSERVERS}
    assert picked["minmax"] == pytest.approx(80.0)
    assert picked["percentile:99.9"] <= picked["percentile:99.99"] <= picked["percentile:99.999"] <= 80.0
    assert picked["entropy"] < 20.0  # the Gaussian body, not the outliers
    assert picked["percentile:99.99"] < 10.0


def _grams(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64).T @ x.astype(np.float64)


def _output_error(w_eff: np.ndarray, w: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (w_eff - w).T) / np.linalg.norm(x @ w.T))


def test_awq_and_gptq_beat_rtn_on_inputs_with_salient_channels():
    """Output error measured on the activations themselves (not through the Gram matrix the algorithms used)."""
    import torch

    from edgelvm.quantize.awq import fake_int4, search_clip, search_scales
    from edgelvm.quantize.gptq import gptq_quantize

    rng = np.random.default_rng(2)
    k, n, tokens = 128, 64, 2048
    # correlated channels (activations live near a low-dimensional subspace) and a few salient ones
    x = rng.normal(size=(tokens, 16)) @ rng.normal(size=(16, k)) + 0.3 * rng.normal(size=(tokens, k))
    x = x.astype(np.float32)
    x[:, :6] *= 25.0
    w = rng.normal(size=(n, k)).astype(np.float32) * 0.05
    gram = torch.from_numpy(_grams(x))
    wt = torch.from_numpy(w)
    rtn = _output_error(fake_int4(wt, 32, True).numpy(), w, x)

    search = search_scales([wt], gram, np.abs(x).mean(0), 32, True)
    s = search.scales
    clip = search_clip(wt * s, gram / torch.outer(s, s).double(), 32, True)
    awq = _output_error((fake_int4(wt * s, 32, True, clip) / s).numpy(), w, x)
    gptq = _output_error(gptq_quantize(wt, gram, 32, True).dequantize().T, w, x)
    assert search.alpha > 0
    assert awq < 0.8 * rtn, (awq, rtn)
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_gptq_result_is_an_ordinary_block_wise_int4_weight():
    import torch

    from edgelvm.quantize.gptq import gptq_quantize

    rng = np.random.default_rng(3)
    x = rng.normal(size=(512, 96)).astype(np.float32)
    w = rng.normal(size=(40, 96)).astype(np.float32)
    q = gptq_quantize(torch.from_numpy(w), torch.from_numpy(_grams(x)), 64, symmetric=False)
    assert (q.k, q.n, q.block_size, q.k_blocks) == (96, 40, 64, 2)  # K padded to 2 blocks, not a permutation
    step = np.repeat(q.scales.T, 64, axis=0)[:96]
    codes = q.dequantize() / step
    assert np.allclose(codes, np.rint(codes), atol=1e-3)  # every value lies on its block's grid


def test_statistics_share_one_gram_matrix_per_input_and_skip_padding(tiny_checkpoints, calib_records):
    import torch

    from edgelvm.calibration.dataset import iter_batches, load_calibration_set
    from edgelvm.calibration.stats import collect_stats
    from edgelvm.models import load_model
    from edgelvm.models.checkpoint.quantized import text_linears

    adapter = load_model(str(tiny_checkpoints["qwen2-siglip"]))
    calib = load_calibration_set(calib_records, limit=12)
    linears = text_linears(adapter)
    stats = collect_stats(adapter, calib, linears, gram=set(linears), text=set(linears), batch_size=5)
    keys = {name: s.gram_key for name, s in stats.layers.items()}
    assert keys["layers.0.self_attn.q_proj"] == keys["layers.0.self_attn.k_proj"] == keys["layers.0.self_attn.v_proj"]
    assert keys["layers.0.mlp.gate_proj"] == keys["layers.0.mlp.up_proj"] != keys["layers.0.self_attn.q_proj"]
    assert len(stats.grams) == 4 * len(adapter.layer_stacks()["text"])  # qkv, o, gate/up, down per layer
    valid = sum(int(inputs["attention_mask"].sum()) for inputs, _ in iter_batches(adapter, calib, 5))
    assert stats.layers["layers.1.mlp.down_proj"].tokens == valid  # padding (batches of unequal length) excluded
    gram = stats.gram("layers.0.self_attn.q_proj")
    assert torch.allclose(gram, gram.T) and float(torch.diagonal(gram).min()) >= 0


@pytest.fixture(scope="module")
def quantized(artifacts):
    """INT4 AWQ (group 32) + INT8 vision of the tiny LLaVA, calibrated on 12 shapes records, and its bundle: the
    session's shared stage (tests/fixtures/artifacts.py), also read by test_quantize_int4.py and
    test_quantized_checkpoint.py."""
    return artifacts.quantized("llava-llama-clip")


def test_quantized_checkpoint_report(quantized):
    out, report = quantized.out, quantized.report
    saved = json.loads((out / "quant_report.json").read_text())
    assert saved["method"] == "awq" and saved["vision"] == "int8"
    text = [r for r in saved["layers"] if r["side"] == "text"]
    vision = [r for r in saved["layers"] if r["side"] == "vision"]
    assert len(text) == 7 * 2 and len(vision) >= 2 * 6 + 2  # q,k,v,o,gate,up,down x 2; tower linears + projector
    assert all(0 < r["weight_error"] < 0.2 and 0 < r["output_error"] < 0.3 for r in text)
    assert all(0 < r["weight_error"] < 0.02 for r in vision)
    assert set(saved["observer_scores"]) == set(OBSERVERS) and saved["calibrator"] in OBSERVERS
    assert any("patch embedding" in line for line in saved["kept_float"])
    assert report.weight_bytes_after < report.weight_bytes_before / 3
    config = json.loads((out / "config.json").read_text())
    assert config["edgelvm_quantization"]["llm"]["method"] == "awq"
    assert (out / "int4.safetensors").is_file() and (out / "int8.safetensors").is_file()


def test_quantized_bundle_matches_the_torch_side_and_runs_unchanged(quantized, test_images):
    """Export's parity checks compare each rewritten graph with its torch-side definition (INT8: fake-quantized
    inputs; INT4: dequantized weights); then the runtime's greedy tokens agree across both decoders and with
    the torch-side quantized model's ``generate``."""
    import onnx
    import torch

    from edgelvm.models import load_model
    from edgelvm.models.checkpoint.quantized import load_int8
    from edgelvm.quantize.vision_int8 import fake_quant_inputs
    from edgelvm.runtime import VLM

    out, result = quantized.out, quantized.export
    graphs = result.manifest.graphs
    assert graphs["vision"].precision == "int8" and graphs["vision"].parity["max_rel"] < 5e-2
    assert graphs["decoder"].precision == "int4" and graphs["decoder"].parity["max_rel"] < 1e-4
    assert graphs["decoder_ort"].precision == "int4" and graphs["decoder_ort"].parity["max_rel"] < 1e-3
    ops = {
        name: [n.op_type for n in onnx.load(str(result.bundle_dir / f), load_external_data=False).graph.node]
        for name, f in (("vision", "vision.onnx"), ("decoder", "decoder.onnx"), ("fused", "decoder_ort.onnx"))
    }
    recipe = result.manifest.created_from["recipe"][0]
    assert recipe["stage"] == "quantize" and result.manifest.created_from["calibration_sha256"]
    # one Q per linear (ORT fuses only unshared Q/DQ); the tower's last layer feeds nothing (feature layer -2), is
    # not traced, and is listed as left float
    written = recipe["graphs"]["vision"]["written"]
    assert ops["vision"].count("QuantizeLinear") == written >= 6 + 2
    assert all("not in the graph" in why for why in recipe["graphs"]["vision"]["left_float"].values())
    assert ops["decoder"].count("DequantizeLinear") == 14 and recipe["graphs"]["decoder"]["left_float"] == {}
    assert ops["fused"].count("MatMulNBits") == 4 * 2

    adapter = load_model(str(out))
    layers = load_int8(out)
    encoder = adapter.vision_encoder()
    fused, portable = VLM.load(result.bundle_dir, decoder="fused"), VLM.load(result.bundle_dir, decoder="portable")
    for image in test_images:
        for prompt in ("Describe the image.", "What is it?"):
            fused.generate(image, prompt, max_new_tokens=10)
            portable.generate(image, prompt, max_new_tokens=10)
            assert fused.last_output_ids == portable.last_output_ids
            inputs = adapter.processor(images=[image], text=[_prompt(adapter, prompt)], return_tensors="pt")
            modules = dict(encoder.named_modules())
            with torch.no_grad(), fake_quant_inputs(modules, {n: q.input_scale for n, q in layers.items()}):
                ids = adapter.model.generate(**inputs, max_new_tokens=10, do_sample=False)
            assert fused.last_output_ids[0] == ids[0, inputs["input_ids"].shape[1] :].tolist()


def _prompt(adapter, text: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return adapter.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_awq_scales_fold_exactly_into_the_float_model(tiny_checkpoints, calib_records):
    """Before any rounding, AWQ's scaling (columns × s, producer ÷ s, GQA-aware: v → o only without GQA) leaves the
    model's function unchanged — so every difference after quantization is the quantization's."""
    import torch

    from edgelvm.calibration.dataset import iter_batches, load_calibration_set
    from edgelvm.calibration.stats import collect_stats
    from edgelvm.models import load_model
    from edgelvm.models.checkpoint.quantized import text_linears
    from edgelvm.quantize import AWQConfig
    from edgelvm.quantize.llm_int4 import _apply_awq_scales

    for variant in ("llama-clip", "qwen2-siglip"):
        adapter = load_model(str(tiny_checkpoints[variant]))
        calib = load_calibration_set(calib_records, limit=8)
        inputs, _ = next(iter_batches(adapter, calib, 8))
        with torch.no_grad():
            before = adapter.model(**inputs).logits
        linears = text_linears(adapter)
        stats = collect_stats(adapter, calib, linears, gram=set(linears), text=set(linears))
        scales, _rows = _apply_awq_scales(adapter, linears, stats, AWQConfig(group_size=32))
        assert any(float((s - 1).abs().max()) > 0.05 for s in scales.values())  # it really rescaled
        with torch.no_grad():
            after = adapter.model(**inputs).logits
        assert torch.allclose(before, after, rtol=1e-4, atol=1e-4), float((before - after).abs().max())


def test_smoothquant_w8a8_language_model_runs_as_qdq_in_the_portable_decoder(
    tiny_checkpoints, calib_records, tmp_path, test_images
):
    """SmoothQuant W8A8: export writes QDQ into the portable decoder (no fused form exists), checked against the
    torch model with fake-quantized inputs, and the runtime's greedy tokens equal the torch-side W8A8 model's
    ``generate``."""
    import onnx
    import torch

    from edgelvm.export import ExportConfig, export
    from edgelvm.models import load_model
    from edgelvm.models.checkpoint.quantized import LLM_INT8_SIDECAR, load_int8
    from edgelvm.quantize import SmoothQuantConfig, quantize
    from edgelvm.quantize.vision_int8 import fake_quant_inputs
    from edgelvm.runtime import VLM

    out = tmp_path / "sq"
    report = quantize(str(tiny_checkpoints["llama-clip"]), calib_records, SmoothQuantConfig(), out=out)
    text = [r for r in report.layers if r["side"] == "text"]
    assert len(text) == 14 and all(r["bits"] == 8 and r["weight_error"] < 0.05 for r in text)
    result = export(out, tmp_path / "bundle", ExportConfig(max_length=128))
    graphs = result.manifest.graphs
    assert "decoder_ort" not in graphs and graphs["decoder"].precision == "int8"
    assert graphs["decoder"].parity["max_rel"] < 5e-2
    nodes = [n.op_type for n in onnx.load(str(result.bundle_dir / "decoder.onnx")).graph.node]
    assert nodes.count("QuantizeLinear") == 14

    adapter = load_model(str(out))
    layers = load_int8(out, LLM_INT8_SIDECAR)
    modules = {name: m for name, m in adapter.language_model().named_modules()}
    scales = {name: q.input_scale for name, q in layers.items()}
    vlm = VLM.load(result.bundle_dir)
    for image in test_images:
        vlm.generate(image, "Describe the image.", max_new_tokens=10)
        inputs = adapter.processor(images=[image], text=[_prompt(adapter, "Describe the image.")], return_tensors="pt")
        with torch.no_grad(), fake_quant_inputs(modules, scales):
            ids = adapter.model.generate(**inputs, max_new_tokens=10, do_sample=False)
        assert vlm.last_output_ids[0] == ids[0, inputs["input_ids"].shape[1] :].tolist()


def test_calibration_in_several_passes_when_the_gram_matrices_exceed_the_memory_budget(
    tiny_checkpoints, calib_records, tmp_path
):
    """A budget below one layer's Gram matrices: one calibration pass per decoder layer (each after the previous
    layers were quantized), every layer still quantized and the bundle still exact against its torch side."""
    from edgelvm.export import ExportConfig, export
    from edgelvm.quantize import GPTQConfig, Int8VisionConfig, quantize

    out = tmp_path / "q"
    methods = [GPTQConfig(group_size=32), Int8VisionConfig()]
    report = quantize(str(tiny_checkpoints["llama-clip"]), calib_records[:16], methods, out=out, stats_memory_gb=1e-9)
    assert report.calibration_passes == 2  # the tiny model's 2 decoder layers
    text = [r for r in report.layers if r["side"] == "text"]
    assert len(text) == 14 and all(0 < r["output_error"] < 0.3 for r in text)
    assert report.calibrator is not None  # the vision sweep used the first pass's statistics
    graphs = export(out, tmp_path / "bundle", ExportConfig(max_length=64)).manifest.graphs
    assert graphs["decoder"].precision == "int4" and graphs["decoder"].parity["max_rel"] < 1e-4


def test_observer_sweep_by_task_accuracy_on_eval_data(tiny_checkpoints, calib_records, tmp_path):
    from edgelvm.quantize import Int8VisionConfig, ObserverSweep, quantize

    vision = Int8VisionConfig(observer=ObserverSweep(eval_data=calib_records[:8]))
    report = quantize(str(tiny_checkpoints["qwen2-siglip"]), calib_records, vision, out=tmp_path / "q", calib_limit=16)
    assert report.observer_metric.startswith("answer-token accuracy")
    assert set(report.observer_scores) == set(OBSERVERS)
    assert all(0.0 <= v <= 1.0 for v in report.observer_scores.values())
    assert report.observer_scores[report.calibrator] == max(report.observer_scores.values())
    assert not any(r["side"] == "text" for r in report.layers)  # --llm none leaves the language model float


def test_bad_input_is_a_clear_error(tiny_checkpoints, tmp_path, calib_records, caplog):
    from edgelvm.calibration.dataset import load_calibration_set
    from edgelvm.quantize import AWQConfig, Int8VisionConfig, quantize

    model = str(tiny_checkpoints["llama-clip"])
    with pytest.raises(DatasetError, match="empty"):
        quantize(model, [], [AWQConfig(), Int8VisionConfig()], out=tmp_path / "a")
    with pytest.raises(ConfigError, match="calibration data"):
        quantize(model, None, AWQConfig(), out=tmp_path / "b")
    with pytest.raises(ConfigError, match="power of two"):
        AWQConfig(group_size=48)
    with pytest.raises(ConfigError, match="calibrator"):
        Int8VisionConfig(observer="percentile:120")
    assert not any((tmp_path / n).exists() for n in "ab")
    with caplog.at_level(logging.WARNING):
        load_calibration_set(calib_records, limit=8)
    assert "only 8 calibration records" in caplog.text
