"""``bench``: latency, throughput, memory and power of bundles on this machine, against the bandwidth roofline.

Each (bundle, backend) is loaded once, warmed up, then run ``runs`` times with a fixed generation length
(``min_new_tokens = max_new_tokens = gen_len``, so EOS never shortens a run). Per-token times come from a thin
proxy around ``vlm.backend`` that timestamps every ``step`` call (vlm.py is not modified): the gap between two
consecutive step ends is one token's full loop time (sampling, detokenizing, embedding lookup and the decoder).
TTFT is measured from the call to the first streamed text piece. Torch-free.
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

from edgelvm.devices.probes import peak_rss_bytes, reset_peak_rss, start_probe
from edgelvm.errors import ConfigError

log = logging.getLogger(__name__)

NOT_REPORTED = "not reported"
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
    threads: int | None = None
    device: str | None = None
    profiles_dir: Path | None = None
    bandwidth_mb: int = 256
    probe_interval_s: float = 0.05

    def __post_init__(self) -> None:
        for name in ("prompt_len", "gen_len", "runs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}", where=name, fix="pass ≥ 1")
        if self.gen_len < 2:
            raise ConfigError("gen_len must be ≥ 2 to time decode steps", where="gen_len", fix="pass ≥ 2")


@dataclass
class BenchResult:
    bundle: str
    backend: str
    prompt_tokens: int
    gen_len: int
    runs: int
    vision_ms: float
    prefill_ms: float
    ttft_ms: float | None
    first_token_ms: float
    decode_ms_per_token_median: float
    decode_ms_per_token_p90: float
    decode_tokens_per_s: float
    roofline_tokens_per_s: float
    roofline_fraction: float
    decoder_weight_bytes: int
    peak_rss_bytes: int | None
    probe: dict[str, Any] = field(default_factory=dict)
    energy_j_per_token: float | None = None


@dataclass
class BenchReport:
    results: list[BenchResult]
    config: dict[str, Any]
    bandwidth_bytes_per_s: float
    bandwidth_source: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "bandwidth_source": self.bandwidth_source,
            "results": [asdict(r) for r in self.results],
        }

    def markdown(self) -> str:
        lines = [
            f"# edgelvm bench\n\nroofline bandwidth: {self.bandwidth_bytes_per_s / 1e9:.1f} GB/s "
            f"({self.bandwidth_source}); "
            f"gen_len {self.config['gen_len']}, runs {self.config['runs']} (medians; decode per token: median / p90)\n",
            "| bundle | backend | prompt tok | vision ms | prefill ms | TTFT ms | decode ms/tok (p50 / p90) | tok/s "
            "| roofline tok/s | of roofline | peak RSS MB | device mem MB | power W | mJ/token |",
            "|" + " --- |" * 14,
        ]
        for r in self.results:
            p = r.probe
            lines.append(
                f"| {Path(r.bundle).name} | {r.backend} | {r.prompt_tokens} | {r.vision_ms:.1f} | {r.prefill_ms:.1f} | "
                f"{_fmt(r.ttft_ms, '.1f')} | {r.decode_ms_per_token_median:.2f} / {r.decode_ms_per_token_p90:.2f} | "
                f"{r.decode_tokens_per_s:.1f} | {r.roofline_tokens_per_s:.1f} | {r.roofline_fraction:.0%} | "
                f"{_fmt(r.peak_rss_bytes, 'mb')} | {_fmt(p.get('peak_memory_bytes'), 'mb')} | "
                f"{_fmt(p.get('mean_power_w'), '.1f')} | "
                f"{_fmt(None if r.energy_j_per_token is None else r.energy_j_per_token * 1e3, '.1f')} |"
            )
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        from edgelvm.bench.chart import latency_chart

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


def decoder_weight_bytes(bundle_dir: Path, manifest: Any) -> int:
    """Bytes of the decoder graph and its external data files: what one decode step reads (the roofline's numerator).

    The embedding table is excluded (a gather reads one row per token)."""
    decoder = manifest.graphs["decoder"].file
    stem = Path(decoder).name
    files = [f for f in (manifest.files or {}) if f == decoder or (Path(f).name.startswith(stem) and f != decoder)]
    return sum((bundle_dir / f).stat().st_size for f in files) or (bundle_dir / decoder).stat().st_size


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


def bench_one(bundle: Path, backend: str, config: BenchConfig, bandwidth: float) -> BenchResult:
    import inspect

    from edgelvm.runtime import VLM

    extra = {}
    if "vision_cache_mb" in inspect.signature(VLM.load).parameters:
        extra["vision_cache_mb"] = 0  # every run must encode its image: a feature cache would hide the vision time
    vlm = VLM.load(bundle, backend=backend, threads=config.threads, **extra)
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
            gaps.extend(np.diff(timer.ends) * 1e3)
            tokens += stats.new_tokens
        summary = probe.stop()
    finally:
        vlm.backend = real_backend
    per_token = float(np.median(gaps))
    weight_bytes = decoder_weight_bytes(Path(bundle), vlm.manifest)
    roofline = bandwidth / weight_bytes
    measured = 1e3 / per_token
    return BenchResult(
        bundle=str(bundle),
        backend=getattr(real_backend, "name", backend),
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
    )


def resolve_bandwidth(config: BenchConfig) -> tuple[float, str]:
    if config.device:
        from edgelvm.devices.profiles import load_profile

        profile = load_profile(config.device, config.profiles_dir)
        return profile.bandwidth_bytes_per_s, f"profile {profile.name} datasheet"
    from edgelvm.devices.roofline import measure_read_bandwidth

    return measure_read_bandwidth(config.bandwidth_mb, repeats=5), "measured here (numpy copy, host memory)"


def bench(bundles: list[str | Path], config: BenchConfig | None = None) -> BenchReport:
    """Benchmark every bundle with every backend in ``config.backends``; see the module docstring for the method."""
    config = config or BenchConfig()
    if not bundles:
        raise ConfigError("no bundle given", where="bench", fix="pass at least one bundle directory")
    bandwidth, source = resolve_bandwidth(config)
    results = []
    for bundle in bundles:
        for backend in config.backends:
            log.info("bench %s on %s", bundle, backend)
            results.append(bench_one(Path(bundle), backend, config, bandwidth))
    cfg = asdict(config)
    cfg.update(
        image=str(config.image) if config.image else None,
        profiles_dir=str(config.profiles_dir) if config.profiles_dir else None,
        backends=list(config.backends),
    )
    return BenchReport(results, cfg, bandwidth, source)
