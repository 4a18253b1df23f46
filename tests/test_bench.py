"""`bench` on the tiny bundle (ONNX Runtime CPU) and the device CLI verbs on a throwaway typer app."""

from __future__ import annotations

import json

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from edgelvm.bench import BenchConfig, bench
from edgelvm.cli_devices import register
from edgelvm.errors import ConfigError


@pytest.fixture(scope="module")
def report(tiny_bundles):
    config = BenchConfig(prompt_len=12, gen_len=6, runs=2, backends=("onnxruntime-cpu",), threads=1, bandwidth_mb=16)
    return bench([tiny_bundles["llama-clip"]], config)


def test_bench_measures_every_phase(report, tiny_bundles):
    (r,) = report.results
    assert r.backend == "onnxruntime-cpu" and r.gen_len == 6 and r.runs == 2
    assert r.vision_ms > 0 and r.prefill_ms > 0 and r.first_token_ms >= r.prefill_ms
    assert 0 < r.decode_ms_per_token_median <= r.decode_ms_per_token_p90
    assert r.decode_tokens_per_s == pytest.approx(1e3 / r.decode_ms_per_token_median)
    decoder = tiny_bundles["llama-clip"] / "decoder.onnx"
    assert r.decoder_weight_bytes == decoder.stat().st_size
    assert r.roofline_tokens_per_s == pytest.approx(report.bandwidth_bytes_per_s / r.decoder_weight_bytes)
    assert report.bandwidth_source.startswith("measured here")
    assert r.peak_rss_bytes and r.peak_rss_bytes > 20 << 20
    # the prompt has the image's tokens plus about prompt_len text tokens (+ the chat template's few)
    assert r.prompt_tokens > 12


def test_report_files(report, tmp_path):
    paths = report.write(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["results"][0]["gen_len"] == 6 and data["config"]["backends"] == ["onnxruntime-cpu"]
    markdown = paths["markdown"].read_text()
    assert "| llama-clip | onnxruntime-cpu |" in markdown
    assert "not reported" in markdown  # no GPU here: power and device memory are not invented
    with Image.open(paths["chart"]) as chart:
        assert chart.size[0] == 900 and chart.getpixel((300, 60)) != (255, 255, 255)  # a bar was drawn


def test_bench_config_errors(tiny_bundles):
    with pytest.raises(ConfigError, match="gen_len must be ≥ 2"):
        BenchConfig(gen_len=1)
    with pytest.raises(ConfigError, match="exceed the bundle's context"):
        bench([tiny_bundles["llama-clip"]], BenchConfig(prompt_len=12, gen_len=250, runs=1, device="l4"))


@pytest.fixture
def app():
    application = typer.Typer()
    register(application)
    return application


def test_cli_devices_lists_and_shows(app):
    runner = CliRunner()
    result = runner.invoke(app, ["devices", "--json"])
    assert result.exit_code == 0, result.output
    names = [p["name"] for p in json.loads(result.output)]
    assert "jetson-orin-nano-8gb" in names and "h200" in names
    one = runner.invoke(app, ["devices", "jetson-agx-orin-64gb"])
    assert one.exit_code == 0 and json.loads(one.output)["memory_bandwidth_gbps"] == 204.8
    table = runner.invoke(app, ["devices"], env={"COLUMNS": "220"})
    assert table.exit_code == 0 and "Orin Nano" in table.output
    bad = runner.invoke(app, ["devices", "orin-nanoo-8gb"])
    assert bad.exit_code != 0 and "did you mean 'jetson-orin-nano-8gb'" in str(bad.exception)


def test_cli_build_and_bench(app, tiny_bundles, tmp_path, monkeypatch):
    import sys

    runner = CliRunner()
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    result = runner.invoke(app, ["build", str(tiny_bundles["llama-clip"])])
    assert result.exit_code != 0 and "TensorRT's Python package is not installed" in str(result.exception)
    result = runner.invoke(
        app,
        [
            "bench",
            str(tiny_bundles["llama-clip"]),
            "--gen-len",
            "3",
            "--runs",
            "1",
            "--prompt-len",
            "4",
            "--warmup",
            "0",
            "--backend",
            "onnxruntime-cpu",
            "--device",
            "jetson-orin-nano-8gb",
            "-o",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "profile jetson-orin-nano-8gb datasheet" in result.output
    assert (tmp_path / "latency.png").is_file() and (tmp_path / "report.md").is_file()
