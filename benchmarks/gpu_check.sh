#!/usr/bin/env bash
# One script for a GPU machine (desktop/datacenter GPU or Jetson with JetPack 6): set up, export a tiny and a
# realistic-shape bundle, build TensorRT engines, check every GPU backend's greedy tokens against ONNX Runtime CPU
# (onnxruntime-cuda, onnxruntime-tensorrt, native tensorrt; the first two keep the KV cache on the device), run the
# gpu/tensorrt-marked tests, bench every backend, print a table. Everything lands in $OUT (default runs/gpu_check).
# Install facts per platform, and what each was checked against: docs/hardware.md.
#
#   EDGELVM_TORCH="torch" EDGELVM_LOCK=none ./benchmarks/gpu_check.sh    # x86-64 desktop / datacenter GPU
#   EDGELVM_BUNDLES=DIR DEVICE=jetson-orin-nano-8gb ./benchmarks/gpu_check.sh   # JetPack 6 (Python 3.10): see below
#
# Knobs: DEVICE (profile for memory limits and the roofline), EDGELVM_ORT_GPU=0 (keep the CPU onnxruntime build on
# x86-64), EDGELVM_SYSTEM_SITE_PACKAGES=1 (make the venv see system packages; the default on Jetson, where TensorRT
# comes from JetPack), EDGELVM_BUNDLES=DIR (bundles exported elsewhere by `python benchmarks/gpu_check.py export DIR`:
# needed where the venv's Python is older than 3.11 — JetPack 6's, which its TensorRT bindings are built for — since
# the export side, transformers >= 5.24, needs 3.11; such a venv gets the runtime only and skips the pytest step).
# A failing step is reported and the script goes on to the next (exit 1 at the end), so one run reports everything.
# Written for the first hardware run: it has NOT run yet.
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
# The torch side (export, the tests' fixtures) needs Python 3.11+; JetPack 6's TensorRT bindings are for its 3.10.
TOOLCHAIN=$("$([ -x "$PY" ] && echo "$PY" || echo "${PYTHON:-python3}")" -c 'import sys; print(int(sys.version_info >= (3, 11)))')
if [ "$TOOLCHAIN" = 1 ]; then
  ./scripts/bootstrap.sh
elif [ -z "${EDGELVM_BUNDLES:-}" ]; then
  echo "this Python is older than 3.11: edgelvm's export side (transformers >= 5.24) cannot install here. Export the" \
       "bundles elsewhere (python benchmarks/gpu_check.py export DIR), copy DIR here and rerun with" \
       "EDGELVM_BUNDLES=DIR (docs/hardware.md)"; exit 1
else
  EDGELVM_EXTRAS=runtime ./scripts/bootstrap.sh
fi
STATUS=0
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
"$VENV/bin/edgelvm" devices --this-gpu | tail -1 || true

echo "== export tiny + realistic bundles (random weights)"
if [ -n "${EDGELVM_BUNDLES:-}" ]; then
  for name in tiny realistic; do  # copies: the engines are written into the bundles
    [ -f "$OUT/$name/bundle/edgelvm.json" ] || { mkdir -p "$OUT/$name"; cp -r "$EDGELVM_BUNDLES/$name/bundle" "$OUT/$name/"; }
  done
else
  "$PY" benchmarks/gpu_check.py export "$OUT"
fi

echo "== edgelvm build (TensorRT engines on this GPU)"
DEVICE_ARG=()
if [ -n "${DEVICE:-}" ]; then DEVICE_ARG=(--device "$DEVICE"); fi
BUILT=1
for name in tiny realistic; do
  "$VENV/bin/edgelvm" -v build "$OUT/$name/bundle" --force ${DEVICE_ARG[@]+"${DEVICE_ARG[@]}"} \
    || { echo "edgelvm build FAILED for $name (continuing)"; BUILT=0; STATUS=1; }
done

echo "== parity: every GPU backend vs ONNX Runtime CPU greedy tokens"
# One JSON row per bundle x backend (OK / SKIP / FAIL); ORT rows name the providers the session really runs on.
"$PY" benchmarks/gpu_check.py parity "$OUT" || { echo "parity FAILED (continuing)"; STATUS=1; }

echo "== gpu- and tensorrt-marked tests"
if [ "$TOOLCHAIN" = 1 ]; then
  "$PY" -m pytest -m "tensorrt or gpu" tests/test_build.py tests/test_gpu_compat.py -q -rs \
    || { echo "gpu/tensorrt-marked tests FAILED (continuing)"; STATUS=1; }
else
  echo "SKIP: the tests' fixtures export bundles (torch side), which needs Python 3.11+"
fi

echo "== bench every available backend"
BACKENDS=(--backend onnxruntime-cpu)
if [ "$BUILT" = 1 ]; then BACKENDS+=(--backend tensorrt); fi
for pair in "onnxruntime-cuda:CUDAExecutionProvider" "onnxruntime-tensorrt:TensorrtExecutionProvider"; do
  if "$PY" -c "import onnxruntime as o, sys; sys.exit('${pair#*:}' not in o.get_available_providers())"; then
    BACKENDS+=(--backend "${pair%%:*}")
  fi
done
"$VENV/bin/edgelvm" bench "$OUT/tiny/bundle" "$OUT/realistic/bundle" \
  "${BACKENDS[@]}" --gen-len 64 --prompt-len 32 --runs 5 \
  ${DEVICE_ARG[@]+"${DEVICE_ARG[@]}"} -o "$OUT/bench" || { echo "bench FAILED"; STATUS=1; }

echo "== summary"
cat "$OUT/bench/report.md" "$OUT/parity.json" || true
echo "gpu_check: $([ "$STATUS" = 0 ] && echo "every step passed" || echo "a step FAILED (see above)")"
exit $STATUS
