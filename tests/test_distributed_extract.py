"""Distributed extraction on a real dask LocalCluster equals single-process extraction."""

import numpy as np
import pytest
import zarr

from cache import open_store
from pipeline.distributed_extract import run_distributed_extract, shard_pieces
from pipeline.extract import run_extract
from tests.conftest import tiny_config, write_image_folder

pytestmark = pytest.mark.dask


def test_pieces_are_whole_shards_in_order():
    pieces = shard_pieces({"train": [0, 1, 2, 3, 5, 8, 9], "val": []}, chunks_per_shard=2, pieces_per_split=2)
    assert pieces == [("train", [0, 1, 2, 3]), ("train", [5, 8, 9])]
    assert shard_pieces({"train": [4]}, 2, 8) == [("train", [4])]


def test_local_cluster_equals_single_process(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=6)  # 18 samples/split: 5 chunks, 3 shards
    single = tiny_config(tmp_path / "single", images)
    run_extract(single)
    # Loader workers asked for: a daemonic dask worker cannot start them and must cope.
    spread = tiny_config(tmp_path / "spread", images, "runtime.num_workers=2")
    run_distributed_extract(spread, workers=2)
    a, b = open_store(single.store.path), open_store(spread.store.path)
    assert b.is_complete() and b.manifest["complete"]
    for split in ("train", "val"):
        for layer in a.layers:
            np.testing.assert_array_equal(a.zarr_array(split, layer)[:], b.zarr_array(split, layer)[:])
        for name in ("valid", "labels", "sample_ids", "chunk_done"):
            np.testing.assert_array_equal(zarr.open_array(f"{single.store.path}/{split}/{name}")[:],
                                          zarr.open_array(f"{spread.store.path}/{split}/{name}")[:])
    assert a.fingerprint == b.fingerprint
