"""The GPU paths' version-dependent logic, without a GPU (issue 26): TensorRT 10.x / 11.x API surfaces recorded as fake
modules, the ONNX Runtime TensorRT-provider options, the CPU-fallback explanation, the fused-decoder refusal on
CUDA, cuda-python/driver matching and memory-pool limits. No torch, no export: a synthetic two-layer manifest.

The fakes hold exactly the attributes edgelvm touches as NVIDIA's documentation gives them for each version
(TensorRT 10.x Python API; "Migrating from TensorRT 10.x to 11.x", removed Python APIs): 10.0 lacks
``device_memory_size_v2`` / ``set_device_memory`` (added in 10.1); 11.x lacks every precision ``BuilderFlag``,
``ICudaEngine.device_memory_size``, ``create_execution_context_without_device_memory`` and the context's
``device_memory`` setter. The 11.x fake also has no ``NetworkDefinitionCreationFlag`` members, so nothing may depend
on them there (strong typing is the default). None of this ran on a GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from packaging.requirements import Requirement

from edgelvm import tensorrt_compat as compat
from edgelvm.build import BuildConfig, EngineBuildError, TensorRTUnavailableError, build_engines
from edgelvm.build import tensorrt_builder as tb
from edgelvm.errors import BackendError, EdgeLVMError
from edgelvm.manifest import Manifest
from edgelvm.runtime import ort_backend as ob

LAYERS, KV_HEADS, HEAD_DIM, HIDDEN, VOCAB, LENGTH = 2, 2, 8, 16, 32, 64


# ---- a synthetic manifest ------------------------------------------------------------------------------------------
def manifest_dict(precision: str = "fp32", dtype: str = "float32", target: dict | None = None) -> dict:
    kv = [
        {"name": f"past_key_values.{i}.{k}", "dtype": dtype, "shape": ["batch", KV_HEADS, "past", HEAD_DIM]}
        for i in range(LAYERS)
        for k in ("key", "value")
    ]
    present = [
        {"name": f"present.{i}.{k}", "dtype": dtype, "shape": ["batch", KV_HEADS, "past + seq", HEAD_DIM]}
        for i in range(LAYERS)
        for k in ("key", "value")
    ]
    return {
        "format_version": "1.0",
        "family": "llava",
        "graphs": {
            "vision": {
                "file": "vision.onnx",
                "precision": precision,
                "inputs": [{"name": "pixel_values", "dtype": dtype, "shape": ["batch", 3, 32, 32]}],
                "outputs": [{"name": "image_features", "dtype": dtype, "shape": ["batch", 4, HIDDEN]}],
            },
            "embed": {
                "file": "embed.npy",
                "kind": "table",
                "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}],
                "outputs": [{"name": "inputs_embeds", "dtype": dtype, "shape": ["batch", "seq", HIDDEN]}],
            },
            "decoder": {
                "file": "decoder.onnx",
                "precision": precision,
                "inputs": [
                    {"name": "inputs_embeds", "dtype": dtype, "shape": ["batch", "seq", HIDDEN]},
                    {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total"]},
                    {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                    *kv,
                ],
                "outputs": [{"name": "logits", "dtype": dtype, "shape": ["batch", VOCAB]}, *present],
            },
        },
        "preprocess": {
            "resize_mode": "shortest_edge",
            "size": {"shortest_edge": 32},
            "resample": "bicubic",
            "center_crop": {"height": 32, "width": 32},
            "rescale_factor": 1 / 255,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "convert_rgb": True,
            "image_token": "<image>",
            "image_token_id": 4,
            "tokens_per_image": 4,
            "tiling": "none",
        },
        "tokenizer": {
            "file": "tokenizer.json",
            "chat_template": None,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "special_tokens": {},
        },
        "kv_cache": {
            "num_layers": LAYERS,
            "num_kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "dtype": dtype,
            "max_length": LENGTH,
            "layout": "per_layer_bhsd",
            "past_name": "past_key_values.{layer}.{kind}",
            "present_name": "present.{layer}.{kind}",
        },
        "positions": {"kind": "1d"},
        "generation": {"eos_token_ids": [2], "pad_token_id": 3},
        "files": {},
        "target": target,
    }


def write_bundle(root: Path, **kwargs) -> Path:
    data = manifest_dict(**kwargs)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("vision.onnx", "decoder.onnx", "embed.npy", "tokenizer.json"):
        (root / name).write_bytes(name.encode())
        data["files"][name] = hashlib.sha256(name.encode()).hexdigest()
    (root / "edgelvm.json").write_text(json.dumps(data))
    return root


# ---- fake TensorRT modules -----------------------------------------------------------------------------------------
class Flags:
    """An enum-like namespace: members are ints, unknown members are AttributeErrors."""

    def __init__(self, *names: str) -> None:
        for index, name in enumerate(names):
            setattr(self, name, index)


PRECISION_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                   "PREFER_PRECISION_CONSTRAINTS")  # fmt: skip


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []


class FakeBuilderConfig:
    def __init__(self, rec: Recorder, accept_cache: bool) -> None:
        self.rec, self.accept_cache = rec, accept_cache

    def set_memory_pool_limit(self, pool, size):
        self.rec.calls.append(("pool", pool, size))

    def set_flag(self, flag):
        self.rec.calls.append(("flag", flag))

    def create_timing_cache(self, blob):
        return SimpleNamespace(blob=blob, serialize=lambda: b"cache:" + bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.rec.calls.append(("timing_cache", cache.blob))
        ok = self.accept_cache or cache.blob == b""
        self.current = cache
        return ok

    def get_timing_cache(self):
        return self.current

    def add_optimization_profile(self, profile):
        self.rec.calls.append(("profile", dict(profile.shapes)))


def fake_tensorrt(version: str, rec: Recorder, *, accept_cache: bool = True) -> SimpleNamespace:
    major = int(version.split(".")[0])
    inputs = [SimpleNamespace(name=t["name"], shape=[-1 if isinstance(d, str) else d for d in t["shape"]])
              for t in manifest_dict()["graphs"]["decoder"]["inputs"]]  # fmt: skip
    vision_inputs = [SimpleNamespace(name="pixel_values", shape=[-1, 3, 32, 32])]

    class Network:
        def __init__(self, flags):
            rec.calls.append(("create_network", flags))
            self.inputs = None
            self.num_layers = 0

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class Parser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            self.network.inputs = vision_inputs if path.endswith("vision.onnx") else inputs
            return True

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            return Network(flags)

        def create_builder_config(self):
            return FakeBuilderConfig(rec, accept_cache)

        def create_optimization_profile(self):
            profile = SimpleNamespace(shapes={})
            profile.set_shape = lambda name, lo, opt, hi: profile.shapes.__setitem__(name, (lo, opt, hi))
            return profile

        def build_serialized_network(self, network, config):
            return b"engine"

    builder_flags = ("TF32", "SPARSE_WEIGHTS") + (PRECISION_FLAGS if major < 11 else ())
    trt = SimpleNamespace(
        __version__=version,
        Builder=Builder,
        OnnxParser=Parser,
        Logger=SimpleNamespace(INFO=1, WARNING=2, __call__=None),
        BuilderFlag=Flags(*builder_flags),
        MemoryPoolType=Flags("WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM", "DLA_GLOBAL_DRAM", "TACTIC_DRAM"),
        LayerType=Flags("QUANTIZE", "DEQUANTIZE", "MATRIX_MULTIPLY"),
        NetworkDefinitionCreationFlag=Flags("EXPLICIT_BATCH", "STRONGLY_TYPED") if major < 11 else Flags(),
        ExecutionContextAllocationStrategy=Flags("STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED"),
    )
    trt.Logger = lambda severity=None: SimpleNamespace()
    trt.Logger.INFO, trt.Logger.WARNING = 1, 2
    return trt


def fake_engine(version: str, rec: Recorder) -> object:
    major, minor = (int(x) for x in version.split(".")[:2])

    class Context:
        pass

    if (major, minor) >= (10, 1):
        Context.set_device_memory = lambda self, ptr, size: rec.calls.append(("set_device_memory", ptr, size))
    if major < 11:
        Context.device_memory = property(None, lambda self, ptr: rec.calls.append(("device_memory=", ptr)))

    class Engine:
        def create_execution_context(self, strategy=0):
            rec.calls.append(("create_execution_context", strategy))
            return Context()

    if (major, minor) >= (10, 1):
        Engine.device_memory_size_v2 = property(lambda self: 2048)
    if major < 11:
        Engine.device_memory_size = property(lambda self: 1024)
        Engine.create_execution_context_without_device_memory = lambda self: Context()
    return Engine()


# ---- version checks and the API surface ----------------------------------------------------------------------------
def test_version_parsing_and_refusal_below_10():
    assert compat.version_tuple("10.3.0.26") == (10, 3, 0, 26)
    assert compat.version_tuple("11.0.0rc1") == (11, 0, 0)
    rec = Recorder()
    for version in ("10.3.0", "11.4.0.106"):
        assert compat.check_tensorrt_version(fake_tensorrt(version, rec)) == int(version.split(".")[0])
    with pytest.raises(TensorRTUnavailableError, match=r"TensorRT 8\.6\.1 is too old") as err:
        compat.check_tensorrt_version(SimpleNamespace(__version__="8.6.1"), TensorRTUnavailableError)
    assert "JetPack 6" in err.value.fix and "onnxruntime" in err.value.fix


def test_device_memory_size_is_version_aware():
    """The old ``getattr(engine, "device_memory_size_v2", engine.device_memory_size)`` evaluates its default first:
    on TensorRT 11 (no device_memory_size) it raises. The compat helper reads only what exists."""
    rec = Recorder()
    engine11 = fake_engine("11.4", rec)
    with pytest.raises(AttributeError):
        getattr(engine11, "device_memory_size_v2", engine11.device_memory_size)  # the bug, reproduced
    assert compat.engine_device_memory_size(engine11) == 2048
    assert compat.engine_device_memory_size(fake_engine("10.3", rec)) == 2048
    assert compat.engine_device_memory_size(fake_engine("10.0", rec)) == 1024


@pytest.mark.parametrize("version, expected", [("10.0", "device_memory="), ("10.3", "set_device_memory"),
                                               ("11.4", "set_device_memory")])  # fmt: skip
def test_user_managed_contexts(version, expected):
    rec = Recorder()
    trt = fake_tensorrt(version + ".0", rec)
    context = compat.create_user_managed_context(trt, fake_engine(version, rec))
    compat.set_context_device_memory(context, 0xABC, 2048)
    assert rec.calls[0] == ("create_execution_context", trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    assert rec.calls[1][0] == expected


def test_network_flags_and_builder_flags_per_version():
    rec = Recorder()
    trt10, trt11 = fake_tensorrt("10.3.0", rec), fake_tensorrt("11.4.0", rec)
    assert (
        compat.network_creation_flags(trt10, strongly_typed=True)
        == 1 << trt10.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    )
    assert compat.network_creation_flags(trt10, strongly_typed=False) == 0
    assert compat.network_creation_flags(trt11, strongly_typed=True) == 0  # always strongly typed; no flag needed
    assert compat.builder_flags(trt10, ["FP16", "INT8"]) == [trt10.BuilderFlag.FP16, trt10.BuilderFlag.INT8]
    with pytest.raises(EdgeLVMError, match="no builder flag"):
        compat.builder_flags(trt11, ["FP16"])


def test_precision_on_tensorrt_11_follows_the_graph(caplog):
    assert tb.resolve_precision("auto", False, None, graph_dtype="float16", trt_major=11) == ("fp16", [])
    with caplog.at_level(logging.WARNING):
        assert tb.resolve_precision("auto", False, None, graph_dtype="float32", trt_major=11) == ("fp32", [])
    assert "--dtype fp16" in caplog.text
    assert tb.resolve_precision("auto", True, "int4", graph_dtype="float32", trt_major=11) == ("int4", [])
    assert tb.resolve_precision("auto", True, None, trt_major=11) == ("int8", [])
    with pytest.raises(EngineBuildError, match="strongly typed") as err:
        tb.resolve_precision("fp16", False, None, graph_dtype="float32", trt_major=11)
    assert "--dtype fp16" in err.value.fix
    assert tb.resolve_precision("auto", False) == ("fp16", ["FP16"])  # TensorRT 10: unchanged


# ---- the whole build against each fake -----------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["10.3.0", "11.4.0"])
def test_build_engines_against_recorded_api(tmp_path, monkeypatch, version):
    rec = Recorder()
    trt = fake_tensorrt(version, rec)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tb, "verify_bundle_files", lambda *a, **k: None)  # placeholders, not ONNX files
    bundle = write_bundle(tmp_path / "bundle")
    report = build_engines(bundle, BuildConfig(fingerprint="fake-gpu", device="jetson-orin-nano-8gb"))
    flags = [c[1] for c in rec.calls if c[0] == "flag"]
    pools = {c[1]: c[2] for c in rec.calls if c[0] == "pool"}
    usable = int(6.5 * (1 << 30))
    assert pools == {trt.MemoryPoolType.WORKSPACE: usable // 4, trt.MemoryPoolType.TACTIC_DRAM: usable // 2}
    if version.startswith("10"):
        assert flags == [trt.BuilderFlag.FP16, trt.BuilderFlag.FP16]  # fp32 graphs, fp16 engines (weak typing)
        assert report.engines["decoder"].precision == "fp16"
    else:
        assert flags == []  # no precision flags exist; the fp32 graph gives an fp32 engine
        assert report.engines["decoder"].precision == "fp32"
    written = json.loads((report.engine_dir / "engines.json").read_text())
    assert written["memory_pool_limits"] == {"WORKSPACE": usable // 4, "TACTIC_DRAM": usable // 2}
    profiles = [c[1] for c in rec.calls if c[0] == "profile"]
    assert len(profiles) == 3  # vision + prefill + decode


def test_quantized_graphs_are_strongly_typed_on_10(tmp_path, monkeypatch):
    rec = Recorder()
    trt = fake_tensorrt("10.3.0", rec)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tb, "verify_bundle_files", lambda *a, **k: None)
    build_engines(write_bundle(tmp_path / "b", precision="int8"), BuildConfig(fingerprint="f", workspace_bytes=0))
    assert {c[1] for c in rec.calls if c[0] == "create_network"} == {
        1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    }
    assert not [c for c in rec.calls if c[0] == "flag"]
    assert not [c for c in rec.calls if c[0] == "pool" and c[1] == trt.MemoryPoolType.WORKSPACE]  # 0: TensorRT's


def test_rejected_timing_cache_falls_back_to_an_empty_one(tmp_path, monkeypatch, caplog):
    rec = Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.3.0", rec, accept_cache=False))
    monkeypatch.setattr(tb, "verify_bundle_files", lambda *a, **k: None)
    shared = tmp_path / "shared.cache"
    shared.write_bytes(b"from-another-gpu")
    with caplog.at_level(logging.WARNING):
        build_engines(write_bundle(tmp_path / "b"), BuildConfig(fingerprint="f", timing_cache=shared))
    assert "rejected the timing cache" in caplog.text
    assert [c[1] for c in rec.calls if c[0] == "timing_cache"][:2] == [b"from-another-gpu", b""]


def test_tensorrt_8_is_refused_before_building(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="8.6.1"))
    monkeypatch.setattr(tb, "verify_bundle_files", lambda *a, **k: None)
    with pytest.raises(TensorRTUnavailableError, match="too old"):
        build_engines(write_bundle(tmp_path / "b"), BuildConfig(fingerprint="f"))


def test_default_pool_limits_and_their_source(tmp_path):
    assert tb.default_pool_limits(None) == {"WORKSPACE": None, "TACTIC_DRAM": None}
    assert tb.default_pool_limits(80 << 30)["WORKSPACE"] == tb.WORKSPACE_CAP
    assert tb.default_pool_limits(512 << 20)["WORKSPACE"] == tb.WORKSPACE_FLOOR
    manifest = Manifest.from_dict(manifest_dict(target={"profile": "x", "usable_bytes": 4 << 30}))
    assert tb.usable_memory_for_build(BuildConfig(), manifest)[0] == 4 << 30
    gpu = {"name": "NVIDIA L4", "memory_total_bytes": 24 << 30, "source": "nvml"}
    assert tb.usable_memory_for_build(BuildConfig(), manifest, gpu) == (
        (24 << 30) - (1 << 29),
        "detected GPU memory (NVIDIA L4)",
    )
    jetson = {"name": "Orin Nano", "memory_total_bytes": 8 << 30, "source": "cuda-python+device-tree"}
    assert tb.usable_memory_for_build(BuildConfig(), manifest, jetson)[0] == 7 << 30
    limits = tb.pool_limits(BuildConfig(workspace_bytes=1 << 30, tactic_dram_bytes=0), manifest)
    assert limits == {"WORKSPACE": 1 << 30, "TACTIC_DRAM": None}


# ---- cuda-python ---------------------------------------------------------------------------------------------------
def test_cuda_python_major_must_not_exceed_the_driver():
    message = compat.cuda_python_driver_mismatch("13.0.1", 12060)
    assert "CUDA 12.6" in message and "cuda-python>=12.0,<13" in message
    assert compat.cuda_python_driver_mismatch("12.9.1", 12060) is None
    assert compat.cuda_python_driver_mismatch("13.0.1", 13000) is None


def test_cuda_errors_name_the_fix(monkeypatch):
    from edgelvm.runtime import trt_backend

    class Err(int):
        name = "cudaErrorInsufficientDriver"

    stream = SimpleNamespace()
    rt = SimpleNamespace(cudaDriverGetVersion=lambda: (0, 12060), cudaStreamCreate=lambda: (Err(35), stream))
    monkeypatch.setattr(trt_backend, "_bindings_version", lambda: "12.9.1")
    with pytest.raises(BackendError, match=r"cudaErrorInsufficientDriver \(35\)") as err:
        trt_backend._Cuda(rt)
    assert "cuda-python>=12.6,<13" in err.value.fix
    monkeypatch.setattr(trt_backend, "_bindings_version", lambda: "13.0.0")
    with pytest.raises(BackendError, match="needs a CUDA 13 driver"):
        trt_backend._Cuda(rt)


def test_host_copies_go_through_pinned_memory(monkeypatch):
    """Decoder inputs are copied into their page-locked twin and DMA'd from there; where cudaMallocHost is refused
    the copy reads the pageable array itself. (A fake CUDA runtime: the calls' arguments are what is checked.)"""
    from edgelvm.runtime import trt_backend

    pinned_memory = np.zeros(64, np.uint8)  # stands in for cudaMallocHost's allocation
    copies, freed = [], []
    refuse = {"on": False}
    rt = SimpleNamespace(
        cudaDriverGetVersion=lambda: (0, 12060),
        cudaStreamCreate=lambda: (0, 7),
        cudaMallocHost=lambda n: (2, 0) if refuse["on"] else (0, pinned_memory.ctypes.data),
        cudaFreeHost=freed.append,
        cudaMemcpyKind=SimpleNamespace(cudaMemcpyHostToDevice="H2D", cudaMemcpyDeviceToHost="D2H"),
        cudaMemcpyAsync=lambda dst, src, n, kind, stream: copies.append((dst, src, n, kind)) or (0,),
    )
    monkeypatch.setattr(trt_backend, "_bindings_version", lambda: "12.9.1")
    cuda = trt_backend._Cuda(rt)
    staging = cuda.malloc_host(64)
    assert staging.ctypes.data == pinned_memory.ctypes.data and staging.nbytes == 64
    array = np.arange(6, dtype=np.int64)[None]  # 48 bytes
    cuda.to_device(0xD0, array, staging)
    assert copies[-1] == (0xD0, pinned_memory.ctypes.data, 48, "H2D")
    assert pinned_memory[:48].view(np.int64).tolist() == list(range(6))
    too_big = np.zeros(9, np.int64)  # 72 bytes > the staging buffer: copied from where it lies
    cuda.to_device(0xD1, too_big, staging)
    assert copies[-1] == (0xD1, too_big.ctypes.data, 72, "H2D")
    refuse["on"] = True
    assert cuda.malloc_host(64) is None
    cuda.to_device(0xD2, array, None)
    assert copies[-1][1] == array.ctypes.data
    cuda.free_host()
    assert freed == [pinned_memory.ctypes.data] and cuda.pinned == []


def test_native_handle_without_get_cuda_native_handle(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", None)  # older cuda-python: int() is the way
    assert compat.native_handle(1234) == 1234


def test_native_handle_uses_get_cuda_native_handle_where_it_exists(monkeypatch):
    """cuda-bindings 12.9.1+ deprecates ``int(cuda_obj)``: the handle comes from ``get_cuda_native_handle``."""

    class Stream:  # int() on it is the deprecated path: it must not be taken
        def __int__(self):
            raise AssertionError("int(cuda_obj) used")

    utils = SimpleNamespace(get_cuda_native_handle=lambda obj: 0x5EED if isinstance(obj, Stream) else None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", utils)
    assert compat.native_handle(Stream()) == 0x5EED


def test_trt_backend_refuses_tensorrt_below_10(tmp_path, monkeypatch):
    """The runtime side of the < 10 refusal (the builder's is above): no half-supported TensorRT 8 (no INT64)."""
    from edgelvm.runtime.trt_backend import TrtBackend

    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="8.6.2"))
    with pytest.raises(BackendError, match=r"TensorRT 8\.6\.2 is too old") as err:
        TrtBackend(tmp_path, Manifest.from_dict(manifest_dict()))
    assert err.value.where == "backend" and "JetPack 6.1/6.2" in err.value.fix


# ---- NVML: a failed power read keeps the memory sample --------------------------------------------------------------
def test_nvml_power_failure_keeps_the_memory_sample(monkeypatch):
    from edgelvm.devices import probes

    class NVMLError(Exception):
        pass

    def power(handle):
        raise NVMLError("Not Supported")

    fake = SimpleNamespace(nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: i,
                           nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=3 << 30),
                           nvmlDeviceGetPowerUsage=power, nvmlDeviceGetTotalEnergyConsumption=power)  # fmt: skip
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    probe = probes.NvmlProbe(interval_s=10.0)
    assert probe._read() == (3 << 30, None)  # issue 26: one try for both dropped the memory figure too
    summary = probe.stop()
    assert summary.peak_memory_bytes == 3 << 30 and summary.mean_power_w is None and summary.energy_j is None
    # NVML's power reading is a ~1 s average on Ampere+: energy comes from the hardware counter where there is one
    counter = iter([1_000_000, 1_250_000])  # mJ at start and at stop
    fake.nvmlDeviceGetPowerUsage = lambda handle: 90_000
    fake.nvmlDeviceGetTotalEnergyConsumption = lambda handle: next(counter)
    summary = probes.NvmlProbe(interval_s=10.0).stop()
    assert summary.energy_j == 250.0 and summary.power_source == "nvmlDeviceGetTotalEnergyConsumption"
    assert summary.mean_power_w == 90.0


# ---- ONNX Runtime: TensorRT provider options, CPU fallback, fused decoder ------------------------------------------
def test_tensorrt_provider_options(tmp_path):
    manifest = Manifest.from_dict(manifest_dict(target={"profile": "x", "max_batch": 2}))
    options = ob.tensorrt_provider_options(manifest, "decoder", tmp_path)
    assert options["trt_fp16_enable"] == "True"
    assert options["trt_engine_cache_enable"] == options["trt_timing_cache_enable"] == "True"
    assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == str(tmp_path)
    mins = options["trt_profile_min_shapes"].split(",")
    maxs = options["trt_profile_max_shapes"].split(",")
    opts = options["trt_profile_opt_shapes"].split(",")
    assert mins[0] == f"inputs_embeds:1x1x{HIDDEN}" and maxs[0] == f"inputs_embeds:2x{LENGTH}x{HIDDEN}"
    assert f"past_key_values.1.value:1x{KV_HEADS}x0x{HEAD_DIM}" in mins
    assert f"past_key_values.1.value:2x{KV_HEADS}x{LENGTH - 1}x{HEAD_DIM}" in maxs
    assert f"attention_mask:1x{LENGTH // 2}" in opts and f"attention_mask:2x{LENGTH}" in maxs
    assert len(mins) == 3 + 2 * LAYERS
    vision = ob.tensorrt_provider_options(manifest, "vision", tmp_path, max_batch=3)
    assert vision["trt_profile_max_shapes"] == "pixel_values:3x3x32x32"
    quantized = Manifest.from_dict(manifest_dict(precision="int4"))
    assert ob.tensorrt_provider_options(quantized, "decoder", tmp_path)["trt_fp16_enable"] == "False"
    assert "2x" not in ob.tensorrt_provider_options(quantized, "decoder", tmp_path)["trt_profile_max_shapes"][:20]
    providers = ob.session_providers(ob.BACKENDS["onnxruntime-tensorrt"], manifest, "decoder", tmp_path)
    assert providers[0][0] == "TensorrtExecutionProvider" and providers[1:] == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert ob.session_providers(["CPUExecutionProvider"], manifest, "decoder", tmp_path) == ["CPUExecutionProvider"]


def test_ort_tensorrt_sessions_are_created_with_those_options(tmp_path, monkeypatch):
    """What OrtBackend hands ``InferenceSession`` on onnxruntime-tensorrt (a recording stand-in for onnxruntime: no
    GPU here): both graphs get TensorRT's options — caches in the bundle's engines/, the manifest's profile — then
    CUDA and CPU; the portable decoder with a device-resident cache."""
    created = []
    graphs = manifest_dict()["graphs"]["decoder"]

    class Session:
        def __init__(self, path, options, providers):
            created.append((Path(path).name, providers))

        def get_inputs(self):
            return [SimpleNamespace(name=t["name"]) for t in graphs["inputs"]]

        def get_outputs(self):
            return [SimpleNamespace(name=t["name"]) for t in graphs["outputs"]]

    fake = SimpleNamespace(__version__="1.31.1", InferenceSession=Session,
                           SessionOptions=lambda: SimpleNamespace(add_session_config_entry=lambda key, value: None),
                           GraphOptimizationLevel=SimpleNamespace(ORT_ENABLE_ALL=99))  # fmt: skip
    monkeypatch.setattr(ob, "import_onnxruntime", lambda: fake)
    monkeypatch.setattr(ob, "resolve_backend", lambda name: (name, ob.BACKENDS[name]))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    manifest = Manifest.from_dict(manifest_dict(target={"profile": "x", "max_batch": 2}))
    backend = ob.OrtBackend(bundle, manifest, backend="onnxruntime-tensorrt")
    assert [name for name, _ in created] == ["vision.onnx", "decoder.onnx"]
    for _, providers in created:
        (name, options), *rest = providers
        assert name == "TensorrtExecutionProvider" and rest == ["CUDAExecutionProvider", "CPUExecutionProvider"]
        assert Path(options["trt_engine_cache_path"]).parent == bundle / "engines"
        assert options["trt_timing_cache_path"] == options["trt_engine_cache_path"]
        assert options["trt_fp16_enable"] == "True" and options["trt_engine_cache_enable"] == "True"
    assert f"inputs_embeds:2x{LENGTH}x{HIDDEN}" in created[1][1][0][1]["trt_profile_max_shapes"]
    assert backend.device == "cuda" and not backend.fused and backend._cache_type.__name__ == "DeviceCache"


def test_ort_tensorrt_cache_dir_in_the_bundle(tmp_path):
    path = ob.ort_tensorrt_cache_dir(tmp_path, "1.32.0", gpu_name="nvidia-l4-sm89")
    assert path == tmp_path / "engines" / "nvidia-l4-sm89-ort1.32.0-trt" and path.is_dir()


def test_auto_says_why_it_fell_back_to_cpu():
    both = ob.cpu_fallback_reason(["onnxruntime", "onnxruntime-gpu"], None)
    assert "#26996" in both and "pip uninstall -y onnxruntime onnxruntime-gpu" in both
    assert "no CUDAExecutionProvider" in ob.cpu_fallback_reason(["onnxruntime-gpu"], None)
    assert "CPU build" in ob.cpu_fallback_reason(["onnxruntime"], "nvidia-smi is on PATH")
    assert ob.cpu_fallback_reason(["onnxruntime"], None) is None  # no GPU expected: CPU is right


def test_auto_logs_the_reason(monkeypatch, caplog):
    monkeypatch.setattr(ob, "installed_onnxruntime_builds", lambda: ["onnxruntime", "onnxruntime-gpu"])
    monkeypatch.setattr(ob, "gpu_expected", lambda: None)
    with caplog.at_level(logging.WARNING):
        assert ob.resolve_backend("auto")[0] == "onnxruntime-cpu"
    assert "#26996" in caplog.text
    with pytest.raises(BackendError) as err:
        ob.resolve_backend("onnxruntime-cuda")
    assert "pip uninstall" in err.value.fix


def test_missing_onnxruntime_names_the_jetson_build(monkeypatch):
    """The base install leaves onnxruntime out on Linux aarch64: loading a bundle there says what to install."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendError, match="onnxruntime is not installed") as err:
        ob.resolve_backend("auto")
    assert "JetPack build of onnxruntime-gpu" in err.value.fix and "backend='tensorrt'" in err.value.fix


def test_fused_decoder_on_cuda_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ob, "resolve_backend", lambda name: ("onnxruntime-cuda", ob.BACKENDS["onnxruntime-cuda"]))
    manifest = Manifest.from_dict(manifest_dict())
    with pytest.raises(BackendError, match=r"fused decoder .* CPU only") as err:
        ob.OrtBackend(tmp_path, manifest, backend="onnxruntime-cuda", fused=True)
    assert "portable" in err.value.fix


def test_fused_decoder_with_tensorrt_is_refused(tiny_bundles):
    from edgelvm.errors import ConfigError
    from edgelvm.runtime import VLM

    with pytest.raises(ConfigError, match="portable decoder") as err:
        VLM.load(tiny_bundles["llama-clip"], backend="tensorrt", decoder="fused")
    assert "auto" in err.value.fix


# ---- installs: what each documented platform's requirements are (offline half of scripts/dry_run_installs.py) -----
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def dry_run(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import dry_run_installs

    return dry_run_installs


def test_each_platform_asks_for_one_onnxruntime_build_and_a_matching_tensorrt(dry_run):
    """pyproject's markers evaluated per platform: one onnxruntime build at most (onnxruntime #26996), none from
    PyPI on Jetson (NVIDIA's JetPack build), TensorRT / cuda-python on the platform's documented CUDA major."""
    for name, target in dry_run.TARGETS.items():
        names = [Requirement(line).name for line in dry_run.requirements(target)]
        builds = [n for n in names if n in dry_run.ORT_BUILDS]
        assert builds == ([target.onnxruntime] if target.onnxruntime else []), name
        trt = [line for line in dry_run.requirements(target) if line.startswith("tensorrt")]
        if target.tensorrt_from_pypi:
            assert trt and all(f"-cu{target.cuda_major}-" in line and "<12" in line for line in trt), (name, trt)
        else:
            assert trt == [], name  # Jetson: TensorRT comes from JetPack
        cuda = [Requirement(line) for line in dry_run.requirements(target) if line.startswith("cuda-python")]
        assert cuda and all(f"{target.cuda_major}.9" in r.specifier and f"{target.cuda_major + 1}.0" not in r.specifier
                            for r in cuda), (name, cuda)  # fmt: skip
    gpu = dry_run.requirements(dry_run.Target("x86_64", "3.12", (2, 35), 12, extras=("gpu",)))
    assert [n for n in gpu if Requirement(n).name.startswith("onnxruntime")] == ["onnxruntime>=1.20.1"]


def test_dry_run_report_check_flags_two_onnxruntime_builds(dry_run):
    target = dry_run.TARGETS["x86_64-cuda12"]
    report = {"install": [{"metadata": {"name": n, "version": v}} for n, v in (("onnxruntime", "1.32.0"),
              ("onnxruntime_gpu", "1.31.1"), ("tensorrt-cu12-bindings", "11.4.0.106"), ("cuda-python", "13.4.4"),
              ("cuda-bindings", "13.4.4"))]}  # fmt: skip
    resolved, problems = dry_run.check_report(report, target)
    assert resolved["onnxruntime-gpu"] == "1.31.1"
    assert any("onnxruntime builds ['onnxruntime', 'onnxruntime-gpu']" in p for p in problems)
    assert any("cuda-python 13.4.4 is not built for CUDA 12" in p for p in problems)
    del report["install"][1]
    report["install"][2:] = [{"metadata": {"name": n, "version": "12.9.10"}} for n in ("cuda-python", "cuda-bindings")]
    assert dry_run.check_report(report, target)[1] == []


# ---- scripts/bootstrap.sh with a stand-in Python: which venv it makes, what it installs -----------------------------
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$0 $*" >> "$FAKE_LOG"
if [ "$1 $2" = "-m venv" ]; then
  dir="${@: -1}"; mkdir -p "$dir/bin"; cp "$0" "$dir/bin/python"; exit 0
fi
if [ "$1" = "-c" ] && [[ "$2" == *version_info* ]]; then exit "${FAKE_OLD:-0}"; fi
exit 0
"""


def _bootstrap(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "log"
    log.write_text("")
    run_env = {"PATH": os.environ["PATH"], "PYTHON": str(fake), "EDGELVM_VENV": str(tmp_path / "venv"),
               "FAKE_LOG": str(log), **env}  # fmt: skip
    result = subprocess.run(["bash", str(ROOT / "scripts" / "bootstrap.sh")], env=run_env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    return result, log.read_text()


def test_bootstrap_makes_the_jetson_venv_with_system_site_packages(tmp_path):
    result, log = _bootstrap(tmp_path, EDGELVM_SYSTEM_SITE_PACKAGES="1")
    assert result.returncode == 0, result.stderr
    assert f"-m venv --system-site-packages {tmp_path / 'venv'}" in log  # JetPack's TensorRT stays visible
    assert "-e .[toolchain,serve,dev]" in log and "-c constraints.txt" in log
    desktop = tmp_path / "desktop"
    desktop.mkdir()
    result, log = _bootstrap(desktop, EDGELVM_SYSTEM_SITE_PACKAGES="0")
    assert result.returncode == 0 and "--system-site-packages" not in log and "-m venv" in log


def test_bootstrap_on_python_3_10_installs_the_runtime_only(tmp_path):
    """JetPack 6's Python is 3.10 (its TensorRT bindings' Python); transformers >= 5.24 needs 3.11: the full
    install stops with the reason, EDGELVM_EXTRAS=runtime installs `-e .` without the 3.11 lock and without torch."""
    result, log = _bootstrap(tmp_path, FAKE_OLD="1")
    assert result.returncode == 1 and "EDGELVM_EXTRAS=runtime" in result.stderr and "pip" not in log
    result, log = _bootstrap(tmp_path, FAKE_OLD="1", EDGELVM_EXTRAS="runtime")
    assert result.returncode == 0, result.stderr
    pip = [line for line in log.splitlines() if " -m pip " in line]
    assert len(pip) == 1 and pip[0].endswith("install -e .") and "constraints" not in pip[0], pip


# ---- benchmarks/gpu_check.py: the steps that need no GPU, as the script runs them ----------------------------------
def test_gpu_check_export_and_parity_steps_run_without_a_gpu(tmp_path, monkeypatch, capsys):
    """The export step as gpu_check.sh runs it (it once asked the tiny LLaVA for 1024 positions of its 512), then the
    parity step: here every GPU backend is a SKIP (no GPU build of onnxruntime) or a FAIL (no TensorRT), and the
    step exits 1 with one JSON row per backend."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    assert gpu_check.main(["export", str(tmp_path), "--only", "tiny"]) == 0
    assert Manifest.load(tmp_path / "tiny" / "bundle").kv_cache.max_length == gpu_check.BUNDLES["tiny"]
    assert gpu_check.main(["parity", str(tmp_path), "--only", "tiny"]) == 1
    rows = json.loads((tmp_path / "parity.json").read_text())
    assert [(r["backend"], r["status"].split(":")[0]) for r in rows] == [
        ("onnxruntime-cuda", "SKIP"), ("onnxruntime-tensorrt", "SKIP"), ("tensorrt", "FAIL")]  # fmt: skip
    assert "TensorRT is not installed" in rows[2]["status"]
    assert len(capsys.readouterr().out.strip().splitlines()) >= 3
    cpu = gpu_check.parity(tmp_path, ["tiny"], backends=("onnxruntime-cpu",))  # the OK path and its fields
    assert cpu[0]["status"] == "OK" and cpu[0]["equal"] and cpu[0]["tokens"] == gpu_check.NEW_TOKENS


# ---- on hardware (skipped without a GPU build of onnxruntime; `benchmarks/gpu_check.sh` runs them on a device) -------
def _providers() -> list[str]:
    import onnxruntime

    return onnxruntime.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in _providers(), reason="needs onnxruntime with CUDAExecutionProvider")
@pytest.mark.parametrize("backend", ["onnxruntime-cuda", "onnxruntime-tensorrt"])
def test_ort_gpu_backends_match_cpu_on_hardware(tiny_bundles, tmp_path, backend):
    """ORT CUDA / ORT TensorRT (device-resident KV cache) against ORT CPU: the first 8 greedy tokens agree (fp16
    TensorRT engines may flip a near-tie later in a random-weight model). TensorRT: the engine cache lands in the
    bundle's engines/ folder and a second session reuses it."""
    import shutil

    import numpy as np

    from edgelvm.runtime import VLM

    if backend == "onnxruntime-tensorrt" and "TensorrtExecutionProvider" not in _providers():
        pytest.skip("this onnxruntime has no TensorrtExecutionProvider")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["llama-clip"], bundle)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ids = {}
    for name in ("onnxruntime-cpu", backend):
        vlm = VLM.load(bundle, backend=name)
        assert vlm.backend.name == name
        vlm.generate(image, "Describe the image.", max_new_tokens=16, min_new_tokens=16)
        ids[name] = vlm.last_output_ids[0]
    assert ids[backend][:8] == ids["onnxruntime-cpu"][:8]
    if backend == "onnxruntime-tensorrt":
        (cache,) = (bundle / "engines").iterdir()
        built = sorted(p.name for p in cache.iterdir())
        assert any(n.endswith(".engine") for n in built), built
        VLM.load(bundle, backend=backend).generate(image, "Again.", max_new_tokens=2)
        assert sorted(p.name for p in cache.iterdir()) == built  # reused, not rebuilt
