"""data.kind huggingface: datasets built from real images, saved with save_to_disk and as Parquet.

The oracle is the ImageFolder extraction of the same files: a store from a dataset must hold
the same bytes. Rows are written in ImageFolder's order (classes, then files, sorted)."""

from pathlib import Path

import pytest

from cache import ConfigError, FeatureCacheError, open_store
from pipeline.runners.extract import run_extract
from tests.conftest import assert_same_but_skipped, assert_same_features, image_folder_samples, real_subset, tiny_config, unstamped_samples
from tests.test_resume import extract_and_kill

datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install -e '.[dev]' installs it)")


@pytest.fixture(autouse=True)
def private_hf_cache(tmp_path, monkeypatch):
    """load_dataset writes Arrow copies into the datasets cache: keep them out of the home folder."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(tmp_path / "hf_cache"))


def build_dataset(images: Path, split_names=("train", "val"), corrupt: int = -1):
    """A DatasetDict of the ImageFolder's splits: an Image column of the files' bytes and a ClassLabel."""
    classes = sorted(p.name for p in (images / "train").iterdir())
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    out = {}
    for split, name in zip(("train", "val"), split_names):
        samples = image_folder_samples(images, split)
        rows = {"image": [{"bytes": b"not an image" if k == corrupt else f.read_bytes(), "path": None} for k, (f, _) in enumerate(samples)],
                "label": [c for _, c in samples]}
        out[name] = datasets.Dataset.from_dict(rows, features=features)
    return datasets.DatasetDict(out)


def parquet_dataset(images, root):
    """The ImageFolder's splits as Parquet files load_dataset finds (val -> 'validation')."""
    data = root / "data"
    data.mkdir(parents=True)
    ds = build_dataset(images, split_names=("train", "validation"))
    for split in ds:
        ds[split].to_parquet(str(data / f"{split}-00000-of-00001.parquet"))
    return root


def hf_config(tmp_path, name, root, splits=("train", "val"), *overrides, **data):
    return tiny_config(tmp_path / name, root, *overrides, data={"kind": "huggingface", "root": str(root), "splits": list(splits), **data})


@pytest.fixture
def images(tmp_path):
    return real_subset(tmp_path / "images", per_class=5)


def test_saved_dataset_store_equals_image_folder_store(tmp_path, images):
    build_dataset(images).save_to_disk(str(tmp_path / "saved"))
    folder = tiny_config(tmp_path / "folder", images)
    hf = hf_config(tmp_path, "hf", tmp_path / "saved")
    run_extract(folder)
    run_extract(hf)
    assert_same_features(folder.store.path, hf.store.path)
    assert open_store(hf.store.path).classes == sorted(p.name for p in (images / "train").iterdir())  # the ClassLabel names


def test_parquet_dataset_store_equals_image_folder_store(tmp_path, images):
    parquet_dataset(images, tmp_path / "parquet")
    folder = tiny_config(tmp_path / "folder", images)
    hf = hf_config(tmp_path, "hf", tmp_path / "parquet", ("train", "validation"))
    run_extract(folder)
    run_extract(hf)
    assert_same_features(folder.store.path, hf.store.path, {"train": "train", "val": "validation"})


def test_sigkill_then_rerun_equals_clean_run(tmp_path):
    images = real_subset(tmp_path / "images", per_class=8)  # 16 samples: 4 chunks of 4
    build_dataset(images).save_to_disk(str(tmp_path / "saved"))
    overrides = ("runtime.batch_size=2", "store.chunks_per_shard=1")
    cfg = hf_config(tmp_path, "killed", tmp_path / "saved", ("train", "val"), *overrides)
    done = extract_and_kill(cfg)
    assert 2 <= done < 4, f"the child should be killed mid-split, it had stamped {done} chunks"
    assert not open_store(cfg.store.path, allow_partial=True).is_complete()
    todo = unstamped_samples(cfg.store.path, ("train", "val"), 4)
    assert run_extract(cfg).streamed == todo  # resumes: the dataset's fingerprint is the same in this process
    clean = hf_config(tmp_path, "clean", tmp_path / "saved", ("train", "val"), *overrides)
    run_extract(clean)
    assert_same_features(clean.store.path, cfg.store.path)


def test_a_corrupt_row_follows_on_corrupt(tmp_path, images):
    build_dataset(images, corrupt=3).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(FeatureCacheError, match=r"row 3 of split 'train'.*cannot identify image"):
        run_extract(hf_config(tmp_path, "fail", tmp_path / "saved"))
    skipping = hf_config(tmp_path, "skip", tmp_path / "saved", ("train", "val"), "data.on_corrupt=skip")
    run_extract(skipping)
    folder = tiny_config(tmp_path / "folder", images)
    run_extract(folder)
    assert_same_but_skipped(folder.store.path, skipping.store.path, "train", skipped=[3])


def test_missing_columns_and_splits_are_named(tmp_path, images):
    build_dataset(images).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ConfigError, match=r"has no column 'img'; it has \['image', 'label'\]"):
        run_extract(hf_config(tmp_path, "a", tmp_path / "saved", image_column="img"))
    with pytest.raises(ConfigError, match=r"'test' is not a split of .*; it has \['train', 'val'\]"):
        run_extract(hf_config(tmp_path, "b", tmp_path / "saved", ("train", "test")))
    for name in ("a", "b"):
        assert not (tmp_path / name / "store.zarr").exists()


def test_a_changed_dataset_is_refused_by_the_store(tmp_path, images):
    build_dataset(images).save_to_disk(str(tmp_path / "saved"))
    cfg = hf_config(tmp_path, "hf", tmp_path / "saved")
    run_extract(cfg)
    # Rewritten in place with one image replaced: same ids and labels, another datasets fingerprint.
    build_dataset(images, corrupt=0).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(FeatureCacheError, match="fingerprint|differ"):
        run_extract(cfg)


@pytest.mark.dask
def test_distributed_extraction_equals_single_process(tmp_path, images):
    from pipeline.runners.distributed_extract import run_distributed_extract

    build_dataset(images).save_to_disk(str(tmp_path / "saved"))
    single = hf_config(tmp_path, "single", tmp_path / "saved", ("train", "val"), "runtime.batch_size=4")
    spread = hf_config(tmp_path, "spread", tmp_path / "saved", ("train", "val"), "runtime.batch_size=4")
    run_extract(single)
    run_distributed_extract(spread, workers=2)
    assert_same_features(single.store.path, spread.store.path)


def test_a_streamed_dataset_gives_the_image_folder_store(tmp_path, images):
    parquet_dataset(images, tmp_path / "parquet")
    folder = tiny_config(tmp_path / "folder", images, "runtime.num_workers=2")
    streamed = hf_config(tmp_path, "streamed", tmp_path / "parquet", ("train", "validation"), "runtime.num_workers=2", streaming=True)
    run_extract(folder)
    run_extract(streamed)
    assert_same_features(folder.store.path, streamed.store.path, {"train": "train", "val": "validation"})


def test_a_killed_streaming_extraction_resumes_at_chunk_boundaries(tmp_path):
    images = real_subset(tmp_path / "images", per_class=8)  # 16 samples: 4 chunks of 4
    parquet_dataset(images, tmp_path / "parquet")
    overrides = ("runtime.batch_size=2", "store.chunks_per_shard=1")
    cfg = hf_config(tmp_path, "killed", tmp_path / "parquet", ("train", "validation"), *overrides, streaming=True)
    done = extract_and_kill(cfg)
    assert 2 <= done < 4, f"the child should be killed mid-split, it had stamped {done} chunks"
    todo = unstamped_samples(cfg.store.path, ("train", "validation"), 4)
    assert run_extract(cfg).streamed == todo  # resumes: streams past the stored chunks, computes only the rest
    clean = hf_config(tmp_path, "clean", tmp_path / "parquet", ("train", "validation"), *overrides, streaming=True)
    run_extract(clean)
    assert_same_features(clean.store.path, cfg.store.path, {"train": "train", "validation": "validation"})


def test_a_rewritten_streamed_file_is_refused_by_the_store(tmp_path, images):
    root = parquet_dataset(images, tmp_path / "parquet")
    cfg = hf_config(tmp_path, "hf", root, ("train", "validation"), streaming=True)
    run_extract(cfg)
    data = root / "data" / "train-00000-of-00001.parquet"
    data.write_bytes(data.read_bytes())  # the same bytes, rewritten: a new modification time
    with pytest.raises(FeatureCacheError, match=r"dataset\.splits\.train\.samples_sha256"):
        run_extract(cfg)
    with pytest.raises(ConfigError, match="save_to_disk, which is read memory-mapped, never streamed"):
        build_dataset(images).save_to_disk(str(tmp_path / "saved"))
        run_extract(hf_config(tmp_path, "saved", tmp_path / "saved", streaming=True))


def test_unlabeled_rows_and_a_dataset_without_splits_are_refused(tmp_path, images):
    ds = build_dataset(images)
    ds["train"] = ds["train"].map(lambda row, i: {"label": -1 if i == 2 else row["label"]}, with_indices=True)
    ds.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ConfigError, match=r"row 2 of split 'train' .* has label -1, not a class index in \[0, 2\)"):
        run_extract(hf_config(tmp_path, "a", tmp_path / "saved"))
    build_dataset(images)["val"].save_to_disk(str(tmp_path / "single"))  # one Dataset, no splits
    with pytest.raises(ConfigError, match=r"one dataset saved without splits; it can only be split 'train'"):
        run_extract(hf_config(tmp_path, "b", tmp_path / "single"))


def test_another_image_column_is_another_store(tmp_path):
    """Two image columns (a photo and a mask): the column read decides every feature, so a
    store made from one refuses the other (it used to be served as complete)."""
    import io

    import numpy as np
    from PIL import Image

    from cache import StoreMismatchError

    def png(seed):
        out = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out, "PNG")
        return {"bytes": out.getvalue(), "path": None}

    features = datasets.Features({"photo": datasets.Image(), "mask": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"photo": [png(i) for i in range(6)], "mask": [png(100 + i) for i in range(6)], "label": [0, 1] * 3}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(tmp_path / "hf"))
    store = f"store.path={tmp_path / 'hf.zarr'}"
    run_extract(hf_config(tmp_path, "photo", tmp_path / "hf", ("train",), store, "backbone.layers=[-1]", image_column="photo"))
    with pytest.raises(StoreMismatchError, match=r"dataset\.splits\.train\.samples_sha256: .*and the image column"):
        run_extract(hf_config(tmp_path, "mask", tmp_path / "hf", ("train",), store, "backbone.layers=[-1]", image_column="mask"))


def path_only_parquet(root: Path, paths: list[str], labels, label_type: str = "int64") -> Path:
    """A Parquet split whose Image cells hold only a file path (no bytes), as pyarrow writes it."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True, exist_ok=True)
    cells = pa.array([{"bytes": None, "path": p} for p in paths], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    features = {"image": {"_type": "Image"}, "label": {"_type": "Value", "dtype": label_type}}
    table = pa.table({"image": cells, "label": pa.array(labels, getattr(pa, label_type)())})
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()}),
                   root / "data" / "train-00000-of-00001.parquet")
    return root / "data"


def test_cells_that_hold_a_file_path_are_fingerprinted_by_that_file(tmp_path):
    """The dataset's fingerprint covers a path, not the file: a file changed in place must
    change the store's fingerprint; a relative path (read from the current directory) is refused."""
    from PIL import Image

    from pipeline.data.huggingface_source import huggingface_split

    files = [tmp_path / "imgs" / f"{i}.png" for i in range(2)]
    files[0].parent.mkdir()
    for i, f in enumerate(files):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(f)
    data = path_only_parquet(tmp_path / "abs", [str(f) for f in files], [0, 1])
    split = huggingface_split(str(data), "train", "image", "label", None)
    assert split.load(1).getpixel((0, 0)) == (40, 0, 0)
    before = split.fingerprint()
    Image.new("RGB", (12, 12), (0, 99, 0)).save(files[0])  # another picture at the same path
    assert huggingface_split(str(data), "train", "image", "label", None).fingerprint()["samples_sha256"] != before["samples_sha256"]
    relative = path_only_parquet(tmp_path / "rel", [str(files[0]), "imgs/1.png"], [0, 1])
    with pytest.raises(ConfigError, match=r"row 1 of split 'train' .* holds only the relative file path 'imgs/1.png'"):
        huggingface_split(str(relative), "train", "image", "label", None)


@pytest.mark.parametrize("label_type,labels", [("string", ["cat", "dog"]), ("float64", [0.0, 1.7])])
def test_labels_that_are_not_class_indices_are_refused(tmp_path, label_type, labels):
    """A float label would be truncated to another class; a string has no index."""
    from PIL import Image

    from pipeline.data.huggingface_source import huggingface_split

    files = [tmp_path / f"{i}.png" for i in range(2)]
    for f in files:
        Image.new("RGB", (8, 8)).save(f)
    data = path_only_parquet(tmp_path / "ds", [str(f) for f in files], labels, label_type)
    with pytest.raises(ConfigError, match=r"values of column 'label' of split 'train' .* are (<U3|float64), not class indices"):
        huggingface_split(str(data), "train", "image", "label", None)


def test_a_streamed_image_folder_reads_its_images_by_path(tmp_path):
    """load_dataset streams an image folder as cells holding each image's path: the builder's
    hash covers those files (its data files), so they are read; a path outside them is refused."""
    from tests.conftest import write_image_folder

    images = write_image_folder(tmp_path / "images")
    folder = tiny_config(tmp_path / "folder", images)
    run_extract(folder)
    streamed = hf_config(tmp_path, "streamed", images, ("train", "validation"), streaming=True)
    run_extract(streamed)
    assert_same_features(folder.store.path, streamed.store.path, {"train": "train", "val": "validation"})
    from pipeline.data.huggingface_source import huggingface_split

    outside = next((images / "train" / "cat").iterdir())  # not a data file of this Parquet stream
    data = path_only_parquet(tmp_path / "paths", [str(outside)], [0])
    with pytest.raises(ConfigError, match=r"holds only the file path .*, which is none of the stream's data files"):
        huggingface_split(str(data), "train", "image", "label", None, streaming=True).load(0)
