"""Shared fixtures: a tiny ImageFolder of random JPEGs, config builders, the real-data location."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cache import BackboneRecord, Fingerprint, LayerSpec, StorageRecord, resident
from pipeline.config import ExtractConfig, apply_overrides, build

# Tiny models gain nothing from a second thread, and OpenMP's barriers make them ~50x slower
# when another process competes for the two cores of this machine.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
BUCKET = "featurecache-test"
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def shared_data(name: str) -> Path:
    """A real data set beside the checkout, or a skip that says why."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data {str(path)!r} is absent (it lives in ../shared/data beside the checkout)")
    return path


def write_image_folder(root: Path, splits=("train", "val"), classes=("cat", "dog", "eel"), per_class=4, size=40, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for split in splits:
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{cls}_{i:03d}.jpg", quality=90)
    return root


def real_subset(root: Path, name: str = "imagenette", splits=("train", "val"), classes: int = 2, per_class: int = 4) -> Path:
    """An ImageFolder tree under `root` holding copies of the first files of the first classes
    of a real data set in ../shared/data (skips when it is absent); other sources are written
    from it, in its order (classes, then files, sorted), so that their stores can be compared."""
    source = shared_data(name)
    for split in splits:
        for cls in sorted(p.name for p in (source / split).iterdir())[:classes]:
            (root / split / cls).mkdir(parents=True)
            for f in sorted((source / split / cls).iterdir())[:per_class]:
                (root / split / cls / f.name).write_bytes(f.read_bytes())
    return root


def image_folder_samples(root: Path, split: str) -> list[tuple[Path, int]]:
    """(file, class index) of an ImageFolder split, in the order image_folder reads it."""
    classes = sorted(p.name for p in (root / split).iterdir())
    return [(f, c) for c, cls in enumerate(classes) for f in sorted((root / split / cls).iterdir())]


def assert_same_features(a_path, b_path, splits=("train", "val")) -> None:
    """Two stores hold the same features, labels and valid flags, byte for byte."""
    from cache import open_store

    a, b = open_store(a_path), open_store(b_path)
    assert a.layers == b.layers
    for split, other in (splits.items() if isinstance(splits, dict) else zip(splits, splits)):
        for layer in a.layers:
            np.testing.assert_array_equal(a.zarr_array(split, layer)[:], b.zarr_array(other, layer)[:])
        np.testing.assert_array_equal(a.labels(split), b.labels(other))
        np.testing.assert_array_equal(a.valid(split), b.valid(other))


def assert_same_but_skipped(a_path, b_path, split: str, skipped: list[int]) -> None:
    """Store b skipped exactly the samples `skipped` of `split`, and holds a's bytes for the others."""
    from cache import open_store

    a, b = open_store(a_path), open_store(b_path)
    valid = b.valid(split)
    assert np.flatnonzero(~valid).tolist() == skipped
    for layer in a.layers:
        np.testing.assert_array_equal(a.zarr_array(split, layer)[:][valid], b.zarr_array(split, layer)[:][valid])


@pytest.fixture(autouse=True)
def nothing_held():
    """Each test starts and ends with nothing held in RAM (cache/resident.py is process-wide), so
    that no test reads what another one held."""
    resident.release()
    yield
    resident.release()


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images")


def tiny_config(tmp_path: Path, data_root: Path, *overrides: str, **sections) -> ExtractConfig:
    """A fast test_vit extraction config; sections/overrides change any key."""
    data = {
        "backbone": {"name": "test_vit", "weights": "none", "layers": [0, -1, "blocks.2.mlp"]},
        "data": {"kind": "image_folder", "root": str(data_root), "splits": ["train", "val"]},
        "store": {"path": str(tmp_path / "store.zarr"), "samples_per_chunk": 4, "chunks_per_shard": 2},
        "preprocess": {"image_size": 64},
        "runtime": {"batch_size": 5, "num_workers": 0},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return build(ExtractConfig, apply_overrides(data, list(overrides)))


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on localhost, fake credentials and its endpoint in the environment.
    One per session: moto keeps its buckets in process-wide state, shared by every server."""
    import logging
    import os

    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[dev]' installs it)")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[dev]' installs it)")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            env.delenv(name, raising=False)
        env.setenv("AWS_CONFIG_FILE", os.devnull)  # never a developer's real profile
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield fs
    server.stop()


def fake_fingerprint(layers: tuple[LayerSpec, ...] = (), dtype: str = "float32", samples_per_chunk: int = 4, chunks_per_shard: int = 2,
                     image_size: int = 64) -> Fingerprint:
    """A store fingerprint for tests that write or load without a backbone."""
    return Fingerprint(BackboneRecord("test_vit", "random", "0" * 64), tuple(layers), StorageRecord(dtype, "all"),
                       {"input_size": [3, image_size, image_size]}, {"kind": "test"},
                       {"samples_per_chunk": samples_per_chunk, "chunks_per_shard": chunks_per_shard, "compressor": ["zstd", 3]})


COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def colour_folder(root, per_class=16, seed=0):
    """Class = dominant colour plus noise: learnable from any backbone's features."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for cls, rgb in COLOURS.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def colour_store(tmp_path_factory):
    from pipeline.runners.extract import run_extract

    tmp = tmp_path_factory.mktemp("colour")
    cfg = tiny_config(tmp, colour_folder(tmp / "images"), "backbone.layers=[0, -1]", "store.samples_per_chunk=8")
    run_extract(cfg)
    return cfg.store.path


@pytest.fixture
def float64_training():
    """The trainer in float64: adapters are built, and features decoded, in the default dtype.
    float64 keeps Adam from amplifying the CPU's float32 rounding noise into differences
    between fused and solo runs."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def interrupted_extraction(cfg, monkeypatch, batch: int = 3) -> None:
    """Run `cfg`'s extraction until its forward raises on batch `batch` (what was stamped
    before stays), then restore the forward."""
    import pipeline.runners.extract as extract

    forward, calls = extract.forward_batch, []

    def dies(*args):
        calls.append(1)
        if len(calls) == batch:
            raise RuntimeError("interrupted")
        return forward(*args)

    monkeypatch.setattr(extract, "forward_batch", dies)
    with pytest.raises(RuntimeError, match="interrupted"):
        extract.run_extract(cfg)
    monkeypatch.setattr(extract, "forward_batch", forward)


def unstamped_samples(store, groups, samples_per_chunk: int) -> int:
    """Samples in the chunks of `groups` (splits, or views such as "train/views/1") whose stamps
    are not set, read with zarr alone: what a resumed extraction must compute, and no more."""
    import zarr

    total = 0
    for group in groups:
        done = zarr.open_array(str(Path(store) / group / "chunk_done"), mode="r")[:]
        n = zarr.open_array(str(Path(store) / group.split("/")[0] / "labels"), mode="r").shape[0]
        total += sum(min(samples_per_chunk, n - c * samples_per_chunk) for c in np.flatnonzero(~done.astype(bool)))
    return total
