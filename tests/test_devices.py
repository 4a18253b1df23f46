"""Device profiles (data + validation), the GPU fingerprint (with fakes) and the probes' parsers."""

from __future__ import annotations

import json
import time

import pytest

from edgelvm.devices import fingerprint as fp
from edgelvm.devices import probes
from edgelvm.devices.profiles import BUILTIN_DIR, ENV_VAR, ProfileError, list_profiles, load_profile

EXPECTED = {
    "jetson-orin-nano-4gb",
    "jetson-orin-nano-8gb",
    "jetson-orin-nx-8gb",
    "jetson-orin-nx-16gb",
    "jetson-agx-orin-32gb",
    "jetson-agx-orin-64gb",
    "rtx-3090",
    "rtx-4090",
    "l4",
    "a100-40gb",
    "a100-80gb",
    "h100",
    "h200",
}


def test_builtin_profiles_are_complete_and_sourced():
    profiles = {p.name: p for p in list_profiles()}
    assert set(profiles) == EXPECTED
    for p in profiles.values():
        assert p.usable_memory_gib < p.memory_gib
        for key in (
            "memory_gib",
            "usable_memory_gib",
            "memory_bandwidth_gbps",
            "compute_capability",
            "int8_dense_tops",
            "dla_count",
            "precisions",
        ):
            assert p.sources.get(key), f"{p.name}: no source for {key}"
        if p.kind == "jetson":
            assert p.compute_capability == "8.7"
            assert not p.supports("fp8") and not p.supports("fp4")
    assert profiles["h200"].supports("fp8") and not profiles["a100-80gb"].supports("fp8")
    assert profiles["jetson-orin-nano-8gb"].bandwidth_bytes_per_s == 68e9
    assert profiles["jetson-orin-nano-8gb"].dla_count == 0 and profiles["jetson-agx-orin-64gb"].dla_count == 2


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ProfileError) as err:
        load_profile("orin-nano8gb")
    assert "did you mean 'jetson-orin-nano-8gb'" in str(err.value)
    assert "h200" in str(err.value)  # the known names are listed


def _write(directory, name, **changes):
    data = json.loads((BUILTIN_DIR / "jetson-orin-nano-8gb.json").read_text())
    data.update(name=name, **changes)
    for key in [k for k, v in changes.items() if v is None and k in ("sources",)]:
        data.pop(key)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def test_user_profiles_extend_and_override(tmp_path, monkeypatch):
    _write(tmp_path, "my-board", usable_memory_gib=5.0, display_name="My board")
    _write(tmp_path, "jetson-orin-nano-8gb", usable_memory_gib=6.0)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert load_profile("my-board").display_name == "My board"
    assert load_profile("jetson-orin-nano-8gb").usable_memory_gib == 6.0
    monkeypatch.delenv(ENV_VAR)
    assert load_profile("jetson-orin-nano-8gb").usable_memory_gib == 6.5
    assert load_profile("my-board", profiles_dir=tmp_path).usable_memory_gib == 5.0


@pytest.mark.parametrize(
    ("changes", "field", "fix"),
    [
        ({"memory_bandwidth_gbps": "fast"}, "memory_bandwidth_gbps", "write a int or float"),
        ({"precisions": ["fp16", "fp12"]}, "precisions", "list some of"),
        ({"usable_memory_gib": 9.0}, "usable_memory_gib", "minus what the OS"),
        ({"compute_capability": "87"}, "compute_capability", "cuda-gpus"),
        ({"kind": "fpga"}, "kind", "use 'jetson'"),
        ({"bandwith": 1}, "bandwith", "fix its spelling"),
    ],
)
def test_malformed_profile_names_file_field_and_fix(tmp_path, changes, field, fix):
    path = _write(tmp_path, "bad-board", **changes)
    with pytest.raises(ProfileError) as err:
        list_profiles(tmp_path)
    text = str(err.value)
    assert str(path) in text and f"field {field!r}" in text and fix in text


def test_missing_field_and_bad_json(tmp_path):
    path = _write(tmp_path, "no-sources")
    data = json.loads(path.read_text())
    del data["sources"]
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="field 'sources': is missing"):
        list_profiles(tmp_path)
    path.write_text('{"name": "no-sources",}')
    with pytest.raises(ProfileError, match=r"not valid JSON \(line 1"):
        list_profiles(tmp_path)
    with pytest.raises(ProfileError, match="does not exist"):
        list_profiles(tmp_path / "nope")


# ---- fingerprint -----------------------------------------------------------------------------------------------------
def test_fingerprint_from_nvidia_smi_output():
    info = fp.parse_nvidia_smi("NVIDIA H200, 9.0, 143771\nNVIDIA H200, 9.0, 143771\n")
    assert info == fp.GpuInfo("NVIDIA H200", "9.0", 143771 << 20, "nvidia-smi")
    assert fp.fingerprint(info, "10.3.0.26") == "nvidia-h200-sm90-trt10.3.0.26"
    assert fp.parse_nvidia_smi("Orin (nvgpu), [N/A], [N/A]") is None  # Jetson's nvidia-smi may not know cc
    assert fp.sanitize("NVIDIA GeForce RTX 4090 (24GB)") == "nvidia-geforce-rtx-4090-24gb"


def test_detect_gpu_prefers_the_jetson_board_name_and_falls_through_sources(tmp_path):
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    calls = []

    def none(index):
        calls.append("none")
        return None

    def orin(index):
        return fp.GpuInfo("Orin", "8.7", None, "fake")

    info = fp.detect_gpu(sources=[none, orin], board=lambda: fp.jetson_model(model))
    assert calls == ["none"] and info.name == "NVIDIA Jetson Orin Nano Developer Kit"
    assert fp.fingerprint(info, "10.3.0") == "nvidia-jetson-orin-nano-developer-kit-sm87-trt10.3.0"
    with pytest.raises(fp.NoGpuError, match="no NVIDIA GPU found"):
        fp.detect_gpu(sources=[none], board=lambda: None)


# ---- probes ----------------------------------------------------------------------------------------------------------
ORIN_NANO_JP6 = (
    "11-29-2026 19:27:51 RAM 2448/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) CPU [2%@729,1%@729,0%@729,0%@729,"
    "off,off] EMC_FREQ 0%@2133 GR3D_FREQ 45%@[305] NVDEC off NVJPG off VIC off OFA off APE 200 cpu@47.5C "
    "soc2@46.8C soc0@46.1C gpu@47.2C tj@47.5C soc1@46.9C VDD_IN 4406mW/4406mW VDD_CPU_GPU_CV 522mW/522mW "
    "VDD_SOC 1393mW/1393mW"
)
AGX_ORIN = (
    "RAM 5123/30536MB (lfb 6178x4MB) SWAP 0/15268MB (cached 0MB) CPU [1%@2201,0%@2201] GR3D_FREQ 0%@[0,0] "
    "VDD_GPU_SOC 3060mW/3060mW VDD_CPU_CV 765mW/765mW VIN_SYS_5V0 3347mW/3347mW VDDQ_VDD2_1V8AO 503mW/503mW"
)
NANO_JP4 = (
    "RAM 1434/3964MB (lfb 236x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) CPU [4%@1479,2%@1479] "
    "EMC_FREQ 3%@1600 GR3D_FREQ 0%@921 APE 25 PLL@23C CPU@25.5C thermal@24.75C POM_5V_IN 2086/2086 "
    "POM_5V_GPU 0/0 POM_5V_CPU 334/334"
)


def test_tegrastats_lines_of_three_generations():
    s = probes.parse_tegrastats(ORIN_NANO_JP6)
    assert (s.ram_used_mb, s.ram_total_mb, s.swap_used_mb, s.gpu_util_percent) == (2448, 7620, 0, 45)
    assert s.total_power_mw == 4406 and s.power_source == "VDD_IN"
    assert s.rails_mw == {"VDD_IN": 4406, "VDD_CPU_GPU_CV": 522, "VDD_SOC": 1393}
    agx = probes.parse_tegrastats(AGX_ORIN)
    assert agx.ram_used_mb == 5123 and agx.total_power_mw == 3060 + 765 + 3347 + 503
    assert agx.power_source.startswith("sum of ")
    old = probes.parse_tegrastats(NANO_JP4)
    assert old.total_power_mw == 2086 and old.power_source == "POM_5V_IN" and old.ram_total_mb == 3964
    assert probes.parse_tegrastats("garbage").total_power_mw is None


def test_tegrastats_probe_integrates_energy_from_fed_lines():
    probe = probes.TegrastatsProbe.__new__(probes.TegrastatsProbe)  # no tegrastats binary here: feed lines
    probes._Sampler.__init__(probe, 0.1)
    probe._started = time.perf_counter()
    for line in (ORIN_NANO_JP6, ORIN_NANO_JP6):
        probe.feed(line)
        time.sleep(0.02)
    probe.times = [0.0, 2.0]  # pin the clock: 4.406 W for 2 s
    assert probes.integrate_energy_j(probe.times, probe.power) == pytest.approx(8.812)
    assert max(probe.memory) == 2448 << 20


def test_null_probe_reports_nothing_and_rss_is_read():
    summary = probes.NullProbe(0.01).start().stop()
    assert summary.mean_power_w is None and summary.energy_j is None and summary.peak_memory_bytes is None
    rss = probes.peak_rss_bytes()
    assert rss is not None and rss > 10 << 20
