"""Layer-by-layer calibration (``quantize(..., layerwise=True)``): the same codes as whole-model passes of one
decoder layer each, on families whose layers take different per-layer inputs (Gemma 3's sliding and global masks,
Qwen2-VL's M-RoPE, Qwen3.5's linear-attention layers, BLIP-2's query tokens); a half-precision load keeps its dtype;
a family that changes the hidden states between layers is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgelvm.errors import ConfigError

FAMILIES = ["llava-llama-clip", "qwen2_vl", "gemma3", "qwen3_5", "blip2"]


def _codes(artifacts, name, calib_records, methods, **kwargs):
    from edgelvm.models import load_model
    from edgelvm.quantize.api import quantize_model

    adapter = load_model(str(artifacts.checkpoint(name)), dtype=kwargs.pop("dtype", "float32"))
    result = quantize_model(adapter, methods, calib_records[:8], batch_size=4, **kwargs)
    codes = {k: v for k, v in result.sidecars["int4.safetensors"].items()}
    return adapter, result, codes


@pytest.mark.parametrize("name", FAMILIES)
def test_layerwise_equals_one_layer_per_whole_model_pass(artifacts, calib_records, name):
    from edgelvm.quantize import GPTQConfig

    methods = [GPTQConfig(group_size=32)]
    _, per_pass, reference = _codes(artifacts, name, calib_records, methods, stats_memory_gb=1e-9)
    _, layerwise, codes = _codes(artifacts, name, calib_records, methods, layerwise=True)
    assert per_pass.report.calibration_passes > 1 and layerwise.report.calibration_passes == 1
    assert codes.keys() == reference.keys() and any(k.endswith(".packed") for k in codes)
    for key, value in reference.items():
        if key.endswith(".scales"):
            np.testing.assert_allclose(codes[key], value, rtol=1e-4, err_msg=key)
        elif key.endswith(".packed"):  # a code may flip where a value sits on a rounding boundary
            assert np.mean(codes[key] != value) < 0.01, key
    errors = {r["name"]: r["output_error"] for r in per_pass.report.layers if r["side"] == "text"}
    for row in layerwise.report.layers:
        if row["side"] == "text":
            assert row["output_error"] == pytest.approx(errors[row["name"]], rel=0.02, abs=1e-4), row["name"]


def test_layerwise_awq_and_int8_vision_together(artifacts, calib_records):
    """AWQ folds its scales into the norms of the layer being processed; the vision part takes the capture pass's
    statistics (its tower runs for real there)."""
    from edgelvm.quantize import AWQConfig, Int8VisionConfig

    methods = [AWQConfig(group_size=32), Int8VisionConfig(observer="minmax")]
    _, per_pass, reference = _codes(artifacts, "llava-llama-clip", calib_records, methods, stats_memory_gb=1e-9)
    _, layerwise, codes = _codes(artifacts, "llava-llama-clip", calib_records, methods, layerwise=True)
    for key, value in reference.items():
        if key.endswith(".scales"):
            np.testing.assert_allclose(codes[key], value, rtol=1e-4, err_msg=key)
    vision = {r["name"]: r["input_scale"] for r in per_pass.report.layers if r["side"] == "vision"}
    assert vision and {r["name"]: r["input_scale"] for r in layerwise.report.layers if r["side"] == "vision"} == (
        pytest.approx(vision, rel=1e-5)
    )


def test_half_precision_load_stays_half_and_layers_compute_in_float32(artifacts, calib_records):
    from edgelvm.quantize import GPTQConfig

    methods = [GPTQConfig(group_size=32)]
    _, _, reference = _codes(artifacts, "llava-llama-clip", calib_records, methods, layerwise=True)
    adapter, result, codes = _codes(artifacts, "llava-llama-clip", calib_records, methods, layerwise=True,
                                    dtype="float16")  # fmt: skip
    assert {p.dtype for p in adapter.language_model().parameters()} == {torch.float16}
    for key, value in reference.items():  # fp16 weights and inputs: close to the fp32 run, not equal
        if key.endswith(".scales"):
            np.testing.assert_allclose(codes[key], value, rtol=0.02, err_msg=key)
    rows = [r for r in result.report.layers if r["side"] == "text"]
    assert rows and all(0 < r["output_error"] < 0.3 for r in rows)


def test_a_model_that_changes_hidden_states_between_layers_is_refused(artifacts, calib_records):
    from edgelvm.models import load_model
    from edgelvm.quantize import RTNConfig
    from edgelvm.quantize.api import quantize_model

    adapter = load_model(str(artifacts.checkpoint("qwen3_vl")))
    with pytest.raises(ConfigError, match="between decoder layers"):
        quantize_model(adapter, [RTNConfig(group_size=32)], calib_records[:4], batch_size=4, layerwise=True)
