"""Export at real sizes: wall time, peak RSS and bundle bytes against the checkpoint's bytes, per model size.

Random-weight LLaVA-layout checkpoints with the shapes of real models (their public config.json values; the tiny
byte-level tokenizer is reused, which is irrelevant for time and memory). Each export runs as ``edgelvm export`` in
its own process; peak RSS is sampled from /proc every 50 ms over the whole process tree (resident file pages of
the memory-mapped safetensors included, as the kernel counts them), and per phase of the export (its progress log
lines, ``edgelvm -v``: printed, and ``phases`` in the JSON), which says where the peak is.

    python benchmarks/scale.py                         # every shape that fits this machine; table + JSON + plot
    python benchmarks/scale.py --models smollm2-135m qwen2-0.5b

The 7B shape (LLaVA-1.5-7B, fp16, a 14 GB checkpoint) is listed but not run by default (not yet measured here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
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

    vision, image, patch, text, text_overrides, _ = SHAPES[name]
    if not (out / "config.json").exists():
        build_tiny_llava(out, text=text, vision="clip", image_size=image, patch_size=patch,
                         vision_overrides=vision, text_overrides=text_overrides)  # fmt: skip
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


def _bytes(folder: Path, suffixes: tuple[str, ...]) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix in suffixes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT, choices=sorted(SHAPES))
    parser.add_argument("--work", type=Path, default=Path("runs/scale"))
    parser.add_argument("--max-length", type=int, default=2048)
    args = parser.parse_args()
    edgelvm = str(Path(sys.executable).with_name("edgelvm"))
    rows = []
    for name in args.models:
        checkpoint = build(name, args.work / name / "checkpoint")
        bundle = args.work / name / "bundle"
        dtype = SHAPES[name][5]
        command = [edgelvm, "-v", "export", str(checkpoint), "-o", str(bundle), "--force", "--dtype", dtype,
                   "--max-length", str(args.max_length)]  # fmt: skip
        seconds, peak, anon, code, phases = run_measured(command)
        weights = _bytes(checkpoint, (".safetensors",))
        row = {"model": name, "dtype": dtype, "checkpoint_bytes": weights, "export_s": round(seconds, 1),
               "export_peak_rss_bytes": peak, "export_peak_anon_bytes": anon, "exit": code,
               "phases": phases}  # fmt: skip
        if code == 0:
            row["bundle_bytes"] = _bytes(bundle, (".onnx", ".data", ".npy"))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "phases"}), flush=True)
        for phase in phases:  # where the peak is: each progress step's own peak
            print(
                f"  {phase['at_s']:7.1f} s  {phase['peak_rss_bytes'] / 1e9:5.2f} GB RSS  "
                f"{phase['peak_anon_bytes'] / 1e9:5.2f} GB anon.  {phase['phase']}",
                flush=True,
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(rows, indent=1))
    header = "| model | dtype | checkpoint | export | peak RSS (× ckpt) | peak anon. RSS (× ckpt) | bundle (× ckpt) |"
    lines = [header, "|---" * 7 + "|"]
    for r in rows:
        ckpt = r["checkpoint_bytes"]
        peak, anon = r["export_peak_rss_bytes"], r["export_peak_anon_bytes"]
        size = r.get("bundle_bytes")
        bundle = f"{size / 1e9:.2f} GB ({size / ckpt:.2f}×)" if size else "failed"
        lines.append(
            f"| {r['model']} | {r['dtype']} | {ckpt / 1e9:.2f} GB | {r['export_s']:.0f} s | "
            f"{peak / 1e9:.2f} GB ({peak / ckpt:.2f}×) | {anon / 1e9:.2f} GB ({anon / ckpt:.2f}×) | {bundle} |"
        )
    table = "\n".join(lines)
    (RESULTS / "scale.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
