"""`bench` on the tiny bundle (ONNX Runtime CPU) and the device CLI verbs on a throwaway typer app."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from edgelvm.bench import BenchConfig, bench
from edgelvm.bench.chart import bundle_label
from edgelvm.bench.runner import BenchReport
from edgelvm.cli_devices import register
from edgelvm.errors import ConfigError


def _external_bytes(graph: Path) -> int:
    """What the graph's external-data tensors point at (each region once), read with onnx itself."""
    import onnx

    from edgelvm.export.external_data import external_info

    proto = onnx.load(str(graph), load_external_data=False)
    return sum(region.length for region in {external_info(t) for t in proto.graph.initializer} - {None})


@pytest.fixture(scope="module")
def report(tiny_bundles):
    config = BenchConfig(prompt_len=12, gen_len=6, runs=2, backends=("onnxruntime-cpu",), threads=1, bandwidth_mb=16)
    return bench([tiny_bundles["llama-clip"]], config)


def test_bench_measures_every_phase(report, tiny_bundles):
    (r,) = report.results
    assert r.backend == "onnxruntime-cpu" and r.gen_len == 6 and r.runs == 2
    assert r.decoder == "fused"  # auto on CPU: the bundle's ORT-fused decoder
    assert r.vision_ms > 0 and r.prefill_ms > 0 and r.first_token_ms >= r.prefill_ms
    assert 0 < r.decode_ms_per_token_median <= r.decode_ms_per_token_p90
    assert r.decode_tokens_per_s == pytest.approx(1e3 / r.decode_ms_per_token_median)
    decoder = tiny_bundles["llama-clip"] / "decoder_ort.onnx"  # the graph that ran: its protobuf and weight regions
    assert r.decoder_weight_bytes == decoder.stat().st_size + _external_bytes(decoder) > decoder.stat().st_size
    assert r.roofline_tokens_per_s == pytest.approx(report.bandwidth_bytes_per_s / r.decoder_weight_bytes)
    assert report.bandwidth_source.startswith("measured here")
    assert "numpy copy (" in report.bandwidth_source and "threaded read-only sum (" in report.bandwidth_source
    assert r.peak_rss_bytes and r.peak_rss_bytes > 20 << 20
    # the prompt has the image's tokens plus about prompt_len text tokens (+ the chat template's few)
    assert r.prompt_tokens > 12
    env = report.environment
    assert env["cpu_count"] >= 1 and env["onnxruntime"] and env["date_utc"].endswith("Z")


def test_report_files(report, tmp_path):
    paths = report.write(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["results"][0]["gen_len"] == 6 and data["config"]["backends"] == ["onnxruntime-cpu"]
    assert data["environment"]["onnxruntime"] and data["skipped"] == []
    markdown = paths["markdown"].read_text()
    (r,) = report.results
    assert f"| {bundle_label(r.bundle)} | onnxruntime-cpu | fused |" in markdown and "onnxruntime " in markdown
    assert "not reported" in markdown  # no GPU here: power and device memory are not invented
    assert f"| {r.first_token_ms:.1f} / " in markdown and "TTFT ms (token / text)" in markdown
    silent = BenchReport([replace(r, ttft_ms=None)], report.config, 1e9, "test")  # no run streamed any text
    assert f"| {r.first_token_ms:.1f} / no text |" in silent.markdown()
    with Image.open(paths["chart"]) as chart:
        assert chart.size[0] == 900 and chart.getpixel((320, 60)) != (255, 255, 255)  # a bar was drawn


def test_decoder_graphs_compared_in_one_run_each_against_its_own_bytes(tiny_bundles, copy_bundle):
    """Fused and portable decoders of one bundle, plus a portable-only bundle whose fused row is skipped (named)."""
    portable_only = copy_bundle(tiny_bundles["llama-clip"])
    manifest = json.loads((portable_only / "edgelvm.json").read_text())
    del manifest["graphs"]["decoder_ort"], manifest["files"]["decoder_ort.onnx"]
    (portable_only / "edgelvm.json").write_text(json.dumps(manifest))
    (portable_only / "decoder_ort.onnx").unlink()
    config = BenchConfig(
        prompt_len=4, gen_len=3, runs=1, warmup=0, decoders=("fused", "portable"), threads=1, device="l4"
    )
    report = bench([tiny_bundles["llama-clip"], portable_only], config)
    rows = [(Path(r.bundle).name, r.decoder) for r in report.results]
    assert rows == [("llava-llama-clip", "fused"), ("llava-llama-clip", "portable"), ("bundle", "portable")]
    fused, portable, _ = report.results
    source = tiny_bundles["llama-clip"]
    fused_graph, portable_graph = source / "decoder_ort.onnx", source / "decoder.onnx"
    assert fused.decoder_weight_bytes == fused_graph.stat().st_size + _external_bytes(fused_graph)
    assert portable.decoder_weight_bytes == portable_graph.stat().st_size + _external_bytes(portable_graph)
    assert fused.decoder_weight_bytes != portable.decoder_weight_bytes
    assert portable.roofline_tokens_per_s == pytest.approx(300e9 / portable.decoder_weight_bytes)  # L4: 300 GB/s
    assert report.skipped == [f"{portable_only.parent.name}/bundle / auto / fused: the bundle has no decoder_ort.onnx"]
    markdown = report.markdown()
    assert "| llava-llama-clip | onnxruntime-cpu | portable |" in markdown and "skipped: " in markdown
    with pytest.raises(ConfigError, match="unknown decoder 'gqa'"):
        BenchConfig(decoders=("gqa",))


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
            "--decoder",
            "portable",
            "--device",
            "jetson-orin-nano-8gb",
            "-o",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "profile jetson-orin-nano-8gb datasheet" in result.output
    assert "| llava-llama-clip | onnxruntime-cpu | portable |" in result.output
    assert (tmp_path / "latency.png").is_file() and (tmp_path / "report.md").is_file()


def test_chart_keeps_a_tiny_model_readable_next_to_a_large_one(report):
    """Totals 100x apart: each bar is drawn as shares of its own request (full width), not as a sliver."""
    from edgelvm.bench.chart import LABEL_WIDTH, latency_chart

    (r,) = report.results
    small = replace(r, bundle="small", vision_ms=1.0, prefill_ms=1.0, decode_ms_per_token_median=0.1, gen_len=81)
    large = replace(small, bundle="large", vision_ms=100.0, prefill_ms=100.0, decode_ms_per_token_median=10.0)
    right = 900 - 80 - 2  # just inside the end of a full-width bar
    shares = latency_chart([small, large])
    assert shares.getpixel((right, 50 + 13)) != (255, 255, 255)  # the small request's bar spans the width too
    assert shares.getpixel((LABEL_WIDTH + 2, 50 + 13)) == (76, 114, 176)  # starting with its vision share
    shared = latency_chart([small, replace(large, vision_ms=2.0, prefill_ms=2.0, decode_ms_per_token_median=0.2)])
    assert shared.getpixel((right, 50 + 13)) == (255, 255, 255)  # 2x apart: one ms scale, the small bar is half


def test_tensorrt_roofline_counts_the_engine_bytes(tiny_bundles, tmp_path):
    """A TensorRT row reads the decoder engine's weights (fp16 from an fp32 graph), not the ONNX file's."""
    from types import SimpleNamespace

    from edgelvm.bench.runner import _bytes_per_token, decoder_ran
    from edgelvm.manifest import Manifest

    bundle = tiny_bundles["llama-clip"]
    (tmp_path / "decoder.engine").write_bytes(b"\0" * 12345)
    backend = SimpleNamespace(
        name="tensorrt", engine_dir=tmp_path, info={"engines": {"decoder": {"file": "decoder.engine"}}}
    )
    manifest = Manifest.load(bundle)
    assert decoder_ran(backend) == "engine"
    assert _bytes_per_token(bundle, manifest, backend, "engine") == 12345
    assert _bytes_per_token(bundle, manifest, backend, "portable") == (bundle / "decoder.onnx").stat().st_size


def test_interleaved_timing_runs_every_bundle_once_per_round_rotating_the_first():
    """The order the demo's speed column (and any interleaved comparison) times its bundles in: each round runs
    every bundle once, rounds in sequence, and the bundle that starts a round rotates."""
    from edgelvm.bench.runner import interleaved_order
    from edgelvm.errors import ConfigError

    order = interleaved_order(3, 4)
    assert order == [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]
    rounds = [order[i : i + 3] for i in range(0, len(order), 3)]
    assert all(sorted(r) == [0, 1, 2] for r in rounds)
    assert [r[0] for r in rounds] == [0, 1, 2, 0]
    assert interleaved_order(1, 3) == [0, 0, 0]
    with pytest.raises(ConfigError):
        interleaved_order(0, 3)


def test_bundle_label_names_the_bundle_or_its_parent():
    assert bundle_label("/runs/llava-clip") == "llava-clip"
    assert bundle_label("/runs/teacher/bundle") == "teacher/bundle"
