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
- One writer at a time: create, resume, overwrite and finalize happen under the store's
  lease (cache/lease.py). A complete store with the wanted fingerprint is opened read-only
  and nothing is written, so a rerun changes nothing (and works on a read-only store).
- Under the lease, what killed writers left behind is removed: hidden `.NAME.creating-PID`
  and `.NAME.old-PID` siblings, and zarr's `*.partial` temporary files inside the store.
- Every object carries a crc32c checksum (cache/codecs.py); layers are filled with NaN (cache/encodings.py),
  so a chunk that was never written can never read back as plausible zeros.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import zarr

from cache.codecs import checked_codecs
from cache.encodings import encoding
from cache.errors import StoreError, StoreMismatchError
from cache.layout import ChunkPlan
from cache.lease import StoreLease
from cache.local_files import replace_dir
from cache.location import StoreLocation, as_location
from cache.sample_ids import read_sample_ids, write_sample_ids
from cache.schema import CREATING_KEY, MANIFEST_KEY, Fingerprint, Manifest, SplitRecord, store_differences, view_group
from cache.stats import STATS_ROWS

log = logging.getLogger(__name__)


class StoreWriter:
    def __init__(self, location: StoreLocation, group: zarr.Group, lease: StoreLease | None = None):
        self.location = location
        self.root = group
        self.lease = lease  # None: a complete store opened read-only, or a worker of the lease's holder
        self.manifest = Manifest.from_json(group.attrs[MANIFEST_KEY], str(location))
        self.layers = list(self.manifest.fingerprint.layers)
        self.plan = self.manifest.plan
        self.dtype = self.manifest.dtype
        self.encoding = encoding(self.dtype)
        self.creation_id = self.manifest.creation_id  # a worker's: the one its driver opened (open)

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    def close(self) -> None:
        """Give the lease back (finalize does too); safe to call twice."""
        if self.lease is not None:
            self.lease.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        fingerprint: Fingerprint,
        splits: dict[str, tuple[list[str], np.ndarray]],
        compressor: tuple[str, int],
        extra: dict,
        overwrite: bool = False,
        storage_options: dict | None = None,
        lease: bool = True,
        creation_id: str | None = None,
    ) -> "StoreWriter":
        """Open a store made with this exact fingerprint, or create it.

        path: a local path or an fsspec URL (storage_options go to fsspec; see cache.location).
        splits: split -> (sample ids, labels), written once at creation.
        compressor: (name, level), cache/codecs.py.
        extra: the Manifest fields that do not identify the content (classes, config, ...).
        lease: False only for workers of a writer that holds the lease (distributed extraction);
            they never create and never finalize.
        creation_id: with lease=False, the creation the driver opened (its manifest's
            creation_id): a worker refuses a store made since at the same path, at open and
            again before each write and stamp, so a task that outlives its driver writes
            nothing into the store of the next run.
        """
        location = as_location(path, storage_options)
        attrs = location.root_attributes()
        if MANIFEST_KEY in attrs and not store_differences(attrs[MANIFEST_KEY], fingerprint) and attrs[MANIFEST_KEY].get("complete"):
            log.info("store %s is complete with this fingerprint: nothing to write", location)
            return cls(location, location.open_group("r"))
        if not lease:
            if MANIFEST_KEY not in attrs:
                raise StoreError(f"store {str(location)!r} is not the store its driver created (it is missing)")
            diff = store_differences(attrs[MANIFEST_KEY], fingerprint)
            if diff:  # e.g. a dask worker whose device or weights differ from the driver's
                raise StoreMismatchError(str(location), diff, "A worker must compute what the driver planned (same device kind, "
                                         "weights and data).", subject=f"store {str(location)!r} was made differently from this worker's plan")
            writer = cls(location, location.open_group("r+"))
            writer.creation_id = creation_id
            writer._check_creation()
            return writer
        held = StoreLease(location).acquire()
        try:
            return cls._open_leased(location, held, fingerprint, splits, compressor, extra, overwrite)
        except BaseException:
            held.release()
            raise

    @classmethod
    def _open_leased(cls, location, held, fingerprint: Fingerprint, splits, compressor, extra, overwrite) -> "StoreWriter":
        _remove_litter(location)
        attrs = location.root_attributes()  # again: it may have changed before the lease was ours
        if MANIFEST_KEY in attrs:
            diff = store_differences(attrs[MANIFEST_KEY], fingerprint) or _code_differs(attrs[MANIFEST_KEY], extra)
            if not diff:
                log.info("resuming store %s", location)
                return cls(location, location.open_group("r+"), held)
            if not overwrite:
                raise StoreMismatchError(str(location), diff, "Use another store.path, or --overwrite to replace it.")
            log.warning("--overwrite: replacing store %s (%d difference(s))", location, len(diff))
        elif CREATING_KEY in attrs:
            log.warning("store %s: its creation was interrupted (no chunk was written yet); creating it again", location)
        elif not location.holds_nothing():
            raise StoreError(f"{str(location)!r} exists and is not a feature-cache store; refusing to touch it")
        plan = ChunkPlan(fingerprint.layout["samples_per_chunk"], fingerprint.layout["chunks_per_shard"])
        manifest = Manifest(fingerprint, {s: SplitRecord(len(ids), plan.n_chunks(len(ids))) for s, (ids, _) in splits.items()}, **extra)
        if location.is_local:
            _create_beside(location.path, manifest, splits, compressor)
        else:
            _create_in_place(location, manifest, splits, compressor)
        log.info("created store %s", location)
        return cls(location, location.open_group("r+"), held)

    # -- writing ------------------------------------------------------------------------
    def missing_chunks(self, split: str) -> list[int]:
        if self.complete:  # by its manifest; a stamp object lost since is verify's to find (and --repair's to reopen)
            return []
        done = self.root[f"{split}/chunk_done"][:]
        return [int(i) for i in np.flatnonzero(done == 0)]

    def write(self, split: str, start: int, layers: dict[str, np.ndarray], scales: dict[str, np.ndarray], valid: np.ndarray) -> None:
        """Write samples [start, start + len(valid)) of every layer (chunk-aligned regions)."""
        self._check_worker()
        stop = start + len(valid)
        g = self.root[split]
        for name, data in layers.items():
            g[f"layers/{name}"][start:stop] = data
            if name in scales:
                g[f"scales/{name}"][start:stop] = scales[name]
        # All False is the fill value, which zarr would not store; the reader refuses a stamped
        # chunk whose object is missing, so write it even when every sample was skipped.
        g["valid"].with_config({"write_empty_chunks": True})[start:stop] = valid

    def write_stats(self, split: str, chunk: int, stats: dict[str, np.ndarray]) -> None:
        """One chunk's feature sums per layer ([len(STATS_ROWS), D] float64, cache/stats.py);
        written with its features (checked before them), before its stamp."""
        for name, rows in stats.items():
            self.root[f"{split}/stats/{name}"][chunk] = rows

    def stamp(self, split: str, chunks: list[int]) -> None:
        self._check_worker()
        done = self.root[f"{split}/chunk_done"]
        for c in chunks:
            done[c] = 1  # one object per chunk: concurrent writers never clash

    def _check_worker(self) -> None:
        """Before a worker writes or stamps anything: the lease is its driver's, and a dask task
        outlives a dead driver, so the store may have been made again since (one small read).
        Left open: a store remade, and the same chunk computed and stamped by the new run,
        within the one write that follows the check."""
        if self.lease is None:
            self._check_creation()

    def _check_creation(self) -> None:
        """Refuse a store at this path that is not the creation this writer writes for."""
        on_disk = self.location.root_attributes().get(MANIFEST_KEY, {}).get("creation_id")
        if on_disk != self.creation_id:
            raise StoreError(f"store {str(self.location)!r} was created again since this worker's driver opened it (by another "
                             f"extract run, with --overwrite?); this piece stamps nothing into it")

    def finalize(self) -> Manifest:
        """Stamp the whole store complete (once every chunk is), listing skipped samples, and
        give the lease back. A store that was complete already is left untouched."""
        try:
            if self.complete:
                return self.manifest
            missing = {g: len(self.missing_chunks(g)) for g in self.manifest.groups}
            if any(missing.values()):
                raise StoreError(f"cannot finalize {self.location}: chunks still missing per split (and view): {missing}")
            self._check_arrays_match_manifest()
            self._check_views_agree_on_validity()
            skipped = {}
            for split in self.manifest.splits:
                valid = self.root[f"{split}/valid"][:]
                ids = read_sample_ids(self.root[split])
                bad = [ids[i] for i in np.flatnonzero(~valid)]
                if bad:
                    skipped[split] = bad
            self.manifest = self.manifest.completed(skipped)
            self.root.attrs[MANIFEST_KEY] = self.manifest.to_json()
            return self.manifest
        finally:
            self.close()

    def _check_views_agree_on_validity(self) -> None:
        """A sample is read in every view of its split or in none. One that failed in some views
        only (a read that is not repeatable, e.g. a transient I/O error under on_corrupt: skip)
        holds a blank image's features there, which training would take as real ones (the
        reader goes by the split's own mask). Its chunk is unstamped in every view, so that a
        rerun reads the file once more for all of them, and finalizing is refused."""
        mixed = {}
        for split in self.manifest.splits:
            views = self.manifest.fingerprint.view_count(split)
            if views > 1:
                bad = np.flatnonzero(mixed_validity(np.stack([self.root[f"{view_group(split, v)}/valid"][:] for v in range(views)])))
                if len(bad):
                    mixed[split] = bad
        if not mixed:
            return
        for split, samples in mixed.items():
            for chunk in sorted({int(i) // self.plan.samples_per_chunk for i in samples}):
                for v in range(self.manifest.fingerprint.view_count(split)):
                    self.root[f"{view_group(split, v)}/chunk_done"][chunk] = 0
        named = {s: [str(x) for x in np.asarray(read_sample_ids(self.root[s]), dtype=object)[i[:5]]] for s, i in mixed.items()}
        raise StoreError(f"cannot finalize {self.location}: samples were read in some views and not in others (a read that is not "
                         f"repeatable, such as a transient I/O error): {sum(map(len, mixed.values()))} samples, e.g. {named}; their "
                         "chunks are unstamped in every view: rerun the same extract command to read them again")

    def _check_arrays_match_manifest(self) -> None:
        """The manifest about to be stamped must describe the arrays that are there: the same
        fingerprint at the root (no other writer replaced the store) and every layer array of
        every split with the manifest's shape and encoding."""
        on_disk = self.location.root_attributes().get(MANIFEST_KEY, {})
        problems = store_differences(on_disk, self.manifest.fingerprint) if on_disk else ["the root manifest is gone"]
        for group in self.manifest.groups:
            info = self.manifest.record(group)
            for spec in self.layers:
                key = f"{group}/layers/{spec.name}"
                try:
                    arr = self.root[key]
                except KeyError:
                    problems.append(f"{key}: missing")
                    continue
                if arr.shape != (info.num_samples, spec.tokens, spec.dim) or arr.attrs.get("encoding") != self.dtype:
                    problems.append(f"{key}: {arr.shape} {arr.attrs.get('encoding')}, manifest says "
                                    f"{(info.num_samples, spec.tokens, spec.dim)} {self.dtype}")
        if problems:
            raise StoreError(f"refusing to stamp {self.location} complete: its arrays do not match its manifest: " + "; ".join(problems))


def _remove_litter(location: StoreLocation) -> None:
    """What killed writers left (the caller holds the lease, so none of it is in use)."""
    if not location.is_local:
        return
    path = location.path
    for stale in list(path.parent.glob(f".{path.name}.creating-*")) + list(path.parent.glob(f".{path.name}.old-*")):
        log.info("removing %s, left by an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if path.is_dir() and (path / "zarr.json").exists():
        for partial in path.rglob("*.partial"):
            partial.unlink(missing_ok=True)


def mixed_validity(valid: np.ndarray) -> np.ndarray:
    """[views, N] a split's valid mask in each view -> [N] bool: the samples valid in some views
    and not in others (finalize refuses them, verify reports them)."""
    return valid.any(0) & ~valid.all(0)


def store_state(path: str, fingerprint: Fingerprint, storage_options=None, code_version: str | None = None) -> str:
    """What an extraction of `fingerprint` would do with the store at `path`, in words (the
    plan's last line: a dry run printed the full cost for a store it would not touch)."""
    location = as_location(path, storage_options)
    try:
        return _store_state(location, fingerprint, code_version)
    except Exception as e:  # an unreadable place or an unreachable endpoint: the run itself says it in one line
        return f"cannot tell what is there ({type(e).__name__}: {str(e)[:120]})"


def _store_state(location, fingerprint: Fingerprint, code_version: str | None) -> str:
    attrs = location.root_attributes()
    if MANIFEST_KEY in attrs:
        manifest = attrs[MANIFEST_KEY]
        diff = store_differences(manifest, fingerprint) or _code_differs(manifest, {"code_version": code_version})
        if diff:
            keys = ", ".join(dict.fromkeys(d.split(":")[0] for d in diff))
            return f"the store there was made differently (in {keys}): refused, unless --overwrite replaces it"
        if manifest.get("complete"):
            return "the store there is complete with this config: nothing to compute"
        return "the store there is unfinished with this config: only its missing chunks are computed"
    if CREATING_KEY in attrs:
        return "the store's creation there was interrupted before its first chunk: it is created again"
    if location.holds_nothing():
        return "no store there yet: the whole cost above"
    return "something there is not a feature cache: refused"


def _code_differs(manifest_json: dict, extra: dict) -> list[str]:
    """An unfinished store whose chunks so far other code computed: resuming would mix two
    versions in one store (unknown on either side: nothing to compare)."""
    was, now = manifest_json.get("code_version"), extra.get("code_version")
    if manifest_json.get("complete") or None in (was, now) or was == now:
        return []
    return [f"code_version: this unfinished store was begun by code {was}, this is {now} (rerun with that code to resume)"]


def _create_beside(path: Path, manifest: Manifest, splits, compressor: tuple[str, int]) -> None:
    """Local: build in a hidden sibling directory, then rename into place."""
    tmp = path.parent / f".{path.name}.creating-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _create(zarr.open_group(str(tmp), mode="w"), manifest, splits, compressor)
    replace_dir(tmp, path)


def _create_in_place(location: StoreLocation, manifest: Manifest, splits, compressor: tuple[str, int]) -> None:
    """Object store: the caller has checked that the place is empty, a store of ours or an
    interrupted creation of ours. The root first becomes a creation marker (one PUT: from
    then on no reader or rerun sees a store here, and a rerun knows the prefix is ours),
    then everything else under the prefix is deleted (an old store's arrays, a previous
    attempt's), then the arrays are made and the manifest written last. A crash anywhere in
    between leaves the marker, and the next run starts again from it."""
    root = location.open_group("a")
    root.attrs.put({CREATING_KEY: manifest.created_at})
    location.clear(keep="zarr.json")
    _create(root, manifest, splits, compressor)


def _create(root: zarr.Group, manifest: Manifest, splits, compressor: tuple[str, int]) -> None:
    """Every array of the layout in an empty root group, then the manifest as its attributes."""
    codecs = checked_codecs(*compressor)
    dtype, plan, layers = manifest.dtype, manifest.plan, manifest.fingerprint.layers
    enc = encoding(dtype)
    for split, (ids, labels) in splits.items():
        n = len(ids)
        g = root.create_group(split)
        g.create_array("labels", shape=(n,), dtype="int64", chunks=(plan.samples_per_shard,), compressors=codecs, fill_value=-1,
                       dimension_names=("sample",))[:] = labels
        write_sample_ids(g, ids, codecs)
        for view in range(manifest.fingerprint.view_count(split)):
            _create_chunked(g if view == 0 else g.require_group("views").create_group(str(view)), n, layers, enc, dtype, plan, codecs)
    root.attrs.put({MANIFEST_KEY: manifest.to_json()})


def _create_chunked(g: zarr.Group, n: int, layers, enc, dtype: str, plan: ChunkPlan, codecs) -> None:
    """The arrays written chunk by chunk, for one split or one view of it."""
    c, s = plan.samples_per_chunk, plan.samples_per_shard
    for spec in layers:
        g.create_array(
            f"layers/{spec.name}", shape=(n, spec.tokens, spec.dim), dtype=enc.zarr_dtype,
            chunks=(c, spec.tokens, spec.dim), shards=(s, spec.tokens, spec.dim),
            compressors=codecs, fill_value=enc.fill_value, dimension_names=("sample", "token", "channel"),
            attributes={"encoding": dtype, **spec.to_json()},
        )
        if enc.has_scales:
            g.create_array(
                f"scales/{spec.name}", shape=(n, spec.dim), dtype=enc.scale_dtype, chunks=(c, spec.dim),
                shards=(s, spec.dim), compressors=codecs, fill_value=float("nan"), dimension_names=("sample", "channel"),
            )
        # One object per chunk, like the stamps: writers of different chunks never share one.
        g.create_array(
            f"stats/{spec.name}", shape=(plan.n_chunks(n), len(STATS_ROWS), spec.dim), dtype="float64",
            chunks=(1, len(STATS_ROWS), spec.dim), compressors=codecs, fill_value=float("nan"),
            dimension_names=("chunk", "sum", "channel"), attributes={"rows": list(STATS_ROWS)},
        )
    g.create_array("valid", shape=(n,), dtype="bool", chunks=(c,), shards=(s,), compressors=codecs, fill_value=False,
                   dimension_names=("sample",))
    g.create_array("chunk_done", shape=(plan.n_chunks(n),), dtype="uint8", chunks=(1,), compressors=checked_codecs("none", 0),
                   fill_value=0)
