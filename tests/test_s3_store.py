"""Stores on S3: a real S3-speaking server (moto's server mode) on 127.0.0.1, started here.

The same extraction goes to a local directory and to s3://BUCKET/...; the S3 store must hold
the same objects byte for byte, train to the same scores, survive interruptions like a local
store, refuse what a local store refuses, and serve sweep jobs that open it themselves.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cache import StoreError, StoreMismatchError, open_store
from cache.summary import summarize
from pipeline.cli import main
from pipeline.config import ConfigError, SweepConfig, TrainConfig, build, load_config
from pipeline.runners.extract import run_extract
from pipeline.runners.train import run_train
from tests.conftest import BUCKET, colour_folder, interrupted_extraction, tiny_config

TRAIN = {"val_fraction": 0.25, "epochs": 2, "batch_size": 8, "warmup_epochs": 0.5}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return colour_folder(tmp_path_factory.mktemp("s3") / "images", per_class=8)


def config(store: str, images: Path, *overrides: str):
    """Few objects, as every request to the server takes milliseconds: one split of 24 samples,
    two layers, 3 chunks of 8, each chunk its own shard, computed in batches of a chunk (stores
    compared byte for byte must come from the same batches: see test_views)."""
    return tiny_config(Path("unused"), images, "data.splits=[train]", "backbone.layers=[0, -1]", "backbone.block_input=false",
                       "store.samples_per_chunk=8", "store.chunks_per_shard=1", "runtime.batch_size=8", *overrides, store={"path": store})


@pytest.fixture(scope="module")
def stores(s3, images, tmp_path_factory):
    """The same config extracted to a local directory and to S3."""
    local = config(str(tmp_path_factory.mktemp("local") / "colour.zarr"), images)
    remote = config(f"s3://{BUCKET}/colour.zarr", images)
    run_extract(local)
    run_extract(remote)
    return local.store.path, remote.store.path


def objects(fs, url: str) -> dict[str, bytes]:
    root = url.removeprefix("s3://")
    return {p[len(root) + 1:]: fs.cat(p) for p in fs.find(root)}


def assert_same_arrays(a, b) -> None:
    for split in a.splits:
        for layer in a.layers:
            np.testing.assert_array_equal(a.zarr_array(split, layer)[:], b.zarr_array(split, layer)[:])
        for name in ("valid", "labels", "sample_ids", "chunk_done"):
            np.testing.assert_array_equal(a.root[f"{split}/{name}"][:], b.root[f"{split}/{name}"][:])
    assert a.fingerprint == b.fingerprint


def scores(store: str, out: Path) -> dict:
    cfg = build(TrainConfig, {"store": store, "output": str(out), **TRAIN,
                              "adapters": [{"kind": "linear", "layers": "all", "lr": 0.03}]})
    return {r["adapter"]: (r["val_acc"], r["test_acc"]) for r in run_train(cfg)["rows"]}


def test_configs_keep_the_url_and_refuse_credentials():
    url = "s3://bucket//deep/store.zarr"
    cfg = tiny_config(Path("unused"), Path("images"), store={"path": url, "storage_options": {"endpoint_url": "http://h:9000"}})
    assert cfg.store.path == url  # never a Path (which would fold the "//")
    with pytest.raises(ConfigError) as e:
        build(TrainConfig, {"store": url, "output": "o", "adapters": [{"kind": "linear"}],
                            "storage_options": {"client_kwargs": {"aws_secret_access_key": "x"}}})
    assert "storage_options: ['aws_secret_access_key'] would be saved" in str(e.value)
    with pytest.raises(ConfigError, match="storage_options: got \\['anon'\\], but 'stores/x.zarr' is a local path"):
        build(SweepConfig, {"store": "stores/x.zarr", "output": "o", "space": [{"kind": "linear"}], "storage_options": {"anon": True}})


def test_extract_then_train_on_s3_equals_local(s3, stores, tmp_path, capsys):
    local, remote = stores
    a, b = open_store(local), open_store(remote)
    assert b.is_complete() and b.manifest.complete and b.path == remote
    assert_same_arrays(a, b)
    # The same objects, and every chunk/shard object byte for byte (zarr.json files differ
    # only in the manifest's paths and times).
    files = {str(p.relative_to(local)): p.read_bytes() for p in Path(local).rglob("*") if p.is_file()}
    stored = objects(s3, remote)
    assert stored.keys() == files.keys()
    data = [k for k in files if not k.endswith("zarr.json")]
    assert len(data) >= 9 and all(stored[k] == files[k] for k in data)
    # Training from S3 gives the scores training from the local copy gives.
    from_s3 = scores(remote, tmp_path / "s3")
    assert from_s3 == scores(local, tmp_path / "local")
    assert max(val for val, _ in from_s3.values()) >= 0.9
    # inspect reads it too, sizes included.
    assert [l["bytes_on_disk"] for l in summarize(remote)["layers"]] == [l["bytes_on_disk"] for l in summarize(local)["layers"]]
    assert main(["inspect", remote]) == 0 and "(complete" in capsys.readouterr().out


def test_interrupted_extraction_is_incomplete_and_rerun_finishes_it(s3, stores, images, monkeypatch):
    url = f"s3://{BUCKET}/interrupted.zarr"
    cfg = config(url, images)
    interrupted_extraction(cfg, monkeypatch)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(url)
    partial = open_store(url, allow_partial=True)
    stamped = 3 - len(partial.missing_chunks("train"))
    assert not partial.manifest.complete and 0 < stamped < 3
    plan = run_extract(cfg)
    assert plan.streamed == 24 - 8 * stamped  # only the unstamped chunks were computed
    assert open_store(url).manifest.complete
    assert_same_arrays(open_store(url), open_store(stores[0]))


def test_interrupted_creation_is_no_store_and_rerun_rebuilds_it(s3, stores, images, monkeypatch):
    import cache.writer

    url = f"s3://{BUCKET}/half_created.zarr"

    def dies_while_creating(root, *args):
        root.create_group("train").create_array("labels", shape=(24,), dtype="int64", fill_value=-1)
        raise RuntimeError("killed while creating")

    monkeypatch.setattr(cache.writer, "_create", dies_while_creating)
    with pytest.raises(RuntimeError, match="killed while creating"):
        run_extract(config(url, images))
    assert "train/labels/zarr.json" in objects(s3, url)
    with pytest.raises(StoreError, match="being created, or its creation was interrupted"):
        open_store(url)
    monkeypatch.undo()
    run_extract(config(url, images))  # recognised as ours: cleared and built again
    assert_same_arrays(open_store(url), open_store(stores[0]))


def test_mismatched_config_is_refused_and_overwrite_replaces_the_store(s3, images):
    url = f"s3://{BUCKET}/mismatch.zarr"
    run_extract(config(url, images))
    before = objects(s3, url)
    other = config(url, images, "backbone.layers=[1]", "preprocess.image_size=48")
    with pytest.raises(StoreMismatchError, match=r"preprocessing.input_size: store has \[3, 64, 64\], now \[3, 48, 48\]"):
        run_extract(other)
    assert objects(s3, url) == before  # untouched
    run_extract(other, overwrite=True)
    assert list(open_store(url).layers) == ["blocks.1"]
    assert not [k for k in objects(s3, url) if "/blocks.5/" in k]  # nothing of the old store is left


def test_overwrite_never_deletes_a_prefix_that_is_not_a_store(s3, images):
    url = f"s3://{BUCKET}/precious"
    s3.pipe(f"{BUCKET}/precious/data.csv", b"keep me")
    with pytest.raises(StoreError, match="not a feature-cache store; refusing to touch it"):
        run_extract(config(url, images), overwrite=True)
    assert objects(s3, url) == {"data.csv": b"keep me"}


def test_sweep_jobs_carry_the_url_and_storage_options(s3, stores, tmp_path, monkeypatch):
    """A sweep's jobs open the store themselves (on dask, in worker processes), from the URL and
    storage_options in the train config each job carries. With AWS_ENDPOINT_URL gone, those
    options are the only way to the server. The jobs run in this process: a LocalCluster's
    worker processes would add ~20 s of imports, and what a job carries is the same."""
    from pipeline.runners.sweep import run_sweep

    endpoint = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    sweep = {"store": stores[1], "storage_options": endpoint, "output": str(tmp_path / "s3"), **TRAIN, "trials_per_job": 1,
             "space": [{"kind": "linear", "layer": ["blocks.0", "blocks.5"], "lr": [0.03]}]}
    result = run_sweep(build(SweepConfig, sweep), workers=0)
    reference = run_sweep(build(SweepConfig, {**sweep, "store": stores[0], "storage_options": {}, "output": str(tmp_path / "local")}), workers=0)
    assert result["jobs"] == 2 and result["trials"] == 2
    accuracies = lambda rows: {r["trial"]: (r["metrics"]["val_acc"], r["metrics"]["test_acc"]) for r in rows}  # noqa: E731
    assert accuracies(result["rows"]) == accuracies(reference["rows"])
    job = build(TrainConfig, json.loads(next((tmp_path / "s3" / "jobs").glob("*/config.json")).read_text()))
    assert (job.store, job.storage_options) == (stores[1], endpoint)  # not turned into a local path
    best = load_config(TrainConfig, str(tmp_path / "s3" / "best_train_config.yaml"))
    assert (best.store, best.storage_options) == (stores[1], endpoint)
