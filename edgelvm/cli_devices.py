"""CLI verbs for devices: ``edgelvm devices``, ``edgelvm build``, ``edgelvm bench``.

Plain typer command functions (heavy imports inside each), mounted on the main app with :func:`register`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def _console():
    from rich.console import Console

    return Console()


def devices(
    name: Annotated[str | None, typer.Argument(help="Show one profile in full (with its sources).")] = None,
    profiles_dir: Annotated[
        Path | None, typer.Option(help="Extra directory of NAME.json profiles (also: EDGELVM_DEVICE_PROFILES).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    this_gpu: Annotated[bool, typer.Option("--this-gpu", help="Also print this machine's GPU fingerprint.")] = False,
) -> None:
    """List the device profiles the fit check and the roofline use (memory, bandwidth, precisions, sources).

    Example:  edgelvm devices jetson-orin-nano-8gb
    """
    from edgelvm.devices.profiles import list_profiles, load_profile

    if name is not None:
        profile = load_profile(name, profiles_dir)
        print(json.dumps(profile.to_dict(), indent=2))
        return
    profiles = list_profiles(profiles_dir)
    if as_json:
        print(json.dumps([p.to_dict() for p in profiles], indent=2))
    else:
        from rich.table import Table

        table = Table(title="device profiles (edgelvm devices NAME for sources)")
        for column in ("name", "device", "memory GiB", "usable GiB", "GB/s", "SM", "INT8 TOPS", "DLA", "precisions"):
            table.add_column(column)
        for p in profiles:
            tops = "?" if p.int8_dense_tops is None else f"{p.int8_dense_tops:g}"
            table.add_row(
                p.name,
                p.display_name,
                f"{p.memory_gib:g}",
                f"{p.usable_memory_gib:g}",
                f"{p.memory_bandwidth_gbps:g}",
                p.compute_capability,
                tops,
                str(p.dla_count),
                ",".join(p.precisions),
            )
        _console().print(table)
    if this_gpu:
        from edgelvm.devices.fingerprint import detect_gpu, fingerprint

        try:
            import tensorrt

            version = tensorrt.__version__
        except ImportError:
            version = "none"
        print(f"this GPU: {fingerprint(detect_gpu(), version)}")


def build(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory written by `edgelvm export`.")],
    max_batch: Annotated[int, typer.Option(help="Largest batch the engines accept.")] = 1,
    max_length: Annotated[int | None, typer.Option(help="Longest context (default: the bundle's).")] = None,
    precision: Annotated[str, typer.Option(help="auto (fp16, + int8 for QDQ graphs) | fp16 | fp32.")] = "auto",
    workspace_gb: Annotated[float | None, typer.Option(help="TensorRT workspace limit in GiB.")] = None,
    timing_cache: Annotated[Path | None, typer.Option(help="Timing cache file shared across builds.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild engines that already exist for this GPU.")] = False,
) -> None:
    """Build TensorRT engines for this GPU into BUNDLE/engines/<gpu>-sm<cc>-trt<version>/ (run it on the device).

    Example:  edgelvm build bundles/llava --max-batch 1
    """
    from edgelvm.build import BuildConfig, build_engines

    config = BuildConfig(
        max_batch=max_batch,
        max_length=max_length,
        precision=precision,
        workspace_bytes=int(workspace_gb * (1 << 30)) if workspace_gb else None,
        timing_cache=timing_cache,
        force=force,
    )
    report = build_engines(bundle, config)
    for name, info in report.engines.items():
        print(f"{name}: {info.file} ({info.size_bytes / 1e6:.1f} MB, {info.precision}, {info.build_seconds:.0f} s)")
    print(f"engines: {report.engine_dir} (TensorRT {report.tensorrt_version}, {report.seconds:.0f} s)")


def bench(
    bundles: Annotated[list[Path], typer.Argument(help="One or more bundle directories.")],
    image: Annotated[Path | None, typer.Option(help="Image to use (default: a seeded random image).")] = None,
    prompt_len: Annotated[int, typer.Option(help="Text tokens in the prompt besides the image tokens.")] = 32,
    gen_len: Annotated[int, typer.Option(help="Tokens generated per run (fixed: EOS is suppressed).")] = 64,
    runs: Annotated[int, typer.Option(help="Measured runs (after warm-up).")] = 5,
    warmup: Annotated[int, typer.Option(help="Warm-up runs.")] = 1,
    backend: Annotated[list[str] | None, typer.Option(help="Backend (repeatable), e.g. onnxruntime-cpu.")] = None,
    decoder: Annotated[
        list[str] | None,
        typer.Option(help="Decoder graph (repeatable): auto, fused (decoder_ort.onnx) or portable (decoder.onnx)."),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="Device profile for the roofline bandwidth (default: measure this machine).")
    ] = None,
    profiles_dir: Annotated[Path | None, typer.Option(help="Extra directory of device profiles.")] = None,
    threads: Annotated[int | None, typer.Option(help="Intra-op threads (onnxruntime).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write report.json, report.md, latency.png.")] = None,
) -> None:
    """Vision ms, prefill ms, TTFT, decode ms/token (median, p90), tokens/s vs roofline, memory and power.

    Example:  edgelvm bench bundles/a bundles/b --decoder fused --decoder portable --runs 10 -o reports/bench
    """
    from edgelvm.bench import BenchConfig
    from edgelvm.bench import bench as run_bench

    config = BenchConfig(
        image=image,
        prompt_len=prompt_len,
        gen_len=gen_len,
        runs=runs,
        warmup=warmup,
        backends=tuple(backend or ["auto"]),
        decoders=tuple(decoder or ["auto"]),
        threads=threads,
        device=device,
        profiles_dir=profiles_dir,
    )
    report = run_bench(list(bundles), config)
    print(report.markdown())
    if out is not None:
        paths = report.write(out)
        print("written: " + ", ".join(str(p) for p in paths.values()))


def register(app: typer.Typer) -> None:
    """Mount ``devices``, ``build`` and ``bench`` on ``app``."""
    app.command()(devices)
    app.command()(build)
    app.command()(bench)
