#!/usr/bin/env bash
# Create .venv with edgelvm, its toolchain (torch side), the server extra and dev tools. Idempotent: fast when already done.
#
# Versions come from constraints.txt, the lock CI tested (refresh it with scripts/lock.sh; check the newest releases
# with scripts/check_versions.sh latest). EDGELVM_LOCK=none resolves freely within pyproject.toml's ranges instead.
# torch comes first so that its choice is yours: EDGELVM_TORCH (default "torch==2.13.0", a CPU build on this
# project's build machines) is installed before edgelvm, whose own requirement is only torch>=2.6.
# On a CUDA desktop use e.g. EDGELVM_TORCH="torch" EDGELVM_LOCK=none; on Jetson, NVIDIA's JetPack wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${EDGELVM_VENV:-.venv}
LOCK=${EDGELVM_LOCK:-constraints.txt}
# On a Jetson the venv must see JetPack's TensorRT (python3-libnvinfer, a system package): EDGELVM_SYSTEM_SITE_PACKAGES
# (default: 1 where /etc/nv_tegra_release exists, else 0) makes it with --system-site-packages (docs/hardware.md).
SYSTEM_SITE=${EDGELVM_SYSTEM_SITE_PACKAGES:-$([ -e /etc/nv_tegra_release ] && echo 1 || echo 0)}
if [ ! -x "$VENV/bin/python" ]; then
  if [ "$SYSTEM_SITE" = "1" ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
CONSTRAINTS=()
if [ "$LOCK" != "none" ]; then
  CONSTRAINTS=(-c "$LOCK")
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "${CONSTRAINTS[@]}" "${EDGELVM_TORCH:-torch==2.13.0}"
fi
"${PIP[@]}" install "${CONSTRAINTS[@]}" -e ".[toolchain,serve,dev]"
echo "edgelvm ready in $VENV ($("$VENV/bin/python" -c 'import torch, transformers, onnxruntime; print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {onnxruntime.__version__}")'), lock: $LOCK)"
