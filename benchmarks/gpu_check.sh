#!/usr/bin/env bash
# One script for a GPU machine (desktop/datacenter GPU or Jetson with JetPack 6): set up, export a tiny and a
# realistic-shape bundle, build TensorRT engines, check every GPU backend's greedy tokens against ONNX Runtime CPU
# (onnxruntime-cuda, onnxruntime-tensorrt, native tensorrt; the first two keep the KV cache on the device), run the
# gpu/tensorrt-marked tests, bench every backend, print a table. Everything lands in $OUT (default runs/gpu_check).
# Install facts per platform, and what each was checked against: docs/hardware.md.
#
#   EDGELVM_TORCH="torch" EDGELVM_LOCK=none ./benchmarks/gpu_check.sh    # x86-64 desktop / datacenter GPU
#   DEVICE=jetson-orin-nano-8gb ./benchmarks/gpu_check.sh                  # Jetson (JetPack torch wheel: EDGELVM_TORCH)
#
# Knobs: DEVICE (profile for memory limits and the roofline), EDGELVM_ORT_GPU=0 (keep the CPU onnxruntime build on
# x86-64), EDGELVM_SYSTEM_SITE_PACKAGES=1 (make the venv see system packages; the default on Jetson, where TensorRT
# comes from JetPack). Written for the first hardware run: it has NOT run yet.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
VENV=${EDGELVM_VENV:-.venv}
PY="$VENV/bin/python"
PIP=("$PY" -m pip -q --disable-pip-version-check)
mkdir -p "$OUT"
JETSON=0
if [ -f /etc/nv_tegra_release ]; then JETSON=1; fi

echo "== environment"
# The venv must see JetPack's TensorRT (python3-libnvinfer, a system package) on a Jetson. bootstrap.sh reuses an
# existing venv, so create it here with --system-site-packages before bootstrap runs.
if [ ! -x "$PY" ] && { [ "$JETSON" = 1 ] || [ "${EDGELVM_SYSTEM_SITE_PACKAGES:-0}" = 1 ]; }; then
  echo "creating $VENV with --system-site-packages"
  "${PYTHON:-python3}" -m venv --system-site-packages "$VENV"
fi
./scripts/bootstrap.sh
# CUDA major of the driver: cuda-python (and the TensorRT wheels) must not be newer than it (cuda-python 13 needs a
# CUDA 13 driver, r580+; JetPack 6 is CUDA 12.6).
if [ "$JETSON" = 1 ]; then
  CUDA_MAJOR=12
else
  CUDA_MAJOR=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9]*\)\..*/\1/p' | head -1 || true)
  CUDA_MAJOR=${CUDA_MAJOR:-12}
fi
echo "driver CUDA major: $CUDA_MAJOR"
"${PIP[@]}" install "cuda-python>=${CUDA_MAJOR}.0,<$((CUDA_MAJOR + 1))" "nvidia-ml-py>=12.535"
if ! "$PY" -c "import tensorrt" 2>/dev/null; then
  if [ "$JETSON" = 1 ]; then
    echo "TensorRT is not visible: sudo apt install python3-libnvinfer (JetPack), and a venv made with" \
         "--system-site-packages (rm -rf $VENV and rerun) — docs/hardware.md"; exit 1
  fi
  "${PIP[@]}" install "tensorrt-cu${CUDA_MAJOR}>=10.3,<12"
fi
# onnxruntime: one build only (onnxruntime and onnxruntime-gpu overwrite each other: onnxruntime #26996).
if [ "$JETSON" = 0 ] && [ "${EDGELVM_ORT_GPU:-1}" = 1 ] && [ "$CUDA_MAJOR" -ge 12 ]; then
  if ! "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    "${PIP[@]}" uninstall -y onnxruntime onnxruntime-gpu || true
    "${PIP[@]}" install "onnxruntime-gpu>=1.20"
  fi
fi
"$PY" -c "import onnxruntime" 2>/dev/null \
  || { echo "no onnxruntime: on Jetson install NVIDIA's JetPack onnxruntime-gpu wheel (docs/hardware.md)"; exit 1; }
"$PY" - <<'PYEOF'
import importlib.metadata as md
import onnxruntime, tensorrt
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"
print("tensorrt", tensorrt.__version__, "| cuda-python", v("cuda-python"), "| cuda-bindings", v("cuda-bindings"))
print("onnxruntime", onnxruntime.__version__, "builds:", [b for b in ("onnxruntime", "onnxruntime-gpu") if v(b) != "-"])
print("providers", onnxruntime.get_available_providers())
PYEOF
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader || true
"$VENV/bin/edgelvm" devices --this-gpu | tail -1

echo "== export tiny + realistic bundles (random weights)"
"$PY" - "$OUT" <<'PYEOF'
import sys
from pathlib import Path
from edgelvm.export import ExportConfig, export
from edgelvm.models.synthetic import build_realistic_llava, build_tiny_llava
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
DEVICE_ARG=()
if [ -n "${DEVICE:-}" ]; then DEVICE_ARG=(--device "$DEVICE"); fi
for name in tiny realistic; do
  "$VENV/bin/edgelvm" -v build "$OUT/$name/bundle" --force ${DEVICE_ARG[@]+"${DEVICE_ARG[@]}"}
done

echo "== parity: every GPU backend vs ONNX Runtime CPU greedy tokens"
"$PY" - "$OUT" <<'PYEOF'
import json, sys, time
from pathlib import Path
import numpy as np
import onnxruntime
from edgelvm.runtime import VLM
out, rows, failed = Path(sys.argv[1]), [], False
providers = onnxruntime.get_available_providers()
backends = ["onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt"]
need = {"onnxruntime-cuda": "CUDAExecutionProvider", "onnxruntime-tensorrt": "TensorrtExecutionProvider"}
image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
for name in ("tiny", "realistic"):
    bundle = out / name / "bundle"
    cpu = VLM.load(bundle, backend="onnxruntime-cpu")
    cpu.generate(image, "Describe the image.", max_new_tokens=32, min_new_tokens=32)
    reference = cpu.last_output_ids[0]
    for backend in backends:
        if backend in need and need[backend] not in providers:
            rows.append({"bundle": name, "backend": backend, "status": f"SKIP: no {need[backend]}"}); continue
        started = time.perf_counter()
        try:
            vlm = VLM.load(bundle, backend=backend)
            vlm.generate(image, "Describe the image.", max_new_tokens=32, min_new_tokens=32)
        except Exception as err:  # report every backend, then fail
            rows.append({"bundle": name, "backend": backend, "status": f"FAIL: {type(err).__name__}: {err}"})
            failed = True; continue
        ids = vlm.last_output_ids[0]
        same = next((i for i, (x, y) in enumerate(zip(reference, ids)) if x != y), min(len(reference), len(ids)))
        # fp16 engines may flip a near-tie late in a random-weight model; the first 8 tokens must agree.
        ok = same >= min(8, len(reference))
        failed |= not ok
        rows.append({"bundle": name, "backend": backend, "status": "OK" if ok else "FAIL: tokens differ",
                     "tokens": len(ids), "identical_prefix": same, "equal": ids == reference,
                     "kv_cache": type(vlm.backend.new_cache(1)).__name__,
                     "load_and_generate_s": round(time.perf_counter() - started, 1)})
for row in rows:
    print(json.dumps(row))
(out / "parity.json").write_text(json.dumps(rows, indent=2))
sys.exit(1 if failed else 0)
PYEOF

echo "== gpu- and tensorrt-marked tests"
STATUS=0
"$PY" -m pytest -m "tensorrt or gpu" tests/test_build.py tests/test_gpu_compat.py -q -rs \
  || { echo "gpu/tensorrt-marked tests FAILED (continuing)"; STATUS=1; }

echo "== bench every available backend"
BACKENDS=(--backend onnxruntime-cpu --backend tensorrt)
for pair in "onnxruntime-cuda:CUDAExecutionProvider" "onnxruntime-tensorrt:TensorrtExecutionProvider"; do
  if "$PY" -c "import onnxruntime as o, sys; sys.exit('${pair#*:}' not in o.get_available_providers())"; then
    BACKENDS+=(--backend "${pair%%:*}")
  fi
done
"$VENV/bin/edgelvm" bench "$OUT/tiny/bundle" "$OUT/realistic/bundle" \
  "${BACKENDS[@]}" --gen-len 64 --prompt-len 32 --runs 5 \
  ${DEVICE_ARG[@]+"${DEVICE_ARG[@]}"} -o "$OUT/bench"

echo "== summary"
cat "$OUT/bench/report.md"
cat "$OUT/parity.json"
exit $STATUS
