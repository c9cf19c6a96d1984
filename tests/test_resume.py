"""kill -9 in the middle of an extraction, rerun the same command: only missing chunks are
computed and the store equals an uninterrupted run."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import yaml
import zarr

from cache import open_store
from pipeline.config import to_dict
from pipeline.runners.extract import run_extract
from tests.conftest import REPO, tiny_config, write_image_folder

# The child slows each forward pass down so the parent can kill it between stamped chunks.
CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    import torch
    torch.set_num_threads(1)
    import pipeline.runners.extract as ex
    from pipeline.config import ExtractConfig, load_config
    slow = ex.forward_batch
    def forward(*a, **k):
        time.sleep(0.3)
        return slow(*a, **k)
    ex.forward_batch = forward
    ex.run_extract(load_config(ExtractConfig, {config!r}))
""")


def extract_and_kill(cfg, group: str = "train", stamped: int = 2) -> int:
    """Run `cfg`'s extraction in a child process and SIGKILL it once `stamped` chunks of store
    group `group` are stamped; returns how many were."""
    config_file = Path(cfg.store.path).parent / "cfg.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(to_dict(cfg)))
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO), config=str(config_file))], stderr=subprocess.DEVNULL)
    stamps = Path(cfg.store.path) / group / "chunk_done"
    deadline, done = time.time() + 120, 0
    while time.time() < deadline and child.poll() is None:
        if stamps.exists():
            done = int(zarr.open_array(str(stamps), mode="r")[:].sum())
            if done >= stamped:
                break
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return done


def test_sigkill_then_rerun_equals_clean_run(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=8)  # 24 samples/split, 6 chunks
    cfg = tiny_config(tmp_path / "a", images, "runtime.batch_size=2", "store.chunks_per_shard=1")
    done = extract_and_kill(cfg)
    store = tmp_path / "a" / "store.zarr"
    assert 2 <= done < 6, f"the child should be killed mid-split, it had stamped {done} chunks"
    partial = open_store(store, allow_partial=True)
    assert not partial.is_complete()
    stamped_before = 6 - len(partial.missing_chunks("train"))

    missing = {split: set(partial.missing_chunks(split)) for split in ("train", "val")}
    # Shard files (LAYER/c/SHARD/0/0; one chunk per shard here) of the stamped training chunks.
    stamped_files = {p: p.stat().st_mtime_ns for p in (store / "train" / "layers").rglob("*")
                     if p.is_file() and "c" in p.parts and int(p.parts[p.parts.index("c") + 1]) not in missing["train"]}
    assert len(stamped_files) == stamped_before * len(partial.layers)
    done = run_extract(cfg)  # the same config: resumes
    # Only the missing chunks were computed (4 samples each), and no stamped shard was rewritten.
    assert done.streamed == 4 * sum(len(chunks) for chunks in missing.values())
    assert [p for p, t in stamped_files.items() if p.stat().st_mtime_ns != t] == []
    resumed = open_store(store)

    clean_cfg = tiny_config(tmp_path / "b", images, "runtime.batch_size=2", "store.chunks_per_shard=1")
    run_extract(clean_cfg)
    clean = open_store(clean_cfg.store.path)
    for split in ("train", "val"):
        for layer in clean.layers:
            np.testing.assert_array_equal(resumed.zarr_array(split, layer)[:], clean.zarr_array(split, layer)[:])
        np.testing.assert_array_equal(resumed.valid(split), clean.valid(split))


def test_an_incomplete_store_says_whether_it_is_being_extracted_now(tmp_path, image_folder, monkeypatch):
    """train on a store still being extracted was told to rerun the extract command (which the
    lease refuses while the first runs) or to pass allow_partial=True (no CLI option)."""
    import json
    import socket

    import pytest

    from cache import StoreError
    from cache.lease import StoreLease
    from cache.location import StoreLocation
    from tests.conftest import interrupted_extraction

    cfg = tiny_config(tmp_path, image_folder)
    interrupted_extraction(cfg, monkeypatch)
    with pytest.raises(StoreError, match=r"is incomplete .*; rerun the same extract command to finish it \(in Python, open_store"):
        open_store(cfg.store.path)
    with StoreLease(StoreLocation(cfg.store.path)):  # an extraction running now, in this process
        with pytest.raises(StoreError, match=rf"is incomplete .*; it is being extracted now by pid {os.getpid()} on host "):
            open_store(cfg.store.path)
    # A killed writer's lease file stays behind: its dead pid is not named as extracting.
    lease = Path(cfg.store.path).parent / f".{Path(cfg.store.path).name}.lease"
    lease.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345, "started_at": "2026-01-01T00:00:00Z"}))
    with pytest.raises(StoreError, match=r"rerun the same extract command"):
        open_store(cfg.store.path)
