"""The Python steps of ``benchmarks/gpu_check.sh``: export the two random-weight LLaVA bundles, and compare every GPU
backend's greedy tokens with ONNX Runtime CPU.

Why a module and not heredocs in the script: the steps that need no GPU (the export; the parity loop with every GPU
backend missing) run in the test suite here (``tests/test_gpu_compat.py``), so a wrong argument fails a test instead
of the first hardware run. Nothing in this file has run on a GPU.

    python benchmarks/gpu_check.py export OUT [--only tiny]    # writes OUT/<name>/bundle (torch side: [toolchain])
    python benchmarks/gpu_check.py parity OUT [--only tiny]    # one JSON row per bundle x backend; OUT/parity.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

#: bundle name → KV-cache length it is exported with (the tiny LLaVA's max_position_embeddings is 512; the
#: realistic shape has 2048, and 1024 covers its 196 image tokens plus a long answer).
BUNDLES = {"tiny": 512, "realistic": 1024}
GPU_BACKENDS = ("onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")
#: the ORT provider each ORT backend must really run on (not merely list): a provider that fails to load (e.g. a
#: TensorRT major onnxruntime-gpu was not built against) makes ORT fall back to the next one with a log line only.
PROVIDER = {"onnxruntime-cuda": "CUDAExecutionProvider", "onnxruntime-tensorrt": "TensorrtExecutionProvider"}
NEW_TOKENS = 32
#: fp16 engines may flip a near-tie late in a random-weight model: the first AGREE greedy tokens must be identical.
AGREE = 8
PROMPT = "Describe the image."


def export_bundles(out: Path, names: list[str]) -> list[Path]:
    """Export each named bundle to ``out/<name>/bundle`` (reused when already there)."""
    from edgelvm.export import ExportConfig, export
    from edgelvm.models.synthetic import build_realistic_llava, build_tiny_llava

    builders = {"tiny": build_tiny_llava, "realistic": build_realistic_llava}
    bundles = []
    for name in names:
        bundle = out / name / "bundle"
        if (bundle / "edgelvm.json").is_file():
            print("reuse", bundle)
        else:
            checkpoint = builders[name](out / name / "checkpoint")
            export(checkpoint, bundle, ExportConfig(max_length=BUNDLES[name], force=True))
            print("exported", bundle)
        bundles.append(bundle)
    return bundles


def _session_providers(vlm: Any) -> list[str] | None:
    """The providers the decoder's ONNX Runtime session really runs on (None: not an ORT backend)."""
    decoder = getattr(vlm.backend, "decoder", None)
    return list(decoder.get_providers()) if hasattr(decoder, "get_providers") else None


def parity(out: Path, names: list[str], backends: tuple[str, ...] = GPU_BACKENDS) -> list[dict[str, Any]]:
    """One row per bundle x backend: OK, SKIP (this onnxruntime lacks the provider) or FAIL (an exception, tokens
    that differ from ONNX Runtime CPU in the first AGREE, or an ORT session that fell back to another provider)."""
    import numpy as np
    import onnxruntime

    from edgelvm.runtime import VLM

    available = onnxruntime.get_available_providers()
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    rows: list[dict[str, Any]] = []
    for name in names:
        bundle = out / name / "bundle"
        cpu = VLM.load(bundle, backend="onnxruntime-cpu")
        cpu.generate(image, PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        reference = cpu.last_output_ids[0]
        for backend in backends:
            row: dict[str, Any] = {"bundle": name, "backend": backend}
            rows.append(row)
            if backend in PROVIDER and PROVIDER[backend] not in available:
                row["status"] = f"SKIP: this onnxruntime has no {PROVIDER[backend]}"
                continue
            started = time.perf_counter()
            try:
                vlm = VLM.load(bundle, backend=backend)
                vlm.generate(image, PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            except Exception as err:  # report every backend, then fail
                row["status"] = f"FAIL: {type(err).__name__}: {err}"
                continue
            ids = vlm.last_output_ids[0]
            same = next((i for i, (x, y) in enumerate(zip(reference, ids)) if x != y), min(len(reference), len(ids)))
            providers = _session_providers(vlm)
            row.update(tokens=len(ids), identical_prefix=same, equal=ids == reference, session_providers=providers,
                       kv_cache=type(vlm.backend.new_cache(1)).__name__,
                       load_and_generate_s=round(time.perf_counter() - started, 1))  # fmt: skip
            if backend in PROVIDER and (not providers or providers[0] != PROVIDER[backend]):
                row["status"] = f"FAIL: the session runs on {providers}, not {PROVIDER[backend]}"
            elif same < min(AGREE, len(reference)):
                row["status"] = f"FAIL: tokens differ at {same}"
            else:
                row["status"] = "OK"
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("export", "parity"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", action="append", choices=list(BUNDLES), help="a bundle (repeatable; default all)")
    args = parser.parse_args(argv)
    names = args.only or list(BUNDLES)
    if args.step == "export":
        export_bundles(args.out, names)
        return 0
    rows = parity(args.out, names)
    for row in rows:
        print(json.dumps(row))
    (args.out / "parity.json").write_text(json.dumps(rows, indent=2))
    return 1 if any(row["status"].startswith("FAIL") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
