"""The TensorRT builder's plain-Python parts: profile shapes, engine directory, engines manifest, errors; and, marked
``tensorrt`` (skipped here: no GPU), the build and the TensorRT backend on hardware."""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from types import SimpleNamespace

import pytest

from edgelvm.build import BuildConfig, EngineBuildError, TensorRTUnavailableError, build_engines, engine_dir
from edgelvm.build import tensorrt_builder as tb
from edgelvm.manifest import Manifest


@pytest.fixture(scope="module")
def manifest(tiny_bundles) -> Manifest:
    return Manifest.load(tiny_bundles["qwen2-siglip"])


def test_decoder_profiles_from_manifest_dims(manifest):
    kv = manifest.kv_cache
    length, hidden = kv.max_length, manifest.graphs["decoder"].inputs[0].shape[-1]
    prefill, decode = tb.decoder_profiles(manifest, BuildConfig(max_batch=2))
    assert (prefill.name, decode.name) == ("prefill", "decode")
    names = [t.name for t in manifest.graphs["decoder"].inputs]
    assert list(prefill.shapes) == names == list(decode.shapes)
    opt_seq = min(length, manifest.preprocess.tokens_per_image + 64)
    assert prefill.shapes["inputs_embeds"] == {
        "min": [1, 1, hidden],
        "opt": [1, opt_seq, hidden],
        "max": [2, length, hidden],
    }
    past = f"past_key_values.{kv.num_layers - 1}.value"
    assert prefill.shapes[past] == {
        "min": [1, kv.num_kv_heads, 0, kv.head_dim],
        "opt": [1, kv.num_kv_heads, 0, kv.head_dim],
        "max": [2, kv.num_kv_heads, 0, kv.head_dim],
    }
    assert decode.shapes["inputs_embeds"]["max"] == [2, 1, hidden]
    assert decode.shapes[past]["max"] == [2, kv.num_kv_heads, length - 1, kv.head_dim]
    assert decode.shapes["attention_mask"] == {"min": [1, 1], "opt": [1, length // 2], "max": [2, length]}
    assert decode.shapes["position_ids"]["max"] == [2, 1]


def test_shorter_context_and_chunked_prefill(manifest):
    prefill, decode = tb.decoder_profiles(
        manifest, BuildConfig(max_length=128, prefill_past_max=64, opt_prefill_length=100)
    )
    assert prefill.shapes["inputs_embeds"]["opt"][1] == 100 and prefill.shapes["inputs_embeds"]["max"][1] == 128
    assert prefill.shapes["past_key_values.0.key"]["max"][2] == 64
    assert decode.shapes["past_key_values.0.key"]["max"][2] == 127
    with pytest.raises(EngineBuildError, match=r"outside 1\.\.256"):
        tb.decoder_profiles(manifest, BuildConfig(max_length=10_000))


def test_vision_profile_and_unknown_dim(manifest):
    (vision,) = tb.vision_profiles(manifest, BuildConfig(max_batch=3, vision_max_batch=4))
    spec = manifest.graphs["vision"].inputs[0]
    assert vision.shapes[spec.name]["max"] == [4, *spec.shape[1:]]
    assert vision.shapes[spec.name]["min"] == [1, *spec.shape[1:]]
    odd = copy.deepcopy(manifest)
    odd.graphs["decoder"].inputs[0].shape = ["batch", "chunk", 64]
    with pytest.raises(EngineBuildError, match="'chunk' has no rule"):
        tb.decoder_profiles(odd, BuildConfig())
    text_conditioned = copy.deepcopy(manifest)  # e.g. InstructBLIP: the Q-Former reads the prompt
    text_conditioned.graphs["vision"].inputs.append(copy.deepcopy(spec))
    text_conditioned.graphs["vision"].inputs[-1].name = "vision_text_ids"
    with pytest.raises(EngineBuildError, match=r"besides pixel_values \(vision_text_ids\)") as info:
        tb.vision_profiles(text_conditioned, BuildConfig())
    assert "onnxruntime" in info.value.fix
    cross = copy.deepcopy(manifest)  # e.g. Idefics: the decoder cross-attends to image states every step
    cross.graphs["decoder"].inputs.insert(3, copy.deepcopy(cross.graphs["decoder"].inputs[0]))
    cross.graphs["decoder"].inputs[3].name = "cross_states"
    with pytest.raises(EngineBuildError, match=r"\(cross_states\)"):
        tb.decoder_profiles(cross, BuildConfig())


def test_network_checks_and_precision():
    (profile,) = [tb.OptimizationProfile("p", {"a": {"min": [1], "opt": [1], "max": [2]}})]
    tb.check_network_inputs({"a": (-1,), "b": (3,)}, profile, "g")  # static inputs need no shape
    with pytest.raises(EngineBuildError, match=r"no profile for: \['c'\]"):
        tb.check_network_inputs({"a": (-1,), "c": (-1, 4)}, profile, "g")
    assert tb.resolve_precision("auto", has_qdq=False) == ("fp16", ["FP16"])
    assert tb.resolve_precision("auto", has_qdq=True) == ("int8", ["FP16", "INT8"])
    assert tb.resolve_precision("fp32", has_qdq=False) == ("fp32", [])
    # graphs edgelvm quantized: strongly typed, no precision flags (TensorRT's explicit-quantization guidance)
    assert tb.resolve_precision("auto", has_qdq=True, quantized="int4") == ("int4", [])
    assert tb.resolve_precision("auto", has_qdq=True, quantized="int8") == ("int8", [])
    with pytest.raises(EngineBuildError, match="unknown precision"):
        tb.resolve_precision("int3", has_qdq=False)
    fake_trt = SimpleNamespace(LayerType=SimpleNamespace(QUANTIZE="Q", DEQUANTIZE="DQ", MATRIX_MULTIPLY="MM"))
    network = SimpleNamespace(num_layers=2, get_layer=lambda i: SimpleNamespace(type=["MM", "DQ"][i]))
    assert tb.network_has_qdq(network, fake_trt)
    assert "MatMulNBits" in tb._parse_errors_fix(["No importer registered for op: MatMulNBits"])


def test_engine_dir_is_written_atomically(tmp_path):
    target = engine_dir(tmp_path, "nvidia-h200-sm90-trt10.3.0")
    assert target == tmp_path / "engines" / "nvidia-h200-sm90-trt10.3.0"
    info = tb.EngineInfo("decoder", "decoder.engine", "decoder.onnx", "ab" * 32, [], "fp16", ["FP16"], "cd" * 32, 3)
    data = tb.engines_manifest("fp", "10.3.0", {"decoder": info}, BuildConfig(max_batch=2))

    def write(blob: object, *, force: bool, cache: bytes | None = None) -> None:
        with tb.EngineDirWriter(target, force=force) as writer:
            assert writer.add_engine("decoder.engine", blob) == (len(blob), hashlib.sha256(blob).hexdigest())
            writer.commit(data, cache)

    write(b"one", force=False, cache=b"cache")
    written = json.loads((target / "engines.json").read_text())
    assert written["tensorrt_version"] == "10.3.0" and written["config"]["max_batch"] == 2
    assert written["engines"]["decoder"]["source_sha256"] == "ab" * 32
    assert (target / "timing.cache").read_bytes() == b"cache"
    with pytest.raises(EngineBuildError, match="already exist"):
        write(b"two", force=False)
    with pytest.raises(TypeError):  # a failure mid-write keeps the old engines and leaves no temp dir
        write("not a buffer", force=True)
    assert (target / "decoder.engine").read_bytes() == b"one"
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    write(bytearray(b"two") * (1 << 10), force=True)  # any buffer, written in slices
    assert (target / "decoder.engine").read_bytes() == b"two" * (1 << 10)
    assert tb.read_engines_manifest(target)["fingerprint"] == "fp"


def test_missing_tensorrt_is_a_clear_error(tiny_bundles, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt → ImportError
    with pytest.raises(TensorRTUnavailableError) as err:
        build_engines(tiny_bundles["llama-clip"], BuildConfig(verify=False))
    fix = err.value.fix
    # issue 26: the fix named a bare `pip install tensorrt` (TensorRT 11, cuda-python 13 whatever the driver)
    assert "edgelvm[tensorrt]" in fix and '"cuda-python>=12.6,<13"' in fix and "tensorrt-cu12" in fix
    assert "python3-libnvinfer" in fix and "--system-site-packages" in fix  # Jetson: JetPack's TensorRT
    assert "pip install tensorrt " not in fix and "pip install tensorrt`" not in fix


# ---- on hardware (skipped without TensorRT + an NVIDIA GPU; `benchmarks/gpu_check.sh` runs the same on a device) ----
@pytest.fixture(scope="module")
def built(tiny_bundles, tmp_path_factory):
    """A copy of the tiny bundle with engines built on this GPU (once per module)."""
    import shutil

    pytest.importorskip("tensorrt")
    bundle = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(tiny_bundles["llama-clip"], bundle)
    return bundle, build_engines(bundle, BuildConfig())


@pytest.mark.tensorrt
def test_build_engines_on_hardware(built):
    _, report = built
    assert (report.engine_dir / "decoder.engine").stat().st_size > 0
    assert [p.name for p in report.engines["decoder"].profiles] == ["prefill", "decode"]
    assert tb.read_engines_manifest(report.engine_dir)["engines"]["decoder"]["source"] == "decoder.onnx"


@pytest.mark.tensorrt
def test_trt_backend_greedy_tokens_match_onnxruntime_on_hardware(built):
    """The TensorRT backend (fp16 engines) against ONNX Runtime CPU (fp32): the same criterion as gpu_check.sh —
    a random-weight model may flip a near-tie late, but the first 8 greedy tokens must agree."""
    import numpy as np

    pytest.importorskip("cuda")  # cuda-python
    from edgelvm.runtime import VLM

    bundle, _ = built
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ids = {}
    for backend in ("onnxruntime-cpu", "tensorrt"):
        vlm = VLM.load(bundle, backend=backend)
        assert vlm.backend.name == backend
        vlm.generate(image, "Describe the image.", max_new_tokens=16, min_new_tokens=16)
        ids[backend] = vlm.last_output_ids[0]
    assert ids["tensorrt"][:8] == ids["onnxruntime-cpu"][:8]


def test_prefill_chunk_profile_takes_chunks_after_any_cached_length(manifest):
    """``--prefill-chunk``: the prefill profile's seq stops at the chunk and its past reaches the context, so the
    runtime's chunks fit it; TensorRT sizes attention for chunk × context instead of context²."""
    prefill, _ = tb.decoder_profiles(manifest, BuildConfig(max_length=128, prefill_chunk=32))
    embeds, past = prefill.shapes["inputs_embeds"], prefill.shapes["past_key_values.0.key"]
    assert embeds["max"][1] == 32 and embeds["opt"][1] <= 32
    assert past["max"][2] == 127 and prefill.shapes["attention_mask"]["max"][1] == 128
    with pytest.raises(EngineBuildError, match=r"prefill chunk 200 is outside 1\.\.128") as err:
        tb.decoder_profiles(manifest, BuildConfig(max_length=128, prefill_chunk=200))
    assert err.value.where == "--prefill-chunk"
