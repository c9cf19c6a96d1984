"""data.kind webdataset: tar shards written with webdataset's own TarWriter from real images.

The oracle is the ImageFolder extraction of the same files: a store from shards must hold the
same bytes. Shards are written in ImageFolder's order (classes, then files, sorted)."""

from pathlib import Path

import pytest

from cache import ConfigError, FeatureCacheError, open_store
from pipeline.data import webdataset_source
from pipeline.runners.extract import run_extract
from tests.conftest import BUCKET, assert_same_but_skipped, assert_same_features, image_folder_samples, real_subset, tiny_config
from tests.test_resume import extract_and_kill

wds = pytest.importorskip("webdataset", reason="webdataset is not installed (pip install -e '.[dev]' installs it)")


def write_shards(images: Path, out: Path, split: str, per_shard: int, corrupt: int = -1, drop_label: int = -1) -> list[Path]:
    """The split's samples as shards of `per_shard`: `<cls>/<stem>.jpg` + `.cls` (the class
    index); sample `corrupt` gets bytes that are no image, sample `drop_label` no label."""
    out.mkdir(parents=True, exist_ok=True)
    samples = image_folder_samples(images, split)
    paths = []
    for s in range(0, len(samples), per_shard):
        path = out / f"{split}-{s // per_shard:03d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for k, (f, label) in enumerate(samples[s:s + per_shard], start=s):
                sample = {"__key__": f"{f.parent.name}/{f.stem}", "jpg": b"not a jpeg" if k == corrupt else f.read_bytes()}
                if k != drop_label:
                    sample["cls"] = label
                sink.write(sample)
        paths.append(path)
    return paths


def shard_config(tmp_path, name, shards_root, classes, shards=None, *overrides, per_shard_pattern="{000..002}"):
    shards = shards or {split: f"{split}-{per_shard_pattern}.tar" for split in ("train", "val")}
    return tiny_config(tmp_path / name, shards_root, *overrides,
                       data={"kind": "webdataset", "root": str(shards_root), "shards": shards, "classes": classes})


@pytest.fixture
def subset(tmp_path):
    """Imagenette, 2 classes x 5 images per split (10 samples: shards of 4, 4, 2)."""
    images = real_subset(tmp_path / "images", per_class=5)
    for split in ("train", "val"):
        write_shards(images, tmp_path / "shards", split, per_shard=4)
    return images, tmp_path / "shards", sorted(p.name for p in (images / "train").iterdir())


def test_store_from_shards_equals_image_folder_store(tmp_path, subset):
    images, shards, classes = subset
    folder = tiny_config(tmp_path / "folder", images)
    run_extract(folder)
    tar = shard_config(tmp_path, "tar", shards, classes)
    run_extract(tar)
    assert_same_features(folder.store.path, tar.store.path)
    store = open_store(tar.store.path)
    assert store.classes == classes
    first = image_folder_samples(images, "train")[0][0]
    assert store.sample_ids("train")[0] == f"train-000.tar/{first.parent.name}/{first.stem}"  # shard/key


def test_a_list_of_shards_and_a_brace_pattern_are_one_split(tmp_path, subset):
    images, shards, classes = subset
    listed = {s: [f"{s}-000.tar", str(shards / f"{s}-001.tar"), f"{s}-002.tar"] for s in ("train", "val")}
    a = shard_config(tmp_path, "a", shards, classes)
    b = shard_config(tmp_path, "b", shards, classes, listed)
    run_extract(a)
    run_extract(b)
    assert_same_features(a.store.path, b.store.path)


def test_sigkill_then_rerun_reads_only_the_missing_chunks(tmp_path, monkeypatch):
    images = real_subset(tmp_path / "images", per_class=8)  # 16 samples: 4 chunks of 4
    for split in ("train", "val"):
        write_shards(images, tmp_path / "shards", split, per_shard=4)
    classes = sorted(p.name for p in (images / "train").iterdir())
    overrides = ("runtime.batch_size=2", "store.chunks_per_shard=1")
    cfg = shard_config(tmp_path, "killed", tmp_path / "shards", classes, None, *overrides, per_shard_pattern="{000..003}")
    done = extract_and_kill(cfg)
    assert 2 <= done < 4, f"the child should be killed mid-split, it had stamped {done} chunks"
    partial = open_store(cfg.store.path, allow_partial=True)
    missing = {split: partial.missing_chunks(split) for split in ("train", "val")}

    reads = []
    real_read = webdataset_source._read_range
    monkeypatch.setattr(webdataset_source, "_read_range", lambda path, *a: reads.append(Path(path).name) or real_read(path, *a))
    run_extract(cfg)  # resumes (num_workers 0: the loads happen in this process)
    expected = [f"{split}-{c:03d}.tar" for split in ("train", "val") for c in missing[split] for _ in range(4)]
    assert sorted(reads) == sorted(expected)  # one ranged read per missing sample, nothing else

    clean = shard_config(tmp_path, "clean", tmp_path / "shards", classes, None, *overrides, per_shard_pattern="{000..003}")
    run_extract(clean)
    assert_same_features(clean.store.path, cfg.store.path)


def test_a_corrupt_member_follows_on_corrupt(tmp_path):
    images = real_subset(tmp_path / "images", per_class=5)
    for split in ("train", "val"):
        write_shards(images, tmp_path / "shards", split, per_shard=4, corrupt=5 if split == "train" else -1)
    classes = sorted(p.name for p in (images / "train").iterdir())
    failing = shard_config(tmp_path, "fail", tmp_path / "shards", classes)
    with pytest.raises(FeatureCacheError, match=r"train-001\.tar/.*cannot identify image"):
        run_extract(failing)
    skipping = shard_config(tmp_path, "skip", tmp_path / "shards", classes, None, "data.on_corrupt=skip")
    run_extract(skipping)
    folder = tiny_config(tmp_path / "folder", images)
    run_extract(folder)
    assert_same_but_skipped(folder.store.path, skipping.store.path, "train", skipped=[5])


def test_a_truncated_shard_is_refused_by_name(tmp_path, subset):
    images, shards, classes = subset
    shard = shards / "train-001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # inside a member
    with pytest.raises(webdataset_source.ShardError, match=r"train-001\.tar' is truncated"):
        run_extract(shard_config(tmp_path, "mid", shards, classes))

    # Cut exactly after a member: tarfile alone would read a shorter, valid-looking archive.
    import tarfile

    with tarfile.open(fileobj=__import__("io").BytesIO(data)) as tar:
        second = tar.getmembers()[2]  # members: jpg, cls, jpg, cls...; cut after the first sample
        end = second.offset
    shard.write_bytes(data[:end])
    with pytest.raises(webdataset_source.ShardError, match=r"train-001\.tar' is truncated: no end-of-archive"):
        run_extract(shard_config(tmp_path, "boundary", shards, classes))
    assert not (tmp_path / "boundary" / "store.zarr").exists()  # refused before a store is made


def test_a_sample_without_its_label_is_refused(tmp_path):
    images = real_subset(tmp_path / "images", per_class=5)
    for split in ("train", "val"):
        write_shards(images, tmp_path / "shards", split, per_shard=4, drop_label=2)
    classes = sorted(p.name for p in (images / "train").iterdir())
    with pytest.raises(webdataset_source.ShardError, match=r"train-000\.tar'.* no 'cls' member \(data\.label_key\); it has \['jpg'\]"):
        run_extract(shard_config(tmp_path, "x", tmp_path / "shards", classes))


def test_a_missing_extra_gets_an_install_hint(tmp_path, subset, monkeypatch):
    import importlib.util

    images, shards, classes = subset
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "braceexpand" else real(name, *a))
    with pytest.raises(FeatureCacheError, match=r"pip install 'featurecache\[webdataset\]'"):
        run_extract(shard_config(tmp_path, "x", shards, classes))


def test_shards_on_s3_equal_local_shards(tmp_path, subset, s3):
    images, shards, classes = subset
    for f in shards.iterdir():
        s3.put(str(f), f"{BUCKET}/wds/{f.name}")
    local = shard_config(tmp_path, "local", shards, classes)
    remote = shard_config(tmp_path, "remote", shards, classes, {s: f"s3://{BUCKET}/wds/{s}-{{000..002}}.tar" for s in ("train", "val")})
    run_extract(local)
    run_extract(remote)
    assert_same_features(local.store.path, remote.store.path)
    assert open_store(remote.store.path).sample_ids("train")[0].startswith(f"s3://{BUCKET}/wds/train-000.tar/")


@pytest.mark.dask
def test_distributed_extraction_equals_single_process(tmp_path, subset):
    from pipeline.runners.distributed_extract import run_distributed_extract

    images, shards, classes = subset
    single = shard_config(tmp_path, "single", shards, classes, None, "runtime.batch_size=4")
    spread = shard_config(tmp_path, "spread", shards, classes, None, "runtime.batch_size=4")
    run_extract(single)
    run_distributed_extract(spread, workers=2)
    assert_same_features(single.store.path, spread.store.path)


def test_labels_must_index_the_classes_and_shards_be_listed_once(tmp_path, subset):
    images, shards, classes = subset
    with pytest.raises(ConfigError, match=r"sample 'train-001\.tar/n02102040/.*' has label 1, not a class index in \[0, 1\)"):
        run_extract(shard_config(tmp_path, "a", shards, classes[:1]))
    twice = {s: [f"{s}-000.tar", f"{s}-{{000..002}}.tar"] for s in ("train", "val")}
    with pytest.raises(ConfigError, match=r"\['train-000\.tar'\] listed more than once"):
        run_extract(shard_config(tmp_path, "b", shards, classes, twice))


def test_another_image_member_is_another_store(tmp_path):
    """Samples with a .jpg and a .png member: data.image_key picks which one is read, so a
    store made from one refuses the other (it used to be served as complete)."""
    import io

    import numpy as np
    from PIL import Image

    from cache import StoreMismatchError

    def image(seed, fmt):
        out = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out, fmt)
        return out.getvalue()

    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "train-000.tar")) as sink:
        for i in range(6):
            sink.write({"__key__": f"s{i:03d}", "jpg": image(i, "JPEG"), "png": image(100 + i, "PNG"), "cls": i % 2})

    def config(name, key):
        return tiny_config(tmp_path / name, tmp_path / "shards", f"store.path={tmp_path / 'wds.zarr'}", "backbone.layers=[-1]",
                           data={"kind": "webdataset", "root": str(tmp_path / "shards"), "shards": {"train": "train-000.tar"},
                                 "splits": ["train"], "classes": ["a", "b"], "image_key": key})

    run_extract(config("jpg", "jpg"))
    with pytest.raises(StoreMismatchError, match=r"dataset\.splits\.train\.samples_sha256: .*each sample's image member"):
        run_extract(config("png", "png"))


def test_a_shard_file_is_read_once_by_one_split(tmp_path):
    """However a shard is spelled (./, absolute), it is one file: listed twice in a split its
    samples would be stored twice, and in two splits validation would hold training samples.
    A key repeated apart in one shard (a concatenated tar) would be two samples with one id."""
    import io
    import tarfile

    from tests.conftest import write_image_folder

    images = write_image_folder(tmp_path / "images", per_class=2)  # 6 samples per split: shards of 4 and 2
    shards = tmp_path / "shards"
    for split in ("train", "val"):
        write_shards(images, shards, split, per_shard=4)
    classes = ["cat", "dog", "eel"]
    spelled_twice = {"train": ["train-000.tar", "./train-000.tar", "train-001.tar"], "val": "val-{000..001}.tar"}
    with pytest.raises(ConfigError, match=r"data.shards.train: \['./train-000.tar', 'train-000.tar'\] name one shard file more than once"):
        run_extract(shard_config(tmp_path, "a", shards, classes, spelled_twice))
    in_two_splits = {"train": "train-{000..001}.tar", "val": ["val-000.tar", str(shards / "train-001.tar")]}
    with pytest.raises(ConfigError, match=r"train-001.tar'\] belong to more than one split"):
        run_extract(shard_config(tmp_path, "b", shards, classes, in_two_splits))
    with tarfile.open(shards / "repeated.tar", "w") as tar:
        for name, data in (("a.cls", b"0"), ("a.jpg", b"x"), ("b.cls", b"1"), ("b.jpg", b"x"), ("a.cls", b"1"), ("a.jpg", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(webdataset_source.ShardError, match=r"key\(s\) \['repeated.tar/a'\] occur more than once"):
        run_extract(shard_config(tmp_path, "c", shards, classes, {"train": "repeated.tar", "val": "val-000.tar"}))
    with tarfile.open(shards / "twice_in_a_row.tar", "w") as tar:
        for name, data in (("a.cls", b"0"), ("a.jpg", b"x"), ("a.cls", b"1"), ("a.jpg", b"y")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(webdataset_source.ShardError, match=r"member 'a.cls' occurs twice in a row"):
        run_extract(shard_config(tmp_path, "e", shards, classes, {"train": "twice_in_a_row.tar", "val": "val-000.tar"}))
    run_extract(shard_config(tmp_path, "d", shards, classes, {"train": "train-{000..001}.tar", "val": "val-{000..001}.tar"}))
