"""Time to first token at full / 50% / 25% image tokens (``edgelvm export --image-tokens``), measured interleaved.

One checkpoint is exported once per fraction (the full bundle without the option), every bundle is loaded in one
process, and each repeat asks one question about a fresh picture (an image-feature cache miss) of every bundle in
turn, the order rotating per repeat, so that a busy machine slows all of them alike. TTFT is the wall time of a
``max_new_tokens=1`` call (vision + prefill + the first sampled token); the vision and prefill stages come from
``VLM.last_stats``. Medians over ``--repeats``, after one warm-up call per bundle; ratios against the first bundle.

The reduced vision graph still runs the whole tower (plus one layer's attention scores), so the saving is in the
prefill: ``prompt tokens`` drops by ``(1 - fraction) x`` the image's tokens.

    python benchmarks/token_reduction.py                        # tiny LLaVA at 224 px (196 tokens): checks the script
    python benchmarks/token_reduction.py --model qwen2-0.5b     # CLIP ViT-L/14-336 (576 tokens) + Qwen2-0.5B
    python benchmarks/token_reduction.py --model realistic      # CLIP ViT-B/16 (196 tokens) + SmolLM2-135M
    python benchmarks/token_reduction.py --bundles FULL HALF QUARTER   # bundles you exported (the first: baseline)

``--model`` is ``tiny``, ``realistic`` (``benchmarks/bench_models.py``) or a shape of ``benchmarks/scale.py``
(random weights with the shapes of real models). All the bundles are loaded at once: for ``qwen2-0.5b`` about three
times 3 GB of memory.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from results_io import save_results

PROMPT = "Describe the picture."
PICTURE = 336  # pixels; each bundle's preprocessing resizes it as its processor does


def checkpoint_for(model: str, workdir: Path) -> Path:
    """The random-weight checkpoint of ``model`` under ``workdir`` (built once)."""
    out = workdir / model / "model"
    if (out / "config.json").is_file():
        return out
    print(f"[{model}] building checkpoint …", file=sys.stderr)
    from edgelvm.models.synthetic import build_realistic_llava, build_tiny_llava

    if model == "tiny":
        build_tiny_llava(out, image_size=224, patch_size=16, text_overrides={"max_position_embeddings": 1024})
    elif model == "realistic":
        build_realistic_llava(out)
    else:
        from scale import build

        build(model, out)
    return out


def export_fractions(
    checkpoint: Path, model: str, workdir: Path, fractions: list[float], max_length: int
) -> list[Path]:
    """One bundle per fraction of the image tokens (1: no ``--image-tokens``), exported once under ``workdir``."""
    from edgelvm.export import ExportConfig, export

    bundles = []
    for fraction in fractions:
        bundle = workdir / model / ("bundle-full" if fraction == 1 else f"bundle-tokens-{fraction:g}")
        if not (bundle / "edgelvm.json").is_file():
            print(f"[{model}] exporting with {fraction:g} of the image tokens …", file=sys.stderr)
            config = ExportConfig(max_length=max_length, force=True, dtype=_shape_dtype(model),
                                  image_tokens=None if fraction == 1 else fraction)  # fmt: skip
            report = export(checkpoint, bundle, config)
            print(f"[{model}] exported in {report.seconds:.0f} s", file=sys.stderr)
        bundles.append(bundle)
    return bundles


def _shape_dtype(model: str) -> str:
    """The export precision of ``model``: fp32, or fp16 for the shapes scale.py exports in half precision."""
    if model in ("tiny", "realistic"):
        return "fp32"
    from scale import SHAPES

    return SHAPES[model][-1]


def pictures(count: int) -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (PICTURE, PICTURE, 3), dtype=np.uint8)) for _ in range(count)]


def measure(bundles: list[Path], repeats: int, threads: int) -> list[dict]:
    """Per bundle: each repeat's TTFT, vision and prefill ms and prompt tokens, the bundles interleaved."""
    from edgelvm.manifest import Manifest
    from edgelvm.runtime import VLM

    vlms = [VLM.load(b, threads=threads) for b in bundles]
    frames = pictures(repeats + 1)
    for vlm in vlms:  # warm-up (session start, first-call allocations), on a picture not measured
        vlm.generate(frames[-1], PROMPT, max_new_tokens=1)
    rows: list[list[dict]] = [[] for _ in bundles]
    for repeat in range(repeats):
        order = [(repeat + k) % len(bundles) for k in range(len(bundles))]
        for i in order:
            started = time.perf_counter()
            vlms[i].generate(frames[repeat], PROMPT, max_new_tokens=1)
            ms = (time.perf_counter() - started) * 1e3
            stats = vlms[i].last_stats
            rows[i].append({"ttft_ms": ms, "vision_ms": stats.vision_ms, "prefill_ms": stats.prefill_ms,
                            "prompt_tokens": stats.prompt_tokens, "images_encoded": stats.images_encoded})  # fmt: skip
    results = []
    for bundle, measured in zip(bundles, rows):
        manifest = Manifest.load(bundle)
        reduction = manifest.image_token_reduction or {}
        results.append({
            "bundle": str(bundle),
            "image_tokens": manifest.preprocess.tokens_per_image,
            "full_image_tokens": reduction.get("full_tokens_per_image", manifest.preprocess.tokens_per_image),
            "reduction": reduction or None,
            "repeats": measured,
            **{key: statistics.median(r[key] for r in measured) for key in
               ("ttft_ms", "vision_ms", "prefill_ms", "prompt_tokens")},
        })  # fmt: skip
    return results


def markdown(label: str, results: list[dict]) -> str:
    base = results[0]
    lines = [
        f"TTFT by image tokens kept — {label} (medians; ratios vs the first row)",
        "",
        "| image tokens | prompt tokens | vision (ms) | prefill (ms) | TTFT (ms) | TTFT ratio | prefill ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['image_tokens']} of {r['full_image_tokens']} | {r['prompt_tokens']:.0f} | {r['vision_ms']:.1f} | "
            f"{r['prefill_ms']:.1f} | {r['ttft_ms']:.1f} | {r['ttft_ms'] / base['ttft_ms']:.2f} | "
            f"{r['prefill_ms'] / base['prefill_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | realistic | a shape of benchmarks/scale.py")
    parser.add_argument("--bundles", nargs="+", type=Path, help="measure these bundles instead (the first: baseline)")
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.5, 0.25],
                        help="fractions of the image tokens to keep (1: the full bundle)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default=None, help="results file stem (default: token_reduction_<model>)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args()
    if args.bundles:
        bundles, label = args.bundles, "given bundles"
    else:
        if args.model not in ("tiny", "realistic"):
            from scale import SHAPES

            if args.model not in SHAPES:
                parser.error(f"unknown --model {args.model!r}: tiny, realistic or one of {', '.join(SHAPES)}")
        if any(not 0 < f <= 1 for f in args.fractions):
            parser.error("--fractions must be in (0, 1]")
        checkpoint = checkpoint_for(args.model, args.workdir)
        bundles = export_fractions(checkpoint, args.model, args.workdir, args.fractions, args.max_length)
        label = f"model {args.model}"
    results = measure(bundles, args.repeats, args.threads)
    summary = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": results,
    }
    name = args.name or f"token_reduction_{'bundles' if args.bundles else args.model}"
    save_results(args.out, name, summary, markdown(label, results))


if __name__ == "__main__":
    main()
