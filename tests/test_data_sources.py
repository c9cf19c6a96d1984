"""Dataset sources: npz and idx arrays, stratified limits, clear errors for missing files."""

import gzip

import numpy as np
import pytest

from pipeline.config import ConfigError, ExtractConfig, build
from pipeline.data import open_split
from pipeline.data.source import stratified_prefix


def data_config(kind, root, **extra):
    return build(ExtractConfig, {"backbone": {"name": "test_vit"}, "store": {"path": "-"},
                                 "data": {"kind": kind, "root": str(root), **extra}}).data


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_read_like_fashion_mnist(tmp_path):
    images = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 251
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1, 5]))
    source = open_split(data_config("idx", tmp_path, splits=["test"]), "test")
    assert len(source) == 5 and source.labels.tolist() == [3, 1, 4, 1, 5]
    image = source.load(2)
    assert image.mode == "RGB" and image.size == (28, 28)
    assert np.array_equal(np.asarray(image)[..., 0], images[2].astype(np.uint8))
    assert source.sample_ids[0] == "test:0"


def test_npz_split_and_content_fingerprint(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", images=rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8), labels=np.array([0, 1, 0, 1, 0, 1]))
    cfg = data_config("npz", tmp_path, splits=["train"])
    before = open_split(cfg, "train").fingerprint()
    np.savez(tmp_path / "train.npz", images=rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8), labels=np.array([0, 1, 0, 1, 0, 1]))
    after = open_split(cfg, "train").fingerprint()
    assert before["num_samples"] == 6 and before["samples_sha256"] != after["samples_sha256"]  # pixels changed


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="train.npz"):
        open_split(data_config("npz", tmp_path, splits=["train"]), "train")
    (tmp_path / "val").mkdir()
    with pytest.raises(ConfigError, match=r"split folder .*train.* does not exist; splits present: \['val'\]"):
        open_split(data_config("image_folder", tmp_path), "train")


def test_stratified_prefix_balances_classes():
    labels = np.array([0] * 10 + [1] * 10 + [2] * 10)  # class-sorted, as ImageFolder lists them
    picked = stratified_prefix(labels, 7)
    assert list(np.bincount(labels[picked])) == [3, 2, 2]
    assert list(picked) == sorted(picked)
    assert list(stratified_prefix(labels, None)) == list(range(30))
