"""Pruning on the shipped teacher: activation importance vs random removal at equal ratios (before recovery), then
recovery distillation, side by side with the unpruned teacher, measured in one run.

Each model is exported to a bundle and evaluated with the torch-free runtime on the shipped test split (greedy,
exact match). Results go to ``benchmarks/results/prune_shapes.{json,md}``.

    python benchmarks/prune_shapes.py
    python benchmarks/prune_shapes.py --text-heads 0.5 --recover-steps 300
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


def run(args: argparse.Namespace) -> dict:
    import torch

    from edgelvm.data import write_shipped_splits
    from edgelvm.eval import EvalConfig, evaluate
    from edgelvm.export import ExportConfig, export
    from edgelvm.prune import PruneConfig, prune

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    if not (data / "test" / "data.jsonl").is_file():
        write_shipped_splits(data, force=True)
    ratios = {
        "vision_heads": args.vision_heads,
        "text_heads": args.text_heads,
        "vision_mlp": args.vision_mlp,
        "text_mlp": args.text_mlp,
    }
    variants = {
        "random, no recovery": {"importance": "random"},
        "activation, no recovery": {"importance": "activation"},
        f"activation + {args.recover_steps} recovery steps": {
            "importance": "activation",
            "recover_steps": args.recover_steps,
            "recover_data": data / "train",
        },
    }
    models: dict[str, Path] = {"teacher": Path(args.teacher)}
    reports: dict[str, dict] = {}
    for name, extra in variants.items():
        target = out / name.split(",")[0].replace(" ", "_") / ("recovered" if "recover_steps" in extra else "plain")
        if not (target / "prune_report.json").is_file():
            cfg = PruneConfig(out=target, gqa=args.gqa, calib_limit=args.calib, batch_size=32, force=True,
                              recover_lr=args.recover_lr, progress=not args.quiet, **ratios, **extra)  # fmt: skip
            prune(args.teacher, data / "val", cfg)
        models[name] = target
        reports[name] = json.loads((target / "prune_report.json").read_text())

    results: dict[str, dict] = {}
    for name, model in models.items():
        bundle = out / "bundles" / name.split(",")[0].replace(" ", "_").replace("+", "") / model.name
        if not (bundle / "edgelvm.json").is_file():
            export(model, bundle, ExportConfig(max_length=128, force=True))
        metrics = evaluate(bundle, data / "test", EvalConfig(max_new_tokens=24, batch_size=32)).metrics
        rep = reports.get(name)
        results[name] = {
            "test_exact_match": metrics["exact_match"],
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
    return {"ratios": ratios, "gqa": args.gqa, "kept": first["kept"], "results": results, "time": time.ctime()}


def markdown(summary: dict) -> str:
    res = summary["results"]
    qtypes = sorted(res["teacher"]["per_type"])
    head = "| model | params | GFLOPs/image | MFLOPs/token | test EM | % of teacher | " + " | ".join(qtypes) + " |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, r in res.items():
        per = " | ".join(f"{r['per_type'][q]:.1%}" for q in qtypes)
        lines.append(
            f"| {name} | {r['parameters'] / 1e6:.2f}M | {r['flops_per_image'] / 1e9:.3f} | "
            f"{r['flops_per_token'] / 1e6:.2f} | {r['test_exact_match']:.1%} | {r['accuracy_vs_teacher']:.1%} | {per} |"
        )
    ratios = ", ".join(f"{k} {v:g}" for k, v in summary["ratios"].items())
    return "\n".join(lines) + f"\n\nRemoved: {ratios} (GQA mode {summary['gqa']}); shipped test split.\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=str(ROOT / "models" / "shapes-teacher"))
    p.add_argument("--vision-heads", type=float, default=0.5)
    p.add_argument("--text-heads", type=float, default=0.25)
    p.add_argument("--vision-mlp", type=float, default=0.3)
    p.add_argument("--text-mlp", type=float, default=0.3)
    p.add_argument("--gqa", default="expand")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--recover-steps", type=int, default=600)
    p.add_argument("--recover-lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/prune_shapes")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--quiet", action="store_true")
    return p


def main() -> None:
    args = parser().parse_args()
    summary = run(args)
    save_results(args.results, "prune_shapes", summary, markdown(summary))


if __name__ == "__main__":
    main()
