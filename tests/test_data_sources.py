"""Dataset sources: npz and idx arrays, stratified limits, clear errors for missing files."""

import gzip
import os

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


def fake_mnist(root, train=6, test=4, seed=0):
    """torchvision's MNIST as its raw idx files (what MNIST(root, download=False) reads)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", train), ("t10k", test)):
        for kind, array in (("images", rng.integers(0, 255, (n, 28, 28))), ("labels", np.arange(n) % 3)):
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            (raw / f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte").write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_refuses_a_split_it_would_read_as_its_test_set(tmp_path):
    fake_mnist(tmp_path)
    cfg = data_config("torchvision", tmp_path, name="MNIST", splits=["train", "val", "test"])
    assert len(open_split(cfg, "train")) == 6 and len(open_split(cfg, "test")) == 4
    with pytest.raises(ConfigError, match="MNIST has a train and a test set only; got split 'val'"):
        open_split(cfg, "val")


def test_torchvision_fingerprint_covers_the_dataset_files(tmp_path):
    fake_mnist(tmp_path)
    cfg = data_config("torchvision", tmp_path, name="MNIST", splits=["train"])
    before = open_split(cfg, "train").fingerprint()
    (tmp_path / "FashionMNIST" / "raw").mkdir(parents=True)  # another dataset under the same root: not this one's files
    (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"x")
    assert open_split(cfg, "train").fingerprint() == before
    fake_mnist(tmp_path, seed=1)  # other pixels, same ids and labels
    for f in (tmp_path / "MNIST" / "raw").iterdir():  # written later, whatever the file system's clock resolution
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert open_split(cfg, "train").fingerprint()["samples_sha256"] != before["samples_sha256"]


def test_given_class_names_must_be_the_datas_own(tmp_path):
    fake_mnist(tmp_path)
    digits = [f"{d} - {w}" for d, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])]
    assert open_split(data_config("torchvision", tmp_path, name="MNIST", splits=["train"], classes=digits), "train").classes == digits
    with pytest.raises(ConfigError, match=r"data.classes: got \['1 - one', '0 - zero'.*but the data names its classes"):
        open_split(data_config("torchvision", tmp_path, name="MNIST", splits=["train"], classes=[digits[1], digits[0], *digits[2:]]), "train")
    np.savez(tmp_path / "train.npz", images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([0, 1]), classes=np.array(["cat", "dog"]))
    assert open_split(data_config("npz", tmp_path, splits=["train"]), "train").classes == ["cat", "dog"]
    with pytest.raises(ConfigError, match="data.classes: got"):
        open_split(data_config("npz", tmp_path, splits=["train"], classes=["dog", "cat"]), "train")


def test_idx_class_names_come_from_the_config_not_the_path(tmp_path):
    root = tmp_path / "fashion"  # a path that names Fashion-MNIST says nothing about the labels
    root.mkdir()
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2]))
    assert open_split(data_config("idx", root, splits=["test"]), "test").classes == ["0", "1", "2"]
    named = data_config("idx", root, splits=["test"], classes=["a", "b", "c", "d"])
    assert open_split(named, "test").classes == ["a", "b", "c", "d"]
    with pytest.raises(ConfigError, match="has label 2, not a class index in"):
        open_split(data_config("idx", root, splits=["test"], classes=["a", "b"]), "test")


def test_a_store_whose_class_names_differ_says_where_names_come_from(tmp_path):
    """An idx store made with data.classes, rerun without them ("0".."max"): the refusal says
    to give the store's names, where --overwrite would store the digits instead."""
    from cache import StoreMismatchError
    from pipeline.runners.extract import run_extract
    from tests.conftest import tiny_config

    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((4, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 0, 1]))
    data = {"kind": "idx", "root": str(tmp_path), "splits": ["test"]}
    run_extract(tiny_config(tmp_path, tmp_path, "preprocess.image_size=32", data={**data, "classes": ["shoe", "bag"]}))
    with pytest.raises(StoreMismatchError, match=r"classes: store has \['shoe', 'bag'\], now \['0', '1'\] \(class names come from "
                       r"data.classes.*give data.classes the store's names rather than --overwrite\)"):
        run_extract(tiny_config(tmp_path, tmp_path, "preprocess.image_size=32", data=data))


def test_array_labels_and_layouts_are_checked_when_the_split_opens(tmp_path):
    gray = np.arange(2 * 4 * 4).reshape(2, 4, 4, 1).astype(np.uint8)
    np.savez(tmp_path / "train.npz", images=gray, labels=np.array([0, 1]))
    image = open_split(data_config("npz", tmp_path, splits=["train"]), "train").load(1)
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.repeat(gray[1], 3, axis=-1))
    for labels in (np.array([[0], [1]]), np.array([0.0, 1.0])):  # Keras's [N, 1]; whole numbers as floats
        np.savez(tmp_path / "train.npz", images=gray, labels=labels)
        assert open_split(data_config("npz", tmp_path, splits=["train"]), "train").labels.tolist() == [0, 1]
    for images, labels, message in ((np.zeros((2, 3, 5, 5), np.uint8), np.array([0, 1]), r"got uint8 \[2, 3, 5, 5\]"),
                                    (gray, np.array([0.0, 1.9]), "labels are float64, not class indices"),
                                    (gray, np.array([[0, 1]]), r"labels must be \[N\] or \[N, 1\], got \[1, 2\]"),
                                    (gray, np.array([-1, 0]), "has label -1")):
        np.savez(tmp_path / "train.npz", images=images, labels=labels)
        with pytest.raises(ConfigError, match=message):
            open_split(data_config("npz", tmp_path, splits=["train"]), "train")


def test_image_folders_take_no_class_names():
    with pytest.raises(ConfigError, match="classes: data.kind .image_folder. does not read it .*image_folder takes its class names from its class folders"):
        data_config("image_folder", "r", classes=["a"])


def test_a_limit_below_the_number_of_classes_says_which_are_left_out(tmp_path, caplog):
    from pipeline.config import ExtractConfig, build
    from pipeline.data import open_split
    from tests.conftest import write_image_folder

    images = write_image_folder(tmp_path / "images", classes=("a", "b", "c", "d"), per_class=2)
    cfg = build(ExtractConfig, {"backbone": {"name": "test_vit"}, "data": {"kind": "image_folder", "root": str(images), "limit": 3},
                                "store": {"path": "s.zarr"}})
    with caplog.at_level("WARNING"):
        assert sorted(open_split(cfg.data, "train").labels.tolist()) == [0, 1, 2]
    assert "data.limit: 3 sample(s) of split train leave 1 of its 4 classes without a sample" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        open_split(build(ExtractConfig, {**{"backbone": {"name": "test_vit"}, "store": {"path": "s.zarr"}},
                                         "data": {"kind": "image_folder", "root": str(images), "limit": 4}}).data, "train")
    assert "data.limit" not in caplog.text
