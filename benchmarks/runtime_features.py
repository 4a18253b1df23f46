"""What the runtime's reuse features buy: the image-feature cache, KV reuse across chat turns, and shared-prefix
batching — each measured against the same work done without it, on the same bundle, in one process.

(a) Time to first token of a second question about the same image, with the image-feature cache and without
    (``VLM.load(..., vision_cache_mb=0)``); ``images_encoded`` must be 0 for the cached question.
(b) Turn 2 of a chat: ``vlm.chat(image).ask(...)`` twice (turn 2 prefills only its new tokens) against a stateless
    call with the whole conversation (``stream_requests([Request(images, messages)])``) — prefill tokens and time,
    and whether both give the same tokens.
(c) K questions about one image: one ``generate_batch`` (the shared prefix, image included, prefilled once) against
    K calls one by one.

TTFT is measured as a ``max_new_tokens=1`` call (prefill + first sampled token): the realistic bundle reuses the
tiny tokenizer, so many of its ids decode to no text and "first streamed piece" would not be a token. Medians over
``--repeats``; every repeat uses a fresh image, so the first question about it is always a cache miss.

    python benchmarks/runtime_features.py                           # tiny bundle only
    python benchmarks/runtime_features.py --models tiny,realistic   # + realistic shape (first export ~2 min)
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_models import prepare

Q1 = "What is on the table?"
Q2 = "And what colour is it?"
QUESTIONS = [
    "What is on the table?",
    "How many people are in the picture?",
    "Is there a dog?",
    "Where is the cat?",
    "Describe the image in one sentence.",
    "What colour is the car?",
    "Is the door open?",
    "Read the sign.",
]


# ---- setup ----------------------------------------------------------------------------------------------------------
def images(count: int, size: int = 224) -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return (time.perf_counter() - started) * 1e3, out


def median(rows: list[dict], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


# ---- (a) image-feature cache --------------------------------------------------------------------------------------
def bench_vision_cache(bundle: Path, frames: list[Any], threads: int) -> dict:
    from edgelvm.runtime import VLM

    result = {}
    for name, cache_mb in (("no_cache", 0), ("cache", 64)):
        vlm = VLM.load(bundle, threads=threads, vision_cache_mb=cache_mb)
        vlm.generate(frames[-1], Q1, max_new_tokens=1)  # warm-up (session allocation, first-run kernels)
        rows = []
        for frame in frames[:-1]:
            vlm.generate(frame, Q1, max_new_tokens=1)  # the first question about this frame: always encoded
            ms, _ = timed(lambda frame=frame, vlm=vlm: vlm.generate(frame, Q2, max_new_tokens=1))
            s = vlm.last_stats
            rows.append(
                {
                    "ttft_ms": ms,
                    "vision_ms": s.vision_ms,
                    "prefill_ms": s.prefill_ms,
                    "images_encoded": s.images_encoded,
                    "image_cache_hits": s.image_cache_hits,
                }
            )
        result[name] = {
            "ttft_ms": median(rows, "ttft_ms"),
            "vision_ms": median(rows, "vision_ms"),
            "prefill_ms": median(rows, "prefill_ms"),
            "images_encoded": max(r["images_encoded"] for r in rows),  # the worst repeat: must be 0 with the cache
            "image_cache_hits": min(r["image_cache_hits"] for r in rows),
        }
    return result


# ---- (b) KV reuse across chat turns -------------------------------------------------------------------------------
def bench_chat_reuse(bundle: Path, frames: list[Any], threads: int, answer_tokens: int) -> dict:
    from edgelvm.runtime import VLM, GenerationConfig, Request

    vlm = VLM.load(bundle, threads=threads)
    reuse_rows, stateless_rows, same = [], [], []
    for frame in frames:
        session = vlm.chat(frame)
        session.ask(Q1, max_new_tokens=answer_tokens, min_new_tokens=answer_tokens)
        conversation = [*session.messages, {"role": "user", "content": [{"type": "text", "text": Q2}]}]
        ms, _ = timed(lambda session=session: session.ask(Q2, max_new_tokens=1))
        reuse_rows.append(_turn_row(ms, vlm.last_stats))
        reuse_ids = list(vlm.last_output_ids[0])

        request = Request(images=[frame], messages=conversation)
        ms, _ = timed(lambda request=request: list(vlm.stream_requests([request], GenerationConfig(max_new_tokens=1))))
        stateless_rows.append(_turn_row(ms, vlm.last_stats))
        same.append(reuse_ids == list(vlm.last_output_ids[0]))
    keys = ("ms", "prefill_tokens", "reused_tokens", "prefill_ms", "vision_ms", "prompt_tokens")
    return {
        "chat_reuse": {k: median(reuse_rows, k) for k in keys},
        "stateless": {k: median(stateless_rows, k) for k in keys},
        "same_first_token": all(same),
    }


def _turn_row(ms: float, stats: Any) -> dict:
    keys = ("prefill_tokens", "reused_tokens", "prefill_ms", "vision_ms", "prompt_tokens")
    return {"ms": ms, **{k: getattr(stats, k) for k in keys}}


# ---- (c) shared-prefix batch --------------------------------------------------------------------------------------
def bench_batch(bundle: Path, frames: list[Any], threads: int, questions: int, tokens: int) -> dict:
    from edgelvm.runtime import VLM

    vlm = VLM.load(bundle, threads=threads)
    asked = QUESTIONS[:questions]
    options = {"max_new_tokens": tokens, "min_new_tokens": tokens}
    batch_rows, serial_rows = [], []
    for frame in frames:
        vlm.generate(frame, "Warm.", max_new_tokens=1)  # both sides find the image features cached
        ms, _ = timed(lambda frame=frame: vlm.generate_batch([(frame, q) for q in asked], **options))
        s = vlm.last_stats
        batch_rows.append(
            {"ms": ms, "prefill_tokens": s.prefill_tokens, "reused_tokens": s.reused_tokens, "prefill_ms": s.prefill_ms}
        )
        totals = {"ms": 0.0, "prefill_tokens": 0, "reused_tokens": 0, "prefill_ms": 0.0}
        for question in asked:
            ms, _ = timed(lambda question=question, frame=frame: vlm.generate(frame, question, **options))
            s = vlm.last_stats
            totals["ms"] += ms
            totals["prefill_tokens"] += s.prefill_tokens
            totals["reused_tokens"] += s.reused_tokens
            totals["prefill_ms"] += s.prefill_ms
        serial_rows.append(totals)
    keys = ("ms", "prefill_tokens", "reused_tokens", "prefill_ms")
    return {
        "questions": questions,
        "new_tokens_each": tokens,
        "batch": {k: median(batch_rows, k) for k in keys},
        "one_by_one": {k: median(serial_rows, k) for k in keys},
    }


# ---- report ---------------------------------------------------------------------------------------------------------
def bench_model(kind: str, bundle: Path, args: argparse.Namespace) -> dict:
    frames = images(args.repeats + 1)
    print(f"[{kind}] (a) image-feature cache …", file=sys.stderr)
    cache = bench_vision_cache(bundle, frames, args.threads)
    print(f"[{kind}] (b) chat KV reuse …", file=sys.stderr)
    chat = bench_chat_reuse(bundle, frames[: args.repeats], args.threads, args.answer_tokens)
    print(f"[{kind}] (c) shared-prefix batch …", file=sys.stderr)
    batch = bench_batch(bundle, frames[: args.repeats], args.threads, args.questions, args.batch_tokens)
    return {"model": kind, "bundle": str(bundle), "vision_cache": cache, "chat": chat, "batch": batch}


def markdown(results: list[dict]) -> str:
    lines = [
        "| model | feature | measure | without | with | speed-up |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]

    def row(model: str, feature: str, measure: str, without: float, with_: float, fmt: str = ".1f") -> None:
        ratio = f"{without / with_:.2f}×" if with_ > 0 else "—"
        lines.append(f"| {model} | {feature} | {measure} | {without:{fmt}} | {with_:{fmt}} | {ratio} |")

    for r in results:
        m, c, ch, b = r["model"], r["vision_cache"], r["chat"], r["batch"]
        row(m, "image cache", "TTFT of 2nd question (ms)", c["no_cache"]["ttft_ms"], c["cache"]["ttft_ms"])
        row(m, "image cache", "vision stage of 2nd question (ms)", c["no_cache"]["vision_ms"], c["cache"]["vision_ms"])
        lines.append(
            f"| {m} | image cache | images encoded for 2nd question | {c['no_cache']['images_encoded']} | "
            f"{c['cache']['images_encoded']} | |"
        )
        s, k = ch["stateless"], ch["chat_reuse"]
        row(m, "chat KV reuse", "turn-2 prefill tokens", s["prefill_tokens"], k["prefill_tokens"], ".0f")
        row(m, "chat KV reuse", "turn-2 prefill (ms)", s["prefill_ms"], k["prefill_ms"])
        row(m, "chat KV reuse", "turn-2 TTFT (ms)", s["ms"], k["ms"])
        row(m, "chat KV reuse", "turn-2 image preprocess + cache lookup (ms)", s["vision_ms"], k["vision_ms"])
        lines.append(
            f"| {m} | chat KV reuse | reused tokens / prompt tokens | 0 / {s['prompt_tokens']:.0f} | "
            f"{k['reused_tokens']:.0f} / {k['prompt_tokens']:.0f} | same first token: {ch['same_first_token']} |"
        )
        o, bb = b["one_by_one"], b["batch"]
        label = f"{b['questions']} questions × {b['new_tokens_each']} tokens"
        row(m, "shared-prefix batch", f"{label}: total (ms)", o["ms"], bb["ms"])
        row(m, "shared-prefix batch", "prefill tokens run", o["prefill_tokens"], bb["prefill_tokens"], ".0f")
        row(m, "shared-prefix batch", "prefill (ms)", o["prefill_ms"], bb["prefill_ms"])
        lines.append(
            f"| {m} | shared-prefix batch | reused tokens | {o['reused_tokens']:.0f} | {bb['reused_tokens']:.0f} | |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny, realistic")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--answer-tokens", type=int, default=16, help="length of the turn-1 answer in (b)")
    parser.add_argument("--questions", type=int, default=4, help="questions per image in (c)")
    parser.add_argument("--batch-tokens", type=int, default=8, help="new tokens per question in (c)")
    args = parser.parse_args()
    if not 1 <= args.questions <= len(QUESTIONS):
        parser.error(f"--questions must be in 1..{len(QUESTIONS)}")
    logging.basicConfig(level=logging.WARNING)
    results = []
    for kind in [m.strip() for m in args.models.split(",") if m.strip()]:
        if kind not in ("tiny", "realistic"):
            parser.error(f"unknown model {kind!r}: use tiny, realistic")
        results.append(bench_model(kind, prepare(kind, args.workdir)[1], args))
    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "out")},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime_features.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(results))
    print(f"\nwrote {args.out / 'runtime_features.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
