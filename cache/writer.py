"""Create or resume a store and write chunk regions into it; never corrupt what is there.

Safety rules:
- A new local store is built in a hidden sibling directory and renamed into place, so a
  crash during creation never leaves a half-made store under the real name.
- Object stores (s3://...) have no rename, so a store is built where it will live and its
  manifest is the last object written: until then the root carries only a creation marker
  (CREATING_KEY), which makes the prefix recognisably ours, so a rerun clears and rebuilds
  it, and which no reader takes for a store. See _create_in_place.
- Data goes in first, then the chunk's completion stamp (one object per chunk in
  chunk_done); zarr's local store writes every object to a temporary file and renames it,
  and an object store's PUT replaces an object whole, so a kill leaves each object either
  old or new, and an unstamped chunk is simply redone.
- An existing store is reused only if its fingerprint equals the wanted one; otherwise the
  differences are listed and nothing is touched (unless overwrite=True). A place that holds
  anything but a feature cache (or our creation marker) is never touched, even with overwrite.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import zarr

from cache.codecs import ZARR_DTYPE, compressors_for
from cache.errors import StoreError, StoreMismatchError
from cache.fingerprint import differences
from cache.layout import ChunkPlan
from cache.location import StoreLocation, as_location
from cache.schema import CREATING_KEY, FORMAT_VERSION, MANIFEST_KEY, LayerSpec

log = logging.getLogger(__name__)


class StoreWriter:
    def __init__(self, location: StoreLocation, group: zarr.Group):
        self.location = location
        self.root = group
        self.manifest = dict(group.attrs[MANIFEST_KEY])
        self.layers = [LayerSpec.from_json(d) for d in self.manifest["layers"]]
        self.plan = ChunkPlan(self.manifest["samples_per_chunk"], self.manifest["chunks_per_shard"])
        self.dtype = self.manifest["storage"]["dtype"]

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        fingerprint: dict,
        layers: list[LayerSpec],
        splits: dict[str, tuple[list[str], np.ndarray]],
        plan: ChunkPlan,
        compressor: tuple[str, int],
        extra: dict,
        overwrite: bool = False,
        storage_options: dict | None = None,
    ) -> "StoreWriter":
        """Open a store made with this exact fingerprint, or create it.

        path: a local path or an fsspec URL (storage_options go to fsspec; see cache.location).
        splits: split -> (sample ids, labels), written once at creation.
        extra: manifest entries that do not identify the content (resolved config, classes...).
        """
        location = as_location(path, storage_options)
        attrs = _root_attributes(location)
        if MANIFEST_KEY in attrs:
            diff = differences(attrs[MANIFEST_KEY]["fingerprint"], fingerprint)
            if not diff:
                log.info("resuming store %s", location)
                return cls(location, location.open_group("r+"))
            if not overwrite:
                raise StoreMismatchError(str(location), diff, "Use another store.path, or --overwrite to replace it.")
            log.warning("--overwrite: replacing store %s (%d difference(s))", location, len(diff))
        elif CREATING_KEY in attrs:
            log.warning("store %s: its creation was interrupted (no chunk was written yet); creating it again", location)
        elif not location.holds_nothing():
            raise StoreError(f"{str(location)!r} exists and is not a feature-cache store; refusing to touch it")
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "layers": [l.to_json() for l in layers],
            "splits": {s: {"num_samples": len(ids), "n_chunks": plan.n_chunks(len(ids))} for s, (ids, _) in splits.items()},
            "samples_per_chunk": plan.samples_per_chunk,
            "chunks_per_shard": plan.chunks_per_shard,
            "storage": fingerprint["storage"],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "complete": False,
            "skipped": {},
            **extra,
        }
        if location.is_local:
            _create_beside(location.path, manifest, layers, splits, plan, compressor)
        else:
            _create_in_place(location, manifest, layers, splits, plan, compressor)
        log.info("created store %s", location)
        return cls(location, location.open_group("r+"))

    # -- writing ------------------------------------------------------------------------
    def missing_chunks(self, split: str) -> list[int]:
        done = self.root[f"{split}/chunk_done"][:]
        return [int(i) for i in np.flatnonzero(done == 0)]

    def write(self, split: str, start: int, layers: dict[str, np.ndarray], scales: dict[str, np.ndarray], valid: np.ndarray) -> None:
        """Write samples [start, start + len(valid)) of every layer (chunk-aligned regions)."""
        stop = start + len(valid)
        g = self.root[split]
        for name, data in layers.items():
            g[f"layers/{name}"][start:stop] = data
            if name in scales:
                g[f"scales/{name}"][start:stop] = scales[name]
        g["valid"][start:stop] = valid

    def stamp(self, split: str, chunks: list[int]) -> None:
        done = self.root[f"{split}/chunk_done"]
        for c in chunks:
            done[c] = 1  # one object per chunk: concurrent writers never clash

    def finalize(self) -> dict:
        """Stamp the whole store complete (once every chunk is), listing skipped samples."""
        missing = {s: len(self.missing_chunks(s)) for s in self.manifest["splits"]}
        if any(missing.values()):
            raise StoreError(f"cannot finalize {self.location}: chunks still missing per split: {missing}")
        skipped = {}
        for split in self.manifest["splits"]:
            valid = self.root[f"{split}/valid"][:]
            ids = self.root[f"{split}/sample_ids"][:]
            bad = [str(ids[i]) for i in np.flatnonzero(~valid)]
            if bad:
                skipped[split] = bad
        self.manifest.update(complete=True, skipped=skipped, completed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.root.attrs[MANIFEST_KEY] = self.manifest
        return self.manifest


def _root_attributes(location: StoreLocation) -> dict:
    """The root group's attributes; {} where there is no zarr group."""
    try:
        return location.open_group("r").attrs.asdict()
    except Exception:
        return {}


def _create_beside(path: Path, manifest: dict, layers, splits, plan: ChunkPlan, compressor: tuple[str, int]) -> None:
    """Local: build in a hidden sibling directory, then rename into place."""
    tmp = path.parent / f".{path.name}.creating-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _create(zarr.open_group(str(tmp), mode="w"), manifest, layers, splits, plan, compressor)
    _replace(tmp, path)


def _create_in_place(location: StoreLocation, manifest: dict, layers, splits, plan: ChunkPlan, compressor: tuple[str, int]) -> None:
    """Object store: the caller has checked that the place is empty, a store of ours or an
    interrupted creation of ours. The root first becomes a creation marker (one PUT: from
    then on no reader or rerun sees a store here, and a rerun knows the prefix is ours),
    then everything else under the prefix is deleted (an old store's arrays, a previous
    attempt's), then the arrays are made and the manifest written last. A crash anywhere in
    between leaves the marker, and the next run starts again from it."""
    root = location.open_group("a")
    root.attrs.put({CREATING_KEY: manifest["created_at"]})
    location.clear(keep="zarr.json")
    _create(root, manifest, layers, splits, plan, compressor)


def _create(root: zarr.Group, manifest: dict, layers: list[LayerSpec], splits, plan: ChunkPlan, compressor: tuple[str, int]) -> None:
    """Every array of the layout in an empty root group, then the manifest as its attributes."""
    codecs = compressors_for(*compressor)
    dtype = manifest["storage"]["dtype"]
    c, s = plan.samples_per_chunk, plan.samples_per_shard
    for split, (ids, labels) in splits.items():
        n = len(ids)
        g = root.create_group(split)
        for spec in layers:
            g.create_array(
                f"layers/{spec.name}", shape=(n, spec.tokens, spec.dim), dtype=ZARR_DTYPE[dtype],
                chunks=(c, spec.tokens, spec.dim), shards=(s, spec.tokens, spec.dim),
                compressors=codecs, fill_value=0, dimension_names=("sample", "token", "channel"),
                attributes={"encoding": dtype, **spec.to_json()},
            )
            if dtype == "int8":
                g.create_array(
                    f"scales/{spec.name}", shape=(n, spec.dim), dtype="float16", chunks=(c, spec.dim),
                    shards=(s, spec.dim), compressors=codecs, fill_value=0, dimension_names=("sample", "channel"),
                )
        g.create_array("valid", shape=(n,), dtype="bool", chunks=(c,), shards=(s,), fill_value=False, dimension_names=("sample",))
        g.create_array("labels", shape=(n,), dtype="int64", chunks=(s,), fill_value=-1, dimension_names=("sample",))[:] = labels
        g.create_array("sample_ids", shape=(n,), dtype=str, chunks=(s,), dimension_names=("sample",))[:] = np.asarray(ids, dtype=object)
        g.create_array("chunk_done", shape=(plan.n_chunks(n),), dtype="uint8", chunks=(1,), fill_value=0)
    root.attrs.put({MANIFEST_KEY: manifest})


def _replace(new: Path, path: Path) -> None:
    """Move the finished new store into place; an old one is removed only after that."""
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.rename(path, old)
        os.rename(new, path)
        shutil.rmtree(old)
    else:
        os.rename(new, path)
