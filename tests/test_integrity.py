"""Stored bytes are checked: damage is a StoreError naming the array and chunk, never a value;
`verify --repair` unstamps exactly the damaged chunks and the same extract recomputes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from cache import StoreError, open_store
from cache.verify import verify_store
from pipeline.cli import main
from pipeline.runners.extract import run_extract
from tests.conftest import tiny_config, write_image_folder

LAYER = "blocks.0"


@pytest.fixture
def store(tmp_path, image_folder):
    def make(*overrides):
        # Batches of one chunk: a repaired chunk is recomputed as one batch, and its bytes are
        # compared with the first run's (features may differ by an ULP across batch sizes).
        cfg = tiny_config(tmp_path, image_folder, "backbone.layers=[0]", "backbone.block_input=false", "runtime.batch_size=4", *overrides)
        run_extract(cfg)
        return cfg

    return make


def shard_files(cfg, array="layers/" + LAYER, split="train") -> list[Path]:
    return sorted(p for p in (Path(cfg.store.path) / split / array / "c").rglob("*") if p.is_file())


def all_bytes(path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def read_everything(cfg):
    reader = open_store(cfg.store.path)
    for split in reader.splits:
        reader.read(split, list(reader.layers), 0, reader.num_samples(split))
        for _ in reader.batches(split, list(reader.layers), 5):
            pass


@pytest.mark.parametrize("compressor", ["zstd", "none"])
def test_every_single_bit_flip_is_refused(store, compressor):
    """Bit flips spread over a whole shard (data, checksums, shard index): each one is a
    StoreError on read; not one reads back as other values."""
    cfg = store(f"store.compressor.name={compressor}")
    reader = open_store(cfg.store.path)
    clean = reader.read("train", [LAYER], 0, 12)[LAYER]
    shard = shard_files(cfg)[0]
    original = shard.read_bytes()
    positions = np.linspace(0, len(original) * 8 - 1, 60).astype(int)
    for bit in positions:
        damaged = bytearray(original)
        damaged[bit // 8] ^= 1 << (bit % 8)
        shard.write_bytes(bytes(damaged))
        with pytest.raises(StoreError, match=rf"train/layers/{LAYER}.*(cannot be decoded|missing|non-finite)"):
            open_store(cfg.store.path).read("train", [LAYER], 0, 12)
    shard.write_bytes(original)
    assert open_store(cfg.store.path).read("train", [LAYER], 0, 12)[LAYER].equal(clean)


def test_a_deleted_shard_is_refused_and_repair_recomputes_exactly_it(store, tmp_path, capsys):
    cfg = store()
    path = tmp_path / "store.zarr"
    before = all_bytes(path)
    shards = shard_files(cfg)
    assert len(shards) == 2  # 12 samples, 4 per chunk, 2 chunks per shard
    shards[1].unlink()
    with pytest.raises(StoreError, match=rf"train/layers/{LAYER} chunk 2 .*is missing"):
        read_everything(cfg)

    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "split train: 3/3 chunks stamped" in out and "chunk 2: layers/blocks.0: object missing" in out
    assert "split val: 3/3 chunks stamped, 3 chunked arrays read: ok" in out

    assert main(["verify", str(path), "--repair"]) == 0
    assert open_store(path, allow_partial=True).missing_chunks("train") == [2]
    val_split = {p: path.joinpath(p).stat().st_mtime_ns for p in before if p.parts[0] == "val"}
    run_extract(cfg)
    after = all_bytes(path)
    assert after.keys() == before.keys()
    for key in before:
        if key != Path("zarr.json"):  # the root's manifest has a new completion time
            assert after[key] == before[key], key
    assert {p: path.joinpath(p).stat().st_mtime_ns for p in val_split} == val_split  # nothing else was rewritten
    assert main(["verify", str(path)]) == 0


def test_a_deleted_valid_shard_does_not_drop_samples_silently(store):
    cfg = store()
    shard_files(cfg, "valid")[0].unlink()
    with pytest.raises(StoreError, match=r"train/valid chunk 0 .*is missing"):
        open_store(cfg.store.path).valid("train")
    report = {r.split: r for r in verify_store(cfg.store.path)}
    assert sorted(report["train"].bad) == [0, 1]


def test_values_that_decode_to_nan_are_refused(store):
    cfg = store()
    arr = zarr.open_group(cfg.store.path, mode="r+")[f"train/layers/{LAYER}"]
    arr[5, 3, 7] = np.nan  # a valid write (correct checksum) of a value no backbone gave
    with pytest.raises(StoreError, match=rf"train/layers/{LAYER} chunk 1 .*non-finite"):
        read_everything(cfg)
    with pytest.raises(StoreError, match="non-finite"):
        open_store(cfg.store.path).read("train", [LAYER], 4, 8)
    report = {r.split: r for r in verify_store(cfg.store.path)}
    assert list(report["train"].bad) == [1] and report["train"].bad[1] == [f"layers/{LAYER}: non-finite values"]


def test_repair_does_not_unstamp_a_store_put_there_after_verify_read_the_damaged_one(store, tmp_path, monkeypatch):
    """verify reads without the lease; an `extract --overwrite` that finished before --repair
    took it had its sound chunks unstamped (the new store left incomplete) and the old
    store's damage reported as the path's."""
    import cache.verify as verify

    cfg = store()
    shard_files(cfg)[0].unlink()
    replace = tiny_config(tmp_path, write_image_folder(tmp_path / "images-b", seed=1), "backbone.layers=[0]", "backbone.block_input=false")
    checked = verify._check_views_agree
    monkeypatch.setattr(verify, "_check_views_agree", lambda *a: (checked(*a), run_extract(replace, overwrite=True)))
    with pytest.raises(StoreError, match="was replaced while this run read it"):
        verify_store(cfg.store.path, repair=True)
    assert open_store(cfg.store.path).manifest.complete  # the new store is untouched
    monkeypatch.undo()
    assert not any(r.bad for r in verify_store(cfg.store.path))


def test_damaged_labels_cannot_be_repaired_by_chunks(store, tmp_path, capsys):
    cfg = store()
    f = shard_files(cfg, "labels", "val")[0]
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
    assert main(["verify", cfg.store.path, "--repair"]) == 2
    captured = capsys.readouterr()
    assert "labels: checksum or decoding failed" in captured.out
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--overwrite" in last


def test_an_object_swapped_for_another_intact_one_is_found_by_verify(store, tmp_path, capsys):
    """Chunk 1's layer object copied over chunk 0's passes its crc32c and decodes to finite
    values: only the feature sums stamped beside chunk 0 show that these are not its values."""
    cfg = store("store.chunks_per_shard=1")
    path = tmp_path / "store.zarr"
    before = all_bytes(path)
    shards = shard_files(cfg)
    assert len(shards) == 3
    shards[0].write_bytes(shards[1].read_bytes())
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"chunk 0: stats/{LAYER}: not the sums of the chunk's values" in out and "chunk 1" not in out
    assert main(["verify", str(path), "--repair"]) == 0
    run_extract(cfg)
    assert all_bytes(path)[shards[0].relative_to(path)] == before[shards[0].relative_to(path)]
    assert main(["verify", str(path)]) == 0


def test_a_lost_stamp_in_a_complete_store_is_found_and_repaired(store, tmp_path, capsys):
    """A complete store whose stamp object of chunk 1 is gone: verify said "ok" (an unstamped
    chunk is not damage in an unfinished store) and extract crashed with a traceback writing
    into the store it had opened read-only. Now verify reports it, extract has nothing to do,
    readers refuse that chunk in one line, and --repair reopens the store for extract."""
    cfg = store()
    path = tmp_path / "store.zarr"
    stamp = path / "train" / "chunk_done" / "c" / "1"
    assert stamp.is_file()
    stamp.unlink()
    assert main(["verify", str(path)]) == 1
    assert "chunk 1: chunk_done: unstamped in a store marked complete" in capsys.readouterr().out
    run_extract(cfg)  # the manifest says complete: nothing to write, no traceback
    with pytest.raises(StoreError, match=r"chunks \[1\] of 'train' .* are not stamped .*verify .* --repair"):
        read_everything(cfg)
    assert main(["verify", str(path), "--repair"]) == 0
    run_extract(cfg)
    assert stamp.is_file() and open_store(path).manifest.complete
    assert main(["verify", str(path)]) == 0


def test_dask_array_refuses_what_read_refuses(store):
    """Before, dask_array read a deleted int8 shard as zeros (the fill value: plausible
    features) and NaNs as values: it checked nothing."""
    cfg = store("store.dtype=int8")
    shard_files(cfg)[0].unlink()
    with pytest.raises(StoreError, match=rf"train/layers/{LAYER} chunk 0 .*is missing"):
        open_store(cfg.store.path).dask_array("train", LAYER)
    nan = store("store.dtype=float16", f"store.path={cfg.store.path}-f16")
    zarr.open_group(nan.store.path, mode="r+")[f"train/layers/{LAYER}"][5, 3, 7] = np.nan
    lazy = open_store(nan.store.path).dask_array("train", LAYER)
    with pytest.raises(StoreError, match=rf"train/layers/{LAYER} samples 0\.\.7 holds non-finite"):
        lazy.compute()


def test_dask_array_of_a_partial_store_checks_only_stamped_chunks(store):
    """verify --repair unstamps a chunk whose values are non-finite; a partial reader's
    dask_array then refused the whole block (the stamped chunk beside it too)."""
    cfg = store("store.dtype=float16")
    zarr.open_group(cfg.store.path, mode="r+")[f"train/layers/{LAYER}"][1, 0, 0] = np.nan
    verify_store(cfg.store.path, repair=True)
    reader = open_store(cfg.store.path, allow_partial=True)
    assert reader.missing_chunks("train") == [0]
    values = reader.dask_array("train", LAYER).compute()
    np.testing.assert_array_equal(values[4:8], reader.read("train", [LAYER], 4, 8)[LAYER].numpy())
