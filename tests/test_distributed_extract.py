"""Distributed extraction on a real dask LocalCluster equals single-process extraction."""

import os

import numpy as np
import pytest
import torch
import zarr

from cache import open_store
from pipeline.runners.distributed_extract import run_distributed_extract, shard_pieces
from pipeline.runners.extract import run_extract
from tests.conftest import tiny_config, write_image_folder

pytestmark = pytest.mark.dask


def test_pieces_are_whole_shards_in_order():
    pieces = shard_pieces({"train": [0, 1, 2, 3, 5, 8, 9], "val": []}, chunks_per_shard=2, pieces_per_split=2)
    assert pieces == [("train", [0, 1, 2, 3]), ("train", [5, 8, 9])]
    assert shard_pieces({"train": [4]}, 2, 8) == [("train", [4])]


def test_pieces_begin_where_a_single_process_begins_a_batch():
    """Chunks of 3 samples (the last of 19 has 1), one chunk per shard, batches of 4. The
    oracle: the positions where a single process over the same missing chunks starts a batch."""
    sizes = [3] * 6 + [1]
    for missing in ([0, 1, 2, 3, 4, 5, 6], [1, 2, 4, 5, 6], [0, 2, 3, 5]):
        pieces = shard_pieces({"train": missing}, 1, 8, batch_size=4, chunk_len=lambda split, c: sizes[c])
        assert [c for _, chunks in pieces for c in chunks] == missing  # whole, in order, once
        position = {c: sum(sizes[m] for m in missing[:i]) for i, c in enumerate(missing)}  # missing samples before c
        assert all(position[chunks[0]] % 4 == 0 for _, chunks in pieces)
        starts = [c for c in missing if position[c] % 4 == 0]
        assert [chunks[0] for _, chunks in pieces] == starts  # and there, whenever there are enough pieces
    assert shard_pieces({"train": [0, 1, 2]}, 1, 8, batch_size=4, chunk_len=lambda split, c: 3) == [("train", [0, 1, 2])]


def test_local_cluster_equals_single_process(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=6)  # 18 samples/split: 5 chunks, 3 shards
    # Batches of 4 divide a shard's 8 samples, so each split is cut into several pieces.
    single = tiny_config(tmp_path / "single", images, "runtime.batch_size=4")
    run_extract(single)
    # Loader workers asked for: a daemonic dask worker cannot start them and must cope.
    spread = tiny_config(tmp_path / "spread", images, "runtime.num_workers=2", "runtime.batch_size=4")
    run_distributed_extract(spread, workers=2)
    a, b = open_store(single.store.path), open_store(spread.store.path)
    assert b.is_complete() and b.manifest.complete
    for split in ("train", "val"):
        for layer in a.layers:
            np.testing.assert_array_equal(a.zarr_array(split, layer)[:], b.zarr_array(split, layer)[:])
        for name in ("valid", "labels", "sample_ids", "chunk_done"):
            np.testing.assert_array_equal(zarr.open_array(f"{single.store.path}/{split}/{name}")[:],
                                          zarr.open_array(f"{spread.store.path}/{split}/{name}")[:])
    assert a.fingerprint == b.fingerprint


# A CNN: oneDNN's CPU convolutions pick their blocking by batch size and thread count, so a
# sample can round differently in a batch of another size or on another number of threads.
# Chunks of 5 in shards of 1, batches of 4, 21 samples per split: cut at shards, a piece of
# 5 samples would make batches of 4 and 1 where one process makes 4, 4, ..., 1.
CNN = ("backbone.name=test_efficientnet", "backbone.layers=[-1,-2]", "store.samples_per_chunk=5", "store.chunks_per_shard=1",
       "runtime.batch_size=4")


def test_workers_compute_the_single_process_batches_on_its_threads(tmp_path):
    """The driver runs on more torch threads than cores/workers, and the last batch of each split
    is partial; the two stores must still be equal bit for bit."""
    images = write_image_folder(tmp_path / "images", per_class=7)  # 21 samples per split
    # Not what a worker got from sharing the cores; from the cores this process may use (a CPU
    # quota on a large host reports the host's count, which would run 60-odd threads on 2 cores).
    threads = len(os.sched_getaffinity(0)) // 2 + 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        single = tiny_config(tmp_path / "single", images, *CNN)
        run_extract(single)
        spread = tiny_config(tmp_path / "spread", images, *CNN)
        run_distributed_extract(spread, workers=2)
    finally:
        torch.set_num_threads(before)
    a, b = open_store(single.store.path), open_store(spread.store.path)
    assert b.is_complete()
    for split in ("train", "val"):
        for layer in a.layers:
            x, y = a.zarr_array(split, layer)[:], b.zarr_array(split, layer)[:]
            assert x.dtype == y.dtype == np.float16
            differ = np.nonzero((x.view(np.uint16) != y.view(np.uint16)).reshape(len(x), -1).any(1))[0]
            assert differ.size == 0, f"{split}/{layer}: samples {differ.tolist()} differ"


def test_a_task_that_outlives_its_driver_stamps_nothing_into_the_next_store(tmp_path):
    """A dask task keeps running after its driver dies. Meanwhile another run replaces the
    store (--overwrite, other preprocessing, same array shapes): the old task's chunks must
    not be stamped there, where they would read as the new run's features."""
    from cache import StoreError
    from pipeline.config import to_dict
    from pipeline.runners.distributed_extract import extract_piece
    from pipeline.runners.extract import extract_chunks, open_writer, plan_extraction

    images = write_image_folder(tmp_path / "images", per_class=4)
    old = tiny_config(tmp_path, images, "backbone.layers=[-1]")
    with open_writer(plan_extraction(old)) as driver:  # the driver creates the store, then dies
        creation = driver.creation_id
    old_plan = plan_extraction(old)
    task = open_writer(old_plan, lease=False, creation_id=creation)  # a task already under way

    new = tiny_config(tmp_path, images, "backbone.layers=[-1]", "preprocess.mean=[0.4, 0.4, 0.4]")
    open_writer(plan_extraction(new), overwrite=True).close()  # the next run replaces the store (and is stopped too)
    with pytest.raises(StoreError, match="created again since this worker's driver opened it"):
        extract_chunks(old_plan, task, "train", [0])
    with pytest.raises(StoreError, match="created again"):  # a task that starts only now is refused at once
        extract_piece(to_dict(new), "train", [1], creation, None)
    store = zarr.open_group(str(new.store.path), mode="r")
    assert not store["train/chunk_done"][:].any()  # nothing of the old run reads as the new one's
    assert not store["train/valid"][:].any()  # nor is written there: the new run may have stamped that chunk already

    run_extract(new)  # the next run finishes its store, and its own workers' pieces are accepted
    assert open_store(new.store.path).manifest.complete
