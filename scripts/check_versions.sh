#!/usr/bin/env bash
# Run the fast suite against the newest or the oldest versions pyproject.toml allows, each in a fresh venv of its own
# (.venv-latest, .venv-lowest), so that upstream drift shows up here before it reaches a user or CI's lock.
#
#   scripts/check_versions.sh latest [pytest args]   newest releases (run before scripts/lock.sh, and weekly)
#   scripts/check_versions.sh lowest [pytest args]   each direct dependency at the lowest version the others allow
#                                                   (uv's --resolution lowest-direct): keeps the ranges honest
#
# torch is the exception in both: it is installed as bootstrap.sh does (EDGELVM_TORCH, default torch==2.13.0, a CPU
# build) and held there, because a different torch is a different multi-GB build, not a version bump.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?usage: scripts/check_versions.sh latest|lowest [pytest args]}
shift
PYTHON=${PYTHON:-python3}
VENV=.venv-$MODE
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install "${EDGELVM_TORCH:-torch==2.13.0}"
case "$MODE" in
  latest)
    "${PIP[@]}" install --upgrade --upgrade-strategy eager -e ".[toolchain,serve,dev]"
    ;;
  lowest)
    "${PIP[@]}" install uv
    TORCH_PIN="$VENV/torch-pin.txt"
    "$VENV/bin/python" -c 'import torch; print(f"torch=={torch.__version__}")' > "$TORCH_PIN"
    "$VENV/bin/uv" pip install --python "$VENV/bin/python" --resolution lowest-direct -c "$TORCH_PIN" \
      -e ".[toolchain,serve,dev]"
    ;;
  *)
    echo "unknown mode '$MODE': latest or lowest" >&2
    exit 2
    ;;
esac
"$VENV/bin/python" -m pip freeze --exclude edgelvm | grep -v '^-e ' | sort -f > "$VENV/versions.txt"
echo "== $MODE: versions that differ from constraints.txt (lock -> $MODE)"
"$VENV/bin/python" - "$VENV/versions.txt" <<'PY' || true
import sys
def pins(path):
    out = {}
    for line in open(path):
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==", 1)
            out[name.lower().replace("_", "-")] = version
    return out
lock, now = pins("constraints.txt"), pins(sys.argv[1])
for name in sorted(set(lock) | set(now)):
    if lock.get(name) != now.get(name):
        print(f"  {name}: {lock.get(name, '-')} -> {now.get(name, '-')}")
PY
"$VENV/bin/python" -m pytest -m "not slow" -q -p no:cacheprovider "$@"
