#!/usr/bin/env bash
# One script for a GPU machine (desktop/datacenter GPU or Jetson with JetPack): bootstrap, export a tiny and a
# realistic-shape bundle, build TensorRT engines, check TensorRT greedy tokens against ONNX Runtime CPU, bench both
# backends, print a table. Everything lands in $OUT (default runs/gpu_check).
#
#   EDGELVM_TORCH="torch" ./benchmarks/gpu_check.sh            # desktop; Jetson: NVIDIA's JetPack torch wheel
#   DEVICE=jetson-orin-nano-8gb ./benchmarks/gpu_check.sh              # roofline from that profile (default: auto by name)
#
# Needs: TensorRT's Python package (`pip install tensorrt` on x86-64; JetPack's python3-libnvinfer on Jetson) and
# cuda-python (installed below). Written for the first hardware run: it has not run yet.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
VENV=${EDGELVM_VENV:-.venv}
PY="$VENV/bin/python"
mkdir -p "$OUT"

echo "== bootstrap"
./scripts/bootstrap.sh
"$PY" -m pip -q --disable-pip-version-check install "cuda-python" "nvidia-ml-py" || echo "warning: cuda-python/nvidia-ml-py not installed"
"$PY" -c "import tensorrt; print('tensorrt', tensorrt.__version__)" \
  || { echo "TensorRT's Python package is missing: pip install tensorrt (x86-64) or use JetPack's"; exit 1; }
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader || true
"$VENV/bin/edgelvm" devices --this-gpu | tail -1

echo "== export tiny + realistic bundles (random weights)"
"$PY" - "$OUT" <<'PYEOF'
import sys
from pathlib import Path
from edgelvm.export import ExportConfig, export
from edgelvm.testing import build_realistic_llava, build_tiny_llava
out = Path(sys.argv[1])
for name, build in (("tiny", lambda d: build_tiny_llava(d)), ("realistic", build_realistic_llava)):
    bundle = out / name / "bundle"
    if (bundle / "edgelvm.json").is_file():
        print("reuse", bundle); continue
    checkpoint = build(out / name / "checkpoint")
    export(checkpoint, bundle, ExportConfig(max_length=1024, force=True))
    print("exported", bundle)
PYEOF

echo "== edgelvm build (TensorRT engines on this GPU)"
for name in tiny realistic; do
  "$VENV/bin/edgelvm" -v build "$OUT/$name/bundle" --force
done

echo "== parity: TensorRT vs ONNX Runtime CPU greedy tokens"
# VLM.load(backend="tensorrt") runs edgelvm.runtime.trt_backend.TrtBackend on the engines just built.
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
import numpy as np
from edgelvm.runtime import VLM
out, rows, failed = Path(sys.argv[1]), [], False
image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
for name in ("tiny", "realistic"):
    bundle = out / name / "bundle"
    ids = {}
    for backend in ("onnxruntime-cpu", "tensorrt"):
        vlm = VLM.load(bundle, backend=backend)
        vlm.generate(image, "Describe the image.", max_new_tokens=32)
        ids[backend] = vlm.last_output_ids[0]
    a, b = ids["onnxruntime-cpu"], ids["tensorrt"]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    rows.append({"bundle": name, "tokens": len(a), "identical_prefix": same, "equal": a == b})
    # fp16 engines may flip a near-tie late in a random-weight model; the first 8 tokens must agree.
    failed |= same < min(8, len(a))
print(json.dumps(rows, indent=2))
(out / "parity.json").write_text(json.dumps(rows, indent=2))
sys.exit(1 if failed else 0)
PYEOF

echo "== tensorrt-marked tests (build + TensorRT backend vs ONNX Runtime on the tiny bundle)"
STATUS=0
"$PY" -m pytest -m tensorrt tests/test_build.py -q -rs || { echo "tensorrt-marked tests FAILED (continuing)"; STATUS=1; }

echo "== bench both backends"
DEVICE_ARG=()
if [ -n "${DEVICE:-}" ]; then DEVICE_ARG=(--device "$DEVICE"); fi
"$VENV/bin/edgelvm" bench "$OUT/tiny/bundle" "$OUT/realistic/bundle" \
  --backend onnxruntime-cpu --backend tensorrt --gen-len 64 --prompt-len 32 --runs 5 \
  ${DEVICE_ARG[@]+"${DEVICE_ARG[@]}"} -o "$OUT/bench"

echo "== summary"
cat "$OUT/bench/report.md"
cat "$OUT/parity.json"
exit $STATUS
