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
    python benchmarks/distill_shapes.py --task scenes --recipes distilled "ground truth" \
        "distilled, top-k cache" "ground truth, equal time"    # two student sizes, paired intervals
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

RECIPES: dict[str, dict[str, float]] = {
    "distilled": {"kd_weight": 1.0, "feature_weight": 1.0, "hidden_weight": 1.0},
    "ground truth": {"kd_weight": 0.0, "ce_weight": 1.0},
    # the teacher runs once over the data first; its top-k logits and image features then stand in for it
    "distilled, top-k cache": {"kd_weight": 1.0, "feature_weight": 1.0},
    # ground truth given the distilled recipe's wall time (run after both): more steps, since it runs no teacher
    "ground truth, equal time": {"kd_weight": 0.0, "ce_weight": 1.0},
}
#: all 4 decoder layers and 3 of 4 vision layers, at half width: 23.6% of the teacher's parameters.
STUDENT = "text_layers=4,text_hidden=128,text_intermediate=256,vision_layers=3,vision_hidden=96,vision_intermediate=384"
#: two student sizes of the scenes teacher (6+6 layers, 256/384 wide; heads keep its head_dim of 64 and the text
#: side its GQA group of 3): about 20% and 10% of its parameters
SCENES_STUDENTS = {
    "student-20%": "text_layers=4,text_hidden=192,text_intermediate=576,vision_layers=4,vision_hidden=128,"
    "vision_intermediate=512",
    # 192 wide: 3 query heads over 1 KV head (the teacher's GQA group of 3 must divide the student's heads)
    "student-10%": "text_layers=2,text_hidden=192,text_intermediate=384,vision_layers=3,vision_hidden=128,"
    "vision_intermediate=256",
}


def _students(args: argparse.Namespace) -> dict[str, str]:
    """name -> spec; a single student's rows carry no name prefix (the shapes results keep their names)."""
    if args.student:
        return {"": args.student}
    return SCENES_STUDENTS if args.task == "scenes" else {"": STUDENT}


def run(args: argparse.Namespace) -> dict:
    import torch

    from edgelvm.distill import DistillConfig, StudentSpec, distill
    from edgelvm.eval import EvalConfig, evaluate
    from edgelvm.export import ExportConfig, export

    torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    args.teacher = args.teacher or str(task.teacher)
    out = Path(args.out or f"runs/distill_{task.name}")
    data = out / "data"
    task.write_splits(data, train=args.train_size)
    students = _students(args)
    rows: dict[str, dict] = {}
    for prefix, student in students.items():
        spec = StudentSpec.parse(student)
        reports: dict[str, dict] = {}
        for name in args.recipes:
            steps = args.steps
            if name == "ground truth, equal time":
                if not {"distilled", "ground truth"} <= reports.keys():
                    raise SystemExit("'ground truth, equal time' needs the 'distilled' and 'ground truth' recipes")
                per_step = reports["ground truth"]["wall_seconds"] / reports["ground truth"]["steps"]
                steps = max(args.steps, round(reports["distilled"]["wall_seconds"] / per_step))
            label = f"{prefix}: {name}" if prefix else name
            student_dir = out / label.replace(":", "").replace(",", "").replace(" ", "_")
            if not (student_dir / "distill_report.json").is_file():
                cfg = DistillConfig(
                    out=student_dir,
                    steps=steps,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    warmup=steps // 20,
                    save_every=max(1, steps // 4),
                    val_data=data / "val",
                    eval_limit=200,
                    eval_every=500,
                    progress=not args.quiet,
                    resume=(student_dir / ".distill").is_dir(),
                    cache_teacher=out / "teacher_cache" if "cache" in name else None,
                    max_new_tokens=task.max_new_tokens,
                    **RECIPES[name],
                )
                distill(args.teacher, spec, data / "train", cfg)
            reports[name] = json.loads((student_dir / "distill_report.json").read_text())
            rows[label] = {"model": student_dir, "report": reports[name], "student": student}
    rows["teacher"] = {"model": Path(args.teacher), "report": None, "student": None}

    results: dict[str, dict] = {}
    scores: dict[str, list[int]] = {}
    for name, row in rows.items():
        bundle = out / "bundles" / name.replace(":", "").replace(",", "").replace(" ", "_")
        if not (bundle / "edgelvm.json").is_file():
            export(row["model"], bundle, ExportConfig(max_length=128, force=True))
        t = time.time()
        evaluation = evaluate(bundle, data / "test", EvalConfig(max_new_tokens=task.max_new_tokens, batch_size=32,
                                                                limit=args.limit))  # fmt: skip
        metrics = evaluation.metrics
        scores[name] = correctness(evaluation)
        report = row["report"]
        results[name] = {
            "params": report["student_params"] if report else None,
            "train_minutes": round(report["wall_seconds"] / 60, 1) if report else None,
            "steps": report["steps"] if report else None,
            "test_exact_match": metrics["exact_match"],
            "ci95": metrics["exact_match_ci95"],
            "per_type": {q: r["exact_match"] for q, r in metrics["per_type"].items()},
            "hallucination_rate": metrics["hallucination_rate"],
            "eval_seconds": round(time.time() - t, 1),
        }
    teacher_params = next(r["report"]["teacher_params"] for r in rows.values() if r["report"])
    results["teacher"]["params"] = teacher_params
    for r in results.values():
        r["params_vs_teacher"] = round(r["params"] / teacher_params, 3)
        r["accuracy_vs_teacher"] = round(r["test_exact_match"] / results["teacher"]["test_exact_match"], 3)
    pairs = []
    for prefix in students:
        def label(recipe: str, prefix: str = prefix) -> str:
            return f"{prefix}: {recipe}" if prefix else recipe

        pairs += [(label("distilled"), label("ground truth")), (label("distilled"), label("ground truth, equal time")),
                  (label("distilled, top-k cache"), label("distilled"))]  # fmt: skip
    return {"student": args.student or students, "task": task.name, "threads": args.threads, "results": results,
            "paired": paired_rows(scores, pairs), "scores": scores}  # fmt: skip


def markdown(summary: dict) -> str:
    res = summary["results"]
    qtypes = sorted(next(iter(res.values()))["per_type"])
    head = ("| model | params | vs teacher | steps | train min | test EM | 95% interval | % of teacher | "
            + " | ".join(qtypes) + " | halluc. |")  # fmt: skip
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, r in res.items():
        per = " | ".join(f"{r['per_type'][q]:.1%}" for q in qtypes)
        train = "-" if r["train_minutes"] is None else f"{r['train_minutes']}"
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r['params_vs_teacher']:.0%} | {r.get('steps') or '-'} | {train} | "
            f"{r['test_exact_match']:.1%} | {interval_text({'exact_match_ci95': r.get('ci95')})} | "
            f"{r['accuracy_vs_teacher']:.1%} | {per} | {r['hallucination_rate']:.1%} |"
        )
    students = summary["student"]
    described = (f"`{students}`" if isinstance(students, str)
                 else "; ".join(f"{k}: `{v}`" for k, v in students.items()))  # fmt: skip
    paired = paired_markdown(summary.get("paired", []))
    return (
        "\n".join(lines) + f"\n\nStudent: {described}; {summary['threads']} threads; shipped "
        f"{summary.get('task', 'shapes')} test split; 95% intervals: percentile bootstrap over questions.\n"
        + (f"\nPaired differences (the same questions, 2000 bootstrap resamples):\n\n{paired}" if paired else "")
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="shapes", choices=list(TASKS))
    p.add_argument("--teacher", default=None, help="default: the task's shipped teacher")
    p.add_argument("--student", default=None, help="one student spec (default: the task's one or two students)")
    p.add_argument("--limit", type=int, default=None, help="test questions (default: all)")
    p.add_argument("--train-size", type=int, default=None, help="train records written (default: the task's)")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="default: runs/distill_<task>")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--recipes", nargs="+", default=["distilled", "ground truth"], choices=list(RECIPES))
    p.add_argument("--name", default=None, help="base name of the result files (default: distill_<task>)")
    return p


def main() -> None:
    args = parser().parse_args()
    summary = run(args)
    print(json.dumps(summary, indent=2, default=str))
    save_results(args.results, args.name or f"distill_{args.task}", summary, markdown(summary))


if __name__ == "__main__":
    main()
