"""INT4 block-wise weights: RTN error bounds, and ONNX Runtime's MatMulNBits computing exactly x @ dequantize(W)."""

from __future__ import annotations

import numpy as np
import pytest

from edgelvm.errors import ConfigError
from edgelvm.export.gqa_decoder import matmul_nbits_node
from edgelvm.quantize.int4 import quantize_rtn


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("k", "block"), [(128, 32), (96, 64), (200, 128)])
def test_rtn_error_is_within_half_a_step(k, block, symmetric):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(k, 24)).astype(np.float32)
    q = quantize_rtn(w, block, symmetric)
    deq = q.dequantize()
    assert deq.shape == w.shape
    step = np.repeat(q.scales.T, block, axis=0)[:k]  # [K, N] scale per element
    assert np.all(np.abs(deq - w) <= 0.5 * step + 1e-6)
    assert np.abs(deq - w).mean() > 0  # it really is quantized


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("k", "block"), [(128, 32), (96, 64)])
def test_onnxruntime_matmulnbits_equals_dequantized_matmul(k, block, symmetric):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    n = 40
    q = quantize_rtn(rng.normal(size=(k, n)).astype(np.float32), block, symmetric)
    node, inits = matmul_nbits_node("fc", "x", "y", q)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.normal(size=(2, 3, k)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ q.dequantize(), rtol=1e-4, atol=1e-4)


def test_unsupported_block_size_is_a_clear_error():
    with pytest.raises(ConfigError, match="power of two"):
        quantize_rtn(np.zeros((64, 8), np.float32), 48)


def test_int4_checkpoint_exports_matmulnbits_and_matches_the_torch_side(
    tiny_checkpoints, variant, artifacts, tmp_path, test_images
):
    """The ORT INT4 graph (MatMulNBits; q|k|v packed into GroupQueryAttention, with Qwen2's biases) against the
    torch-side quantized model (dequantized weights): the export's own parity check, then greedy tokens. Llama: the
    bundle of the session's shared INT4 (AWQ) + INT8-vision stage, whose decoders the same INT4 writers produce
    (an RTN checkpoint of it is exported by test_cli.py's quantize → export)."""
    pytest.importorskip("torch")
    import onnx

    from edgelvm.export import ExportConfig, export
    from edgelvm.quantize import RTNConfig, quantize
    from edgelvm.runtime import VLM

    out = tmp_path / "q"
    methods = RTNConfig(group_size=32)
    report = quantize(str(tiny_checkpoints[variant]), None, methods, out=out)
    assert report.weight_bytes_after < report.weight_bytes_before / 6
    assert all(0 < layer["weight_error"] < 0.2 for layer in report.layers)
    if variant == "llama-clip":
        result = artifacts.quantized("llava-llama-clip").export
    else:
        result = export(out, tmp_path / "bundle", ExportConfig(max_length=128))
    fused = onnx.load(str(result.bundle_dir / "decoder_ort.onnx"), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in fused.graph.node) == 4 * 2  # qkv, o, gate_up, down x 2 layers
    parity = result.manifest.graphs["decoder_ort"].parity
    assert parity["max_rel"] < 1e-3, parity
    vlm_fused = VLM.load(result.bundle_dir, decoder="fused")
    vlm_portable = VLM.load(result.bundle_dir, decoder="portable")  # the dequantized float weights
    for prompt in ("Describe the image.", "What is it?"):
        vlm_fused.generate(test_images[0], prompt, max_new_tokens=12)
        vlm_portable.generate(test_images[0], prompt, max_new_tokens=12)
        assert vlm_fused.last_output_ids == vlm_portable.last_output_ids
