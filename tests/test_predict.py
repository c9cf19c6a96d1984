"""predict: several tasks from one backbone pass equal the adapters applied to cached features."""

import csv
import json
from pathlib import Path

import pytest
import torch

from cache import ConfigError, open_store
from pipeline.adapters import load_adapter
from pipeline.backbones.build import build_backbone
from pipeline.cli import main
from pipeline.config import ExtractConfig, build
from pipeline.runners.extract import run_extract
from pipeline.runners.train import run_train
from tests.conftest import colour_folder, tiny_config
from tests.test_train import train_config


@pytest.mark.parametrize("dtype,extra", [("float16", []), ("int8", []),
                                         ("float16", ["backbone.through_final_norm=true", "store.tokens=mean"])])
def test_predictions_equal_cached_path(tmp_path, dtype, extra):
    images = colour_folder(tmp_path / "images", per_class=6)
    cfg = tiny_config(tmp_path, images, "backbone.layers=[0, -1]", f"store.dtype={dtype}", *extra)
    run_extract(cfg)
    # A reduced layer keeps the record that it went through the final norm (predict reproduces it).
    assert open_store(cfg.store.path).layers["blocks.5"].through_final_norm == bool(extra)
    run_train(train_config(cfg.store.path, tmp_path / "colour", [{"kind": "inca", "layers": ["blocks.5"], "hparams": {"num_heads": 4}}], epochs=2, save_top=1))
    run_train(train_config(cfg.store.path, tmp_path / "probe", [{"kind": "linear", "layers": ["embed"]}], epochs=2, save_top=1))
    dirs = [str(next((tmp_path / run / "adapters").iterdir())) for run in ("colour", "probe")]
    out = tmp_path / "preds.csv"
    # --batch-size 5: the extraction's batches (tiny_config), so the live features are the cached
    # ones by construction (some CPUs' kernels round a sample differently in another batch size).
    assert main(["predict", *(a for d in dirs for a in ("--adapter", d)), str(images / "val"), "--out", str(out),
                 "--batch-size", "5"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 18 and set(rows[0]) == {"image", "colour", "colour_prob", "probe", "probe_prob"}

    reader = open_store(cfg.store.path)
    ids = [str(s) for s in reader.sample_ids("val")]
    for task, d in zip(("colour", "probe"), dirs):
        adapter = load_adapter(d, reader.fingerprint).eval()
        with torch.no_grad():
            probs = adapter(reader.read("val", adapter.required_layers(), 0, len(ids))).softmax(-1)
        by_id = {i: p for i, p in zip(ids, probs)}
        for row in rows:
            rel = "/".join(row["image"].split("/")[-2:])
            p = by_id[rel]
            assert row[task] == reader.classes[int(p.argmax())]
            assert float(row[f"{task}_prob"]) == pytest.approx(float(p.max()), abs=1e-4)


def test_adapter_refuses_another_store(tmp_path):
    images = colour_folder(tmp_path / "images", per_class=4)
    cfg = tiny_config(tmp_path, images, "backbone.layers=[-1]")
    run_extract(cfg)
    run_train(train_config(cfg.store.path, tmp_path / "run", [{"kind": "linear"}], epochs=1, save_top=1))
    other = tiny_config(tmp_path / "o", images, "backbone.layers=[-1]", "preprocess.image_size=48")
    run_extract(other)
    with pytest.raises(Exception, match="different feature store"):
        load_adapter(next((tmp_path / "run" / "adapters").iterdir()), open_store(other.store.path).fingerprint)


def test_predict_of_vqt_trained_on_a_store_with_cached_keys_values(tmp_path):
    """backbone.cache_kv: predict captures the keys/values as extraction did (it used to fail
    with "layer 'kv.0': no such module"), and equals VQT on the cached features."""
    images = colour_folder(tmp_path / "images", per_class=4)
    cfg = tiny_config(tmp_path, images, "backbone.layers=[0, 1, 2, 3, 4, 5]", "backbone.cache_kv=true")
    run_extract(cfg)
    run_train(train_config(cfg.store.path, tmp_path / "vqt", [{"kind": "vqt", "hparams": {"num_queries": 1}}], epochs=1, save_top=1))
    (directory,) = (tmp_path / "vqt" / "adapters").iterdir()
    reader = open_store(cfg.store.path)
    adapter = load_adapter(directory, reader.fingerprint, backbone_modules=build_backbone(cfg.backbone, cfg.preprocess).model).eval()
    assert adapter.kv_cached and any(l.startswith("kv.") for l in adapter.required_layers())
    out = tmp_path / "preds.json"
    assert main(["predict", "--adapter", str(directory), str(images / "val"), "--out", str(out),
                 "--batch-size", "5"]) == 0
    rows = json.loads(out.read_text())
    assert_rows_are_the_cached_predictions(rows, adapter, reader, "vqt")


def test_vqt_trains_and_predicts_on_a_store_whose_saved_config_has_a_renamed_key(tmp_path):
    """The backbone is rebuilt from the store's fingerprint alone, never from the extract config
    saved in the manifest: a key renamed since extraction leaves an old store usable, by VQT's
    training (its frozen blocks) and by predict."""
    images = colour_folder(tmp_path / "images", per_class=4)
    cfg = tiny_config(tmp_path, images, "backbone.layers=[0, 1, 2, 3, 4, 5]")
    run_extract(cfg)
    root = tmp_path / "store.zarr" / "zarr.json"
    meta = json.loads(root.read_text())
    saved = meta["attributes"]["feature_cache"]["config"]
    saved["backbone"]["model_args"] = saved["backbone"].pop("model_kwargs")  # a key of an older (or newer) schema
    root.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="backbone.model_args: unknown key"):  # the saved config no longer builds
        build(ExtractConfig, open_store(cfg.store.path).manifest.config)
    run_train(train_config(cfg.store.path, tmp_path / "vqt", [{"kind": "vqt", "hparams": {"num_queries": 1}}], epochs=1, save_top=1))
    (directory,) = (tmp_path / "vqt" / "adapters").iterdir()
    out = tmp_path / "preds.json"
    assert main(["predict", "--adapter", str(directory), str(images / "val"), "--out", str(out),
                 "--batch-size", "5"]) == 0
    rows = json.loads(out.read_text())
    reader = open_store(cfg.store.path)
    adapter = load_adapter(directory, reader.fingerprint, backbone_modules=build_backbone(cfg.backbone, cfg.preprocess).model).eval()
    assert_rows_are_the_cached_predictions(rows, adapter, reader, "vqt")


def assert_rows_are_the_cached_predictions(rows, adapter, reader, task):
    """Each predicted row equals the adapter applied to the cached features of its image."""
    ids = [str(s) for s in reader.sample_ids("val")]
    with torch.no_grad():
        probs = adapter(reader.read("val", adapter.required_layers(), 0, len(ids))).softmax(-1)
    by_id = dict(zip(ids, probs))
    assert len(rows) == len(ids) == 12
    for row in rows:
        p = by_id["/".join(row["image"].split("/")[-2:])]
        assert row[task] == reader.classes[int(p.argmax())]
        assert row[f"{task}_prob"] == pytest.approx(float(p.max()), abs=1e-4)


def test_rebuilt_backbone_preprocesses_as_the_store_recorded(tmp_path):
    """A timm that resolves another crop mode for the model (its defaults changed since
    extraction) still gets the recorded one: predict feeds the pixels extraction read."""
    import dataclasses

    import numpy as np
    from PIL import Image
    from timm.data import create_transform

    from cache import StoreMismatchError
    from pipeline.training.frozen_backbone import rebuild_backbone

    images = colour_folder(tmp_path / "images", per_class=2)
    cfg = tiny_config(tmp_path, images, "backbone.layers=[-1]")
    run_extract(cfg)
    fp = open_store(cfg.store.path).fingerprint
    assert fp.preprocessing["crop_mode"] == "center"
    recorded = {**fp.preprocessing, "crop_mode": "squash"}
    backbone = rebuild_backbone(dataclasses.replace(fp, preprocessing=recorded), "store x")
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 120, 3), dtype=np.uint8))
    squashed = create_transform(input_size=(3, 64, 64), interpolation=recorded["interpolation"], mean=tuple(recorded["mean"]),
                                std=tuple(recorded["std"]), crop_pct=recorded["crop_pct"], crop_mode="squash", is_training=False)(wide)
    centred = rebuild_backbone(fp, "store x").transform()(wide)
    assert not torch.equal(squashed, centred)  # the two modes differ on a wide image
    assert torch.equal(backbone.transform()(wide), squashed)

    with pytest.raises(StoreMismatchError, match=r"preprocessing\.crop_border: recorded 4"):
        rebuild_backbone(dataclasses.replace(fp, preprocessing={**fp.preprocessing, "crop_border": 4}), "store x")


def test_predict_says_when_the_store_was_extracted_under_autocast(tmp_path, caplog):
    """predict's float32 CPU forward cannot reproduce bf16-autocast features: it says so, once."""
    images = colour_folder(tmp_path / "images", per_class=2)
    cfg = tiny_config(tmp_path, images, "backbone.layers=[-1]")
    run_extract(cfg)
    run_train(train_config(cfg.store.path, tmp_path / "run", [{"kind": "linear"}], epochs=1, save_top=1))
    adapter = next((tmp_path / "run" / "adapters").iterdir())
    assert main(["predict", "--adapter", str(adapter), str(images / "val"), "--out", str(tmp_path / "a.csv")]) == 0
    assert "autocast" not in caplog.text  # extracted on the CPU, in float32: nothing to say

    manifest = json.loads((adapter / "adapter.json").read_text())
    manifest["store_fingerprint"]["compute"] = {"device": "cuda", "autocast": "bfloat16"}
    (adapter / "adapter.json").write_text(json.dumps(manifest))
    assert main(["predict", "--adapter", str(adapter), str(images / "val"), "--out", str(tmp_path / "b.csv")]) == 0
    warnings = [r for r in caplog.records if "bfloat16 autocast on cuda" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


def test_predict_refuses_a_rebuilt_backbone_whose_layers_differ_from_the_stored_ones():
    """A backbone rebuilt from the record that gives a layer another shape (another timm
    version, a layer tapped another way) would feed the adapters features they never saw."""
    from cache import LayerSpec, StoreError
    from pipeline.runners.predict import _check_same_layers
    from tests.conftest import fake_fingerprint

    stored = LayerSpec("blocks.1", 16, 8, 0, (4, 4), None)
    fp = fake_fingerprint((stored,))
    _check_same_layers(fp, {"blocks.1": stored}, ["blocks.1"], Path("a"))
    with pytest.raises(StoreError, match=r"the rebuilt backbone does not give the stored layers \(blocks.1: stored"):
        _check_same_layers(fp, {"blocks.1": LayerSpec("blocks.1", 16, 8, 0, (2, 8), None)}, ["blocks.1"], Path("a"))
    # A store made before registers_only was recorded lacks it; the rebuilt backbone says it.
    old = LayerSpec("blocks.1", 20, 8, 4, (4, 4), 1)
    _check_same_layers(fake_fingerprint((old,)), {"blocks.1": LayerSpec("blocks.1", 20, 8, 4, (4, 4), 1, registers_only=True)},
                       ["blocks.1"], Path("a"))
    with pytest.raises(StoreError, match="does not give the stored layers"):  # recorded registers only, rebuilt with a CLS
        _check_same_layers(fake_fingerprint((LayerSpec("blocks.1", 20, 8, 4, (4, 4), 1, registers_only=True),)), {"blocks.1": old},
                           ["blocks.1"], Path("a"))


def test_a_recorded_img_size_that_the_image_size_gives_rebuilds_the_backbone():
    """Stores made before model_kwargs.img_size was refused may record it: where it equals the
    recorded input size, the image size builds the same model; otherwise it is refused."""
    from dataclasses import replace

    from pipeline.training.frozen_backbone import _recorded
    from tests.conftest import fake_fingerprint

    fp = fake_fingerprint(image_size=64)
    fp = replace(fp, preprocessing={**fp.preprocessing, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0})
    recorded = _recorded(replace(fp, backbone=replace(fp.backbone, model_kwargs={"img_size": 64, "drop_path_rate": 0.0})), "store x")
    assert recorded.backbone.model_kwargs == {"drop_path_rate": 0.0} and recorded.preprocess.image_size == 64
    with pytest.raises(ConfigError, match="model_kwargs.img_size: got 32"):
        _recorded(replace(fp, backbone=replace(fp.backbone, model_kwargs={"img_size": 32})), "store x")


def test_a_folder_gives_the_images_extraction_would_take(tmp_path):
    """Hidden files and folders are not images to predict: .ipynb_checkpoints/ copies were
    predicted too, and macOS's ._x.jpg resource forks (no images) failed the run."""
    from PIL import Image

    from pipeline.runners.predict import find_images

    photos = tmp_path / ".photos"  # a hidden folder given by name is searched
    for rel in ["a.jpg", "sub/b.PNG", ".ipynb_checkpoints/a-checkpoint.jpg", "sub/.cache/c.jpg"]:
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(photos / rel, format="PNG")
    (photos / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (photos / "notes.txt").write_text("x")
    (photos / "folder.jpg").mkdir()
    (photos / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (4, 4)).save(elsewhere / "d.jpg")
    (photos / "linked").symlink_to(elsewhere)  # a linked folder is searched (rglob skipped it), as extraction's class folders
    (elsewhere / "loop").symlink_to(photos)  # a folder reached again is searched once
    assert find_images([str(photos)]) == [photos / "a.jpg", photos / "gone.jpg", photos / "linked" / "d.jpg", photos / "sub" / "b.PNG"]
    assert find_images([str(photos / "._a.jpg")]) == [photos / "._a.jpg"]  # a file named is taken as given


def test_a_damaged_adapter_folder_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """Each was a raw traceback (FileNotFoundError, SafetensorError, RuntimeError, JSONDecodeError,
    KeyError)."""
    import shutil

    images = colour_folder(tmp_path / "images", per_class=4)
    cfg = tiny_config(tmp_path, images, "backbone.layers=[-1]")
    run_extract(cfg)
    run_train(train_config(cfg.store.path, tmp_path / "run", [{"kind": "linear"}, {"kind": "inca", "hparams": {"num_heads": 4}}],
                           epochs=1, save_top=2))
    saved = {d.name.split("_", 1)[1].split("@")[0]: d for d in (tmp_path / "run" / "adapters").iterdir()}

    def damaged(name, damage):
        d = tmp_path / "damaged" / name / "adapters" / "01_x"
        shutil.copytree(saved["linear"], d)
        damage(d)
        return d

    cases = {
        "no_weights": (lambda d: (d / "adapter.safetensors").unlink(), "the adapter's weights cannot be read"),
        "cut_weights": (lambda d: (d / "adapter.safetensors").write_bytes((d / "adapter.safetensors").read_bytes()[:20]),
                        "the adapter's weights cannot be read"),
        "other_weights": (lambda d: shutil.copy(saved["inca"] / "adapter.safetensors", d / "adapter.safetensors"),
                          "the weights do not fit the adapter adapter.json describes"),
        "cut_manifest": (lambda d: (d / "adapter.json").write_text((d / "adapter.json").read_text()[:50]), "not a readable adapter manifest"),
        "bare_manifest": (lambda d: (d / "adapter.json").write_text('{"kind": "linear"}'), "the adapter manifest lacks ['format_version'"),
        "bad_fingerprint": (lambda d: (d / "adapter.json").write_text(json.dumps({**json.loads((d / "adapter.json").read_text()),
                                                                                   "store_fingerprint": {"x": 1}})),
                            "its store_fingerprint is damaged"),
    }
    for name, (damage, message) in cases.items():
        d = damaged(name, damage)
        capsys.readouterr()
        assert main(["predict", "--adapter", str(d), str(images / "val"), "--out", str(tmp_path / f"{name}.csv")]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and str(d) in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not (tmp_path / f"{name}.csv").exists()

    assert main(["predict", "--adapter", str(saved["linear"] / "adapter.json"), str(images / "val")]) == 2
    assert "is a file; give the adapter's folder" in capsys.readouterr().err
    # An adapter given as "." is named by its folder (the column names were "" and "_prob").
    monkeypatch.chdir(saved["linear"])
    assert main(["predict", "--adapter", ".", str(images / "val" / "red"), "--out", str(tmp_path / "dot.csv")]) == 0
    assert next(csv.reader((tmp_path / "dot.csv").open())) == ["image", "run", "run_prob"]


def test_an_adapter_whose_weights_file_is_not_found_says_where_the_path_came_from(tmp_path, monkeypatch, capsys):
    """A weights file given by a relative path at extraction, predict run elsewhere: the error
    named backbone.weights, an option predict does not have."""
    import timm
    from safetensors.torch import save_file

    images = colour_folder(tmp_path / "images", per_class=4)
    save_file(timm.create_model("test_vit", img_size=64).state_dict(), str(tmp_path / "w.safetensors"))
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, images, "backbone.layers=[-1]", "backbone.weights=w.safetensors")
    run_extract(cfg)
    run_train(train_config(cfg.store.path, tmp_path / "run", [{"kind": "linear"}], epochs=1, save_top=1))
    adapter = next((tmp_path / "run" / "adapters").iterdir())
    monkeypatch.chdir(tmp_path / "images")
    capsys.readouterr()  # the extraction's and training's progress bars
    assert main(["predict", "--adapter", str(adapter), str(images / "val")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the store of adapter {str(adapter)!r}: its backbone cannot be rebuilt: backbone.weights: "
                          "'w.safetensors' is neither")
    assert "(a relative weights path is read from the working directory)" in err
