"""Export at real sizes: wall time, peak RSS and bundle bytes against the checkpoint's bytes, per model size.

Random-weight LLaVA-layout checkpoints with the shapes of real models (their public config.json values; the tiny
byte-level tokenizer is reused, which is irrelevant for time and memory). Each export runs as ``edgelvm export`` in
its own process; peak RSS is sampled from /proc every 50 ms over the whole process tree (resident file pages of
the memory-mapped safetensors included, as the kernel counts them), and per phase of the export (its progress log
lines, ``edgelvm -v``: printed, and ``phases`` in the JSON), which says where the peak is.

Each bundle then answers one question about a picture in its own measured process (load, vision, prefill, decode
tokens/s, peak RSS). With ``--parity-layers N`` (the default for fp16 shapes), a copy of the same checkpoint cut to
its first N language-model layers (every other weight the same bytes) is exported the same way, and its greedy
tokens are compared with PyTorch's on that copy, in the checkpoint's dtype — the whole model's PyTorch reference
would need a second copy of the weights (and in fp16, days of CPU time).

    python benchmarks/scale.py                         # every shape that fits this machine; table + JSON + plot
    python benchmarks/scale.py --models smollm2-135m qwen2-0.5b
    python benchmarks/scale.py --models llava-1.5-7b   # fp16, a 14 GB checkpoint; about 20 GB of disk per copy
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

#: name -> (vision overrides, image size, patch, text kind, text overrides, export dtype)
SHAPES: dict[str, tuple[dict, int, int, str, dict, str]] = {
    # CLIP ViT-B/16 at 224 + SmolLM2-135M (edgelvm.models.synthetic.build_realistic_llava)
    "smollm2-135m": (
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12), 224, 16, "llama",
        dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048, rope_theta=100000.0),
        "fp32",
    ),
    # CLIP ViT-L/14-336 + Qwen2-0.5B (LLaVA-OneVision-0.5B's language model; the 0.8B class of issue 19)
    "qwen2-0.5b": (
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16), 336, 14, "qwen2",
        dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0),
        "fp32",
    ),
    # CLIP ViT-L/14-336 + Qwen2-1.5B (Qwen2-VL-2B's language model size)
    "qwen2-1.5b": (
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16), 336, 14, "qwen2",
        dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
             num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0),
        "fp32",
    ),
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 + Llama-2-7B (Vicuna), fp16
    "llava-1.5-7b": (
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16), 336, 14, "llama",
        dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, tie_word_embeddings=False, max_position_embeddings=4096, torch_dtype="float16"),
        "fp16",
    ),
}
DEFAULT = ["smollm2-135m", "qwen2-0.5b"]


def build(name: str, out: Path) -> Path:
    from edgelvm.models.synthetic import build_tiny_llava

    vision, image, patch, text, text_overrides, dtype = SHAPES[name]
    if not (out / "config.json").exists():
        build_tiny_llava(out, text=text, vision="clip", image_size=image, patch_size=patch, vision_overrides=vision,
                         text_overrides=text_overrides, dtype="float16" if dtype == "fp16" else "float32")  # fmt: skip
    return out


def _tree_rss(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of ``pid`` and its children, in bytes. RssAnon leaves out the resident pages of the
    memory-mapped checkpoint, which are clean file pages the kernel can drop and read again."""
    rss = anon = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, anon


def run_measured(command: list[str]) -> tuple[float, int, int, int, list[dict]]:
    """Wall seconds, peak RSS bytes, peak anonymous RSS bytes, exit code of ``command``, and its phases: each
    progress log line (``-v``) with the peak RSS and anonymous RSS until the next one — where the peak is."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, last = [0, 0], [0, 0]
    phases: list[dict] = [{"phase": "start", "at_s": 0.0, "peak_rss_bytes": 0, "peak_anon_bytes": 0}]

    def sample() -> None:
        while proc.poll() is None:
            rss, anon = _tree_rss(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
            last[:] = rss, anon
            phase = phases[-1]
            phase["peak_rss_bytes"] = max(phase["peak_rss_bytes"], rss)
            phase["peak_anon_bytes"] = max(phase["peak_anon_bytes"], anon)
            time.sleep(0.05)

    def read_log() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("INFO ") and not line.startswith("INFO edgelvm"):
                continue  # the ONNX exporter's passes
            sys.stderr.write(line)
            if line.startswith("INFO edgelvm"):  # a phase starts, at the memory the last sample saw
                at = round(time.perf_counter() - started, 1)
                phases.append({"phase": line.split(": ", 1)[-1].strip()[:80], "at_s": at, "peak_rss_bytes": last[0],
                               "peak_anon_bytes": last[1]})  # fmt: skip

    sampler = threading.Thread(target=sample, daemon=True)
    reader = threading.Thread(target=read_log, daemon=True)
    sampler.start()
    reader.start()
    code = proc.wait()
    sampler.join()
    reader.join()
    return time.perf_counter() - started, peak[0], peak[1], code, phases


PROMPT = "Describe the picture."
PICTURE = 336  # pixels; each bundle's preprocessing resizes it, as HF's processor does


def picture(size: int) -> object:
    """A deterministic test picture: a colour gradient with a few bright squares."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype(np.uint8)
    for i in range(4):
        rgb[40 * i + 10 : 40 * i + 40, 60 * i + 10 : 60 * i + 40] = (255, 255 - 60 * i, 60 * i)
    return Image.fromarray(rgb)


def answer(bundle: Path, out: Path, tokens: int) -> None:
    """Child process: load ``bundle``, answer one question about the picture, write the timings and token ids."""
    from edgelvm.runtime import VLM

    started = time.perf_counter()
    vlm = VLM.load(bundle)
    loaded = time.perf_counter() - started
    vlm.generate(picture(PICTURE), PROMPT, max_new_tokens=tokens)
    stats = vlm.last_stats
    out.write_text(json.dumps({
        "load_s": round(loaded, 1), "vision_ms": round(stats.vision_ms), "prefill_ms": round(stats.prefill_ms),
        "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
        "decode_tok_s": round(stats.decode_tokens_per_s, 2), "ids": vlm.last_output_ids[0],
    }))  # fmt: skip


def run_answer(bundle: Path, tokens: int) -> dict:
    """:func:`answer` in its own process, measured (peak RSS of the runtime with the bundle loaded)."""
    out = bundle.parent / f"{bundle.name}.answer.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--answer", str(bundle), str(out), "--tokens", str(tokens)]
    seconds, peak, anon, code, _ = run_measured(command)
    result = json.loads(out.read_text()) if code == 0 else {}
    return {**result, "run_s": round(seconds, 1), "run_peak_rss_bytes": peak, "run_peak_anon_bytes": anon,
            "run_exit": code}  # fmt: skip


_TEXT_LAYER = re.compile(r"language_model\.(?:model\.)?layers\.(\d+)\.")


def truncate(checkpoint: Path, out: Path, layers: int) -> Path:
    """A copy of ``checkpoint`` with only its first ``layers`` language-model layers; every kept tensor is the
    same bytes. Streams tensor by tensor through the shards (never the whole model in memory)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for path in checkpoint.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and not path.name.endswith(".index.json"):
            shutil.copy2(path, out / path.name)
    config = json.loads((checkpoint / "config.json").read_text())
    text = config["text_config"]
    old = text["num_hidden_layers"]
    for key, value in list(text.items()):  # per-layer lists (layer_types) follow the layer count
        if isinstance(value, list) and len(value) == old:
            text[key] = value[:layers]
    text["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config, indent=2))
    weight_map = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            kept = {k: f.get_tensor(k) for k in f.keys()  # noqa: SIM118 (safe_open is not a dict)
                    if not ((m := _TEXT_LAYER.search(k)) and int(m.group(1)) >= layers)}  # fmt: skip
        if kept:
            save_file(kept, str(out / shard.name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(kept, shard.name))
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def pytorch_greedy(checkpoint: Path, dtype: str, tokens: int) -> list[int]:
    """PyTorch's greedy answer (``generate``) to the same question, in the checkpoint's dtype."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(
        checkpoint, dtype=torch.float16 if dtype == "fp16" else torch.float32
    ).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[picture(PICTURE)], text=[text], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ids = ids.tolist()
    return next((ids[: i + 1] for i, t in enumerate(ids) if t in eos), ids)


def truncated_parity(name: str, checkpoint: Path, work: Path, layers: int, tokens: int, command: list[str]) -> dict:
    """Export the first ``layers`` layers of ``checkpoint`` as the full model was (``command`` with its paths
    replaced) and compare the bundle's greedy tokens with PyTorch's on that copy."""
    copy = truncate(checkpoint, work / "truncated" / "checkpoint", layers)
    bundle = work / "truncated" / "bundle"
    command = [str(copy) if c == str(checkpoint) else str(bundle) if c.endswith("bundle") else c for c in command]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runtime = run_answer(bundle, tokens).get("ids", [])
    reference = pytorch_greedy(copy, SHAPES[name][5], tokens)
    same = next((i for i, (a, b) in enumerate(zip(runtime, reference)) if a != b), min(len(runtime), len(reference)))
    shutil.rmtree(work / "truncated")
    return {"layers": layers, "tokens": len(reference), "equal": runtime == reference, "common_prefix": same,
            "runtime_ids": runtime, "pytorch_ids": reference}  # fmt: skip


def quantized_row(edgelvm: str, checkpoint: Path, args: argparse.Namespace, method: str, dtype: str = "fp32") -> dict:
    """``edgelvm quantize --llm METHOD`` (INT4 g128, calibrated on shapes records), its export and one answer,
    each measured in its own process. ``--layerwise``: one decoder layer at a time, the model in its own dtype."""
    work = checkpoint.parent
    calib = calibration_records(edgelvm, work, args.calib_limit)
    tag = f"{method}-layerwise" if args.layerwise else method
    quantized, bundle = work / f"int4-{tag}", work / f"bundle-int4-{tag}"
    mode = ["--layerwise", "--dtype", dtype] if args.layerwise else []
    seconds, peak, anon, code, _ = run_measured([
        edgelvm, "-v", "quantize", str(checkpoint), "--calib", str(calib), "-o", str(quantized), "--llm", method,
        "--vision", "none", "--group-size", "128", "--calib-limit", str(args.calib_limit), "--force",
        "--batch-size", str(args.calib_batch), *mode,
    ])  # fmt: skip
    row = {"method": tag, "quantize_s": round(seconds, 1), "quantize_peak_rss_bytes": peak,
           "quantize_peak_anon_bytes": anon, "quantize_exit": code}  # fmt: skip
    if code == 0:
        seconds, peak, anon, code, _ = run_measured([
            edgelvm, "-v", "export", str(quantized), "-o", str(bundle), "--force", "--max-length",
            str(args.max_length),
        ])  # fmt: skip
        row.update(export_s=round(seconds, 1), export_peak_rss_bytes=peak, export_peak_anon_bytes=anon,
                   export_exit=code)  # fmt: skip
        if code == 0:
            row["bundle_bytes"] = _bytes(bundle, (".onnx", ".data", ".npy"))
            row["run"] = run_answer(bundle, args.tokens)
    return row


def calibration_records(edgelvm: str, work: Path, n: int) -> Path:
    calib = work / "calib"
    if not (calib / "data.jsonl").exists():
        subprocess.run([edgelvm, "data", "shapes", "-o", str(calib), "--n", str(n), "--force"], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    return calib


def pruned_row(edgelvm: str, checkpoint: Path, args: argparse.Namespace) -> dict:
    """``edgelvm prune`` (activation importance, no recovery) measured in its own process."""
    work = checkpoint.parent
    calib = calibration_records(edgelvm, work, args.calib_limit)
    out = work / "pruned"
    seconds, peak, anon, code, _ = run_measured([
        edgelvm, "-v", "prune", str(checkpoint), "--calib", str(calib), "-o", str(out), "--vision-heads", "0.5",
        "--text-heads", "0.25", "--text-mlp", "0.25", "--calib-limit", str(args.calib_limit), "--recover-steps", "0",
        "--force",
    ])  # fmt: skip
    row = {"prune_s": round(seconds, 1), "prune_peak_rss_bytes": peak, "prune_peak_anon_bytes": anon,
           "prune_exit": code}  # fmt: skip
    if code == 0:
        row["pruned_bytes"] = _bytes(out, (".safetensors",))
    return row


STUDENT = "text_layers=4,vision_layers=4"  # derived from the checkpoint: its first layers, same widths


def distill_row(edgelvm: str, checkpoint: Path, args: argparse.Namespace, variant: str, derive: str = STUDENT) -> dict:
    """Two steps of ``edgelvm distill`` into a derived 4-layer student, measured: the teacher in fp32, in bf16
    (``--teacher-dtype``), or read from the offline top-k cache (built first, by the fp32 teacher, measured apart)."""
    work = checkpoint.parent
    calib = calibration_records(edgelvm, work, args.calib_limit)
    base = [edgelvm, "-v", "distill", str(checkpoint), "-d", str(calib), "--derive", derive,
            "--steps", "2", "--batch-size", "2", "--warmup", "1"]  # fmt: skip
    row: dict = {"variant": variant}
    for folder in (work / f"student-{variant}", work / "student-cache-build", work / "teacher-cache"):
        shutil.rmtree(folder, ignore_errors=True)  # this script's own outputs: distill wants new directories
    if variant == "cache":
        cache = work / "teacher-cache"
        seconds, peak, anon, code, _ = run_measured([*base, "-o", str(work / "student-cache-build"), "--cache-teacher",
                                                     str(cache), "--steps", "1"])  # fmt: skip
        row.update(cache_s=round(seconds, 1), cache_peak_rss_bytes=peak, cache_peak_anon_bytes=anon, cache_exit=code)
        extra = ["--cache-teacher", str(cache)]
    else:
        extra = ["--teacher-dtype", variant]
    seconds, peak, anon, code, _ = run_measured([*base, "-o", str(work / f"student-{variant}"), *extra])
    row.update(distill_s=round(seconds, 1), peak_rss_bytes=peak, peak_anon_bytes=anon, exit=code)
    return row


def _bytes(folder: Path, suffixes: tuple[str, ...]) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix in suffixes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT, choices=sorted(SHAPES))
    parser.add_argument("--work", type=Path, default=Path("runs/scale"))
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per answer")
    parser.add_argument("--parity-layers", type=int, default=None,
                        help="check a copy cut to this many LLM layers (default: 2 for fp16 shapes, else off; 0 = off)")
    parser.add_argument("--quantize", nargs="*", default=[], choices=["rtn", "awq", "gptq"],
                        help="also quantize each fp32 shape's LLM to INT4 with these methods, export and run it")
    parser.add_argument("--prune", action="store_true",
                        help="also prune each fp32 shape (50%% vision heads, 25%% LLM heads and MLP neurons)")
    parser.add_argument("--distill", action="store_true",
                        help="also distil each fp32 shape into a 4-layer student: fp32 teacher, bf16 teacher, and from "
                             "the offline top-k cache (2 steps each: memory, not quality)")
    parser.add_argument("--no-export", action="store_true", help="skip the export, its run and parity check")
    parser.add_argument("--name", default="scale", help="results file stem in benchmarks/results/")
    parser.add_argument("--calib-limit", type=int, default=16, help="calibration records for --quantize / --prune")
    parser.add_argument("--calib-batch", type=int, default=16, help="calibration batch size for --quantize")
    parser.add_argument("--layerwise", action="store_true",
                        help="--quantize one decoder layer at a time, the model in its checkpoint dtype (fp16 too)")
    parser.add_argument("--answer", nargs=2, type=Path, metavar=("BUNDLE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.answer:
        return answer(*args.answer, args.tokens)
    edgelvm = str(Path(sys.executable).with_name("edgelvm"))
    rows = []
    for name in args.models:
        checkpoint = build(name, args.work / name / "checkpoint")
        bundle = args.work / name / "bundle"
        dtype = SHAPES[name][5]
        command = [edgelvm, "-v", "export", str(checkpoint), "-o", str(bundle), "--force", "--dtype", dtype,
                   "--max-length", str(args.max_length)]  # fmt: skip
        weights = _bytes(checkpoint, (".safetensors",))
        row = {"model": name, "dtype": dtype, "checkpoint_bytes": weights,
               "parameters": weights // (2 if dtype == "fp16" else 4)}  # fmt: skip
        seconds, peak, anon, code, phases = run_measured(command) if not args.no_export else (0, 0, 0, None, [])
        if code is not None:
            row.update(export_s=round(seconds, 1), export_peak_rss_bytes=peak, export_peak_anon_bytes=anon, exit=code,
                       phases=phases)  # fmt: skip
        if code == 0:
            row["bundle_bytes"] = _bytes(bundle, (".onnx", ".data", ".npy"))
            row["run"] = run_answer(bundle, args.tokens)
            layers = args.parity_layers if args.parity_layers is not None else 2 if dtype == "fp16" else 0
            if layers:
                row["truncated_parity"] = truncated_parity(name, checkpoint, args.work / name, layers, args.tokens,
                                                           command)  # fmt: skip
        for method in args.quantize if dtype == "fp32" or args.layerwise else []:
            row.setdefault("int4", []).append(quantized_row(edgelvm, checkpoint, args, method, dtype))
        if args.prune and dtype == "fp32":
            row["pruned"] = pruned_row(edgelvm, checkpoint, args)
        if args.distill and dtype == "fp32":
            row["distill"] = [distill_row(edgelvm, checkpoint, args, variant) for variant in ("fp32", "bf16", "cache")]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "phases"}), flush=True)
        for phase in phases:  # where the peak is: each progress step's own peak
            print(
                f"  {phase['at_s']:7.1f} s  {phase['peak_rss_bytes'] / 1e9:5.2f} GB RSS  "
                f"{phase['peak_anon_bytes'] / 1e9:5.2f} GB anon.  {phase['phase']}",
                flush=True,
            )
        save(rows, args.name)  # after each model: a long run's finished rows survive a later failure
    print(render(rows))


def save(rows: list[dict], name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / f"{name}.md").write_text(render(rows) + "\n")
    plot(rows, RESULTS / f"{name}.png")


def render(rows: list[dict]) -> str:
    header = ("| model | params | dtype | checkpoint | export | export peak RSS (× ckpt) | peak anon. (× ckpt) | "
              "bundle (× ckpt) | runtime peak RSS | decode tok/s | truncated copy = PyTorch |")  # fmt: skip
    lines = [header, "|---" * 11 + "|"]
    extra, distilled = [], []
    for r in rows:
        distilled += [(r, d) for d in r.get("distill", [])]
        extra += [quantized_line(r, q) for q in r.get("int4", [])]
        if "export_s" not in r:
            continue
        ckpt = r["checkpoint_bytes"]
        peak, anon = r["export_peak_rss_bytes"], r["export_peak_anon_bytes"]
        size, run, parity = r.get("bundle_bytes"), r.get("run", {}), r.get("truncated_parity")
        bundle = f"{size / 1e9:.2f} GB ({size / ckpt:.2f}×)" if size else "failed"
        runtime = f"{run['run_peak_rss_bytes'] / 1e9:.2f} GB" if run.get("run_exit") == 0 else "—"
        check = "—" if not parity else (
            f"{parity['layers']} layers: {'yes' if parity['equal'] else 'no'}, "
            f"{parity['common_prefix']}/{parity['tokens']} tokens"
        )
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e9:.2f} B | {r['dtype']} | {ckpt / 1e9:.2f} GB | "
            f"{r['export_s']:.0f} s | {peak / 1e9:.2f} GB ({peak / ckpt:.2f}×) | "
            f"{anon / 1e9:.2f} GB ({anon / ckpt:.2f}×) | {bundle} | {runtime} | {run.get('decode_tok_s', '—')} | "
            f"{check} |"
        )
    pruned = [r for r in rows if r.get("pruned")]
    if pruned:
        lines += ["", "| model | prune (50% vision heads, 25% LLM heads + MLP) | peak RSS (× ckpt) | "
                  "peak anon. (× ckpt) | pruned checkpoint |", "|---" * 5 + "|"]  # fmt: skip
        for r in pruned:
            q, ckpt = r["pruned"], r["checkpoint_bytes"]
            if q["prune_exit"] != 0:
                lines.append(f"| {r['model']} | failed ({q['prune_exit']}) | | | |")
                continue
            lines.append(
                f"| {r['model']} | {q['prune_s']:.0f} s | {q['prune_peak_rss_bytes'] / 1e9:.2f} GB "
                f"({q['prune_peak_rss_bytes'] / ckpt:.2f}×) | {q['prune_peak_anon_bytes'] / 1e9:.2f} GB "
                f"({q['prune_peak_anon_bytes'] / ckpt:.2f}×) | {q['pruned_bytes'] / 1e9:.2f} GB |"
            )
    if distilled:
        lines += ["", "| model | distil (2 steps, 4-layer student) | teacher cache build: peak RSS | distil: wall | "
                  "peak RSS (× fp32 ckpt) | peak anon. |", "|---" * 6 + "|"]  # fmt: skip
        for r, d in distilled:
            ckpt, gb = r["checkpoint_bytes"], 1e9
            cache = f"{d['cache_peak_rss_bytes'] / gb:.2f} GB" if "cache_peak_rss_bytes" in d else "—"
            status = "" if d["exit"] == 0 else f" (failed: {d['exit']})"
            lines.append(
                f"| {r['model']} | teacher {d['variant']}{status} | {cache} | {d['distill_s']:.0f} s | "
                f"{d['peak_rss_bytes'] / gb:.2f} GB ({d['peak_rss_bytes'] / ckpt:.2f}×) | "
                f"{d['peak_anon_bytes'] / gb:.2f} GB |"
            )
    if extra:
        lines += ["", "| model | INT4 method | quantize | quantize peak RSS (× ckpt) | export | export peak RSS | "
                  "bundle | runtime peak RSS | decode tok/s |", "|---" * 9 + "|", *extra]  # fmt: skip
    return "\n".join(lines)


def quantized_line(r: dict, q: dict) -> str:
    ckpt, gb = r["checkpoint_bytes"], 1e9
    run = q.get("run", {})
    if q["quantize_exit"] != 0:
        return f"| {r['model']} | {q['method']} | failed ({q['quantize_exit']}) | | | | | | |"
    return (
        f"| {r['model']} | {q['method']} g128 | {q['quantize_s']:.0f} s | {q['quantize_peak_rss_bytes'] / gb:.2f} GB "
        f"({q['quantize_peak_rss_bytes'] / ckpt:.2f}×) | {q.get('export_s', 0):.0f} s | "
        f"{q.get('export_peak_rss_bytes', 0) / gb:.2f} GB | {q.get('bundle_bytes', 0) / gb:.2f} GB | "
        f"{run.get('run_peak_rss_bytes', 0) / gb:.2f} GB | {run.get('decode_tok_s', '—')} |"
    )


def plot(rows: list[dict], path: Path) -> None:
    """Export time, peak RSS, bundle bytes and decode tokens/s against parameters (log-log)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in rows if r.get("bundle_bytes")), key=lambda r: r["parameters"])
    if not rows:
        return
    params = [r["parameters"] / 1e9 for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].plot(params, [r["export_s"] / 60 for r in rows], "o-")
    axes[0].set_ylabel("export wall time (min)")
    for key, label in (("checkpoint_bytes", "checkpoint"), ("export_peak_rss_bytes", "export peak RSS"),
                       ("export_peak_anon_bytes", "export peak anon. RSS"), ("bundle_bytes", "bundle")):  # fmt: skip
        axes[1].plot(params, [r[key] / 1e9 for r in rows], "o-", label=label)
    axes[1].set_ylabel("GB")
    axes[1].legend(fontsize=8)
    speeds = [r.get("run", {}).get("decode_tok_s") or float("nan") for r in rows]
    axes[2].plot(params, speeds, "o-")
    axes[2].set_ylabel("decode tok/s (ONNX Runtime CPU, 2 cores)", fontsize=8)
    for ax in axes:
        ax.set_xscale("log")
        if ax is not axes[2] or any(v > 0 for v in speeds):
            ax.set_yscale("log")
        ax.set_xlabel("parameters (billions)")
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the models' own ticks, named
        ax.set_xticks(params, [f"{r['model']}\n{p:.2f} B" for r, p in zip(rows, params)], rotation=30, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
