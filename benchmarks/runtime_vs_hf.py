"""edgelvm runtime (ONNX Runtime CPU, fp32) vs Hugging Face ``generate`` (PyTorch eager, fp32), in one run.

For a realistic-shape LLaVA (CLIP ViT-B/16 + SmolLM2-135M-shaped Llama, random weights) and a tiny one, measures
vision-encoder ms, prefill ms, decode tokens/s and peak RSS of each side, plus this machine's memory bandwidth and
decode tokens/s as a fraction of the bandwidth roofline (decoder weight bytes read per token / bandwidth).

Each side runs in its own process (so peak RSS is its own, and the runtime process never imports torch), and the
two alternate over ``--rounds`` rounds; the table shows medians with min–max, since shared machines are noisy.

    python benchmarks/runtime_vs_hf.py                      # both models, JSON + markdown to benchmarks/results/
    python benchmarks/runtime_vs_hf.py --models tiny --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_models import prepare, prepare_int4

PROMPT = "Describe the image in detail."
THREADS = 2


# ---- workers (run in child processes) -------------------------------------------------------------------------------
def _image(size: int):
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _peak_rss_mb() -> float:
    """This process's peak resident memory. /proc's VmHWM, not getrusage: ru_maxrss survives exec, so a child
    would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # non-Linux fallback


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def worker_runtime(bundle: str, tokens: int, repeats: int, decoder: str = "auto") -> dict:
    from edgelvm.runtime import VLM

    vlm = VLM.load(bundle, backend="onnxruntime-cpu", threads=THREADS, decoder=decoder)
    image = _image(256)
    vlm.generate(image, PROMPT, max_new_tokens=4)  # warm-up
    pixels = vlm.preprocessor([image])
    vision_ms = _median_ms(lambda: vlm.backend.encode_images(pixels), repeats)
    prefill, decode = [], []
    for _ in range(repeats):
        vlm.generate(image, PROMPT, max_new_tokens=tokens, min_new_tokens=tokens)
        prefill.append(vlm.last_stats.prefill_ms)
        decode.append(vlm.last_stats.decode_tokens_per_s)
    return {
        "vision_ms": vision_ms,
        "prefill_ms": statistics.median(prefill),
        "prompt_tokens": vlm.last_stats.prompt_tokens,
        "decode_tok_s": statistics.median(decode),
        "peak_rss_mb": _peak_rss_mb(),
        "torch_imported": "torch" in sys.modules,
    }


def worker_hf(checkpoint: str, tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(THREADS)
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[_image(256)], text=[text], return_tensors="pt")

    def run(n: int) -> None:
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with torch.inference_mode():
        run(4)  # warm-up
        pixels = inputs["pixel_values"]
        vision_ms = _median_ms(lambda: model.model.get_image_features(pixel_values=pixels), repeats)
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        features = torch.cat(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
        mask = (inputs["input_ids"] == model.config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(mask, features)
        prefill_ms = _median_ms(
            lambda: model(
                inputs_embeds=embeds, attention_mask=inputs["attention_mask"], use_cache=True, logits_to_keep=1
            ),
            repeats,
        )
        decode = []
        for _ in range(repeats):
            one = _median_ms(lambda: run(1), 1)
            full = _median_ms(lambda: run(tokens), 1)
            decode.append((tokens - 1) / ((full - one) / 1e3))
    return {
        "vision_ms": vision_ms,
        "prefill_ms": prefill_ms,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "decode_tok_s": statistics.median(decode),
        "peak_rss_mb": _peak_rss_mb(),
    }


# ---- orchestration --------------------------------------------------------------------------------------------------
SIDES = {
    "runtime-fused": "edgelvm runtime, fused decoder (ORT CPU)",
    "runtime-portable": "edgelvm runtime, portable decoder (ORT CPU)",
    "hf": "HF generate (PyTorch eager)",
}
#: With --int4: the INT4 (RTN g128) language model on the fused decoder (MatMulNBits), accuracy_level 0 and 4, with
#: the LM head float or INT4 (``edgelvm quantize --lm-head int4``): side -> (label, accuracy level, head format).
INT4_VARIANTS = {
    "runtime-int4": ("INT4 layers, fp32 head (accuracy_level 0)", 0, "float"),
    "runtime-int4-al4": ("INT4 layers, fp32 head (accuracy_level 4)", 4, "float"),
    "runtime-int4-head4": ("INT4 layers + INT4 head (accuracy_level 0)", 0, "int4"),
    "runtime-int4-head4-al4": ("INT4 layers + INT4 head (accuracy_level 4)", 4, "int4"),
}
INT4_SIDES = {side: f"edgelvm runtime, fused: {label}" for side, (label, _, _) in INT4_VARIANTS.items()}


def _child(side: str, path: Path, tokens: int, repeats: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--path",
        str(path),
        "--tokens",
        str(tokens),
        "--repeats",
        str(repeats),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{side} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def kernels_per_step(graph: Path) -> int:
    """Nodes of the graph as ONNX Runtime runs it (after its own optimisations): one kernel launch each."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        return len(onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node)


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_model(
    kind: str, workdir: Path, tokens: int, rounds: int, repeats: int, bandwidth: float, int4: bool = False
) -> dict:
    from edgelvm.bench.runner import decoder_weight_bytes
    from edgelvm.manifest import Manifest

    checkpoint, bundle = prepare(kind, workdir)
    paths = {"runtime-fused": bundle, "runtime-portable": bundle, "hf": checkpoint}
    if int4:
        for side, (_, level, head) in INT4_VARIANTS.items():
            paths[side] = prepare_int4(kind, workdir, accuracy_level=level, lm_head=head)
    runs: dict[str, list[dict]] = {side: [] for side in paths}
    for round_index in range(rounds):
        for side, path in paths.items():
            print(f"[{kind}] round {round_index + 1}/{rounds}: {side}", file=sys.stderr)
            runs[side].append(_child(side, path, tokens, repeats))
    # Decode reads the decoder's weights once per token; the embedding table is gathered, not read.
    weight_bytes = sum(p.stat().st_size for p in bundle.glob("decoder.onnx*"))
    roofline = bandwidth / weight_bytes
    result = {
        "model": kind,
        "decoder_weight_bytes": weight_bytes,
        "roofline_tok_s": roofline,
        "sides": {},
        "kernels_per_decode_step": {
            "runtime-portable": kernels_per_step(bundle / "decoder.onnx"),
            "runtime-fused": kernels_per_step(bundle / "decoder_ort.onnx"),
        },
    }
    side_bytes = {side: weight_bytes for side in paths}
    for side in INT4_VARIANTS:
        if side in paths:
            result["kernels_per_decode_step"][side] = kernels_per_step(paths[side] / "decoder_ort.onnx")
            # what a step reads: the graph and every external-data region it points at (a tied INT4 head's codes
            # lie in the embedding table's file)
            side_bytes[side] = decoder_weight_bytes(paths[side], Manifest.load(paths[side]), "decoder_ort")
            result.setdefault("decoder_bytes_per_token", {})[side] = side_bytes[side]
            result.setdefault("bundle_bytes", {})[side] = sum(f.stat().st_size for f in paths[side].iterdir())
    for side, side_runs in runs.items():
        metrics = {
            key: _summary([r[key] for r in side_runs])
            for key in ("vision_ms", "prefill_ms", "decode_tok_s", "peak_rss_mb")
        }
        metrics["prompt_tokens"] = side_runs[0]["prompt_tokens"]
        metrics["roofline_tok_s"] = bandwidth / side_bytes[side]
        metrics["roofline_fraction"] = metrics["decode_tok_s"]["median"] / metrics["roofline_tok_s"]
        if side != "hf":
            metrics["torch_imported"] = any(r["torch_imported"] for r in side_runs)
        result["sides"][side] = metrics
    hf = result["sides"]["hf"]
    result["ratios_over_hf"] = {
        side: {
            "decode_speedup": m["decode_tok_s"]["median"] / hf["decode_tok_s"]["median"],
            "vision_speedup": hf["vision_ms"]["median"] / m["vision_ms"]["median"],
            "prefill_speedup": hf["prefill_ms"]["median"] / m["prefill_ms"]["median"],
            "peak_rss_ratio": m["peak_rss_mb"]["median"] / hf["peak_rss_mb"]["median"],
        }
        for side, m in result["sides"].items()
        if side != "hf"
    }
    return result


def markdown(results: list[dict], bandwidth: float, tokens: int) -> str:
    def cell(m: dict, fmt: str) -> str:
        return f"{m['median']:{fmt}} ({m['min']:{fmt}}–{m['max']:{fmt}})"

    lines = [
        f"Memory bandwidth (numpy copy, read+write): **{bandwidth / 1e9:.1f} GB/s**; {tokens} new tokens, batch 1, "
        f"{THREADS} threads, fp32; medians (min–max) over rounds.",
        "",
        "| model | side | vision ms | prefill ms (tokens) | decode tok/s | roofline tok/s | of roofline "
        "| peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for side, name in {**SIDES, **INT4_SIDES}.items():
            if side not in r["sides"]:
                continue
            m = r["sides"][side]
            lines.append(
                f"| {r['model']} | {name} | {cell(m['vision_ms'], '.1f')} | {cell(m['prefill_ms'], '.1f')} "
                f"({m['prompt_tokens']}) | {cell(m['decode_tok_s'], '.1f')} | {m['roofline_tok_s']:.1f} | "
                f"{m['roofline_fraction']:.0%} | {cell(m['peak_rss_mb'], '.0f')} |"
            )
    lines += [
        "",
        "| model | runtime | decode speed-up | vision speed-up | prefill speed-up | peak RSS ratio "
        "| kernels per decode step |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for side, q in r["ratios_over_hf"].items():
            lines.append(
                f"| {r['model']} | {side} | {q['decode_speedup']:.2f}x | {q['vision_speedup']:.2f}x | "
                f"{q['prefill_speedup']:.2f}x | {q['peak_rss_ratio']:.2f} | "
                f"{r['kernels_per_decode_step'][side]} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="realistic,tiny")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--name", default="runtime_vs_hf", help="Base name of the JSON / markdown written to --out.")
    parser.add_argument("--int4", action="store_true", help="Add INT4 (RTN g128) fused-decoder sides.")
    parser.add_argument("--worker", choices=[*SIDES, *INT4_SIDES], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "hf":
        print(json.dumps(worker_hf(args.path, args.tokens, args.repeats)))
        return
    if args.worker:
        decoder = "fused" if args.worker.startswith("runtime-int4") else args.worker.removeprefix("runtime-")
        print(json.dumps(worker_runtime(args.path, args.tokens, args.repeats, decoder=decoder)))
        return

    from edgelvm.devices.roofline import measure_read_bandwidth

    bandwidth = measure_read_bandwidth()
    results = [
        bench_model(kind, args.workdir, args.tokens, args.rounds, args.repeats, bandwidth, args.int4)
        for kind in args.models.split(",")
    ]
    report = {"bandwidth_bytes_per_s": bandwidth, "tokens": args.tokens, "threads": THREADS, "results": results}
    table = markdown(results, bandwidth, args.tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
