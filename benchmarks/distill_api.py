"""A teacher you can only call: the shipped teacher behind ``edgelvm serve`` (loopback, the ``openai`` client)
teaches a derived student through the API, next to the same student distilled from the local teacher (logit KD)
and trained on the ground truth, the same steps, batch and learning rate.

- ``API teacher``: the served teacher answers every training record once (cached), the student learns its text
  (cross-entropy; ``edgelvm serve`` returns no logprobs, so no token-level KD);
- ``local teacher (logit KD)``: forward KL on the answer tokens against the teacher's full distribution;
- ``ground truth``: cross-entropy on the dataset's answers.

Accuracy: teacher-forced exact match on a held-out split (the trainer's own end-of-run evaluation: every answer
token argmax-right, which equals greedy decoding reproducing the answer). Results go to
``benchmarks/results/distill_api.{json,md}``.

    python benchmarks/distill_api.py                    # 1000 records, 600 steps of 16 (about 10 minutes on 2 cores)
    python benchmarks/distill_api.py --records 200 --steps 50 --out runs/distill_api_quick
"""

from __future__ import annotations

import argparse
import json
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_io import save_results  # noqa: E402 (benchmarks/ is the script directory: on sys.path)

STUDENT = "text_layers=4,text_hidden=128,text_intermediate=256,vision_layers=3,vision_hidden=96,vision_intermediate=384"
RECIPES = {
    "API teacher (its text, CE)": {"kd_weight": 0.0, "ce_weight": 1.0, "api": True},
    "local teacher (logit KD)": {"kd_weight": 1.0},
    "ground truth (CE)": {"kd_weight": 0.0, "ce_weight": 1.0},
}


@contextmanager
def serve(bundle: Path, model_id: str):
    """``edgelvm serve`` on an ephemeral loopback port; yields (base URL, health URL)."""
    code = "from edgelvm.serve.cli import main; main()"
    cmd = [sys.executable, "-c", code, str(bundle), "--port", "0", "--model-id", model_id, "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        port = None
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line.startswith("edgelvm serve:"):
                port = int(line.rsplit(":", 1)[1])
        if port is None:
            raise SystemExit("edgelvm serve did not start")
        health = f"http://127.0.0.1:{port}/health"
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(health, timeout=5).read()
                break
            except OSError:
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1", health
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run(args: argparse.Namespace) -> dict:
    import torch

    from edgelvm.data import write_split
    from edgelvm.distill import DistillConfig, StudentSpec, TeacherAPIConfig, distill
    from edgelvm.export import ExportConfig, export

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    train, val = out / "data" / "train", out / "data" / "val"
    if not (train / "data.jsonl").is_file():
        write_split(train, seed=101, n=args.records, force=True)
    if not (val / "data.jsonl").is_file():
        write_split(val, seed=102, n=args.val, force=True)
    bundle = out / "teacher-bundle"
    if not (bundle / "edgelvm.json").is_file():
        export(args.teacher, bundle, ExportConfig(max_length=128, force=True))
    spec = StudentSpec.parse(args.student)
    results = {}
    with serve(bundle, "shapes-teacher") as (url, health):
        for name, recipe in RECIPES.items():
            recipe = dict(recipe)
            api = None
            if recipe.pop("api", False):
                api = TeacherAPIConfig(
                    url=url,
                    model="shapes-teacher",
                    max_tokens=24,
                    concurrency=args.concurrency,
                    cache=out / "teacher_api_cache",  # shared by reruns: the teacher answers each record once
                )
            student_dir = out / name.split(" (")[0].replace(" ", "_")
            if not (student_dir / "distill_report.json").is_file():
                cfg = DistillConfig(
                    out=student_dir,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    warmup=max(1, args.steps // 20),
                    save_every=args.steps,
                    val_data=val,
                    eval_limit=args.val,
                    progress=not args.quiet,
                    seed=args.seed,
                    resume=(student_dir / ".distill").is_dir(),
                    teacher_api=api,
                    **recipe,
                )
                distill(args.teacher, spec, train, cfg)
            report = json.loads((student_dir / "distill_report.json").read_text())
            api_stats = report.get("teacher_api") or {}
            results[name] = {
                "val_exact_match": report["evals"][-1]["val_exact_match"],
                "wall_seconds": report["wall_seconds"],
                "samples_per_second": report["samples_per_second"],
                "teacher_api": api_stats or None,
            }
        served = json.loads(urllib.request.urlopen(health, timeout=5).read())["counts"]
    stamps = sorted(json.loads(f.read_text())["at"] for f in (out / "teacher_api_cache").glob("??/*.json"))
    return {
        "student": args.student,
        "student_params": report["student_params"],
        "records": args.records,
        "val": args.val,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "threads": args.threads,
        "server_counts": served,
        "answering_seconds": round(stamps[-1] - stamps[0], 1) if len(stamps) > 1 else None,
        "results": results,
    }


def markdown(summary: dict) -> str:
    res = summary["results"]
    qtypes = sorted(q for q in next(iter(res.values()))["val_exact_match"] if q != "all")
    head = "| student taught by | val EM | " + " | ".join(qtypes) + " | wall s |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, r in res.items():
        em = r["val_exact_match"]
        per = " | ".join(f"{em[q]:.1%}" for q in qtypes)
        lines.append(f"| {name} | {em['all']:.1%} | {per} | {r['wall_seconds']:.0f} |")
    api = next((r["teacher_api"] for r in res.values() if r["teacher_api"]), None)
    note = (
        f"\n\nStudent `{summary['student']}` ({summary['student_params'] / 1e6:.2f}M), {summary['steps']} steps of "
        f"{summary['batch_size']}, lr {summary['lr']}, {summary['records']} training records, {summary['val']} "
        f"held-out questions (teacher-forced exact match), {summary['threads']} threads."
    )
    if api:
        note += (
            f" API teacher: {api['answered']} answers used, {api['malformed']} malformed, {api['asked']} asked in "
            f"this run, {api['from_cache']} from the cache; the server counted {summary['server_counts']}."
        )
    if summary.get("answering_seconds"):
        note += f" Answering all records took {summary['answering_seconds']:.0f} s (first to last answer)."
    return "\n".join(lines) + note + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=str(ROOT / "models" / "shapes-teacher"))
    p.add_argument("--student", default=STUDENT)
    p.add_argument("--records", type=int, default=1000)
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--out", default="runs/distill_api")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--quiet", action="store_true")
    return p


def main() -> None:
    args = parser().parse_args()
    summary = run(args)
    save_results(args.results, "distill_api", summary, markdown(summary))


if __name__ == "__main__":
    main()
