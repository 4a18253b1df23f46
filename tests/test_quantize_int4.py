"""INT4 block-wise weights: RTN error bounds, and ONNX Runtime's MatMulNBits computing exactly x @ dequantize(W)."""

from __future__ import annotations

import numpy as np
import pytest

from edgelvm.errors import ConfigError
from edgelvm.quantize.int4 import matmul_nbits_node, quantize_rtn


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
