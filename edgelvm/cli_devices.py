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
    prefill_chunk: Annotated[
        int | None,
        typer.Option(help="Prefill at most this many tokens per step (the runtime chunks longer prompts): attention "
                          "scratch for chunk x context instead of context² (default: whole prompts)."),
    ] = None,
    precision: Annotated[str, typer.Option(help="auto (fp16, + int8 for QDQ graphs) | fp16 | fp32.")] = "auto",
    workspace_gb: Annotated[
        float | None, typer.Option(help="TensorRT workspace limit in GiB (default: from the device; 0: TensorRT's).")
    ] = None,
    tactic_dram_gb: Annotated[
        float | None, typer.Option(help="TensorRT tactic DRAM limit in GiB (default: sized from the device).")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="Device profile sizing the memory limits (default: the detected GPU's memory).")
    ] = None,
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
        prefill_chunk=prefill_chunk,
        precision=precision,
        workspace_bytes=None if workspace_gb is None else int(workspace_gb * (1 << 30)),
        tactic_dram_bytes=None if tactic_dram_gb is None else int(tactic_dram_gb * (1 << 30)),
        device=device,
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
    draft: Annotated[
        Path | None, typer.Option(help="A draft bundle (same tokenizer) for speculative decoding in every run.")
    ] = None,
    draft_tokens: Annotated[int, typer.Option(help="Tokens the draft proposes per target step.")] = 4,
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
        draft=draft,
        draft_tokens=draft_tokens,
    )
    report = run_bench(list(bundles), config)
    print(report.markdown())
    if out is not None:
        paths = report.write(out)
        print("written: " + ", ".join(str(p) for p in paths.values()))


def plan(
    model: Annotated[str, typer.Argument(help="Checkpoint directory (config.json is enough) or a hub id (online).")],
    target: Annotated[
        list[str] | None,
        typer.Option("--target", help="Device profile(s) to check in detail (default: a table of all)."),
    ] = None,
    precision: Annotated[
        str, typer.Option(help="LLM weights: fp16 | int8 | int4 (4.5 bits/param) | fp32 | bf16.")
    ] = "fp16",
    vision_precision: Annotated[
        str | None, typer.Option(help="Vision encoder weights (default fp16; fp32 with --precision fp32).")
    ] = None,
    lm_head_precision: Annotated[
        str | None,
        typer.Option(help="LM head (default: --precision if float, else fp16 — `quantize --lm-head` makes it int8/4)."),
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Context the KV cache is sized for (default: as export, ≤ 4096).")
    ] = None,
    batch: Annotated[int, typer.Option(help="Rows decoded together (KV cache per row).")] = 1,
    profiles_dir: Annotated[
        Path | None, typer.Option(help="Extra directory of NAME.json profiles (also: EDGELVM_DEVICE_PROFILES).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")] = False,
) -> None:
    """Will it fit? Memory, headroom, roofline tokens/s and TensorRT build peak per device — from the config alone.

    No weights are read and no model is built: the byte counts come from config.json through the family's adapter
    (the same numbers `edgelvm export --target` computes from the loaded model). With --target, the budget and the
    suggestions for each named device, and exit code 1 when one does not fit.

    Example:  edgelvm plan ./llava-1.5-7b-hf --precision int4 --max-length 2048
    """
    from edgelvm.devices.profiles import list_profiles, load_profile
    from edgelvm.plan import footprint_from_config, plan_model

    profiles = list_profiles(profiles_dir)
    chosen = [load_profile(name, profiles_dir) for name in target] if target else profiles
    footprint = footprint_from_config(model)
    result = plan_model(footprint, chosen, precision=precision, vision_precision=vision_precision,
                        max_length=max_length, max_batch=batch, candidates=profiles,
                        head_precision=lm_head_precision)  # fmt: skip
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_plan(result, detailed=bool(target))
    if target and any(row.plan is None or not row.plan.fits for row in result.rows):
        raise typer.Exit(1)


def _print_plan(result, detailed: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    fp = result.footprint
    gib = 1 << 30
    kv_token = fp.kv_bytes_per_token(result.kv_dtype)

    def params(n: int) -> str:
        return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"

    console.print(
        f"{escape(fp.source)} ({fp.family}): vision {params(fp.vision_params)} params ({result.vision_precision}), "
        f"decoder {params(fp.decoder_params)} ({result.precision}, embedding table excluded: memory-mapped), "
        f"KV {kv_token / 1024:.0f} KiB/token ({fp.kv_layers - fp.window_layers} layers × {fp.kv_heads} KV heads × "
        f"{fp.head_dim}, "
        f"{result.kv_dtype}, 2 buffers); max_length {result.max_length}, batch {result.max_batch}"
        + (f"; hybrid decoder states {fp.state_bytes / 2**20:.1f} MiB/sequence at any length" * bool(fp.state_bytes))
        + (
            f"; plus {fp.window_layers} sliding-window layers holding at most {fp.window} positions "
            f"({fp.window_kv_bytes_per_token(result.kv_dtype) / 1024:.0f} KiB/position) at any length"
        )
        * bool(fp.window_layers)
    )
    for note in fp.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    table = Table(title="will it fit? (GiB; decode tok/s ≤ bandwidth / bytes read per token; build = TensorRT peak)")
    for column in ("device", "fits", "needs", "usable", "headroom", "tok/s", "tok/s@max", "build", "max ctx"):
        table.add_column(column, justify="left" if column in ("device", "fits") else "right")
    for row in result.rows:
        if row.plan is None:
            table.add_row(row.profile.name, "[red]no[/] (precision)", *["—"] * 7)
            continue
        p = row.plan
        fits = "[green]yes[/]" if p.fits else "[red]no[/]"
        if p.fits and not p.build_fits:
            fits += " (build: swap)"
        table.add_row(
            row.profile.name,
            fits,
            f"{p.total_bytes / gib:.2f}",
            f"{p.usable_bytes / gib:.2f}",
            f"{p.headroom_bytes / gib:+.2f}",
            f"{row.tokens_per_s_short:.1f}",
            f"{row.tokens_per_s_at_max:.1f}",
            f"{p.build_peak_bytes / gib:.2f}",
            str(row.longest_context),
        )
    console.print(table)
    if not detailed:
        return
    for row in result.rows:
        if row.plan is None:
            console.print(f"[red]{row.profile.name}:[/] {escape(row.error or '')}")
            continue
        console.print(escape(row.plan.summary()))
        for suggestion in row.plan.suggestions:
            console.print(f"  - {escape(suggestion)}")


def register(app: typer.Typer) -> None:
    """Mount ``devices``, ``plan``, ``build`` and ``bench`` on ``app``."""
    app.command()(devices)
    app.command()(plan)
    app.command()(build)
    app.command()(bench)
