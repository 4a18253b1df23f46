"""Distillation on the shipped task: a <= 25%-size student taught by the shipped teacher vs. the same student trained
the same steps on the ground truth alone, side by side, measured in one run.

Both students are derived from the teacher the same way (fewer layers, narrower widths, initialised from its
leading weights); only the loss differs:

- ``distilled``: forward KL on the answer tokens + MSE on the projector's image features (learned projection);
- ``ground truth``: cross-entropy on the answer tokens only.

Each is exported to a bundle and evaluated with the torch-free runtime on the shipped test split (greedy, exact
match), as is the teacher. Results go to ``benchmarks/results/distill_shapes.{json,md}``.

    python benchmarks/distill_shapes.py                       # the full comparison (about 2 x the --steps time)
    python benchmarks/distill_shapes.py --steps 200 --out runs/distill_quick
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

RECIPES: dict[str, dict[str, float]] = {
    "distilled": {"kd_weight": 1.0, "feature_weight": 1.0, "hidden_weight": 1.0},
    "ground truth": {"kd_weight": 0.0, "ce_weight": 1.0},
}
#: all 4 decoder layers and 3 of 4 vision layers, at half width: 23.6% of the teacher's parameters.
STUDENT = "text_layers=4,text_hidden=128,text_intermediate=256,vision_layers=3,vision_hidden=96,vision_intermediate=384"


def run(args: argparse.Namespace) -> dict:
    import torch

    from edgelvm.data import write_shipped_splits
    from edgelvm.distill import DistillConfig, StudentSpec, distill
    from edgelvm.eval import EvalConfig, evaluate
    from edgelvm.export import ExportConfig, export

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    if not (data / "test" / "data.jsonl").is_file():
        write_shipped_splits(data, force=True)
    spec = StudentSpec.parse(args.student)
    rows: dict[str, dict] = {}
    for name in args.recipes:
        losses = RECIPES[name]
        student_dir = out / name.replace(" ", "_")
        if not (student_dir / "distill_report.json").is_file():
            cfg = DistillConfig(
                out=student_dir,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                warmup=args.steps // 20,
                save_every=max(1, args.steps // 4),
                val_data=data / "val",
                eval_limit=200,
                eval_every=500,
                progress=not args.quiet,
                resume=(student_dir / ".distill").is_dir(),
                **losses,
            )
            distill(args.teacher, spec, data / "train", cfg)
        report = json.loads((student_dir / "distill_report.json").read_text())
        rows[name] = {"model": student_dir, "report": report}
    rows["teacher"] = {"model": Path(args.teacher), "report": None}

    results: dict[str, dict] = {}
    for name, row in rows.items():
        bundle = out / "bundles" / name.replace(" ", "_")
        if not (bundle / "edgelvm.json").is_file():
            export(row["model"], bundle, ExportConfig(max_length=128, force=True))
        t = time.time()
        metrics = evaluate(bundle, data / "test", EvalConfig(max_new_tokens=24, batch_size=32)).metrics
        report = row["report"]
        results[name] = {
            "params": report["student_params"] if report else None,
            "train_minutes": round(report["wall_seconds"] / 60, 1) if report else None,
            "steps": report["steps"] if report else None,
            "test_exact_match": metrics["exact_match"],
            "per_type": {q: r["exact_match"] for q, r in metrics["per_type"].items()},
            "hallucination_rate": metrics["hallucination_rate"],
            "eval_seconds": round(time.time() - t, 1),
        }
    teacher_params = rows[args.recipes[0]]["report"]["teacher_params"]
    results["teacher"]["params"] = teacher_params
    for r in results.values():
        r["params_vs_teacher"] = round(r["params"] / teacher_params, 3)
        r["accuracy_vs_teacher"] = round(r["test_exact_match"] / results["teacher"]["test_exact_match"], 3)
    return {"student": args.student, "threads": args.threads, "results": results}


def markdown(summary: dict) -> str:
    res = summary["results"]
    qtypes = sorted(next(iter(res.values()))["per_type"])
    head = "| model | params | vs teacher | train min | test EM | % of teacher | " + " | ".join(qtypes) + " | halluc. |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, r in res.items():
        per = " | ".join(f"{r['per_type'][q]:.1%}" for q in qtypes)
        train = "-" if r["train_minutes"] is None else f"{r['train_minutes']}"
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r['params_vs_teacher']:.0%} | {train} | "
            f"{r['test_exact_match']:.1%} | {r['accuracy_vs_teacher']:.1%} | {per} | {r['hallucination_rate']:.1%} |"
        )
    return (
        "\n".join(lines) + f"\n\nStudent: `{summary['student']}`; {summary['threads']} threads; shipped test split.\n"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=str(ROOT / "models" / "shapes-teacher"))
    p.add_argument("--student", default=STUDENT)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/distill_shapes")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    return p


def main() -> None:
    args = parser().parse_args()
    summary = run(args)
    print(json.dumps(summary, indent=2, default=str))
    save_results(args.results, "distill_shapes", summary, markdown(summary))


if __name__ == "__main__":
    main()
