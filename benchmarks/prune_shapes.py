"""Pruning on the shipped teacher: activation importance vs random removal at equal ratios (before recovery), then
recovery distillation, side by side with the unpruned teacher, measured in one run.

Each model is exported to a bundle and evaluated with the torch-free runtime on the shipped test split (greedy,
exact match). Results go to ``benchmarks/results/prune_shapes.{json,md}``.

    python benchmarks/prune_shapes.py
    python benchmarks/prune_shapes.py --text-heads 0.5 --recover-steps 300
    python benchmarks/prune_shapes.py --task scenes --importances random magnitude gradient activation \
        --recover random activation --scales 0.5 1 --text-heads 0.6666666666666666   # 6 heads / 2 KV: n/3 ratios
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import save_results  # noqa: E402 (benchmarks/ is the script directory: on sys.path)
from tasks import TASKS, correctness, interval_text, paired_markdown, paired_rows  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    import torch

    from edgelvm.eval import EvalConfig, evaluate
    from edgelvm.export import ExportConfig, export
    from edgelvm.prune import PruneConfig, prune

    torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    args.teacher = args.teacher or str(task.teacher)
    out = Path(args.out or f"runs/prune_{task.name}")
    data = out / "data"
    task.write_splits(data, train=None if args.recover else 10)  # the train split feeds recovery only
    base = {"vision_heads": args.vision_heads, "text_heads": args.text_heads, "vision_mlp": args.vision_mlp,
            "text_mlp": args.text_mlp}  # fmt: skip
    variants: dict[str, dict] = {}
    kinds: dict[tuple[str, str, bool], str] = {}  # (importance, scale tag, recovered) -> variant name
    for scale in args.scales:
        ratios = {k: v * scale for k, v in base.items()}  # unrounded: head ratios must hit n/heads exactly
        tag = "" if len(args.scales) == 1 else f" ×{scale:g}"
        for importance in args.importances:
            name = kinds[importance, tag, False] = f"{importance}{tag}, no recovery"
            variants[name] = {"importance": importance, **ratios}
            if importance in args.recover:
                name = kinds[importance, tag, True] = f"{importance}{tag} + {args.recover_steps} recovery steps"
                variants[name] = {"importance": importance, "recover_steps": args.recover_steps,
                                  "recover_data": data / "train", **ratios}  # fmt: skip
    models: dict[str, Path] = {"teacher": Path(args.teacher)}
    reports: dict[str, dict] = {}
    for name, extra in variants.items():
        target = out / _slug(name)
        if not (target / "prune_report.json").is_file():
            cfg = PruneConfig(out=target, gqa=args.gqa, calib_limit=args.calib, batch_size=32, force=True,
                              recover_lr=args.recover_lr, progress=not args.quiet, **extra)  # fmt: skip
            prune(args.teacher, data / "val", cfg)
        models[name] = target
        reports[name] = json.loads((target / "prune_report.json").read_text())

    results: dict[str, dict] = {}
    scores: dict[str, list[int]] = {}
    for name, model in models.items():
        bundle = out / "bundles" / _slug(name)
        if not (bundle / "edgelvm.json").is_file():
            export(model, bundle, ExportConfig(max_length=128, force=True))
        report = evaluate(bundle, data / "test", EvalConfig(max_new_tokens=task.max_new_tokens, batch_size=32,
                                                            limit=args.limit))  # fmt: skip
        metrics = report.metrics
        scores[name] = correctness(report)
        rep = reports.get(name)
        results[name] = {
            "test_exact_match": metrics["exact_match"],
            "ci95": metrics["exact_match_ci95"],
            "per_type": {q: r["exact_match"] for q, r in metrics["per_type"].items()},
            "parameters": rep["after"]["parameters"] if rep else None,
            "flops_per_image": rep["after"]["flops_per_image"] if rep else None,
            "flops_per_token": rep["after"]["flops_per_token"] if rep else None,
            "recovery_seconds": (rep.get("recovery") or {}).get("seconds") if rep else None,
        }
    first = next(iter(reports.values()))
    results["teacher"].update(
        parameters=first["before"]["parameters"],
        flops_per_image=first["before"]["flops_per_image"],
        flops_per_token=first["before"]["flops_per_token"],
    )
    for r in results.values():
        r["accuracy_vs_teacher"] = round(r["test_exact_match"] / results["teacher"]["test_exact_match"], 3)
    pairs = [(n, "teacher") for n in variants]
    for (importance, tag, recovered), name in kinds.items():  # each importance against random, same ratios
        if importance != "random" and ("random", tag, recovered) in kinds:
            pairs.append((name, kinds["random", tag, recovered]))
    return {"ratios": base, "scales": args.scales, "gqa": args.gqa, "kept": first["kept"], "task": task.name,
            "results": results, "paired": paired_rows(scores, pairs), "scores": scores,
            "time": time.ctime()}  # fmt: skip


def _slug(name: str) -> str:
    return name.replace(",", "").replace("+", "").replace("×", "x").replace(" ", "_")


def markdown(summary: dict) -> str:
    res = summary["results"]
    qtypes = sorted(res["teacher"]["per_type"])
    head = ("| model | params | GFLOPs/image | MFLOPs/token | test EM | 95% interval | % of teacher | "
            + " | ".join(qtypes) + " |")  # fmt: skip
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, r in res.items():
        per = " | ".join(f"{r['per_type'][q]:.1%}" for q in qtypes)
        lines.append(
            f"| {name} | {r['parameters'] / 1e6:.2f}M | {r['flops_per_image'] / 1e9:.3f} | "
            f"{r['flops_per_token'] / 1e6:.2f} | {r['test_exact_match']:.1%} | "
            f"{interval_text({'exact_match_ci95': r.get('ci95')})} | {r['accuracy_vs_teacher']:.1%} | {per} |"
        )
    ratios = ", ".join(f"{k} {v:g}" for k, v in summary["ratios"].items())
    scales = summary.get("scales", [1.0])
    paired = paired_markdown(summary.get("paired", []))
    return "\n".join(lines) + (
        f"\n\nRemoved: {ratios} (GQA mode {summary['gqa']})"
        + (f", scaled by ×{', ×'.join(f'{s:g}' for s in scales)}" if len(scales) > 1 else "")
        + f"; shipped {summary.get('task', 'shapes')} test split; 95% intervals: percentile bootstrap over questions.\n"
        + (f"\nPaired differences (the same questions, 2000 bootstrap resamples):\n\n{paired}" if paired else "")
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="shapes", choices=list(TASKS))
    p.add_argument("--teacher", default=None, help="default: the task's shipped teacher")
    p.add_argument("--vision-heads", type=float, default=0.5)
    p.add_argument("--text-heads", type=float, default=0.25)
    p.add_argument("--vision-mlp", type=float, default=0.3)
    p.add_argument("--text-mlp", type=float, default=0.3)
    p.add_argument("--scales", nargs="+", type=float, default=[1.0], help="each ratio times each scale")
    p.add_argument("--importances", nargs="+", default=["random", "activation"],
                   choices=["activation", "gradient", "magnitude", "random"])  # fmt: skip
    p.add_argument("--recover", nargs="*", default=["activation"], help="importances also run with recovery")
    p.add_argument("--gqa", default="expand")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="test questions (default: all)")
    p.add_argument("--recover-steps", type=int, default=600)
    p.add_argument("--recover-lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="default: runs/prune_<task>")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default=None, help="base name of the result files (default: prune_<task>)")
    p.add_argument("--quiet", action="store_true")
    return p


def main() -> None:
    args = parser().parse_args()
    summary = run(args)
    save_results(args.results, args.name or f"prune_{args.task}", summary, markdown(summary))


if __name__ == "__main__":
    main()
