"""A hybrid decoder at a real shape: edgelvm runtime (ONNX Runtime CPU, fp32) vs Hugging Face ``generate``
(PyTorch eager, fp32) on a Qwen3.5-0.8B-shaped checkpoint with random weights, in one run.

The checkpoint is built from transformers' ``Qwen3_5Config`` with Qwen3.5-0.8B's public sizes (:data:`SHAPES`): 24
layers, 18 Gated DeltaNet (linear attention, a fixed-size state each) and 6 gated full-attention layers (every 4th),
1024 wide, 248320-token vocabulary, tied embeddings; the 12-layer 768-wide tower. The tiny byte-level tokenizer is
reused (as ``build_realistic_llava`` does): ids beyond its vocabulary decode to nothing, irrelevant for speed and
memory. Checkpoint and bundle are cached under ``--workdir`` (``runs/bench/hybrid/<shape>/``).

Measured as ``benchmarks/runtime_vs_hf.py`` does: each side in its own process (its own peak RSS; the runtime
process never imports torch), the sides alternating over ``--rounds`` rounds, medians with min–max, decode tokens/s
and the ratio to HF within the same run. The bundle's decoder is the portable one (the fused decoder is Llama-family
only); its linear layers run the gated delta rule as one ONNX ``Scan`` per layer, token by token, in prefill as in
decode — so a profile of one prefill and a few decode steps (ORT's profiler, per operator type) is reported too.
A second table: the per-sequence memory of the cache from the manifest (``kv_cache.states`` vs keys/values per
token) against an all-attention model of the same shape.

    python benchmarks/hybrid_decode.py                 # Qwen3.5-0.8B shape; JSON + markdown to benchmarks/results/
    python benchmarks/hybrid_decode.py --small --rounds 1 --tokens 16   # a smoke test in a minute
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from results_io import save_results
from runtime_vs_hf import _peak_rss_mb

PROMPT = "Describe the image in detail."
THREADS = 2
#: Context lengths the memory table compares the hybrid cache with an all-attention one at.
CONTEXTS = (4096, 32768)

#: shape -> (text config, vision config, image side in pixels). ``qwen3_5-0.8b``: Qwen/Qwen3.5-0.8B's config.json;
#: a 448-px image gives 28×28 patches merged 2×2 = 196 image tokens (the realistic LLaVA's count).
SHAPES: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {
    "qwen3_5-0.8b": (
        dict(
            vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
            full_attention_interval=4, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
            linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
            linear_conv_kernel_dim=4, max_position_embeddings=262144, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000000, "mrope_section": [11, 11, 10],
                             "mrope_interleaved": True, "partial_rotary_factor": 0.25},
        ),
        dict(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12, out_hidden_size=1024, patch_size=16,
             spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304),
        448,
    ),
    "small": (
        dict(
            vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, full_attention_interval=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_num_key_heads=4,
            linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64, linear_conv_kernel_dim=4,
            max_position_embeddings=4096, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000000, "mrope_section": [3, 3, 2],
                             "mrope_interleaved": True, "partial_rotary_factor": 0.25},
        ),
        dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256, patch_size=16,
             spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304),
        224,
    ),
}  # fmt: skip


# ---- the checkpoint and the bundle ----------------------------------------------------------------------------------
def build_qwen3_5(out_dir: Path, shape: str, seed: int = 0) -> Path:
    """A random-weight ``Qwen3_5ForConditionalGeneration`` of ``shape`` with Qwen3.5's image processor
    (``Qwen2VLImageProcessorPil``: 16-px patches merged 2×2, mean = std = 0.5, at least 256×256 pixels)."""
    import torch
    from transformers import Qwen2VLImageProcessorPil, Qwen3_5Config, Qwen3_5ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from edgelvm.models.synthetic import QWEN_VL_TOKENS, TINY_QWEN3_VL_CHAT_TEMPLATE, build_tiny_tokenizer

    hf_logging.disable_progress_bar()
    text, vision, _ = SHAPES[shape]
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(named_tokens=QWEN_VL_TOKENS)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in QWEN_VL_TOKENS.items()}
    interval = text["full_attention_interval"]
    layer_types = [
        "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(text["num_hidden_layers"])
    ]
    config = Qwen3_5Config(
        text_config={**text, "layer_types": layer_types, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={**vision, "in_channels": 3},
        image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"],
        tie_word_embeddings=text["tie_word_embeddings"],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [ids["im_end_token"], tokenizer.eos_token_id]
    model.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(
        min_pixels=256 * 256, max_pixels=1024 * 1024, patch_size=16, merge_size=2, temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(out_dir)  # fmt: skip
    tokenizer.chat_template = TINY_QWEN3_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return out_dir


def prepare(shape: str, workdir: Path, max_length: int) -> tuple[Path, Path, dict[str, float]]:
    """``(checkpoint, bundle, seconds)``: built and exported once under ``workdir/<shape>``; ``seconds`` holds what
    this call spent building / exporting (empty when both were cached)."""
    checkpoint, bundle = workdir / shape / "model", workdir / shape / "bundle"
    seconds: dict[str, float] = {}
    if not (checkpoint / "config.json").is_file():
        print(f"[{shape}] building checkpoint …", file=sys.stderr)
        started = time.perf_counter()
        build_qwen3_5(checkpoint, shape)
        seconds["build_s"] = time.perf_counter() - started
    if not (bundle / "edgelvm.json").is_file():
        from edgelvm.export import ExportConfig, export

        print(f"[{shape}] exporting …", file=sys.stderr)
        report = export(checkpoint, bundle, ExportConfig(max_length=max_length, force=True))
        seconds["export_s"] = report.seconds
        print(f"[{shape}] exported in {report.seconds:.0f} s", file=sys.stderr)
    return checkpoint, bundle, seconds


# ---- workers (run in child processes) -------------------------------------------------------------------------------
def _image(size: int):
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _ms(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def worker_runtime(bundle: str, tokens: int, repeats: int, image_size: int) -> dict:
    from edgelvm.runtime import VLM

    # image-feature cache off: every request runs the tower, as HF's does
    vlm = VLM.load(bundle, backend="onnxruntime-cpu", threads=THREADS, vision_cache_mb=0)
    image = _image(image_size)
    vlm.generate(image, PROMPT, max_new_tokens=4)  # warm-up
    vision, prefill, decode = [], [], []
    for _ in range(repeats):
        vlm.generate(image, PROMPT, max_new_tokens=tokens, min_new_tokens=tokens)
        stats = vlm.last_stats
        vision.append(stats.vision_ms)
        prefill.append(stats.prefill_ms)
        decode.append(stats.decode_tokens_per_s)
    return {
        "vision_ms": statistics.median(vision),
        "prefill_ms": statistics.median(prefill),
        "prompt_tokens": vlm.last_stats.prompt_tokens,
        "decode_tok_s": statistics.median(decode),
        "peak_rss_mb": _peak_rss_mb(),
        "output_ids": vlm.last_output_ids[0],
        "torch_imported": "torch" in sys.modules,
    }


def worker_hf(checkpoint: str, tokens: int, repeats: int, image_size: int) -> dict:
    """HF's forward has no prefill-only entry point for an image prompt (the M-RoPE positions are computed from the
    image grid inside it), so prefill = one forward over the prompt with the image − the tower alone."""
    import torch
    from transformers import AutoModelForImageTextToText

    from edgelvm.models.qwen3_5 import Qwen3_5Adapter

    torch.set_num_threads(THREADS)
    processor = Qwen3_5Adapter.load_processor(checkpoint)  # Qwen3VLProcessor without its torchvision video part
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[_image(image_size)], text=[text], return_tensors="pt")

    def run(n: int) -> Any:
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    vision, forward, decode = [], [], []
    with torch.inference_mode():
        output = run(4)  # warm-up
        for _ in range(repeats):
            vision.append(_ms(lambda: model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])))
            forward.append(_ms(lambda: model(**inputs, use_cache=True, logits_to_keep=1)))
            one = _ms(lambda: run(1))
            started = time.perf_counter()
            output = run(tokens)
            full = (time.perf_counter() - started) * 1e3
            decode.append((tokens - 1) / ((full - one) / 1e3))
    return {
        "vision_ms": statistics.median(vision),
        "prefill_ms": statistics.median(forward) - statistics.median(vision),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "decode_tok_s": statistics.median(decode),
        "peak_rss_mb": _peak_rss_mb(),
        "output_ids": output[0, inputs["input_ids"].shape[1] :].tolist(),
    }


def worker_profile(bundle: str, prompt_tokens: int, steps: int) -> dict:
    """ORT's profile of the decoder graph alone: one prefill of ``prompt_tokens`` random embeddings, then ``steps``
    one-token decode steps; milliseconds per top-level operator type (a ``Scan``'s body counts inside it)."""
    import onnx
    import onnxruntime as ort

    from edgelvm.manifest import Manifest

    manifest = Manifest.load(bundle)
    spec, kv = manifest.graphs["decoder"], manifest.kv_cache
    path = str(Path(bundle) / spec.file)
    top_level = {node.name: node.op_type for node in onnx.load(path, load_external_data=False).graph.node}
    hidden = int(next(t for t in spec.inputs if t.name == "inputs_embeds").shape[-1])
    past, present = kv.io_names()
    rng = np.random.default_rng(0)
    empty = [np.zeros((1, kv.num_kv_heads, 0, kv.head_dim), np.float32)] * (2 * kv.num_layers)
    empty += [np.zeros((1, *s.shape), np.float32) for s in kv.states or []]

    def sequence(session: Any) -> tuple[float, float]:
        """A warm-up prefill, a timed prefill and ``steps`` decode steps: (prefill ms, median step ms)."""

        def step(start: int, stop: int, cache: list) -> list:
            feeds = {
                "inputs_embeds": rng.standard_normal((1, stop - start, hidden)).astype(np.float32) * 0.02,
                "attention_mask": np.ones((1, stop), np.int64),
                "position_ids": np.broadcast_to(np.arange(start, stop), (3, 1, stop - start)).astype(np.int64),
                **dict(zip(past, cache)),
            }
            return session.run(present, feeds)

        step(0, prompt_tokens, empty)
        started = time.perf_counter()
        cache = step(0, prompt_tokens, empty)
        prefill_ms, times = (time.perf_counter() - started) * 1e3, []
        for i in range(steps):
            started = time.perf_counter()
            cache = step(prompt_tokens + i, prompt_tokens + i + 1, cache)
            times.append((time.perf_counter() - started) * 1e3)
        return prefill_ms, statistics.median(times)

    def options(profile_prefix: str | None) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.log_severity_level = 3
        if profile_prefix:
            options.enable_profiling, options.profile_file_prefix = True, profile_prefix
        return options

    # first unprofiled: the profiler logs every node of every Scan iteration, which slows what it measures
    plain = sequence(ort.InferenceSession(path, options(None), providers=["CPUExecutionProvider"]))
    with tempfile.TemporaryDirectory() as tmp:
        session = ort.InferenceSession(path, options(str(Path(tmp) / "decoder")), providers=["CPUExecutionProvider"])
        sequence(session)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-(steps + 1) :]

    def by_op(run: dict) -> dict[str, float]:
        totals: dict[str, float] = {}
        for e in events:
            node = e["name"].removesuffix("_kernel_time")
            inside = run["ts"] <= e["ts"] <= run["ts"] + run["dur"]
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and node in top_level and inside:
                totals[top_level[node]] = totals.get(top_level[node], 0.0) + e["dur"] / 1e3
        return totals

    prefill = by_op(runs[0])
    decode = [by_op(r) for r in runs[1:]]
    ops = sorted({op for d in decode for op in d} | set(prefill))
    return {
        "prompt_tokens": prompt_tokens,
        "unprofiled_prefill_ms": plain[0],
        "unprofiled_decode_step_ms": plain[1],
        "prefill_ms": runs[0]["dur"] / 1e3,
        "prefill_ms_by_op": prefill,
        "decode_step_ms": statistics.median(r["dur"] / 1e3 for r in runs[1:]),
        "decode_step_ms_by_op": {op: statistics.median(d.get(op, 0.0) for d in decode) for op in ops},
        "scan_nodes": sum(op == "Scan" for op in top_level.values()),
        "nodes": len(top_level),
    }


# ---- orchestration --------------------------------------------------------------------------------------------------
SIDES = {"runtime": "edgelvm runtime, portable decoder (ORT CPU)", "hf": "HF generate (PyTorch eager)"}


def _child(side: str, path: Path, args: argparse.Namespace, image_size: int, extra: list[str] = ()) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    cmd = [sys.executable, __file__, "--worker", side, "--path", str(path), "--tokens", str(args.tokens),
           "--repeats", str(args.repeats), "--image-size", str(image_size), *extra]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{side} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def cache_memory(bundle: Path) -> dict:
    """The cache's bytes per sequence from the manifest: keys/values per token of the attention layers, the
    constant states of the linear ones, and what keys/values in every layer (all-attention, same heads) would take."""
    from edgelvm.manifest import Manifest

    kv = Manifest.load(bundle).kv_cache
    element = {"float32": 4, "float16": 2, "bfloat16": 2}[kv.dtype]
    per_layer = 2 * kv.num_kv_heads * kv.head_dim * element
    layers = len(set(kv.kv_layers) | {s.layer for s in kv.states or []})
    hybrid_token, state = len(kv.kv_layers) * per_layer, kv.state_bytes(batch=1)
    return {
        "layers": layers,
        "attention_layers": len(kv.kv_layers),
        "kv_bytes_per_token": hybrid_token,
        "state_bytes": state,
        "all_attention_kv_bytes_per_token": layers * per_layer,
        "contexts": {
            n: {"hybrid_bytes": state + n * hybrid_token, "all_attention_bytes": n * layers * per_layer}
            for n in CONTEXTS
        },
        "break_even_tokens": state / ((layers - len(kv.kv_layers)) * per_layer) if layers > len(kv.kv_layers) else 0,
    }


def bench(shape: str, args: argparse.Namespace) -> dict:
    from edgelvm.bench.runner import decoder_weight_bytes
    from edgelvm.devices.roofline import measure_read_bandwidth
    from edgelvm.manifest import Manifest

    checkpoint, bundle, seconds = prepare(shape, args.workdir, args.max_length)
    image_size = SHAPES[shape][2]
    paths = {"runtime": bundle, "hf": checkpoint}
    runs: dict[str, list[dict]] = {side: [] for side in paths}
    for round_index in range(args.rounds):
        for side, path in paths.items():
            print(f"[{shape}] round {round_index + 1}/{args.rounds}: {side}", file=sys.stderr)
            runs[side].append(_child(side, path, args, image_size))
    prompt_tokens = runs["runtime"][0]["prompt_tokens"]
    profile = None
    if args.profile_steps:
        print(f"[{shape}] profiling the decoder graph …", file=sys.stderr)
        profile = _child("profile", bundle, args, image_size, ["--prompt-tokens", str(prompt_tokens),
                                                                "--steps", str(args.profile_steps)])  # fmt: skip
    bandwidth = measure_read_bandwidth()
    # what a decode step reads: the graph and its external-data regions (the tied head lies in embed.npy)
    weight_bytes = decoder_weight_bytes(bundle, Manifest.load(bundle), "decoder")
    result: dict[str, Any] = {
        "shape": shape,
        "text_config": SHAPES[shape][0],
        "vision_config": SHAPES[shape][1],
        "image_size": image_size,
        **seconds,
        "bandwidth_bytes_per_s": bandwidth,
        "decoder_weight_bytes": weight_bytes,
        "roofline_tok_s": bandwidth / weight_bytes,
        "sides": {},
        "cache_memory": cache_memory(bundle),
        "decoder_profile": profile,
    }
    for side, side_runs in runs.items():
        metrics: dict[str, Any] = {
            key: _summary([r[key] for r in side_runs])
            for key in ("vision_ms", "prefill_ms", "decode_tok_s", "peak_rss_mb")
        }
        metrics["prompt_tokens"] = side_runs[0]["prompt_tokens"]
        metrics["prefill_ms_per_token"] = metrics["prefill_ms"]["median"] / metrics["prompt_tokens"]
        metrics["decode_ms_per_token"] = 1e3 / metrics["decode_tok_s"]["median"]
        metrics["roofline_fraction"] = metrics["decode_tok_s"]["median"] / result["roofline_tok_s"]
        if side == "runtime":
            metrics["torch_imported"] = any(r["torch_imported"] for r in side_runs)
        result["sides"][side] = metrics
    rt, hf = result["sides"]["runtime"], result["sides"]["hf"]
    result["ratios_over_hf"] = {
        "decode_speedup": rt["decode_tok_s"]["median"] / hf["decode_tok_s"]["median"],
        "vision_speedup": hf["vision_ms"]["median"] / rt["vision_ms"]["median"],
        "prefill_speedup": hf["prefill_ms"]["median"] / rt["prefill_ms"]["median"],
        "peak_rss_ratio": rt["peak_rss_mb"]["median"] / hf["peak_rss_mb"]["median"],
    }
    ours, theirs = runs["runtime"][-1]["output_ids"], runs["hf"][-1]["output_ids"]
    result["greedy_tokens_equal_hf"] = {"prefix": _common_prefix(ours, theirs), "of": len(theirs)}
    return result


def markdown(r: dict, tokens: int) -> str:
    def cell(m: dict, fmt: str) -> str:
        return f"{m['median']:{fmt}} ({m['min']:{fmt}}–{m['max']:{fmt}})"

    q, agree = r["ratios_over_hf"], r["greedy_tokens_equal_hf"]
    lines = [
        f"{r['shape']}, random weights: a {r['image_size']}-px image + {r['sides']['runtime']['prompt_tokens']}-token "
        f"prompt, {tokens} new tokens, batch 1, {THREADS} threads, fp32; medians (min–max) over rounds. Roofline: "
        f"{r['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (numpy copy) / {r['decoder_weight_bytes'] / 1e9:.2f} GB "
        f"decoder = {r['roofline_tok_s']:.1f} tok/s.",
        "",
        "| side | vision ms | prefill ms (ms / prompt token) | decode tok/s (ms / token) | of roofline | peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for side, name in SIDES.items():
        m = r["sides"][side]
        lines.append(
            f"| {name} | {cell(m['vision_ms'], '.0f')} | {cell(m['prefill_ms'], '.0f')} "
            f"({m['prefill_ms_per_token']:.1f}) | {cell(m['decode_tok_s'], '.1f')} ({m['decode_ms_per_token']:.1f}) "
            f"| {m['roofline_fraction']:.0%} | {cell(m['peak_rss_mb'], '.0f')} |"
        )
    lines += [
        "",
        f"Runtime / HF in the same run: decode {q['decode_speedup']:.2f}x, vision {q['vision_speedup']:.2f}x, "
        f"prefill {q['prefill_speedup']:.2f}x, peak RSS {q['peak_rss_ratio']:.2f}. Greedy tokens equal to HF's: "
        f"first {agree['prefix']} of {agree['of']} (random weights: near-tied logits may part later). HF on a CPU "
        "runs its reference PyTorch code for the causal convolution and the gated delta rule (causal-conv1d and "
        "flash-linear-attention are GPU kernels): what a CPU user of `generate` gets.",
    ]
    if r.get("decoder_profile"):
        p = r["decoder_profile"]
        prefill_ops, step_ops = sum(p["prefill_ms_by_op"].values()), sum(p["decode_step_ms_by_op"].values())
        scan_prefill, scan_step = p["prefill_ms_by_op"].get("Scan", 0.0), p["decode_step_ms_by_op"].get("Scan", 0.0)
        top = sorted(p["prefill_ms_by_op"].items(), key=lambda kv: -kv[1])[:4]
        lines += [
            "",
            f"Decoder graph alone (ORT profiler, operator time; {p['nodes']} nodes, {p['scan_nodes']} `Scan`; "
            f"the profiled prefill / step took {p['prefill_ms']:.0f} / {p['decode_step_ms']:.1f} ms, unprofiled "
            f"{p['unprofiled_prefill_ms']:.0f} / {p['unprofiled_decode_step_ms']:.1f} ms — the profiler logs every "
            f"node of every `Scan` iteration, so read the `Scan` figures as upper bounds): "
            f"a {p['prompt_tokens']}-token prefill {prefill_ops:.0f} ms, of which `Scan` {scan_prefill:.0f} ms "
            f"({scan_prefill / prefill_ops:.0%}; {scan_prefill / p['prompt_tokens']:.2f} ms per prefill token, "
            f"{scan_prefill / p['prompt_tokens'] / p['scan_nodes'] * 1e3:.0f} µs per token and layer); a decode step "
            f"{step_ops:.1f} ms, of which `Scan` {scan_step:.2f} ms. Prefill by operator: "
            + ", ".join(f"{op} {ms:.0f} ms" for op, ms in top)
            + ".",
        ]
    c = r["cache_memory"]
    mib = 2**20
    lines += [
        "",
        f"Cache per sequence (fp32, from the manifest): {c['attention_layers']} of {c['layers']} layers keep keys and "
        f"values ({c['kv_bytes_per_token'] / 1024:.0f} KiB per token); the other {c['layers'] - c['attention_layers']}"
        f" keep fixed states ({c['state_bytes'] / mib:.1f} MiB in all, any length). All-attention with the same heads: "
        f"{c['all_attention_kv_bytes_per_token'] / 1024:.0f} KiB per token; the states cost as much as "
        f"{c['break_even_tokens']:.0f} tokens of the missing layers' keys and values.",
        "",
        "| context | hybrid: KV + states | all-attention KV | ratio |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for n, m in c["contexts"].items():
        lines.append(
            f"| {int(n)} | {m['hybrid_bytes'] / mib:.0f} MiB | {m['all_attention_bytes'] / mib:.0f} MiB | "
            f"{m['hybrid_bytes'] / m['all_attention_bytes']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="A small shape (256 wide, 4 layers, 4096 vocab).")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench/hybrid"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default=None, help="Base name of the results (default hybrid_decode[_small]).")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--profile-steps", type=int, default=8, help="Decode steps to profile (0: no profile).")
    parser.add_argument("--worker", choices=[*SIDES, "profile"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "hf":
        print(json.dumps(worker_hf(args.path, args.tokens, args.repeats, args.image_size)))
        return
    if args.worker == "runtime":
        print(json.dumps(worker_runtime(args.path, args.tokens, args.repeats, args.image_size)))
        return
    if args.worker == "profile":
        print(json.dumps(worker_profile(args.path, args.prompt_tokens, args.steps)))
        return

    shape = "small" if args.small else "qwen3_5-0.8b"
    started = time.perf_counter()
    load_before = os.getloadavg()
    result = bench(shape, args)
    result.update(
        tokens=args.tokens, rounds=args.rounds, repeats=args.repeats, threads=THREADS,
        wall_s=time.perf_counter() - started, load_average_before=load_before, load_average_after=os.getloadavg(),
    )  # fmt: skip
    save_results(args.out, args.name or ("hybrid_decode_small" if args.small else "hybrid_decode"), result,
                 markdown(result, args.tokens))  # fmt: skip


if __name__ == "__main__":
    main()
