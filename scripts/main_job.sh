#!/usr/bin/env bash
# The main job, end to end on a fresh machine: install, extract Fashion-MNIST through
# ImageNet EfficientNet-Lite0 into a zarr cache, train adapters from it, print the table.
# Rerunning is cheap: a complete store is reused (only missing chunks are ever computed).
set -euo pipefail
cd "$(dirname "$0")/.."
# Arguments went to extract alone, so `store.path=...` made inspect and train read the default
# store; only --overwrite (re-extract the store after its data changed) is passed on.
for arg in "$@"; do
    if [ "$arg" != "--overwrite" ]; then
        echo "error: main_job.sh takes only --overwrite (passed to extract); got '$arg'. Run the stages yourself for other settings." >&2
        exit 2
    fi
done
bash scripts/setup.sh
.venv/bin/python -m pipeline extract configs/fashion_mnist_lite0.yaml "$@"
.venv/bin/python -m pipeline inspect stores/fashion_mnist_lite0.zarr
.venv/bin/python -m pipeline train configs/train_fashion_mnist_lite0.yaml --overwrite  # a rerun replaces the last run whole
