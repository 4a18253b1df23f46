#!/usr/bin/env bash
# Create .venv with edgelvm, its toolchain (torch side), the server extra and dev tools. Idempotent: fast when already done.
#
# Versions come from constraints.txt, the lock CI tested (refresh it with scripts/lock.sh; check the newest releases
# with scripts/check_versions.sh latest). EDGELVM_LOCK=none resolves freely within pyproject.toml's ranges instead.
# torch comes first so that its choice is yours: EDGELVM_TORCH (default "torch==2.13.0", a CPU build on this
# project's build machines) is installed before edgelvm, whose own requirement is only torch>=2.6.
# On a CUDA desktop use e.g. EDGELVM_TORCH="torch" EDGELVM_LOCK=none; on Jetson, NVIDIA's JetPack wheel.
# EDGELVM_EXTRAS=runtime installs the runtime only (`pip install -e .`: no torch, no transformers) — for a Python older
# than 3.11, which the export side (transformers >= 5.24) does not support: JetPack 6's Python 3.10, the one its
# TensorRT bindings are built for (docs/hardware.md). The lock was made on Python 3.11: older Pythons resolve freely.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${EDGELVM_VENV:-.venv}
LOCK=${EDGELVM_LOCK:-constraints.txt}
EXTRAS=${EDGELVM_EXTRAS:-toolchain,serve,dev}
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
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  if [ "$EXTRAS" != runtime ]; then
    echo "bootstrap: $("$VENV/bin/python" -V) is too old for edgelvm's export side (transformers >= 5.24 needs 3.11+):" \
         "use Python 3.11+, or EDGELVM_EXTRAS=runtime for the runtime only (docs/hardware.md)" >&2
    exit 1
  fi
  if [ -z "${EDGELVM_LOCK:-}" ]; then LOCK=none; fi  # constraints.txt pins releases that need 3.11 (numpy 2.4)
fi
CONSTRAINTS=()
if [ "$LOCK" != "none" ]; then
  CONSTRAINTS=(-c "$LOCK")
fi
if [ "$EXTRAS" = runtime ]; then
  "${PIP[@]}" install ${CONSTRAINTS[@]+"${CONSTRAINTS[@]}"} -e .
  echo "edgelvm runtime ready in $VENV ($("$VENV/bin/python" -V), lock: $LOCK)"
  exit 0
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "${CONSTRAINTS[@]}" "${EDGELVM_TORCH:-torch==2.13.0}"
fi
"${PIP[@]}" install "${CONSTRAINTS[@]}" -e ".[$EXTRAS]"
echo "edgelvm ready in $VENV ($("$VENV/bin/python" -c 'import torch, transformers, onnxruntime; print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {onnxruntime.__version__}")'), lock: $LOCK)"
