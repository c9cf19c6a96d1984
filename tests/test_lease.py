"""One writer at a time, tested with real processes: a second extract (or --overwrite) while
another holds the store's lease gets one line naming the holder; a killed holder's lease is
free again at once, and what its run left behind is cleaned up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cache import StoreError
from cache.lease import StoreLease
from cache.location import as_location
from tests.conftest import BUCKET, REPO, tiny_config

HOLD = """
import sys, time
from cache.lease import StoreLease
from cache.location import as_location
lease = StoreLease(as_location(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def holder(store: Path) -> subprocess.Popen:
    """A separate process that takes the store's lease and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(store)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def extract_cli(tmp_path: Path, cfg, *args: str) -> subprocess.CompletedProcess:
    from pipeline.config import to_dict

    path = tmp_path / "extract.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return subprocess.run([sys.executable, "-m", "pipeline", "extract", str(path), *args], cwd=REPO, capture_output=True, text=True)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_the_store(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder)
    store = Path(cfg.store.path)
    proc = holder(store)
    try:
        line = error_line(extract_cli(tmp_path, cfg))
        assert f"is being written by pid {proc.pid} on host {socket.gethostname()}" in line
        assert not store.exists()  # the refused writer created nothing
        # --overwrite does not get past a running writer either.
        assert f"pid {proc.pid}" in error_line(extract_cli(tmp_path, cfg, "--overwrite"))
        # What a killed extraction leaves: a half-built hidden store and a temporary file.
        (tmp_path / f".{store.name}.creating-999999").mkdir()
        (tmp_path / f".{store.name}.creating-999999" / "x.partial").write_text("half")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    result = extract_cli(tmp_path, cfg)  # the kernel dropped the dead holder's lock
    assert result.returncode == 0, result.stderr[-2000:]
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert left == [], left  # no lease file, no hidden folders
    assert not list(store.rglob("*.partial"))


def test_a_lease_in_this_process_refuses_a_second_one(tmp_path):
    location = as_location(tmp_path / "s.zarr")
    with StoreLease(location):
        recorded = json.loads((tmp_path / ".s.zarr.lease").read_text())
        assert recorded["pid"] == os.getpid() and recorded["host"] == socket.gethostname() and recorded["started_at"]
        with pytest.raises(StoreError, match=rf"being written by pid {os.getpid()} on host"):
            StoreLease(location).acquire()
    assert not (tmp_path / ".s.zarr.lease").exists()
    with StoreLease(location):  # released: free again
        pass


def test_a_store_reached_through_a_symlink_is_one_store_with_one_lease(tmp_path):
    """A writer through a link and one through the real path used to lock two lease files,
    so an --overwrite could run under a writer still stamping the old store's chunks."""
    import numpy as np

    from cache import LayerSpec, StoreWriter
    from tests.conftest import fake_fingerprint

    real, link = tmp_path / "disk" / "store.zarr", tmp_path / "link.zarr"
    real.parent.mkdir()
    os.symlink(real, link, target_is_directory=True)
    spec = LayerSpec("l", 1, 4)
    splits = {"train": ([f"s{i}" for i in range(8)], np.zeros(8, np.int64))}
    StoreWriter.open(real, fake_fingerprint((spec,)), splits, ("zstd", 3), {}).close()
    first = StoreWriter.open(link, fake_fingerprint((spec,)), splits, ("zstd", 3), {})
    with pytest.raises(StoreError, match=rf"'{real}' is being written by pid {os.getpid()}"):
        StoreWriter.open(real, fake_fingerprint((spec,), image_size=96), splits, ("zstd", 3), {}, overwrite=True)
    first.close()
    # --overwrite through the link replaces the store it points to and keeps the link.
    StoreWriter.open(link, fake_fingerprint((spec,), image_size=96), splits, ("zstd", 3), {}, overwrite=True).close()
    assert link.is_symlink() and json.loads((real / "zarr.json").read_text())["attributes"]["feature_cache"]["fingerprint"][
        "preprocessing"] == {"input_size": [3, 96, 96]}


def test_on_s3_the_lease_is_a_conditional_create_and_a_dead_local_holder_is_taken_over(s3):
    url = f"s3://{BUCKET}/leased.zarr"
    location = as_location(url)
    first = StoreLease(location).acquire()
    try:
        with pytest.raises(StoreError, match=rf"being written by pid {os.getpid()} on host .*delete {BUCKET}/leased.zarr.lease"):
            StoreLease(location).acquire()
    finally:
        first.release()
    assert not s3.exists(f"{BUCKET}/leased.zarr.lease")
    # A lease left by a process of this host that is gone (a pid that cannot be running).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    s3.pipe(f"{BUCKET}/leased.zarr.lease", json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started_at": "x"}).encode())
    with StoreLease(location):
        assert json.loads(s3.cat(f"{BUCKET}/leased.zarr.lease"))["pid"] == os.getpid()
    # One held on another host is never taken over.
    s3.pipe(f"{BUCKET}/leased.zarr.lease", json.dumps({"host": "elsewhere", "pid": 1, "started_at": "x"}).encode())
    with pytest.raises(StoreError, match="pid 1 on host elsewhere"):
        StoreLease(location).acquire()


def test_on_s3_two_writers_that_find_one_stale_lease_never_both_take_it(s3, monkeypatch):
    """Both read the stale holder; the first replaces it. The second's takeover is conditional
    on the object it saw (its ETag), so it is refused, not a second holder (before: read,
    delete, create, and both held it). Release deletes only the holder's own object."""
    url = f"s3://{BUCKET}/raced.zarr"
    key = f"{BUCKET}/raced.zarr.lease"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"host": socket.gethostname(), "pid": int(dead.stdout), "started_at": "x"}
    s3.pipe(key, json.dumps(stale).encode())
    seen_by_second = s3.info(key)["ETag"]
    first = StoreLease(as_location(url)).acquire()  # takes over the stale lease
    assert json.loads(s3.cat(key))["pid"] == os.getpid()
    # The second read the stale object before the first replaced it.
    monkeypatch.setattr(StoreLease, "_etag_of", staticmethod(lambda fs, k: seen_by_second))
    monkeypatch.setattr(StoreLease, "_read_remote", staticmethod(lambda fs, k: stale))
    with pytest.raises(StoreError, match="another writer took over the stale lease of .* first"):
        StoreLease(as_location(url)).acquire()
    monkeypatch.undo()
    s3.pipe(key, json.dumps({"host": "elsewhere", "pid": 1, "started_at": "y"}).encode())  # not first's any more
    first.release()
    assert json.loads(s3.cat(key))["host"] == "elsewhere"  # left to its holder
    s3.rm(key)
    # A server without conditional deletes: the holder deletes its lease once it reads it as its own.
    import s3fs

    own = StoreLease(as_location(url)).acquire()
    real = s3fs.S3FileSystem.call_s3

    def no_conditional_delete(fs, method, *args, **kwargs):
        if method == "delete_object" and "IfMatch" in kwargs:
            raise OSError("NotImplemented: A header you provided implies functionality that is not implemented")
        return real(fs, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", no_conditional_delete)
    own.release()
    assert not s3.exists(key)


def test_finalize_refuses_a_manifest_that_does_not_match_the_arrays(tmp_path, image_folder):
    """Another writer replaced the store under an open writer: stamping complete is refused."""
    import zarr

    from pipeline.runners.extract import extract_chunks, open_writer, plan_extraction

    plan = plan_extraction(tiny_config(tmp_path, image_folder))
    writer = open_writer(plan)
    for split in plan.sources:
        extract_chunks(plan, writer, split, range(plan.chunks.n_chunks(len(plan.sources[split]))))
    root = zarr.open_group(plan.cfg.store.path, mode="r+")
    manifest = dict(root.attrs["feature_cache"])
    manifest["fingerprint"] = {**manifest["fingerprint"], "backbone": {"name": "another"}}
    root.attrs["feature_cache"] = manifest
    with pytest.raises(StoreError, match="arrays do not match its manifest: backbone"):
        writer.finalize()
    assert not (tmp_path / ".store.zarr.lease").exists()  # the lease was given back all the same


def test_on_s3_lease_edge_cases_are_refused_or_released_in_one_line(s3, monkeypatch, caplog):
    """A lease object deleted by hand is released with a warning (a raw FileNotFoundError
    before); a botocore without If-Match (s3fs drops arguments it does not know, which would
    make the takeover unconditional) refuses to take over a stale lease; an error whose text
    holds "412" is no failed precondition."""
    import cache.lease as lease

    url = f"s3://{BUCKET}/edges.zarr"
    key = f"{BUCKET}/edges.zarr.lease"
    held = StoreLease(as_location(url)).acquire()
    s3.rm(key)
    with caplog.at_level("WARNING"):
        held.release()
    assert "was already gone" in caplog.text
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    s3.pipe(key, json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started_at": "x"}).encode())
    monkeypatch.setattr(lease, "_client_sends_if_match", lambda: False)
    with pytest.raises(StoreError, match=r"this botocore cannot send a conditional PUT \(If-Match; botocore >= 1.35.69\)"):
        StoreLease(as_location(url)).acquire()
    s3.rm(key)
    with StoreLease(as_location(url)):  # and releases by content without If-Match
        assert s3.exists(key)
    assert not s3.exists(key)
    held = StoreLease(as_location(url)).acquire()
    s3.pipe(key, json.dumps({"host": "elsewhere", "pid": 1, "started_at": "z"}).encode())  # another writer's now
    with caplog.at_level("WARNING"):
        held.release()
    assert "another writer took it over); left to it" in caplog.text and json.loads(s3.cat(key))["host"] == "elsewhere"
    s3.rm(key)
    assert not lease._precondition_failed(OSError("Could not connect to the endpoint URL: http://host/run_2412.zarr.lease"))
