"""``edgelvm bench`` on ONNX Runtime CPU: the shipped teacher's bundle and the realistic-shape bundle, fused and
portable decoder graphs, in one run, against this machine's measured memory bandwidth (issue 7).

Builds what is missing under ``--workdir`` (the teacher export takes ~10 s; the realistic CLIP-B/16 +
SmolLM2-135M-shaped bundle is built by ``bench_models.prepare``, ~4 minutes the first time, and shared with
``roofline.py`` / ``runtime_vs_hf.py``), then runs the CLI verb itself (``python -m edgelvm.cli bench``) in a fresh
process so that its peak RSS is the bench's own, and copies ``report.json`` / ``report.md`` / ``latency.png`` (~12 KB)
to ``benchmarks/results/bench_teacher_realistic.{json,md,png}``. The report records the 1-minute load average
before and after: on a shared machine, rerun when "after" is much above what the bench itself adds (~1.5 on 2 cores).

    python benchmarks/bench_cpu.py                         # runs 10, warm-up 2, 64 new tokens
    python benchmarks/bench_cpu.py --runs 3 --name bench_quick
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

TEACHER = ROOT / "models" / "shapes-teacher"


def teacher_bundle(workdir: Path, max_length: int) -> Path:
    bundle = workdir / "teacher"
    if not (bundle / "decoder_ort.onnx").is_file():
        from edgelvm.export import ExportConfig, export

        print("[teacher] exporting …", file=sys.stderr)
        report = export(TEACHER, bundle, ExportConfig(max_length=max_length, force=True))
        print(f"[teacher] exported in {report.seconds:.0f} s", file=sys.stderr)
    return bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="bench_teacher_realistic", help="results file stem")
    args = parser.parse_args()

    from bench_models import prepare

    teacher = teacher_bundle(args.workdir, max_length=256)
    _, realistic = prepare("realistic", args.workdir)
    report_dir = args.workdir / f"report-{args.name}"
    command = [
        sys.executable, "-m", "edgelvm.cli", "bench", str(teacher), str(realistic),
        "--backend", "onnxruntime-cpu", "--decoder", "fused", "--decoder", "portable",
        "--runs", str(args.runs), "--warmup", str(args.warmup), "--gen-len", str(args.gen_len),
        "--prompt-len", str(args.prompt_len), "--threads", str(args.threads), "-o", str(report_dir),
    ]  # fmt: skip
    print("$ " + " ".join(command[2:]).replace("edgelvm.cli", "edgelvm", 1), file=sys.stderr)
    subprocess.run(command, check=True, cwd=ROOT)
    results = ROOT / "benchmarks" / "results"
    for suffix, source in ((".json", "report.json"), (".md", "report.md"), (".png", "latency.png")):
        shutil.copyfile(report_dir / source, results / f"{args.name}{suffix}")
    print(f"written: {results / args.name}.{{json,md,png}}", file=sys.stderr)


if __name__ == "__main__":
    main()
