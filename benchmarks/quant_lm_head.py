"""A quantized LM head on the shipped teacher: INT4 layers (AWQ) with the head float, INT8 or INT4, and the token
table INT8 — accuracy against the fp32 bundle with paired 95% intervals, the quantize report's top-1 agreement of
each head with the float one (calibration answers), bundle bytes and decoder bytes per token.

Each variant is quantized from the teacher on the validation split, exported and evaluated with the torch-free
runtime on the shipped test split (greedy exact match; the same questions for every variant, so the difference to
fp32 is a paired bootstrap interval). Results: ``benchmarks/results/quant_lm_head.{json,md}``.

    python benchmarks/quant_lm_head.py
    python benchmarks/quant_lm_head.py --limit 300 --group 32
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

#: variant -> (LM head, token table) on top of INT4 AWQ layers
VARIANTS = {
    "INT4 awq, fp32 head": ("float", "float"),
    "INT4 awq, INT8 head": ("int8", "float"),
    "INT4 awq, INT4 head": ("int4", "float"),
    "INT4 awq, INT4 head, INT8 table": ("int4", "int8"),
}


def run(args: argparse.Namespace) -> dict:
    import torch

    from edgelvm.bench.runner import decoder_weight_bytes
    from edgelvm.data import write_shipped_splits
    from edgelvm.eval import EvalConfig, evaluate
    from edgelvm.eval.intervals import paired_difference
    from edgelvm.export import ExportConfig, export
    from edgelvm.manifest import Manifest
    from edgelvm.quantize import AWQConfig, quantize

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    if not (data / "test" / "data.jsonl").is_file():
        write_shipped_splits(data, sizes={"train": 10}, force=True)
    bundles = {"fp32": out / "bundles" / "fp32"}
    if not (bundles["fp32"] / "edgelvm.json").is_file():
        export(args.teacher, bundles["fp32"], ExportConfig(max_length=128, force=True))
    reports: dict[str, dict] = {}
    for name, (head, table) in VARIANTS.items():
        slug = f"awq_g{args.group}_head_{head}_table_{table}"
        ckpt, bundle = out / "models" / slug, out / "bundles" / slug
        if not (ckpt / "quant_report.json").is_file():
            config = AWQConfig(group_size=args.group, lm_head=head, embeddings=table)
            quantize(args.teacher, data / "val", config, out=ckpt, calib_limit=args.calib, force=True)
        reports[name] = json.loads((ckpt / "quant_report.json").read_text())
        if not (bundle / "edgelvm.json").is_file():
            export(ckpt, bundle, ExportConfig(max_length=128, force=True))
        bundles[name] = bundle

    eval_config = EvalConfig(max_new_tokens=24, batch_size=32, limit=args.limit, reference=bundles["fp32"],
                             agreement_limit=args.agreement)  # fmt: skip
    evaluated = {name: evaluate(bundle, data / "test", eval_config) for name, bundle in bundles.items()}
    base = [item.correct for item in evaluated["fp32"].items]
    rows = {}
    for name, report in evaluated.items():
        correct = [item.correct for item in report.items]
        diff, low, high = paired_difference(correct, base)
        manifest = Manifest.load(bundles[name])
        head = reports.get(name, {}).get("lm_head") or {}
        rows[name] = {
            "test_exact_match": report.metrics["exact_match"],
            "exact_match_ci95": report.metrics["exact_match_ci95"],
            "difference_vs_fp32_points": [round(100 * x, 2) for x in (diff, low, high)],
            "answer_top1_agreement_vs_fp32_bundle": report.metrics["reference"]["top1_agreement"],
            "head_top1_agreement_calibration": head.get("top1_agreement"),
            "head_output_error": head.get("output_error"),
            "bundle_bytes": sum(f.stat().st_size for f in bundles[name].iterdir()),
            "decoder_bytes_per_token": decoder_weight_bytes(bundles[name], manifest, "decoder_ort"),
            "table_precision": manifest.graphs["embed"].precision,
        }
    return {"results": rows, "group": args.group, "calib": args.calib, "limit": args.limit,
            "agreement": args.agreement, "model": args.teacher, "time": time.ctime()}  # fmt: skip


def markdown(summary: dict) -> str:
    head = ("| variant | test EM (95% CI) | Δ vs fp32, points (paired 95% CI) | answer top-1 agree vs fp32 "
            "| head top-1 agree (calibration) | head output err | decoder MB / token | bundle MB | table |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, r in summary["results"].items():
        low, high = r["exact_match_ci95"]
        d, dl, dh = r["difference_vs_fp32_points"]
        agree = r["head_top1_agreement_calibration"]
        err = r["head_output_error"]
        lines.append(
            f"| {name} | {r['test_exact_match']:.1%} ({low:.1%}–{high:.1%}) | "
            f"{'–' if name == 'fp32' else f'{d:+.1f} ({dl:+.1f} to {dh:+.1f})'} | "
            f"{r['answer_top1_agreement_vs_fp32_bundle']:.2%} | {'–' if agree is None else f'{agree:.2%}'} | "
            f"{'–' if err is None else f'{err:.4f}'} | {r['decoder_bytes_per_token'] / 1e6:.2f} | "
            f"{r['bundle_bytes'] / 1e6:.2f} | {r['table_precision']} |"
        )
    n = summary["limit"] or "all"
    return "\n".join(lines) + (
        f"\n\nShipped teacher, test split ({n} questions), greedy exact match; INT4 AWQ g{summary['group']} layers, "
        f"{summary['calib']} calibration records from the validation split (the head's agreement is measured on "
        "their answer positions, teacher-forced); answer top-1 agreement: teacher-forced along the fp32 bundle's "
        f"answers on {summary['agreement']} questions; decoder MB / token: the fused graph and the data it reads.\n"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=str(ROOT / "models" / "shapes-teacher"))
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="test questions (default: all 1000)")
    p.add_argument("--agreement", type=int, default=200, help="questions scored against fp32 by teacher forcing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/quant_lm_head")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="quant_lm_head", help="base name of the result files")
    return p


def main() -> None:
    args = parser().parse_args()
    summary = run(args)
    save_results(args.results, args.name, summary, markdown(summary))


if __name__ == "__main__":
    main()
