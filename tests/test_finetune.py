"""The full fine-tuning paragon on a tiny ViT: augmentation on training images only, the time
budget, the learning rate chosen on validation, and the report's figure and cost lines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import BenchConfig, ConfigError, build, to_dict
from tests.conftest import tiny_config, write_image_folder

SETTINGS = {"image_size": 32, "epochs": 2, "time_budget_s": None, "lr": 1e-3, "weight_decay": 0.05, "batch_size": 8,
            "warmup_epochs": 0.5, "crop_scale": [0.08, 1.0]}


@pytest.fixture(scope="module")
def extract(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("finetune")
    root = write_image_folder(tmp / "images", per_class=6, size=40)
    return to_dict(tiny_config(tmp, root))


def test_augmentation_is_applied_to_training_images_only(extract, monkeypatch):
    import timm
    from timm.data import resolve_model_data_config

    from pipeline.benchmarking import finetune as F
    from pipeline.data import open_split
    from pipeline.training.splits import validation_mask

    calls = []
    real = F.make_loader

    def recording(source, transform, indices, *args):
        calls.append((source.split, np.asarray(indices), transform))
        return real(source, transform, indices, *args)

    monkeypatch.setattr(F, "make_loader", recording)
    result = F.finetune(extract, SETTINGS, 0, "train", "val", 0.25)

    is_val = validation_mask(len(open_split(build_data(extract), "train")), 0.25, 0)
    train_calls = [c for c in calls if c[0] == "train" and not is_val[c[1]].any()]
    val_calls = [c for c in calls if c[0] == "train" and is_val[c[1]].all()]
    test_calls = [c for c in calls if c[0] == "val"]
    assert len(train_calls) == len(val_calls) == len(test_calls) == 2 and len(calls) == 6  # one of each per epoch
    assert all(sorted(c[1]) == list(np.flatnonzero(~is_val)) for c in train_calls)
    # The backbone's own data config, straight from timm (test_vit: bicubic, mean = std = 0.5).
    expected = resolve_model_data_config(timm.create_model("test_vit", pretrained=False, img_size=32))
    for _, _, transform in train_calls:
        names = [type(t).__name__ for t in transform.transforms]
        assert names[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"], names
        assert not any(n in names for n in ("ColorJitter", "RandAugment", "RandomErasing")), names
        crop, norm = transform.transforms[0], transform.transforms[-1]
        assert crop.size == (32, 32) and crop.scale == (0.08, 1.0) and "bicubic" in repr(crop)
        assert tuple(norm.mean.tolist()) == expected["mean"] and tuple(norm.std.tolist()) == expected["std"]
    for _, _, transform in val_calls + test_calls:
        assert not any("Random" in type(t).__name__ for t in transform.transforms), transform
    # Behaviour, not names: a training view changes from draw to draw, an evaluation view never does.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    train_tf, eval_tf = train_calls[0][2], val_calls[0][2]
    torch.manual_seed(0)
    assert any(not torch.equal(train_tf(image), train_tf(image)) for _ in range(5))
    assert torch.equal(eval_tf(image), eval_tf(image)) and eval_tf(image).shape == (3, 32, 32)

    elapsed = [h["elapsed_s"] for h in result["history"]]
    assert result["epochs_run"] == 2 and not result["stopped_by_budget"] and elapsed[0] < elapsed[1]  # cumulative
    best = max(result["history"], key=lambda h: h["val_acc"])
    assert (result["best_epoch"], result["test_acc"]) == (best["epoch"], best["test_acc"])


def build_data(extract: dict):
    from pipeline.config import ExtractConfig

    return build(ExtractConfig, extract).data


def test_time_budget_stops_after_the_first_epoch_past_it(extract):
    from pipeline.benchmarking.finetune import finetune

    result = finetune(extract, {**SETTINGS, "epochs": 3, "time_budget_s": 0.0}, 0, "train", "val", 0.25)
    assert result["epochs_run"] == len(result["history"]) == 1 and result["epochs_planned"] == 3
    assert result["stopped_by_budget"] and result["converged"] is False  # one epoch cannot show convergence


def test_converged_needs_a_flat_loss_and_the_last_val_near_the_best():
    from pipeline.benchmarking.finetune import converged

    def epochs(*pairs):
        return [{"val_acc": v, "train_loss": l} for v, l in pairs]

    assert converged(epochs((0.80, 1.00), (0.900, 0.50), (0.897, 0.49)))
    assert not converged(epochs((0.80, 1.00), (0.900, 0.50), (0.890, 0.49)))  # 1 point below the best
    assert not converged(epochs((0.80, 1.00), (0.900, 0.50), (0.900, 0.40)))  # the loss still falls by 20%
    assert not converged(epochs((0.900, 0.50),))


# The per-lr runs, faked: validation prefers 1e-2, test would have preferred 3e-2.
VAL = {1e-3: 0.50, 1e-2: 0.80, 3e-2: 0.60}
TEST = {1e-3: 0.55, 1e-2: 0.70, 3e-2: 0.90}


def fake_run(fn, extract, settings, seed, *rest) -> dict:
    lr = settings["lr"]
    history = [{"epoch": e, "elapsed_s": 10.0 * e, "train_loss": 1.0 / e, "val_acc": VAL[lr] - 0.1 * (2 - e) + 0.01 * seed,
                "test_acc": TEST[lr] - 0.1 * (2 - e) + 0.01 * seed} for e in (1, 2)]
    result = {"val_acc": history[-1]["val_acc"], "test_acc": history[-1]["test_acc"], "best_epoch": 2, "lr": lr, "epochs_run": 2,
              "epochs_planned": settings["epochs"], "train_s": 20.0, "stopped_by_budget": False, "converged": False,
              "converged_rule": "a rule", "params": 1000, "image_size": settings["image_size"], "history": history, "device": "cpu"}
    return {"result": result, "wall_s": 30.0 + seed, "peak_mb": 900.0, "gpu_peak_mb": None}


def paragon_row(tmp_path, extract: dict, monkeypatch, calls: list) -> dict:
    from pipeline.benchmarking.units import Units
    from pipeline.config import ExtractConfig
    from pipeline.runners import bench as bench_module

    def recorded(fn, *args):
        calls.append((args[1]["lr"], args[2]))
        return fake_run(fn, *args)

    monkeypatch.setattr(bench_module, "run_measured", recorded)
    finetune = {**SETTINGS, "lr": list(VAL), "seeds": [0, 1, 2]}
    cfg = build(BenchConfig, {"output": str(tmp_path / "out"), "cases": [{"name": "tiny", "extract": "e.yaml", "test_split": "val",
                                                                          "methods": [], "finetune": finetune}]})
    return bench_module._finetune_row(cfg, cfg.cases[0], build(ExtractConfig, extract), "a-store-key", Units(tmp_path / "units"))


def test_lr_is_chosen_on_the_first_seeds_validation_then_the_other_seeds_run_at_it(tmp_path, extract, monkeypatch):
    calls = []
    row = paragon_row(tmp_path, extract, monkeypatch, calls)
    assert calls == [(1e-3, 0), (1e-2, 0), (3e-2, 0), (1e-2, 1), (1e-2, 2)]
    assert row["paragon"]["lr"] == 1e-2 and [x["val_acc"] for x in row["paragon"]["lr_search"]] == [0.50, 0.80, 0.60]
    assert row["test_acc"] == pytest.approx(np.mean([0.70, 0.71, 0.72])) and row["seeds"] == 3
    assert row["wall_s"] == pytest.approx(31.0) and len(row["paragon"]["history"]) == 3
    # A rerun reuses every run, the chosen lr's first-seed run included.
    again = paragon_row(tmp_path, extract, monkeypatch, calls := [])
    assert calls == [] and again == row


@pytest.mark.parametrize("extract_s", [12.5, None])
def test_report_draws_the_time_figure_and_states_gap_and_cost(tmp_path, extract, monkeypatch, extract_s):
    from pipeline.benchmarking.report import PLOTS, write_benchmarks

    fine = paragon_row(tmp_path, extract, monkeypatch, [])
    probe = {"method": "linear probe, last layer (blocks.5)", "kind": "linear", "config": "lr 0.01", "params": 100, "pct_backbone": 0.1,
             "wall_s": 2.0, "peak_mb": 150.0, "gpu_peak_mb": None, "seeds": 3, "val_acc": 0.6, "val_acc_sd": 0.01,
             "test_acc": 0.65, "test_acc_sd": 0.02}
    case = {"name": "tiny", "backbone": "test_vit", "weights": "none", "image_size": [32, 32], "backbone_params": 1000,
            "store": {"dtype": "float16", "tokens": "all", "kb_on_disk": 1.0}, "splits": {"train": 18, "val": 18},
            "train_split": "train", "test_split": "val", "rows": [probe, fine], "per_layer": {}, "store_variants": []}
    if extract_s is not None:
        case["extract_s"] = extract_s
    machine = {"date": "today", "commit": "abc", "cpu": "cpu", "cores": 2, "torch_threads": 1, "memory_gb": 8, "gpu": None,
               "python": "3.11", "packages": {"torch": "2"}}
    config = {"output": str(tmp_path / "out"), "seeds": [0, 1, 2], "val_fraction": 0.1, "epochs": 2, "batch_size": 8, "warmup_epochs": 1.0,
              "cases": [{"name": "tiny", "methods": [{"kind": "linear", "lr": 0.01, "weight_decay": 0.0}], "notes": ""}]}
    result = {"config_path": "bench.yaml", "config": config, "machine": machine, "cases": [case], "speed": None, "wall_s": 1.0,
              "units_computed": 5, "units_reused": 0}
    text = write_benchmarks(tmp_path / "out", result).read_text()

    assert (tmp_path / "out" / PLOTS / "accuracy_vs_training_time.png").read_bytes()[:4] == b"\x89PNG"
    assert "accuracy_vs_training_time.png" in text
    assert "chose **0.01**" in text and "the other seeds ran at it" in text
    assert "vs full fine-tuning: **-6.00 points**" in text  # 65% against the paragon's mean 71%
    if extract_s is None:
        assert "= 15.5x (the extraction's time is not in these results" in text  # 31 s / 2 s
    else:
        assert "(extraction 12 s + adapter 2.0 s) = **2.1x**" in text  # 31 / 14.5
    assert "= **6.0x**" in text and "9.2x" in text and "peak resident set size of a process on CPU, not GPU memory" in text


def test_finetune_settings_list_every_problem():
    from pipeline.config.bench_config import FinetuneSettings

    with pytest.raises(ConfigError) as e:
        build(FinetuneSettings, {"image_size": 32, "epochs": 2, "lr": [1e-3, 0.0], "time_budget_s": -1, "crop_scale": [0.5, 0.2]})
    for fragment in ("lr: got [0.001, 0.0]", "time_budget_s: got -1.0", "crop_scale: got [0.5, 0.2]"):
        assert fragment in str(e.value), fragment
    ok = build(FinetuneSettings, {"image_size": 32, "epochs": 2})
    assert ok.lrs == (3e-4,) and ok.time_budget_s is None
    assert build(FinetuneSettings, {"image_size": 32, "epochs": 2, "lr": [1e-4, 3e-4], "time_budget_s": 0}).lrs == (1e-4, 3e-4)
