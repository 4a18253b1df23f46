"""``bench``: latency, throughput, memory and power of bundles on this machine, against the bandwidth roofline.

Each (bundle, backend) is loaded once, warmed up, then run ``runs`` times with a fixed generation length
(``min_new_tokens = max_new_tokens = gen_len``, so EOS never shortens a run). Per-token times come from a thin
proxy around ``vlm.backend`` that timestamps every ``step`` call (vlm.py is not modified): the gap between two
consecutive step ends is one token's full loop time (sampling, detokenizing, embedding lookup and the decoder).
TTFT is reported twice, both from the call: to the first token (the end of the prefill step, whose logits give it)
and to the first streamed text piece (``no text`` when none came: a random-weight model's ids may all decode to
nothing, and a piece waits for a complete UTF-8 character). Several bundles × backends × decoder graphs
(``decoders``: ``auto``, ``fused``, ``portable``) are compared in one report; the roofline of each row counts the
bytes of the decoder graph that row actually ran (an INT4 fused decoder is much smaller than the portable one).
Torch-free.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelvm.bench.chart import bundle_label, latency_chart
from edgelvm.devices.probes import peak_rss_bytes, reset_peak_rss, start_probe
from edgelvm.errors import ConfigError

log = logging.getLogger(__name__)

NOT_REPORTED = "not reported"
DECODERS = ("auto", "fused", "portable")
_WORD = " the"


@dataclass
class BenchConfig:
    """``device``: a profile name whose bandwidth gives the roofline (default: measure this machine's host memory
    bandwidth, right for CPU backends). ``prompt_len``: text tokens besides the image tokens (approximate: the
    chat template adds a few)."""

    image: Path | None = None
    prompt_len: int = 32
    gen_len: int = 64
    runs: int = 5
    warmup: int = 1
    backends: tuple[str, ...] = ("auto",)
    decoders: tuple[str, ...] = ("auto",)
    threads: int | None = None
    device: str | None = None
    profiles_dir: Path | None = None
    bandwidth_mb: int = 512
    probe_interval_s: float = 0.05
    draft: Path | None = None  # speculative decoding: a draft bundle (same tokenizer) for every bundle benched
    draft_tokens: int = 4

    def __post_init__(self) -> None:
        for name in ("prompt_len", "gen_len", "runs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}", where=name, fix="pass ≥ 1")
        if self.gen_len < 2:
            raise ConfigError("gen_len must be ≥ 2 to time decode steps", where="gen_len", fix="pass ≥ 2")
        for decoder in self.decoders:
            if decoder not in DECODERS:
                raise ConfigError(f"unknown decoder {decoder!r}", where="decoders", fix=f"use {', '.join(DECODERS)}")


@dataclass
class BenchResult:
    bundle: str
    backend: str
    decoder: str  # the graph that ran: "fused" (decoder_ort.onnx), "portable" (decoder.onnx) or "engine" (TensorRT)
    prompt_tokens: int
    gen_len: int
    runs: int
    vision_ms: float
    prefill_ms: float
    ttft_ms: float | None  # to the first streamed text piece; None when no run streamed any text
    first_token_ms: float  # to the first token (end of the prefill step)
    decode_ms_per_token_median: float
    decode_ms_per_token_p90: float
    decode_tokens_per_s: float
    roofline_tokens_per_s: float
    roofline_fraction: float
    decoder_weight_bytes: int
    peak_rss_bytes: int | None
    probe: dict[str, Any] = field(default_factory=dict)
    energy_j_per_token: float | None = None
    acceptance_rate: float | None = None  # with a draft: the share of drafted tokens the target kept


@dataclass
class BenchReport:
    results: list[BenchResult]
    config: dict[str, Any]
    bandwidth_bytes_per_s: float
    bandwidth_source: str
    skipped: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "config": self.config,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "bandwidth_source": self.bandwidth_source,
            "results": [asdict(r) for r in self.results],
            "skipped": list(self.skipped),
        }

    def markdown(self) -> str:
        env = self.environment
        load = env.get("load_average_1m") or {}
        where = (
            f"measured {env.get('date_utc', '?')} on {env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores), "
            f"onnxruntime {env.get('onnxruntime', '?')}; 1-min load average {load.get('before')} before, "
            f"{load.get('after')} after\n\n"
            if env
            else ""
        )
        lines = [
            f"# edgelvm bench\n\n{where}roofline bandwidth: {self.bandwidth_bytes_per_s / 1e9:.1f} GB/s "
            f"({self.bandwidth_source}); "
            f"gen_len {self.config['gen_len']}, runs {self.config['runs']} (medians; decode per token: median / p90)\n",
            "| bundle | backend | decoder | prompt tok | vision ms | prefill ms | TTFT ms (token / text) "
            "| decode ms/tok (p50 / p90) | tok/s | roofline tok/s | of roofline | peak RSS MB | device mem MB "
            "| power W | mJ/token |",
            "|" + " --- |" * 15,
        ]
        for r in self.results:
            p = r.probe
            lines.append(
                f"| {bundle_label(r.bundle)} | {r.backend} | {r.decoder} | {r.prompt_tokens} | {r.vision_ms:.1f} | "
                f"{r.prefill_ms:.1f} | "
                f"{r.first_token_ms:.1f} / {'no text' if r.ttft_ms is None else format(r.ttft_ms, '.1f')} | "
                f"{r.decode_ms_per_token_median:.2f} / {r.decode_ms_per_token_p90:.2f} | "
                f"{r.decode_tokens_per_s:.1f} | {r.roofline_tokens_per_s:.1f} | {r.roofline_fraction:.0%} | "
                f"{_fmt(r.peak_rss_bytes, 'mb')} | {_fmt(p.get('peak_memory_bytes'), 'mb')} | "
                f"{_fmt(p.get('mean_power_w'), '.1f')} | "
                f"{_fmt(None if r.energy_j_per_token is None else r.energy_j_per_token * 1e3, '.1f')} |"
            )
        drafted = [r for r in self.results if r.acceptance_rate is not None]
        if drafted:
            draft = self.config.get("draft")
            lines.append(f"\nspeculative decoding with draft {draft} ({self.config.get('draft_tokens')} tokens per "
                         "step; decode per token = decode time / tokens): draft tokens kept "
                         + ", ".join(f"{bundle_label(r.bundle)} {r.acceptance_rate:.0%}" for r in drafted))  # fmt: skip
        lines += [f"\nskipped: {reason}" for reason in self.skipped]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "report.json", "markdown": out / "report.md", "chart": out / "latency.png"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        paths["markdown"].write_text(self.markdown(), encoding="utf-8")
        latency_chart(self.results).save(paths["chart"])
        return paths


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return NOT_REPORTED
    return f"{value / (1 << 20):.0f}" if spec == "mb" else format(value, spec)


class _StepTimer:
    """Delegates to the real backend and records when each ``step`` ended (perf_counter seconds)."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.ends: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        out = self._backend.step(*args, **kwargs)
        self.ends.append(time.perf_counter())
        return out


def decoder_weight_bytes(bundle_dir: Path, manifest: Any, graph: str = "decoder") -> int:
    """Bytes of a decoder graph (``decoder`` or ``decoder_ort``) and the external-data regions it reads: what one
    decode step reads (the roofline's numerator). Regions, not files: the fused decoder's weights lie in the portable
    decoder's data file and a tied LM head in the embedding table (each counted once, as much as the graph reads)."""
    from edgelvm.manifest import onnx_external_regions

    path = bundle_dir / manifest.graphs[graph].file
    regions = set()
    for location, offset, length in onnx_external_regions(path):
        regions.add((location, offset, length if length >= 0 else (bundle_dir / location).stat().st_size - offset))
    return path.stat().st_size + sum(length for _, _, length in regions)


def make_prompt(vlm: Any, image: Any, text_tokens: int) -> tuple[str, int]:
    """A prompt of about ``text_tokens`` tokens besides the image tokens and chat template; returns (prompt, total)."""
    from edgelvm.runtime import Request

    def count(words: int) -> int:
        return len(vlm.prompt_ids(Request(prompt=_WORD * words, images=[image])))

    base = count(0)
    per_word = max((count(16) - base) / 16, 1e-6)
    words = max(0, round(text_tokens / per_word))
    total = count(words)
    return _WORD * words, total


def _load_image(config: BenchConfig, size: int) -> Any:
    if config.image is not None:
        return config.image
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _image_size(manifest: Any) -> int:
    size = manifest.preprocess.size
    return int(size.get("shortest_edge") or size.get("height") or 224)


def decoder_ran(backend: Any) -> str:
    """Which decoder graph a loaded backend runs: ``fused``, ``portable`` or ``engine`` (TensorRT)."""
    if getattr(backend, "name", "") == "tensorrt" or not hasattr(backend, "fused"):
        return "engine"
    return "fused" if backend.fused else "portable"


def _bytes_per_token(bundle: Path, manifest: Any, backend: Any, ran: str) -> int:
    """The roofline's numerator for the graph that ran: the fused or portable decoder's file bytes, or for TensorRT
    the decoder engine's file (weights in the engine's precision, e.g. fp16 from an fp32 graph)."""
    if ran == "engine":
        engine_dir = getattr(backend, "engine_dir", None)
        entry = (getattr(backend, "info", None) or {}).get("engines", {}).get("decoder", {})
        engine = Path(engine_dir) / entry.get("file", "decoder.engine") if engine_dir else None
        if engine is not None and engine.is_file():
            return engine.stat().st_size
    return decoder_weight_bytes(bundle, manifest, "decoder_ort" if ran == "fused" else "decoder")


def bench_one(bundle: Path, backend: str, config: BenchConfig, bandwidth: float, decoder: str = "auto") -> BenchResult:
    from edgelvm.runtime import VLM

    # vision_cache_mb=0: every run must encode its image (a feature cache would hide the vision time)
    vlm = VLM.load(bundle, backend=backend, threads=config.threads, vision_cache_mb=0, decoder=decoder,
                   draft=config.draft, draft_tokens=config.draft_tokens)  # fmt: skip
    image = _load_image(config, _image_size(vlm.manifest))
    prompt, prompt_tokens = make_prompt(vlm, image, config.prompt_len)
    if prompt_tokens + config.gen_len > vlm.max_length:
        raise ConfigError(
            f"prompt ({prompt_tokens} tokens incl. image) + gen_len {config.gen_len} exceed the bundle's context "
            f"{vlm.max_length}",
            where=str(bundle),
            fix="lower --prompt-len / --gen-len, or re-export with a larger --max-length",
        )
    options = dict(max_new_tokens=config.gen_len, min_new_tokens=config.gen_len)
    real_backend = vlm.backend
    timer = _StepTimer(real_backend)
    vlm.backend = timer
    try:
        for _ in range(config.warmup):
            vlm.generate(image, prompt, **options)
        reset_peak_rss()
        probe = start_probe(config.probe_interval_s)
        vision, prefill, ttft, first, gaps, tokens = [], [], [], [], [], 0
        drafted = accepted = 0
        for _ in range(config.runs):
            timer.ends.clear()
            started = time.perf_counter()
            first_piece = None
            for _piece in vlm.generate(image, prompt, stream=True, **options):
                if first_piece is None:
                    first_piece = time.perf_counter()
            stats = vlm.last_stats
            vision.append(stats.vision_ms)
            prefill.append(stats.prefill_ms)
            first.append((timer.ends[0] - started) * 1e3)
            if first_piece is not None:
                ttft.append((first_piece - started) * 1e3)
            if config.draft is None:
                gaps.extend(np.diff(timer.ends) * 1e3)
            else:  # a step verifies several tokens: the per-token time is the decode time over its tokens
                gaps.append(stats.decode_ms / max(stats.new_tokens - 1, 1))
                drafted, accepted = drafted + stats.draft_tokens, accepted + stats.accepted_tokens
            tokens += stats.new_tokens
        summary = probe.stop()
    finally:
        vlm.backend = real_backend
    per_token = float(np.median(gaps))
    ran = decoder_ran(real_backend)
    weight_bytes = _bytes_per_token(Path(bundle), vlm.manifest, real_backend, ran)
    roofline = bandwidth / weight_bytes
    measured = 1e3 / per_token
    return BenchResult(
        bundle=str(bundle),
        backend=getattr(real_backend, "name", backend),
        decoder=ran,
        prompt_tokens=prompt_tokens,
        gen_len=config.gen_len,
        runs=config.runs,
        vision_ms=statistics.median(vision),
        prefill_ms=statistics.median(prefill),
        ttft_ms=statistics.median(ttft) if ttft else None,
        first_token_ms=statistics.median(first),
        decode_ms_per_token_median=per_token,
        decode_ms_per_token_p90=float(np.percentile(gaps, 90)),
        decode_tokens_per_s=measured,
        roofline_tokens_per_s=roofline,
        roofline_fraction=measured / roofline,
        decoder_weight_bytes=weight_bytes,
        peak_rss_bytes=peak_rss_bytes(),
        probe=summary.to_dict(),
        energy_j_per_token=summary.energy_j / tokens if summary.energy_j is not None and tokens else None,
        acceptance_rate=accepted / drafted if drafted else None,
    )


def interleaved_order(n: int, rounds: int) -> list[int]:
    """Which of ``n`` items each timed run belongs to when they are compared interleaved: every item once per round,
    rounds one after another, the first item rotating from round to round. Load that comes and goes on a shared
    machine then falls on every item alike, and no item always runs first (after the previous round's last)."""
    if n < 1 or rounds < 1:
        raise ConfigError(f"interleaving needs ≥ 1 item and round, got {n} and {rounds}", where="rounds",
                          fix="pass at least one bundle and rounds ≥ 1")  # fmt: skip
    return [(r + i) % n for r in range(rounds) for i in range(n)]


def decode_rates_interleaved(
    bundles: list[str | Path], image: Any, prompt: str, gen_len: int, rounds: int = 5, threads: int | None = None
) -> list[float]:
    """Decode tokens/s of each bundle on one fixed-length request, timed as :func:`bench_one` times decode (the
    step-end gaps of :class:`_StepTimer`, median per run), with the bundles interleaved in rounds
    (:func:`interleaved_order`); per bundle, the median over its rounds. Every bundle is loaded and warmed first."""
    from edgelvm.runtime import VLM

    options = dict(max_new_tokens=gen_len, min_new_tokens=gen_len)
    vlms = [VLM.load(b, threads=threads, vision_cache_mb=0) for b in bundles]
    timers = []
    for vlm in vlms:
        timers.append(_StepTimer(vlm.backend))
        vlm.backend = timers[-1]
        vlm.generate(image, prompt, **options)  # warm-up
    per_run: list[list[float]] = [[] for _ in vlms]  # median ms per decode step of each run
    try:
        for i in interleaved_order(len(vlms), rounds):
            timers[i].ends.clear()
            vlms[i].generate(image, prompt, **options)
            per_run[i].append(float(np.median(np.diff(timers[i].ends) * 1e3)))
    finally:
        for vlm, timer in zip(vlms, timers):
            vlm.backend = timer._backend
    return [1e3 / statistics.median(ms) for ms in per_run]


def resolve_bandwidth(config: BenchConfig) -> tuple[float, str]:
    if config.device:
        from edgelvm.devices.profiles import load_profile

        profile = load_profile(config.device, config.profiles_dir)
        return profile.bandwidth_bytes_per_s, f"profile {profile.name} datasheet"
    from edgelvm.devices.roofline import measure_host_bandwidth

    rates = measure_host_bandwidth(config.bandwidth_mb, repeats=5)
    which = "numpy copy, read + write bytes" if rates["copy"] >= rates["read"] else "threaded read-only sum"
    return rates["max"], (
        f"measured here, host memory: the larger of a numpy copy ({rates['copy'] / 1e9:.1f} GB/s) and a threaded "
        f"read-only sum ({rates['read'] / 1e9:.1f} GB/s), i.e. the {which}"
    )


def bench(bundles: list[str | Path], config: BenchConfig | None = None) -> BenchReport:
    """Benchmark every bundle with every backend in ``config.backends``; see the module docstring for the method."""
    config = config or BenchConfig()
    if not bundles:
        raise ConfigError("no bundle given", where="bench", fix="pass at least one bundle directory")
    load_before = _load_average()
    bandwidth, source = resolve_bandwidth(config)
    results, skipped = [], []
    for bundle in bundles:
        for backend in config.backends:
            for decoder in config.decoders:
                if decoder == "fused" and not _has_fused(Path(bundle)):
                    skipped.append(f"{bundle_label(bundle)} / {backend} / fused: the bundle has no decoder_ort.onnx")
                    log.warning("skipping %s", skipped[-1])
                    continue
                log.info("bench %s on %s (decoder %s)", bundle, backend, decoder)
                results.append(bench_one(Path(bundle), backend, config, bandwidth, decoder))
    cfg = asdict(config)
    cfg.update(
        image=str(config.image) if config.image else None,
        profiles_dir=str(config.profiles_dir) if config.profiles_dir else None,
        backends=list(config.backends),
        decoders=list(config.decoders),
    )
    env = environment()
    env["load_average_1m"] = {"before": load_before, "after": _load_average()}
    return BenchReport(results, cfg, bandwidth, source, skipped, env)


def _load_average() -> float | None:
    """The 1-minute load average: other work on the machine is the largest source of noise in these numbers."""
    import os

    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def environment() -> dict[str, Any]:
    """Where the numbers were measured: date, CPU, core count, memory and library versions."""
    import os
    import platform
    from datetime import datetime, timezone

    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    return {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": memory,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
    }


def _has_fused(bundle: Path) -> bool:
    from edgelvm.manifest import Manifest

    return "decoder_ort" in Manifest.load(bundle).graphs
