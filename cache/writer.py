"""Create or resume a store and write chunk regions into it; never corrupt what is there.

Safety rules:
- A new store is built in a hidden sibling directory and renamed into place, so a crash
  during creation never leaves a half-made store under the real name.
- Data goes in first, then the chunk's completion stamp (one object per chunk in
  chunk_done); zarr's local store writes every object to a temporary file and renames it,
  so a kill leaves each object either old or new, and an unstamped chunk is simply redone.
- An existing store is reused only if its fingerprint equals the wanted one; otherwise the
  differences are listed and nothing is touched (unless overwrite=True).
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
from cache.schema import FORMAT_VERSION, MANIFEST_KEY, LayerSpec

log = logging.getLogger(__name__)


class StoreWriter:
    def __init__(self, path: Path, group: zarr.Group):
        self.path = path
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
    ) -> "StoreWriter":
        """Open a store made with this exact fingerprint, or create it.

        splits: split -> (sample ids, labels), written once at creation.
        extra: manifest entries that do not identify the content (resolved config, classes...).
        """
        path = Path(path)
        if path.exists():
            existing = _read_manifest(path)
            if existing is None:
                if not path.is_dir() or any(path.iterdir()):
                    raise StoreError(f"{str(path)!r} exists and is not a feature-cache store; refusing to touch it")
            else:
                diff = differences(existing["fingerprint"], fingerprint)
                if not diff:
                    log.info("resuming store %s", path)
                    return cls(path, zarr.open_group(str(path), mode="r+"))
                if not overwrite:
                    raise StoreMismatchError(str(path), diff, "Use another store.path, or --overwrite to replace it.")
                log.warning("--overwrite: replacing store %s (%d difference(s))", path, len(diff))
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
        tmp = path.parent / f".{path.name}.creating-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _create(tmp, manifest, layers, splits, plan, compressor)
        _replace(tmp, path)
        log.info("created store %s", path)
        return cls(path, zarr.open_group(str(path), mode="r+"))

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
            raise StoreError(f"cannot finalize {self.path}: chunks still missing per split: {missing}")
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


def _read_manifest(path: Path) -> dict | None:
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:
        return None
    return group.attrs.get(MANIFEST_KEY)


def _create(path: Path, manifest: dict, layers: list[LayerSpec], splits, plan: ChunkPlan, compressor: tuple[str, int]) -> None:
    root = zarr.open_group(str(path), mode="w", attributes={MANIFEST_KEY: manifest})
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


def _replace(new: Path, path: Path) -> None:
    """Move the finished new store into place; an old one is removed only after that."""
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.rename(path, old)
        os.rename(new, path)
        shutil.rmtree(old)
    else:
        os.rename(new, path)
