#!/usr/bin/env bash
# Refresh constraints.txt, the lock that bootstrap.sh (and so CI and the README's commands) install from.
#
# Resolves the newest versions pyproject.toml allows in a scratch venv — torch as bootstrap.sh installs it, then
# edgelvm with the extras CI uses — and writes what got installed. Run it on purpose (after
# scripts/check_versions.sh latest has passed), commit the new constraints.txt, and let CI prove it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
"$PYTHON" -m venv "$SCRATCH/venv"
PIP=("$SCRATCH/venv/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install "${EDGELVM_TORCH:-torch==2.13.0}"
"${PIP[@]}" install ".[toolchain,serve,dev]"
{
  echo "# edgelvm's lock: the versions CI tested, installed by scripts/bootstrap.sh as pip constraints."
  echo "# Made by scripts/lock.sh on $(date -u +%Y-%m-%d) with $("$SCRATCH/venv/bin/python" --version) on $(uname -m)."
  echo "# torch is not locked here: bootstrap.sh installs EDGELVM_TORCH (default torch==2.13.0, a CPU build) itself."
  "$SCRATCH/venv/bin/python" -m pip freeze --exclude edgelvm --exclude torch | grep -v '^-e ' | sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages locked"
