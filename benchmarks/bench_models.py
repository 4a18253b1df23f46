"""The benchmark models, built and exported once under ``--workdir`` and shared by the benchmark scripts.

``tiny``: the test-sized LLaVA at 224 px. ``realistic``: a CLIP ViT-B/16 tower + SmolLM2-135M-shaped Llama with random
weights (``edgelvm.models.synthetic.build_realistic_llava``); its export takes a few minutes the first time.
"""

from __future__ import annotations

import sys
from pathlib import Path


def prepare(kind: str, workdir: Path) -> tuple[Path, Path]:
    """``(checkpoint, bundle)`` for ``kind``; re-exported when the bundle lacks the fused decoder."""
    checkpoint, bundle = workdir / kind / "model", workdir / kind / "bundle"
    if not (checkpoint / "config.json").is_file():
        from edgelvm.models.synthetic import build_realistic_llava, build_tiny_llava

        print(f"[{kind}] building checkpoint …", file=sys.stderr)
        if kind == "realistic":
            build_realistic_llava(checkpoint)
        else:
            build_tiny_llava(
                checkpoint, image_size=224, patch_size=16, text_overrides={"max_position_embeddings": 1024}
            )
    if not (bundle / "edgelvm.json").is_file() or not (bundle / "decoder_ort.onnx").is_file():
        from edgelvm.export import ExportConfig, export

        print(f"[{kind}] exporting (the realistic decoder takes a few minutes) …", file=sys.stderr)
        report = export(checkpoint, bundle, ExportConfig(max_length=1024, force=True))
        print(f"[{kind}] exported in {report.seconds:.0f} s", file=sys.stderr)
    return checkpoint, bundle


def prepare_int4(
    kind: str, workdir: Path, accuracy_level: int = 0, group_size: int = 128, lm_head: str = "float"
) -> Path:
    """An INT4 weight-only (RTN: the method does not change the speed) bundle of ``kind``'s language model, with
    MatMulNBits ``accuracy_level`` 0 (fp32 compute) or 4 (int8 activations); ``lm_head``: float, int8 or int4."""
    checkpoint, _ = prepare(kind, workdir)
    head = "" if lm_head == "float" else f"-head-{lm_head}"
    quantized = workdir / kind / f"int4-g{group_size}{head}"
    if not (quantized / "int4.safetensors").is_file():
        from edgelvm.quantize import RTNConfig, quantize

        print(f"[{kind}] INT4 RTN g{group_size}, LM head {lm_head} …", file=sys.stderr)
        quantize(checkpoint, None, RTNConfig(group_size=group_size, lm_head=lm_head), out=quantized, force=True)
    bundle = workdir / kind / f"bundle-int4-g{group_size}{head}-al{accuracy_level}"
    if not (bundle / "edgelvm.json").is_file():
        from edgelvm.export import ExportConfig, export

        print(f"[{kind}] exporting INT4{head} (accuracy_level {accuracy_level}) …", file=sys.stderr)
        export(quantized, bundle, ExportConfig(max_length=1024, force=True, int4_accuracy_level=accuracy_level))
    return bundle
