#!/usr/bin/env bash
# Create ./.venv with the CPU build of torch first (an open "torch" requirement would pull a
# multi-gigabyte CUDA build), then this package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    # Here torch==2.13.0 is the CPU wheel; elsewhere add PyTorch's CPU index URL (see README).
    .venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
