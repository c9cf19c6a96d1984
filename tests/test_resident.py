"""Layers held in RAM (cache/resident.py): batches equal streamed ones value for value, the
budget is kept, held arrays are checked as streamed reads are, and a store is decoded once
per process across runs and sweep jobs."""

import shutil
import threading

import numpy as np
import pytest
import torch
import zarr

from cache import ConfigError, StoreError, open_store, resident
from pipeline.config import SweepConfig, TrainConfig, build
from pipeline.runners.extract import run_extract
from pipeline.runners.sweep import run_sweep
from pipeline.runners.train import run_train
from tests.conftest import tiny_config, write_image_folder


def epoch(reader, views="clean", epoch=0, layers=("blocks.0", "blocks.5"), **how):
    return [(b.indices.clone(), b.labels.clone(), {k: v.clone() for k, v in b.features.items()})
            for b in reader.batches("train", list(layers), 5, seed=3, epoch=epoch, keep=np.arange(12) != 4, views=views, **how)]


# One window of 3 chunks; then one chunk per window, so batches carry samples over windows.
@pytest.mark.parametrize("how", [{}, {"buffer_chunks": 1}, {"buffer_chunks": 1, "shuffle": False}], ids=["window", "windows", "in-order"])
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_held_batches_equal_streamed_batches(tmp_path, image_folder, dtype, how, monkeypatch):
    cfg = tiny_config(tmp_path, image_folder, f"store.dtype={dtype}", "store.views=3")
    run_extract(cfg)
    streamed = [epoch(open_store(cfg.store.path), "random", e, **how) for e in range(2)]
    reader = open_store(cfg.store.path)
    before = resident.loads
    assert reader.hold("train", ["blocks.0", "blocks.5"], "random", budget=10**9)
    arrays = 3 * 2 * (2 if dtype == "int8" else 1)  # 3 views x 2 layers (+ their scales)
    assert resident.loads == before + arrays
    monkeypatch.setattr(reader, "_checked", lambda *a, **k: pytest.fail("a held layer was read from the store"))
    # Nor are the stamps, labels and validity re-read each epoch.
    monkeypatch.setattr("cache.reader.read_region", lambda *a, **k: pytest.fail("a held split read the store"))
    for e in range(2):
        held = epoch(reader, "random", e, **how)
        assert len(held) == len(streamed[e])
        for (i, y, f), (i2, y2, f2) in zip(held, streamed[e]):
            assert torch.equal(i, i2) and torch.equal(y, y2)
            assert all(torch.equal(f[k], f2[k]) for k in f)
    monkeypatch.undo()  # holding does read the stamps, labels and validity
    # Another reader of the same store in this process reads from RAM: nothing is loaded again.
    again = open_store(cfg.store.path)
    assert again.hold("train", ["blocks.0"], "random", budget=10**9) and resident.loads == before + arrays


def test_a_store_over_the_budget_streams(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder, "store.dtype=float32")
    run_extract(cfg)
    reader = open_store(cfg.store.path)
    need, before = 12 * 17 * 64 * 4, resident.loads  # one layer of train, float32
    assert not reader.hold("train", ["blocks.0"], budget=need - 1)
    assert resident.held_bytes() == 0 and resident.loads == before
    assert len(epoch(reader, layers=["blocks.0"])) == 3  # streamed
    assert reader.hold("train", ["blocks.0"], budget=need) and resident.held_bytes() == need


# A non-finite value of a computed sample of chunk 1 (4 samples per chunk), as each format holds it.
NON_FINITE = {"float32": ("layers", np.nan), "float16": ("layers", np.inf), "bfloat16": ("layers", 0xFF80), "int8": ("scales", np.nan)}


@pytest.mark.parametrize("dtype", list(NON_FINITE))
def test_held_arrays_are_checked_once_as_a_streamed_read_checks_them(tmp_path, image_folder, dtype):
    cfg = tiny_config(tmp_path, image_folder, f"store.dtype={dtype}")
    run_extract(cfg)
    kind, value = NON_FINITE[dtype]
    arr = zarr.open_array(f"{cfg.store.path}/train/{kind}/blocks.5", mode="r+")
    arr[(5, 0, 0)[: arr.ndim]] = value  # scales are [N, D]
    with pytest.raises(StoreError, match="train/layers/blocks.5.*chunk 1"):  # the streamed read's verdict
        next(iter(open_store(cfg.store.path).batches("train", ["blocks.5"], 12, shuffle=False)))
    with pytest.raises(StoreError, match="train/layers/blocks.5.*chunk 1"):
        open_store(cfg.store.path).hold("train", ["blocks.5"], budget=10**9)
    assert resident.held_bytes() == 0


def test_a_hold_is_all_or_nothing(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder, "store.views=3")
    run_extract(cfg)
    arr = zarr.open_array(f"{cfg.store.path}/train/views/2/layers/blocks.5", mode="r+")
    arr[5, 0, 0] = np.nan  # the last view group: the split and view 1 were checked before it
    with pytest.raises(StoreError, match="train/views/2/layers/blocks.5.*chunk 1"):
        open_store(cfg.store.path).hold("train", ["blocks.5"], "random", budget=10**9)
    assert resident.held_bytes() == 0


def test_a_store_is_decoded_once_across_runs_and_sweep_jobs(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder)
    run_extract(cfg)
    settings = {"store": cfg.store.path, "epochs": 1, "batch_size": 4, "test_split": "val"}
    adapters = [{"kind": "linear", "layers": ["blocks.5"], "lr": [0.01, 0.1]}]
    start = resident.loads
    run_train(build(TrainConfig, {**settings, "output": str(tmp_path / "a"), "adapters": adapters}), keep_held=True)
    first = resident.loads
    assert first == start + 2  # train and val of blocks.5
    run_train(build(TrainConfig, {**settings, "output": str(tmp_path / "b"), "adapters": adapters}))
    assert resident.loads == first and resident.held_bytes() == 0  # reused, then released by the run that does not keep it
    # A sweep of several jobs in one process (as on one dask worker): decoded by its first job only.
    sweep = build(SweepConfig, {**settings, "output": str(tmp_path / "sweep"), "trials_per_job": 1,
                                "space": [{"kind": "linear", "layer": ["blocks.5"], "lr": [0.01, 0.03, 0.1]}]})
    result = run_sweep(sweep, workers=0)
    assert len(result["rows"]) == 3 and resident.loads == first + 2
    off = build(TrainConfig, {**settings, "output": str(tmp_path / "c"), "adapters": adapters, "memory_budget_mb": 0})
    resident.release()
    run_train(off)
    assert resident.loads == first + 2  # budget 0: streamed, nothing held


def test_cuda_asked_for_without_one_is_refused_naming_the_key(tmp_path, image_folder):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = tiny_config(tmp_path, image_folder)
    run_extract(cfg)
    train = build(TrainConfig, {"store": cfg.store.path, "output": str(tmp_path / "out"), "epochs": 1, "device": "cuda",
                                "adapters": [{"kind": "linear", "layers": ["blocks.5"]}]})
    with pytest.raises(ConfigError, match="^device: 'cuda' was asked for but no CUDA device is available"):
        run_train(train)
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "int8", "bfloat16"])
def test_training_on_the_gpu_holds_the_store_there_and_equals_the_cpu(tmp_path, float64_training, dtype):
    """Held batches are gathered and decoded on the GPU, and the fused groups train there: in
    float64, every member's validation and test logits equal a CPU run's up to rounding (one
    epoch, where Adam has not yet amplified it; logits.npz keeps them as float32, so up to
    its rounding), and every held array is on the device that trained."""
    # 24 training samples in batches of 20: index_select's large-index kernel, as at real batch sizes.
    cfg = tiny_config(tmp_path, write_image_folder(tmp_path / "images", per_class=8), f"store.dtype={dtype}", "store.views=2")
    run_extract(cfg)
    settings = {"store": cfg.store.path, "epochs": 1, "batch_size": 20, "test_split": "val", "views": "random",
                "adapters": [{"kind": "linear", "layers": ["blocks.5"], "lr": [0.01, 0.1]},
                             {"kind": "inca", "layers": ["blocks.0"], "hparams": {"dim": 16}, "lr": [0.001, 0.01]}]}
    logits = {}
    for device in ("cpu", "cuda"):
        resident.release()
        run_train(build(TrainConfig, {**settings, "output": str(tmp_path / device), "device": device}), keep_held=True)
        identity = open_store(cfg.store.path).identity
        held = [resident.get(identity, f"{group}/{kind}/{layer}") for group in ("train", "train/views/1", "val")
                for layer in ("blocks.0", "blocks.5") for kind in (["layers", "scales"] if dtype == "int8" else ["layers"])]
        assert all(a is not None and a.device.type == device for a in held)
        logits[device] = np.load(tmp_path / device / "logits.npz")
    for key in ("val_logits", "test_logits"):
        np.testing.assert_allclose(logits["cuda"][key], logits["cpu"][key], rtol=1e-6, atol=1e-6)


def test_a_batch_never_aliases_a_held_array(tmp_path, image_folder):
    # One layer held, one streamed, read in store order with one chunk per window: the held
    # layer's rows come out of RAM unchanged. A consumer that edits its batch in place must
    # not change what later epochs (or other sweep jobs) read.
    cfg = tiny_config(tmp_path, image_folder, "store.dtype=float32")
    run_extract(cfg)
    reader = open_store(cfg.store.path)
    assert reader.hold("train", ["blocks.0"], budget=10**9)
    for batch in reader.batches("train", ["blocks.0", "blocks.5"], 4, shuffle=False, buffer_chunks=1):
        batch.features["blocks.0"].zero_()
    stored = zarr.open_array(f"{cfg.store.path}/train/layers/blocks.0", mode="r")[:]
    again = torch.cat([b.features["blocks.0"] for b in reader.batches("train", ["blocks.0", "blocks.5"], 4, shuffle=False, buffer_chunks=1)])
    assert np.abs(stored).sum() > 0 and torch.equal(again, torch.from_numpy(stored))


def test_the_labels_and_validity_a_reader_keeps_are_its_own(tmp_path, image_folder):
    # Every epoch reads the labels and validity the reader keeps; a caller that edits what it
    # was given must not change them, and the reader cannot edit its own by mistake.
    cfg = tiny_config(tmp_path, image_folder)
    run_extract(cfg)
    reader = open_store(cfg.store.path)
    labels, valid = reader.labels("train"), reader.valid("train")
    labels[:], valid[:] = 99, False
    stored = zarr.open_array(f"{cfg.store.path}/train/labels", mode="r")[:]
    assert np.array_equal(reader.labels("train"), stored) and reader.valid("train").all()
    assert torch.equal(torch.cat([b.labels for b in reader.batches("train", ["blocks.0"], 4, shuffle=False)]), torch.from_numpy(stored))
    with pytest.raises(ValueError, match="read-only"):
        reader._whole("train", "labels")[0] = 0


def test_a_store_extracted_again_at_the_same_path_is_read_afresh(tmp_path):
    # What a process holds is keyed by the store's place, fingerprint and creation: a new
    # store at the path of a held one is read from disk, never answered from the old one's RAM.
    first = tiny_config(tmp_path, write_image_folder(tmp_path / "a", seed=0), "store.dtype=float32")
    run_extract(first)
    assert open_store(first.store.path).hold("train", ["blocks.0"], budget=10**9)
    shutil.rmtree(first.store.path)
    second = tiny_config(tmp_path, write_image_folder(tmp_path / "b", seed=1), "store.dtype=float32")
    assert second.store.path == first.store.path
    run_extract(second)
    reader = open_store(second.store.path)
    got = torch.cat([b.features["blocks.0"] for b in reader.batches("train", ["blocks.0"], 4, shuffle=False)])
    stored = zarr.open_array(f"{second.store.path}/train/layers/blocks.0", mode="r")[:]
    assert torch.equal(got, torch.from_numpy(stored))


def test_an_epoch_keeps_the_arrays_it_started_with_when_another_thread_releases_them(tmp_path, image_folder, monkeypatch):
    cfg = tiny_config(tmp_path, image_folder)
    run_extract(cfg)
    streamed = epoch(open_store(cfg.store.path))
    reader = open_store(cfg.store.path)
    assert reader.hold("train", ["blocks.0", "blocks.5"], budget=10**9)
    window_order = reader._window_order

    def released_meanwhile(*args, **kwargs):  # the release lands after the epoch chose the held path
        reader.release()
        return window_order(*args, **kwargs)

    monkeypatch.setattr(reader, "_window_order", released_meanwhile)
    held = epoch(reader)
    assert resident.held_bytes() == 0 and len(held) == len(streamed)
    for (i, y, f), (i2, y2, f2) in zip(held, streamed):
        assert torch.equal(i, i2) and torch.equal(y, y2) and all(torch.equal(f[k], f2[k]) for k in f)


def test_two_threads_holding_at_once_never_pass_the_budget_together(tmp_path, image_folder, monkeypatch):
    cfgs = [tiny_config(tmp_path, image_folder, "store.dtype=float32", f"store.path={tmp_path / name}") for name in ("a.zarr", "b.zarr")]
    for cfg in cfgs:
        run_extract(cfg)
    first, second = (open_store(cfg.store.path) for cfg in cfgs)
    need = 12 * 17 * 64 * 4  # one layer of train, float32: the budget fits one store's, not both
    outcome = {}
    other = threading.Thread(target=lambda: outcome.setdefault("second", second.hold("train", ["blocks.0"], budget=need * 3 // 2)))
    checked = first._checked

    def while_first_reads(*args, **kwargs):  # the second hold starts after the first passed the budget, before it loads
        if not other.is_alive() and "second" not in outcome:
            other.start()
            other.join(timeout=1.0)
        return checked(*args, **kwargs)

    monkeypatch.setattr(first, "_checked", while_first_reads)
    assert first.hold("train", ["blocks.0"], budget=need * 3 // 2)
    other.join()
    # The second hold waited for the first, then forgot it to make room (the least recently held).
    assert outcome == {"second": True} and resident.held_bytes() == need
    assert resident.get(first.identity, "train/layers/blocks.0") is None


def test_a_hold_that_does_not_fit_forgets_the_least_recently_held_other_store(tmp_path, image_folder):
    """As on a long-lived dask worker that sweeps one store after another."""
    readers = []
    for name in ("a.zarr", "b.zarr", "c.zarr"):
        cfg = tiny_config(tmp_path, image_folder, "store.dtype=float32", f"store.path={tmp_path / name}")
        run_extract(cfg)
        readers.append(open_store(cfg.store.path))
    a, b, c = readers
    need = 12 * 17 * 64 * 4  # one layer of train, float32
    budget = 2 * need  # two stores' layer fit, not three
    assert a.hold("train", ["blocks.0"], budget=budget) and b.hold("train", ["blocks.0"], budget=budget)
    assert a.hold("train", ["blocks.0"], budget=budget)  # already held: a is now the more recently held
    loads = resident.loads
    assert c.hold("train", ["blocks.0"], budget=budget)
    assert resident.loads == loads + 1 and resident.held_bytes() == budget
    assert [resident.get(r.identity, "train/layers/blocks.0") is not None for r in readers] == [True, False, True]
    # A store that would not fit even alone forgets nothing and streams.
    assert not a.hold("train", ["blocks.0", "blocks.5"], budget=need + 1)
    assert resident.held_bytes() == budget
    # Another split of the same store (a run holds train, then val) forgets the other store, never its own.
    assert c.hold("val", ["blocks.0"], budget=budget)
    assert [resident.get(r.identity, "train/layers/blocks.0") is not None for r in readers] == [False, False, True]
    held = resident.held_bytes()
    assert not c.hold("val", ["blocks.5"], budget=held) and resident.held_bytes() == held


def test_a_layer_held_without_its_scales_is_checked_with_the_scales_read_now(tmp_path, image_folder):
    """An int8 layer's values are q * scale: whichever of the two is new, both are checked together."""
    cfg = tiny_config(tmp_path, image_folder, "store.dtype=int8")
    run_extract(cfg)
    reader = open_store(cfg.store.path)
    assert reader.hold("train", ["blocks.5"], budget=10**9)
    resident._ARRAYS.pop((reader.identity, "train/scales/blocks.5"))  # as a hold cut short between its two puts would leave it
    zarr.open_array(f"{cfg.store.path}/train/scales/blocks.5", mode="r+")[5, 0] = np.nan
    with pytest.raises(StoreError, match="train/layers/blocks.5.*chunk 1"):
        open_store(cfg.store.path).hold("train", ["blocks.5"], budget=10**9)
    assert resident.get(reader.identity, "train/scales/blocks.5") is None


def test_a_hold_that_streams_forgets_no_other_store(tmp_path, image_folder):
    readers = []
    for name in ("a.zarr", "b.zarr"):
        cfg = tiny_config(tmp_path, image_folder, "store.dtype=float32", f"store.path={tmp_path / name}")
        run_extract(cfg)
        readers.append(cfg.store.path)
    need = 12 * 17 * 64 * 4  # one layer of train, float32: the budget fits one
    a = open_store(readers[0])
    assert a.hold("train", ["blocks.0"], budget=need)
    zarr.open_array(f"{readers[1]}/train/chunk_done", mode="r+")[1] = 0  # b's train is incomplete: it streams
    b = open_store(readers[1])
    assert not b.hold("train", ["blocks.0"], budget=need)
    assert resident.get(a.identity, "train/layers/blocks.0") is not None and resident.held_bytes() == need
