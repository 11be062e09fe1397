#!/usr/bin/env bash
# Set up, build the example checkpoint (a real few-step AdamW + LambdaLR training), then run
# components, list and a modify on it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
export PATH="$PWD/.venv/bin:$PATH" PYTHONWARNINGS="ignore::UserWarning"
EXAMPLE="${1:-example-checkpoint}"
rm -rf "$EXAMPLE"
python -m forgather_checkpoint.examples "$EXAMPLE/checkpoints/checkpoint-5" >/dev/null
CKPT="$EXAMPLE/checkpoints/checkpoint-5"
set -x
forgather checkpoint components "$CKPT"
forgather checkpoint list "$CKPT" --component optimizer
forgather checkpoint modify "$CKPT" --component optimizer --set weight_decay=0.01 --dry-run
forgather checkpoint modify "$CKPT" --component optimizer --set weight_decay=0.01 --force
forgather checkpoint lr "$CKPT" --scale 0.5 --force
forgather checkpoint list "$CKPT" --component optimizer
forgather checkpoint history "$CKPT"
forgather checkpoint verify "$CKPT"
