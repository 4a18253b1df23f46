"""fp16 bundles on ONNX Runtime's CPU provider: weights upcast to fp32 when they fit, memory-mapped otherwise."""

from __future__ import annotations

import pytest

from edgelvm.runtime import VLM
from edgelvm.runtime.session_settings import SessionSettings

GB = 10**9


def test_auto_upcasts_only_when_twice_the_weights_fit():
    settings = SessionSettings(threads=1, spinning=False)
    assert settings.fp16_mode(GB, available=3 * GB) == "upcast"  # 2 GB of fp32 copies, 1.25x margin
    assert settings.fp16_mode(GB, available=2 * GB) == "mapped"
    assert settings.fp16_mode(14 * GB, available=23 * GB) == "mapped"  # a 7B fp16 bundle on a 24 GB machine
    forced = SessionSettings(threads=1, spinning=False, fp16_weights="upcast")
    assert forced.fp16_mode(14 * GB, available=GB) == "upcast"


@pytest.fixture(scope="module")
def fp16_bundle(tiny_checkpoints, tmp_path_factory):
    from edgelvm.export import ExportConfig, export

    out = tmp_path_factory.mktemp("fp16") / "bundle"
    return export(tiny_checkpoints["llama-clip"], out, ExportConfig(dtype="fp16", max_length=64)).bundle_dir


def test_mapped_fp16_weights_give_the_upcast_answers(fp16_bundle, test_images):
    answers = {}
    for mode in ("upcast", "mapped"):
        vlm = VLM.load(fp16_bundle, threads=1, fp16_weights=mode)
        assert vlm.backend.fp16_modes == {"vision": mode, "decoder": mode}
        answers[mode] = []
        for image in test_images[:2]:
            vlm.generate(image, "What is in the picture?", max_new_tokens=12)
            answers[mode].append(vlm.last_output_ids[0])
    # the same fp16 weights, converted to fp32 before the matmuls either way: the same greedy tokens
    assert answers["mapped"] == answers["upcast"]
    assert all(len(ids) > 0 for ids in answers["mapped"])


_MEASURE = """
import sys, numpy as np
from edgelvm.runtime.session_settings import SessionSettings
import onnxruntime as ort

def anon():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon:"))

before = anon()
settings = SessionSettings(threads=1, spinning=False)
session = ort.InferenceSession(sys.argv[1], settings.cpu_fp16_options(ort, sys.argv[2]),
                               providers=["CPUExecutionProvider"])
out = session.run(None, {"x": np.ones((1, 4096), np.float16)})[0]
print(anon() - before, float(out.astype(np.float32).sum()))
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/status")
def test_mapped_mode_keeps_fp16_weights_out_of_anonymous_memory(tmp_path):
    """What the modes are for, measured on one 128 MB fp16 matmul: upcast holds an fp32 copy (256 MB of
    anonymous memory), mapped reads the file's pages and holds none; both compute the same output."""
    import subprocess
    import sys

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = (np.random.default_rng(0).standard_normal((4096, 16384)) * 0.01).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4096])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 16384])],
        [numpy_helper.from_array(weight, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "matmul.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="matmul.onnx.data")
    results = {}
    for mode in ("upcast", "mapped"):
        out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), mode], capture_output=True, text=True,
                             check=True).stdout.split()  # fmt: skip
        results[mode] = int(out[0]), float(out[1])
    assert results["upcast"][0] > 200e6, results  # the fp32 copy of 128 MB of fp16
    assert results["mapped"][0] < 64e6, results
    assert results["mapped"][1] == pytest.approx(results["upcast"][1], rel=1e-3)
