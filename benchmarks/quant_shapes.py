"""Quantization on the shipped teacher: INT8 vision, INT4 LLM by RTN / AWQ / GPTQ at several group sizes, and
both together — against the fp32 bundle, and the vision graph quantized by onnxruntime.quantization's own
``quantize_static`` (QDQ, MinMax, per-channel) on the same calibration images, measured in one run.

Each model is exported and evaluated with the torch-free runtime on the shipped test split (greedy, exact match).
Per bundle: size on disk, vision-graph latency (one image, median) and decode tokens/s (``edgelvm bench``'s runner),
and for INT4 MatMulNBits ``accuracy_level`` 0 vs 4. Results: ``benchmarks/results/quant_shapes.{json,md}``.

    python benchmarks/quant_shapes.py
    python benchmarks/quant_shapes.py --groups 128 --methods awq --limit 300
    python benchmarks/quant_shapes.py --teacher runs/distill_shapes/distilled --groups 64 32 \
        --out runs/quant_student --name quant_shapes_student     # the distilled student (distill_shapes.py)
    python benchmarks/quant_shapes.py --task scenes --groups 128 64 32   # the harder task: paired intervals rank
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import save_results  # noqa: E402 (benchmarks/ is the script directory: on sys.path)
from tasks import TASKS, correctness, interval_text, paired_markdown, paired_rows  # noqa: E402


def _bundle_bytes(bundle: Path, decoder: str) -> int:
    """What one backend loads: the shared files plus the decoder it runs."""
    skip = {"decoder.onnx", "decoder_ort.onnx"} - {decoder}
    return sum(p.stat().st_size for p in bundle.iterdir() if p.is_file() and p.name not in skip)


def _vision_ms(bundle: Path, threads: int, repeats: int = 300) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(bundle / "vision.onnx"), options, providers=["CPUExecutionProvider"])
    shape = [1 if isinstance(d, str) else d for d in session.get_inputs()[0].shape]
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    for _ in range(3):
        session.run(None, {"pixel_values": x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, {"pixel_values": x})
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _decode_tok_s(bundle: Path, decoder: str, threads: int, runs: int, size: int = 96) -> float:
    from edgelvm.runtime import VLM

    vlm = VLM.load(bundle, decoder=decoder, threads=threads)
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    rates = []
    for i in range(runs + 1):
        vlm.generate(image, "What is in the image?", max_new_tokens=48, min_new_tokens=48)
        stats = vlm.last_stats
        if i:  # the first is warm-up
            rates.append(stats.decode_tokens_per_s)
    return statistics.median(rates)


def _ort_static_vision(fp32_bundle: Path, calib_dir: Path, limit: int, target: Path) -> Path:
    """A copy of the fp32 bundle whose vision graph is ORT's own quantize_static (QDQ, MinMax, per-channel)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgelvm.data.jsonl import load_jsonl_dataset
    from edgelvm.manifest import MANIFEST_NAME, Manifest, hash_bundle_files, write_text_atomic
    from edgelvm.runtime.images import load_image
    from edgelvm.runtime.images.preprocess import ImagePreprocessor

    manifest = Manifest.load(fp32_bundle)
    records = load_jsonl_dataset(calib_dir)[:limit]
    preprocess = ImagePreprocessor(manifest.preprocess, fp32_bundle)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(
                {"pixel_values": preprocess([load_image(r.image_path)])} for r in records
            )

        def get_next(self) -> dict | None:
            return next(self.items, None)

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(fp32_bundle, target)
    quantize_static(str(fp32_bundle / "vision.onnx"), str(target / "vision.onnx"), Reader(),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])  # fmt: skip
    manifest.graphs["vision"].precision = "int8 (ORT quantize_static)"
    manifest.files = hash_bundle_files(target)
    write_text_atomic(target / MANIFEST_NAME, manifest.to_json())
    return target


def run(args: argparse.Namespace) -> dict:
    import torch

    from edgelvm.eval import EvalConfig, evaluate
    from edgelvm.export import ExportConfig, export
    from edgelvm.quantize import AWQConfig, Int8VisionConfig, method_config, quantize

    torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    args.teacher = args.teacher or str(task.teacher)
    out = Path(args.out or f"runs/quant_{task.name}")
    data = out / "data"
    task.write_splits(data, train=10)
    variants: dict[str, list] = {"INT8 vision": [Int8VisionConfig()]}
    for group in args.groups:
        for method in args.methods:
            variants[f"INT4 {method} g{group}"] = [method_config("llm", method, group_size=group)]
    best_group = args.groups[0]
    variants[f"INT8 vision + INT4 awq g{best_group}"] = [AWQConfig(group_size=best_group), Int8VisionConfig()]

    bundles: dict[str, Path] = {}
    quant_reports: dict[str, dict] = {}
    fp32 = out / "bundles" / "fp32"
    if not (fp32 / "edgelvm.json").is_file():
        export(args.teacher, fp32, ExportConfig(max_length=128, force=True))
    bundles["fp32"] = fp32
    for name, methods in variants.items():
        slug = name.replace(" ", "_").replace("+", "")
        ckpt = out / "models" / slug
        if not (ckpt / "quant_report.json").is_file():
            quantize(args.teacher, data / "val", methods, out=ckpt, calib_limit=args.calib, force=True,
                     progress=not args.quiet)  # fmt: skip
        quant_reports[name] = json.loads((ckpt / "quant_report.json").read_text())
        bundle = out / "bundles" / slug
        if not (bundle / "edgelvm.json").is_file():
            export(ckpt, bundle, ExportConfig(max_length=128, force=True))
        bundles[name] = bundle
    bundles["INT8 vision (ORT quantize_static)"] = _ort_static_vision(fp32, data / "val", args.calib,
                                                                      out / "bundles" / "ort_static")  # fmt: skip

    results: dict[str, dict] = {}
    scores: dict[str, list[int]] = {}
    eval_config = EvalConfig(max_new_tokens=task.max_new_tokens, batch_size=32, limit=args.limit, reference=fp32,
                             agreement_limit=args.agreement)  # fmt: skip
    for name, bundle in bundles.items():
        metrics = evaluate(bundle, data / "test", eval_config)
        scores[name] = correctness(metrics)
        rep = quant_reports.get(name, {})
        row = {
            "test_exact_match": metrics.metrics["exact_match"],
            "ci95": metrics.metrics["exact_match_ci95"],
            "top1_agreement": metrics.metrics["reference"]["top1_agreement"],
            "mean_kl": metrics.metrics["reference"]["mean_kl"],
            "per_type": {q: r["exact_match"] for q, r in metrics.metrics["per_type"].items()},
            "bundle_mb_fused": _bundle_bytes(bundle, "decoder_ort.onnx") / 1e6,
            "vision_ms": _vision_ms(bundle, args.threads),
            "decode_tok_s": _decode_tok_s(bundle, "fused", args.threads, args.runs, task.image_size),
            "calibrator": rep.get("calibrator"),
            "llm_output_error": _mean([r["output_error"] for r in rep.get("layers", []) if r["side"] == "text"]),
            "quantize_seconds": rep.get("seconds"),
        }
        results[name] = row
    # MatMulNBits accuracy_level 4 (int8 activations) on the combined model: accuracy and speed
    combined = f"INT8 vision + INT4 awq g{best_group}"
    level4 = out / "bundles" / "combined_level4"
    if not (level4 / "edgelvm.json").is_file():
        export(out / "models" / combined.replace(" ", "_").replace("+", ""), level4,
               ExportConfig(max_length=128, force=True, int4_accuracy_level=4))  # fmt: skip
    metrics = evaluate(level4, data / "test", eval_config)
    scores[combined + ", accuracy_level 4"] = correctness(metrics)
    results[combined + ", accuracy_level 4"] = {
        "test_exact_match": metrics.metrics["exact_match"],
        "ci95": metrics.metrics["exact_match_ci95"],
        "top1_agreement": metrics.metrics["reference"]["top1_agreement"],
        "mean_kl": metrics.metrics["reference"]["mean_kl"],
        "per_type": {q: r["exact_match"] for q, r in metrics.metrics["per_type"].items()},
        "bundle_mb_fused": _bundle_bytes(level4, "decoder_ort.onnx") / 1e6,
        "vision_ms": results[combined]["vision_ms"],
        "decode_tok_s": _decode_tok_s(level4, "fused", args.threads, args.runs, task.image_size),
        "calibrator": results[combined]["calibrator"],
        "llm_output_error": results[combined]["llm_output_error"],
        "quantize_seconds": results[combined]["quantize_seconds"],
    }
    base = results["fp32"]
    for r in results.values():
        r["drop_points"] = round(100 * (base["test_exact_match"] - r["test_exact_match"]), 2)
        r["size_ratio"] = round(r["bundle_mb_fused"] / base["bundle_mb_fused"], 3)
        r["decode_speedup"] = round(r["decode_tok_s"] / base["decode_tok_s"], 2)
        r["vision_speedup"] = round(base["vision_ms"] / r["vision_ms"], 2)
    pairs = [(name, "fp32") for name in results if name != "fp32"]
    for group in args.groups:  # the method comparisons the yardstick is for
        pairs += [(f"INT4 {m} g{group}", f"INT4 rtn g{group}") for m in ("awq", "gptq")]
        pairs.append((f"INT4 gptq g{group}", f"INT4 awq g{group}"))
    return {"results": results, "paired": paired_rows(scores, pairs), "scores": scores, "task": task.name,
            "calib": args.calib, "limit": args.limit, "threads": args.threads, "agreement": args.agreement,
            "model": args.teacher, "time": time.ctime()}  # fmt: skip


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 5) if values else None


def markdown(summary: dict) -> str:
    res = summary["results"]
    head = ("| model | test EM | 95% interval | drop (pt) | top-1 agree | KL vs fp32 | bundle MB (fused) | × size "
            "| vision ms | × vision | decode tok/s | × decode | LLM output err | observer |")  # fmt: skip
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, r in res.items():
        err = f"{r['llm_output_error']:.4f}" if r["llm_output_error"] is not None else "–"
        lines.append(
            f"| {name} | {r['test_exact_match']:.1%} | {interval_text({'exact_match_ci95': r.get('ci95')})} | "
            f"{r['drop_points']:+.1f} | {r['top1_agreement']:.2%} | "
            f"{r['mean_kl']:.5f} | {r['bundle_mb_fused']:.2f} | "
            f"{r['size_ratio']:.2f} | {r['vision_ms']:.2f} | {r['vision_speedup']:.2f} | {r['decode_tok_s']:.0f} | "
            f"{r['decode_speedup']:.2f} | {err} | {r['calibrator'] or '–'} |"
        )
    n = summary["limit"] or "all"
    paired = paired_markdown(summary.get("paired", []))
    return "\n".join(lines) + (
        f"\n\nShipped {summary.get('task', 'shapes')} test split ({n} questions), greedy exact match; "
        f"{summary['calib']} calibration records from the "
        f"validation split; ONNX Runtime CPU, {summary['threads']} threads; drop = fp32 EM − EM in points; decode "
        "on the fused decoder (MatMulNBits for INT4), 48 tokens, median of the runs; top-1 agreement and KL: "
        f"teacher-forced along the fp32 bundle's answers on {summary['agreement']} questions; LLM output error: "
        "relative, on the calibration tokens, mean over layers; 95% intervals: percentile bootstrap over questions.\n"
    ) + (f"\nPaired differences (the same questions, 2000 bootstrap resamples):\n\n{paired}" if paired else "")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="shapes", choices=list(TASKS))
    p.add_argument("--teacher", default=None, help="default: the task's shipped teacher")
    p.add_argument("--methods", nargs="+", default=["rtn", "awq", "gptq"])
    p.add_argument("--groups", nargs="+", type=int, default=[128, 32])
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="test questions (default: all)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--agreement", type=int, default=200, help="questions scored against fp32 by teacher forcing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="default: runs/quant_<task>")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default=None, help="base name of the result files (default: quant_<task>)")
    p.add_argument("--quiet", action="store_true")
    return p


def main() -> None:
    args = parser().parse_args()
    summary = run(args)
    save_results(args.results, args.name or f"quant_{args.task}", summary, markdown(summary))


if __name__ == "__main__":
    main()
