"""Stage one's feature statistics equal numpy's on the whole split, as the reader returns it."""

import numpy as np
import pytest

from cache import open_store
from pipeline.runners.extract import run_extract
from tests.conftest import tiny_config, write_image_folder

LAYERS = ["embed", "blocks.0", "blocks.5", "blocks.2.mlp"]


@pytest.fixture(scope="module", params=["float16", "int8"])
def store(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"stats_{request.param}")
    images = write_image_folder(tmp / "images", per_class=7)  # 21 samples, chunks of 4: the last is short
    (images / "train" / "cat" / "cat_003.jpg").write_bytes(b"not an image")  # a skipped sample is left out
    cfg = tiny_config(tmp, images, "data.on_corrupt=skip", f"store.dtype={request.param}")
    run_extract(cfg)
    return cfg.store.path


def numpy_stats(tokens: np.ndarray, prefix: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The oracle: float64 numpy over the decoded values of the samples given ([n, T, D])."""
    x = tokens.astype(np.float64)
    out = {"patch": (x[:, prefix:].reshape(-1, x.shape[2]).mean(0), x[:, prefix:].reshape(-1, x.shape[2]).std(0))}
    pooled = x[:, prefix:].mean(1)
    out["pooled"] = (pooled.mean(0), pooled.std(0))
    if prefix:
        out["prefix"] = (x[:, :prefix].reshape(-1, x.shape[2]).mean(0), x[:, :prefix].reshape(-1, x.shape[2]).std(0))
    return out


def check(stats, expected, samples):
    assert int(stats["samples"]) == samples
    for kind, (mean, std) in expected.items():
        # float64 sums of at most a few thousand float32 values: rounding is ~1e-15 relative,
        # far below this tolerance, and any wrong count, token or sample is far above it.
        np.testing.assert_allclose(stats[f"{kind}_mean"].numpy(), mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(stats[f"{kind}_std"].numpy(), std, rtol=1e-9, atol=1e-12)


def test_split_statistics_equal_numpy_on_the_whole_split(store):
    reader = open_store(store)
    valid = reader.valid("train")
    assert not valid.all()  # the corrupt image is in the split but not in the statistics
    whole = reader.read("train", LAYERS, 0, reader.num_samples("train"))
    stats = reader.feature_stats("train", LAYERS)
    for name in LAYERS:
        spec = reader.layers[name]
        check(stats[name], numpy_stats(whole[name].numpy()[valid], spec.prefix_tokens), int(valid.sum()))


def test_a_subset_subtracts_exactly_what_it_leaves_out(store):
    reader = open_store(store)
    valid = reader.valid("train")
    keep = np.zeros(len(valid), bool)
    keep[::3] = True
    whole = reader.read("train", LAYERS, 0, reader.num_samples("train"))
    stats = reader.feature_stats("train", LAYERS, keep=keep)
    for name in LAYERS:
        spec = reader.layers[name]
        check(stats[name], numpy_stats(whole[name].numpy()[valid & keep], spec.prefix_tokens), int((valid & keep).sum()))


def test_statistics_over_views_describe_every_view_of_the_kept_samples(tmp_path):
    """train with views "random" reads the clean and the augmented views alike: its
    standardisation describes all of them (it described the clean view alone)."""
    import zarr

    images = write_image_folder(tmp_path / "images", per_class=5)
    cfg = tiny_config(tmp_path, images, "store.views=3", "store.dtype=float32", "backbone.layers=[0]")
    run_extract(cfg)
    reader = open_store(cfg.store.path)
    keep = np.ones(reader.num_samples("train"), bool)
    keep[1::4] = False
    root = zarr.open_group(cfg.store.path, mode="r")
    for name in ("embed", "blocks.0"):
        every = np.concatenate([root[f"{g}/layers/{name}"][:][keep] for g in ("train", "train/views/1", "train/views/2")])
        stats = reader.feature_stats("train", [name], keep=keep, views="random")
        check(stats[name], numpy_stats(every, reader.layers[name].prefix_tokens), 3 * int(keep.sum()))
        clean = reader.feature_stats("train", [name], keep=keep)
        check(clean[name], numpy_stats(root[f"train/layers/{name}"][:][keep], reader.layers[name].prefix_tokens), int(keep.sum()))
