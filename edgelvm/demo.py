"""``edgelvm demo``: the README's main job — the whole pipeline on the default model, in about a minute.

Until the shipped, trained teacher lands, the default model is a small random-weight LLaVA that edgelvm builds
itself (CLIP tower + Llama decoder): its answers are gibberish, but every stage is real — the export, the parity
check, the torch-free runtime and the comparison with Hugging Face ``generate``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def _demo_image() -> Any:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 96), (235, 235, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 12, 42, 44), fill=(220, 30, 30))
    draw.rectangle((55, 50, 85, 80), fill=(30, 60, 220))
    return image


def run_demo(workdir: Path, *, console: Any, max_new_tokens: int = 24) -> dict[str, Any]:
    import torch
    from rich.table import Table
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from edgelvm.export import ExportConfig, export
    from edgelvm.runtime import VLM
    from edgelvm.testing import build_tiny_llava

    workdir = Path(workdir)
    model_dir, bundle_dir = workdir / "model", workdir / "bundle"
    prompt = "What is on the table?"
    image = _demo_image()

    with console.status("building the default model (small LLaVA, random weights) …"):
        build_tiny_llava(model_dir, image_size=64, patch_size=8, hidden_size=128, num_layers=4)
    with console.status("exporting the bundle (vision, embedding, KV-cache decoder) …"):
        report = export(model_dir, bundle_dir, ExportConfig(force=True, max_length=512))

    with console.status("running Hugging Face generate (PyTorch) …"):
        processor = AutoProcessor.from_pretrained(model_dir)
        model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()  # progress bar off (adapter load)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        inputs = processor(
            images=[image],
            text=[processor.apply_chat_template(messages, add_generation_prompt=True)],
            return_tensors="pt",
        )
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=4, do_sample=False)  # warm-up
            started = time.perf_counter()
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False
            )
            hf_seconds = time.perf_counter() - started
        hf_ids = out[0, inputs["input_ids"].shape[1] :].tolist()

    vlm = VLM.load(bundle_dir)
    vlm.generate(image, prompt, max_new_tokens=4)  # warm-up
    started = time.perf_counter()
    answer = vlm.generate(image, prompt, max_new_tokens=max_new_tokens)
    rt_seconds = time.perf_counter() - started
    rt_ids = vlm.last_output_ids[0]
    same = rt_ids == hf_ids[: len(rt_ids)]

    params = sum(p.numel() for p in model.parameters())
    bundle_mb = sum(p.stat().st_size for p in bundle_dir.rglob("*") if p.is_file()) / 1e6
    results = {
        "parameters": params,
        "bundle_mb": bundle_mb,
        "tokens_identical_to_hf": same,
        "runtime_tokens_per_s": len(rt_ids) / rt_seconds,
        "hf_tokens_per_s": len(hf_ids) / hf_seconds,
        "export_seconds": report.seconds,
    }
    table = Table(title="edgelvm demo — default model (random-weight LLaVA; the trained shapes teacher replaces it)")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{params / 1e6:.2f} M")
    table.add_row("bundle size", f"{bundle_mb:.1f} MB")
    table.add_row("export (incl. parity checks)", f"{report.seconds:.1f} s")
    worst = max(g.parity.get("max_rel", 0.0) for g in report.manifest.graphs.values())
    table.add_row("worst graph error vs PyTorch", f"{worst:.1e} relative")
    table.add_row("greedy tokens identical to HF generate", "yes" if same else "NO")
    table.add_row("runtime (onnxruntime, whole request)", f"{results['runtime_tokens_per_s']:.0f} tok/s")
    table.add_row("HF generate (PyTorch eager)", f"{results['hf_tokens_per_s']:.0f} tok/s")
    console.print(table)
    console.print(f"answer: {answer!r}")
    console.print(f"bundle: {bundle_dir}  (try: edgelvm inspect {bundle_dir})")
    if not same:
        from edgelvm.errors import EdgeLVMError

        raise EdgeLVMError(
            "the runtime's greedy tokens differ from Hugging Face generate",
            where=str(bundle_dir),
            fix="this is a bug; please report it with the demo output",
        )
    return results
