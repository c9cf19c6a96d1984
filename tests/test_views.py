"""Augmented views in the cache (store.views = K): view 0 is the clean extraction, view v of
sample i is timm's train transform drawn with the seed of (i, v), reruns and resumes give the
same bytes, the reader hands out one view per sample per epoch, and val/test stay clean."""

import hashlib
import random

import numpy as np
import pytest
import timm
import torch
import zarr
from timm.data import create_transform

from cache import ConfigError, StoreMismatchError, open_store
from pipeline.config import TrainConfig, build
from pipeline.data import open_split
from pipeline.runners.extract import run_extract
from pipeline.runners.train import run_train
from tests.conftest import tiny_config, unstamped_samples, write_image_folder
from tests.test_resume import extract_and_kill

LAYERS = ["embed", "blocks.0", "blocks.5", "blocks.2.mlp"]


def views_config(tmp_path, images, *overrides):
    return tiny_config(tmp_path, images, "store.views=3", "store.dtype=float32", *overrides)


def stored(path, group: str) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return {name: root[f"{group}/layers/{name}"][:] for name in LAYERS}


def hand_seed(seed: int, index: int, view: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}:{view}".encode()).digest()[:8], "little")


def test_view_0_is_the_clean_extraction_and_val_stays_clean(tmp_path, image_folder):
    cfg = views_config(tmp_path / "k3", image_folder)
    run_extract(cfg)
    clean = tiny_config(tmp_path / "k1", image_folder, "store.dtype=float32")
    run_extract(clean)
    for group in ("train", "val"):
        for name, values in stored(cfg.store.path, group).items():
            np.testing.assert_array_equal(values, stored(clean.store.path, group)[name], err_msg=f"{group}/{name}")
    reader = open_store(cfg.store.path)
    assert reader.views("train") == 3 and reader.views("val") == 1
    root = zarr.open_group(cfg.store.path, mode="r")
    assert sorted(root["train/views"].group_keys()) == ["1", "2"] and "views" not in root["val"]
    for v in (1, 2):  # augmented views differ from the clean one and from each other
        assert not np.array_equal(stored(cfg.store.path, f"train/views/{v}")["blocks.5"], stored(clean.store.path, "train")["blocks.5"])
    assert not np.array_equal(stored(cfg.store.path, "train/views/1")["blocks.5"], stored(cfg.store.path, "train/views/2")["blocks.5"])


@pytest.mark.parametrize("policy", ["crop_flip", "randaugment"])
def test_an_augmented_view_is_timms_train_transform_with_its_seed(tmp_path, image_folder, policy):
    cfg = views_config(tmp_path, image_folder, f"augment.policy={policy}", "augment.seed=7", "augment.scale=[0.3,1.0]")
    run_extract(cfg)
    # By hand: timm's train transform for the model's data config, the generators seeded with
    # sha256("seed:index:view"), one forward of timm's own model.
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=64).eval()
    from pipeline.backbones.build import build_backbone

    model.load_state_dict(build_backbone(cfg.backbone, cfg.preprocess).model.state_dict())  # the store's random weights
    tf = create_transform((3, 64, 64), is_training=True, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=None,
                          auto_augment="rand-m9-mstd0.5-inc1" if policy == "randaugment" else None,
                          interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    source = open_split(cfg.data, "train")
    pixels = []
    for i in range(len(source)):
        s = hand_seed(7, i, 2)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)
        pixels.append(tf(source.load(i)))
    out = {}
    model.blocks[5].register_forward_hook(lambda module, args, output: out.update(tokens=output.clone()))
    with torch.no_grad():
        model(torch.stack(pixels))
    final = out["tokens"]  # block 5's output, CLS first, before the final norm
    got = torch.from_numpy(stored(cfg.store.path, "train/views/2")["blocks.5"])
    torch.testing.assert_close(got, final, atol=2e-3, rtol=1e-2)


def test_views_are_the_same_bytes_after_sigkill_and_resume(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=8)  # 24 samples/split, 6 chunks
    cfg = views_config(tmp_path / "a", images, "runtime.batch_size=2", "store.chunks_per_shard=1")
    done = extract_and_kill(cfg, "train/views/1")
    assert 2 <= done < 6, f"the child should be killed inside view 1, it had stamped {done} of its chunks"
    todo = unstamped_samples(cfg.store.path, ("train", "train/views/1", "train/views/2", "val"), 4)
    assert run_extract(cfg).streamed == todo  # the same config: resumes, view 1 from its first missing chunk

    # The same batches: a sample's float32 features may differ by an ULP between batch sizes on
    # some CPUs' kernels (MKL's AVX2 path), which a byte comparison would see.
    fresh = views_config(tmp_path / "b", images, "runtime.batch_size=2", "store.chunks_per_shard=1")
    run_extract(fresh)
    for group in ("train", "train/views/1", "train/views/2", "val"):
        for name, values in stored(cfg.store.path, group).items():
            np.testing.assert_array_equal(values, stored(fresh.store.path, group)[name], err_msg=f"{group}/{name}")


def test_the_reader_gives_each_sample_once_per_epoch_with_one_view_for_every_layer(tmp_path, image_folder):
    cfg = views_config(tmp_path, image_folder)
    run_extract(cfg)
    views = [stored(cfg.store.path, g) for g in ("train", "train/views/1", "train/views/2")]
    reader = open_store(cfg.store.path)
    drawn = set()
    for epoch in range(6):
        seen = []
        for batch in reader.batches("train", ["blocks.0", "blocks.5"], 5, seed=1, epoch=epoch, views="random"):
            for row, i in enumerate(batch.indices.tolist()):
                which = {name: [v for v in range(3) if np.array_equal(batch.features[name][row].numpy(), views[v][name][i])]
                         for name in ("blocks.0", "blocks.5")}
                assert len(which["blocks.0"]) == 1 and which["blocks.0"] == which["blocks.5"], (epoch, i, which)
                drawn.add(which["blocks.0"][0])
                seen.append(i)
        assert sorted(seen) == list(range(12))
    assert drawn == {0, 1, 2}
    clean = [i for b in reader.batches("train", ["blocks.0"], 5, views="clean") for i in b.indices.tolist()]
    assert sorted(clean) == list(range(12))
    every = [(b.features["blocks.0"], b.indices) for b in reader.batches("train", ["blocks.0"], 5, shuffle=False, views="all")]
    rows = torch.cat([f for f, _ in every]).numpy()
    np.testing.assert_array_equal(rows, np.concatenate([v["blocks.0"] for v in views]))  # K passes, view by view


def test_training_reads_the_views_and_the_views_enter_the_fingerprint(tmp_path, image_folder):
    """The exact probe solves on every view (random) or view 0 (clean): its optimum is
    scikit-learn's on those rows; AdamW's probe reads other values under random than clean."""
    from safetensors.torch import load_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    cfg = views_config(tmp_path, image_folder)
    run_extract(cfg)
    logits = {}
    for views in ("random", "clean"):
        run = tmp_path / f"run_{views}"
        result = run_train(build(TrainConfig, {
            "store": cfg.store.path, "output": str(run), "epochs": 2, "batch_size": 4, "views": views, "val_split": "val",
            "test_split": None, "save_top": 2,
            "adapters": [{"kind": "linear", "layers": ["blocks.5"]}, {"kind": "linear", "layers": ["blocks.5"], "solver": "lbfgs", "weight_decay": 0.1}]}))
        assert len(result["rows"]) == 2
        logits[views] = np.load(run / "logits.npz")["val_logits"]

        groups = ("train", "train/views/1", "train/views/2") if views == "random" else ("train",)
        x = np.concatenate([stored(cfg.store.path, g)["blocks.5"][:, 1:].astype(np.float64).mean(1) for g in groups])
        y = np.tile(open_store(cfg.store.path).labels("train"), len(groups))
        scaler = StandardScaler().fit(x)
        z = scaler.transform(x)
        l2 = 0.1  # the entry's weight_decay (well conditioned: the solver's tolerance decides nothing here)
        sk = LogisticRegression(C=1 / (l2 * len(y)), tol=1e-10, max_iter=10000).fit(z, y)
        (lbfgs,) = [d for d in (run / "adapters").iterdir() if "lbfgs" in d.name]
        state = {k: v.double().numpy() for k, v in load_file(str(lbfgs / "adapter.safetensors")).items()}
        w, b = state["head.weight"] * scaler.scale_, state["head.bias"] + state["head.weight"] @ scaler.mean_

        def objective(w, b):
            out = z @ w.T + b
            top = out.max(1, keepdims=True)
            return float((top[:, 0] + np.log(np.exp(out - top).sum(1)) - out[np.arange(len(y)), y]).mean() + 0.5 * l2 * (w * w).sum())

        assert objective(w, b) <= objective(sk.coef_, sk.intercept_) + 1e-8, views
    assert not np.allclose(logits["random"], logits["clean"], atol=1e-3)  # the augmented views were read
    with pytest.raises(StoreMismatchError, match="views.count: store has 3, now 4"):
        run_extract(tiny_config(tmp_path, image_folder, "store.views=4", "store.dtype=float32"))
    with pytest.raises(StoreMismatchError, match="views.augmentation.policy: store has 'crop_flip', now 'trivialaugment'"):
        run_extract(views_config(tmp_path, image_folder, "augment.policy=trivialaugment"))
    with pytest.raises(ConfigError, match="augment.split: got 'training', which is not one of data.splits"):
        views_config(tmp_path, image_folder, "augment.split=training")


def test_a_sample_read_in_one_view_only_is_read_again_not_trained_on_blank(tmp_path, monkeypatch):
    """A transient read error while one view is extracted (on_corrupt: skip) stored that view
    of the sample as a blank image, valid=False, beside a valid clean view; the reader goes by
    the clean mask, so training took the blank image's features as real. Finalizing now
    refuses, unstamps that chunk in every view, and the rerun reads the file again."""
    from PIL import Image

    from cache import StoreError

    images = write_image_folder(tmp_path / "images")
    cfg = tiny_config(tmp_path, images, "store.views=2", "data.on_corrupt=skip", "backbone.layers=[-1]")
    victim = str(sorted((images / "train" / "cat").iterdir())[1])
    opens, real_open = [], Image.open

    def flaky(fp, *args, **kwargs):  # the file's 2nd read fails (view 1's): EIO once, then fine
        if str(fp) == victim:
            opens.append(1)
            if len(opens) == 2:
                raise OSError(5, "Input/output error")
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", flaky)
    with pytest.raises(StoreError, match=r"read in some views and not in others .* 1 samples, e\.g\. \{'train': \['cat/"):
        run_extract(cfg)
    root = zarr.open_group(cfg.store.path, mode="r")
    stamps = [root[g]["chunk_done"][:] for g in ("train", "train/views/1")]
    spc = cfg.store.samples_per_chunk
    victim_chunk = [str(s) for s in open_split(cfg.data, "train").sample_ids].index(victim.split("train/")[1]) // spc
    for done in stamps:  # only the victim's chunk is to redo, in both views
        assert np.flatnonzero(done == 0).tolist() == [victim_chunk]
    run_extract(cfg)
    reader = open_store(cfg.store.path)
    assert reader.manifest.complete and reader.manifest.skipped == {}
    assert root["train/valid"][:].all() and root["train/views/1/valid"][:].all()


def test_verify_reports_a_sample_valid_in_one_view_only(tmp_path):
    """A store made before finalize refused it (or edited since): verify names the chunk in
    every view, and --repair unstamps it there."""
    from cache.verify import verify_store

    cfg = tiny_config(tmp_path, write_image_folder(tmp_path / "images"), "store.views=2", "backbone.layers=[-1]")
    run_extract(cfg)
    zarr.open_group(cfg.store.path, mode="r+")["train/views/1/valid"][5] = False
    chunk = 5 // cfg.store.samples_per_chunk
    reports = {r.split: r for r in verify_store(cfg.store.path, repair=True)}
    for group in ("train", "train/views/1"):
        assert "valid: a sample is valid in some views and not in others" in reports[group].bad[chunk]
        assert open_store(cfg.store.path, allow_partial=True).missing_chunks(group) == [chunk]


def test_an_unfinished_view_shows_in_the_summary_and_is_not_read(tmp_path):
    """A store stopped while a view was extracted: inspect counted the clean view's chunks only
    ("chunks N/N"), and read() of an unwritten chunk gave its fill value (NaN rows)."""
    from cache import StoreError, summarize

    cfg = tiny_config(tmp_path, write_image_folder(tmp_path / "images"), "store.views=2", "backbone.layers=[-1]")
    run_extract(cfg)
    root = zarr.open_group(cfg.store.path, mode="r+")
    root["train/views/1/chunk_done"][0] = 0
    train = summarize(cfg.store.path)["splits"]["train"]
    assert train["chunks_done"] == train["chunks_total"] - 1
    reader = open_store(cfg.store.path, allow_partial=True)
    with pytest.raises(StoreError, match=r"chunks \[0\] of 'train/views/1' .* are not stamped"):
        reader.read("train/views/1", list(reader.layers), 0, 4)
    reader.read("train", list(reader.layers), 0, 4)  # the clean view is whole
