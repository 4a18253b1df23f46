"""Speculative decoding against the target alone, measured in one run (issue 24): decode tokens/s, acceptance and
time to first token per draft length ``k``, interleaved with the plain target, and whether every greedy answer is
token-for-token the target's own.

The target and the draft are bundles with one tokenizer (a distilled student, or the target's INT4 export). The
questions are the records of a dataset (``--data``: a ``data.jsonl`` directory, e.g. the scenes test split) or,
without one, a fixed prompt about a synthetic image forced to ``--max-new-tokens`` tokens (``min_new_tokens``, so
EOS never shortens a random-weight model's answer). Within a round every setting answers every question once, and
the settings' order rotates between rounds, so a noisy neighbour slows all of them alike.

    python benchmarks/speculative.py --target bundles/teacher --draft bundles/teacher-int4 \\
        --data data/scenes/test --qtype caption --limit 30 --tokens 2 4 6 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from results_io import save_results

from edgelvm.runtime import VLM


def questions(args: argparse.Namespace) -> list[tuple[list, str]]:
    """``(images, prompt)`` per question: dataset records, or one synthetic frame and prompt."""
    if args.data:
        from edgelvm.data.jsonl import load_jsonl_dataset

        records = [r for r in load_jsonl_dataset(args.data) if args.qtype in (None, r.qtype)][: args.limit]
        return [([str(r.image_path)] if r.image_path else [], r.question) for r in records]
    from PIL import Image

    rng = __import__("numpy").random.default_rng(0)
    frame = Image.fromarray(rng.integers(0, 255, size=(336, 336, 3), dtype="uint8"))
    return [([frame], "Describe everything you see in this picture, object by object.")] * args.limit


def run_setting(vlm: VLM, items: list[tuple[list, str]], tokens: int, args: argparse.Namespace) -> dict:
    """Answer every question with ``tokens`` draft tokens (0: the target alone); totals and the output ids."""
    decode_ms = first_ms = 0.0
    new = rounds = drafted = accepted = 0
    outputs = []
    forced = {"min_new_tokens": args.max_new_tokens} if not args.data else {}
    for images, prompt in items:
        vlm.generate(images, prompt, max_new_tokens=args.max_new_tokens, draft_tokens=tokens, **forced)
        s = vlm.last_stats
        first_ms += s.vision_ms + s.prefill_ms
        decode_ms += s.decode_ms
        new += max(s.new_tokens - 1, 0)
        rounds += s.speculative_rounds
        drafted += s.draft_tokens
        accepted += s.accepted_tokens
        outputs.append(list(vlm.last_output_ids[0]))
    return {"decode_ms": decode_ms, "first_ms": first_ms, "tokens": new, "rounds": rounds, "drafted": drafted,
            "accepted": accepted, "outputs": outputs}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, type=Path)
    p.add_argument("--draft", required=True, type=Path)
    p.add_argument("--data", type=Path, help="a data.jsonl directory (default: a synthetic frame and prompt)")
    p.add_argument("--limit", type=int, default=40, help="questions per setting and round")
    p.add_argument("--qtype", help="only the records of this question type (e.g. caption: the long answers)")
    p.add_argument("--tokens", type=int, nargs="+", default=[2, 4, 6], help="draft lengths k to compare")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--decoder", default="auto", help="the target's decoder graph: auto | fused | portable")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--name", default="speculative")
    args = p.parse_args()

    vlm = VLM.load(args.target, threads=args.threads, decoder=args.decoder, draft=args.draft,
                   draft_tokens=max(args.tokens))  # fmt: skip
    # the target alone as a user would run it: default session settings (spinning thread pools, which a pair turns
    # off: two sessions take turns on the same cores); the pair's own draft_tokens=0 row is the same graphs at the
    # pair's settings
    alone = VLM.load(args.target, threads=args.threads, decoder=args.decoder)
    items = questions(args)
    settings = [-1, 0, *args.tokens]  # -1: the target alone, default settings
    runner = {setting: (alone if setting < 0 else vlm) for setting in settings}
    for setting in settings:  # warm-up: sessions, caches, the image-feature caches of both bundles
        runner[setting].generate(*items[0], max_new_tokens=4, draft_tokens=max(setting, 0))
    totals: dict[int, list[dict]] = {k: [] for k in settings}
    for round_index in range(args.rounds):
        order = settings[round_index % len(settings) :] + settings[: round_index % len(settings)]
        for setting in order:
            totals[setting].append(run_setting(runner[setting], items, max(setting, 0), args))

    plain_outputs = totals[-1][0]["outputs"]
    rows, summary = [], {"target": str(args.target), "draft": str(args.draft), "questions": len(items),
                         "rounds": args.rounds, "max_new_tokens": args.max_new_tokens, "threads": args.threads,
                         "decoder": args.decoder, "load_average": os.getloadavg()[0], "settings": {}}  # fmt: skip
    base_rate = statistics.median(t["tokens"] / (t["decode_ms"] / 1e3) for t in totals[-1])
    for setting in settings:
        runs = totals[setting]
        rate = statistics.median(t["tokens"] / (t["decode_ms"] / 1e3) for t in runs)
        first = statistics.median(t["first_ms"] / len(items) for t in runs)
        drafted = sum(t["drafted"] for t in runs)
        acceptance = sum(t["accepted"] for t in runs) / drafted if drafted else None
        same = sum(o == b for t in runs for o, b in zip(t["outputs"], plain_outputs, strict=True))
        identical = same / (len(runs) * len(items))
        summary["settings"][setting] = {
            "decode_tokens_per_s": rate, "speedup": rate / base_rate, "first_token_ms": first,
            "acceptance": acceptance, "identical": identical,
            "runs": [{k: v for k, v in t.items() if k != "outputs"} for t in runs],
        }  # fmt: skip
        shown = "" if acceptance is None else f"{acceptance:.1%}"
        label = {-1: "target alone (default settings)", 0: "target alone (the pair's settings: no spinning)"}
        rows.append(f"| {label.get(setting, setting)} | {rate:.1f} | {rate / base_rate:.2f}x | {shown} | {first:.1f} | "
                    f"{identical:.0%} |")  # fmt: skip
    table = "\n".join([
        f"Speculative decoding: target {args.target.name}, draft {args.draft.name}; {len(items)} questions x "
        f"{args.rounds} rounds, medians over rounds; load average {summary['load_average']:.2f}",
        "",
        "| draft tokens k | decode tokens/s | speed-up | acceptance | first token ms | greedy == target alone |",
        "|---|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip
    save_results(args.results, args.name, summary, table + "\n")


if __name__ == "__main__":
    main()
