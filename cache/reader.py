"""Read a store for stage two: metadata, dask arrays, and shuffled multi-layer mini-batches.

Batches are chunk-aware: each epoch shuffles the order of chunks, reads a window of
`buffer_chunks` chunks (all requested layers, the same samples), permutes the samples inside
the window and cuts mini-batches; leftovers carry into the next window, so every valid
sample appears exactly once per epoch. A thread pool reads the next windows ahead while
the consumer trains (zstd decoding releases the GIL).

Nothing damaged reads as a value (cache/integrity.py): every read checks that the objects of
its stamped chunks exist, decodes through crc32c, and refuses non-finite features, raising a
StoreError that names the array and the chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

import numpy as np
import torch
import zarr

from cache import resident
from cache.encodings import encoding
from cache.errors import StoreError, require_extra
from cache.integrity import ObjectIndex, non_finite_error, read_region, require_finite
from cache.lease import StoreLease
from cache.location import StoreLocation, as_location
from cache.sample_ids import read_sample_ids
from cache.schema import CREATING_KEY, MANIFEST_KEY, Fingerprint, Manifest, SplitRecord, split_of, view_group
from cache.stats import summarize, sums

log = logging.getLogger(__name__)


@dataclass
class Batch:
    # layer -> [B, T, D], on the device its arrays are held on (a GPU run holds them there),
    # else on the CPU
    features: dict[str, torch.Tensor]
    labels: torch.Tensor  # [B] int64
    indices: torch.Tensor  # [B] sample index within the split


class CacheReader:
    def __init__(self, path: str | Path | StoreLocation, allow_partial: bool = False, storage_options: Optional[dict] = None):
        """path: a local path or an fsspec URL (s3://bucket/prefix); storage_options go to fsspec."""
        self.location = as_location(path, storage_options)
        self.path = str(self.location)
        if not self.location.exists():
            raise StoreError(f"store {self.path!r} does not exist; run `python -m pipeline extract` first")
        try:
            self.root = self.location.open_group("r")
        except Exception as e:
            raise StoreError(f"{self.path!r} is not a zarr store: {e}") from e
        manifest = self.root.attrs.get(MANIFEST_KEY)
        if CREATING_KEY in self.root.attrs:
            raise StoreError(f"store {self.path!r} is still being created, or its creation was interrupted; "
                             "rerun the extract command to finish it")
        if manifest is None:
            raise StoreError(f"{self.path!r} is a zarr store but not a feature cache (no {MANIFEST_KEY!r} manifest)")
        self.manifest = Manifest.from_json(manifest, self.path)
        self.objects = ObjectIndex(self.path)
        self.allow_partial = allow_partial
        self.layers = self.manifest.layers
        self.plan = self.manifest.plan
        # Names this store's arrays held in RAM (cache/resident.py): its place, what it holds and
        # which creation of it (a store made again in the same second keeps created_at).
        self.creation = _creation(manifest)  # which store this is, wherever it is read from
        self.identity = f"{self.path}#{self.creation}"
        self.read_held = True  # False: always read the store, even what this process holds in RAM
        # The per-sample metadata (stamps, labels, valid) of complete splits, read and checked
        # once per reader: every chunk of them is stamped, and a stamped chunk is never rewritten.
        self._complete_meta: dict[str, np.ndarray] = {}
        self.dtype = self.manifest.dtype
        self.encoding = encoding(self.dtype)
        if not allow_partial and not self.is_complete():
            missing = {s: len(self.missing_chunks(s)) for s in self.splits}
            writer = StoreLease(self.location).writer()
            advice = (f"it is being extracted now by {writer}: use it once that finishes" if writer else
                      "rerun the same extract command to finish it (in Python, open_store(path, allow_partial=True) reads "
                      "the chunks stamped so far)")
            raise StoreError(f"store {self.path!r} is incomplete (missing chunks per split: {missing}); {advice}")

    def require_unchanged(self) -> None:
        """Refuse to go on when the store at this path is no longer the one opened: after an
        `extract --overwrite` replaced it, its objects are another store's values, which this
        reader's manifest, stamps and labels do not describe. Called after reads, so a read
        that raced a replacement is refused too (the replacement marks the root first)."""
        _require_creation(self.location, self.creation, self.path)

    # -- metadata -----------------------------------------------------------------------
    @property
    def fingerprint(self) -> Fingerprint:
        return self.manifest.fingerprint

    @property
    def splits(self) -> list[str]:
        return list(self.manifest.splits)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    def num_samples(self, split: str) -> int:
        return self._split(split).num_samples

    def views(self, split: str) -> int:
        """How many views of each sample `split` holds: 1 (clean), or K with K-1 augmented."""
        self._split(split)
        return self.fingerprint.view_count(split)

    def is_complete(self) -> bool:
        return self.manifest.complete or all(not self.missing_chunks(g) for g in self.manifest.groups)

    def missing_chunks(self, split: str) -> list[int]:
        """The unstamped chunks of a split, or of one of its views (its group, "train/views/2")."""
        return [int(i) for i in np.flatnonzero(~self._done(split))]

    def labels(self, split: str) -> np.ndarray:
        """[N] int labels, the caller's own copy (the reader keeps its read-only one)."""
        return self._whole(split, "labels").copy()

    def valid(self, split: str) -> np.ndarray:
        """[N] bool, False for skipped samples; its objects must exist for every stamped chunk
        (a missing one would read as all-False: samples silently dropped). The caller's own copy."""
        return self._whole(split, "valid").copy()

    def sample_ids(self, split: str) -> np.ndarray:
        return np.asarray(read_sample_ids(self.root[split]), dtype=object)

    def _whole(self, split: str, name: str, done: Optional[np.ndarray] = None) -> np.ndarray:
        """The whole array, once the objects of every stamped chunk (`done`, read if not given)
        are known to exist."""
        if self.read_held and f"{split}/{name}" in self._complete_meta:
            return self._complete_meta[f"{split}/{name}"]
        arr = self.root[f"{split}/{name}"]
        n = self.num_samples(split)
        done = self._done(split) if done is None else done
        for c in np.flatnonzero(done):
            start, stop = self.plan.chunk_range(int(c), n)
            self.objects.require(arr, start, stop, int(c))
        values = read_region(arr, 0, n, self.path)
        self.require_unchanged()
        if self.read_held and done.all():
            values.flags.writeable = False  # shared by every later read: a caller must not edit it
            self._complete_meta[f"{split}/{name}"] = values
        return values

    def _done(self, split: str) -> np.ndarray:
        """[n_chunks] bool: the chunks stamped complete."""
        if self.read_held and f"{split}/chunk_done" in self._complete_meta:
            return self._complete_meta[f"{split}/chunk_done"].copy()  # callers combine stamps in place
        done = read_region(self.root[f"{split}/chunk_done"], 0, self.plan.n_chunks(self.num_samples(split)), self.path) != 0
        if self.read_held and done.all():
            self._complete_meta[f"{split}/chunk_done"] = done.copy()
        return done

    def _split(self, split: str) -> SplitRecord:
        """The record of a split, or of the split a view group belongs to."""
        if split_of(split) not in self.manifest.splits:
            raise StoreError(f"split {split!r} is not in store {self.path!r}; it has {self.splits}")
        return self.manifest.record(split)

    def _check_layers(self, layers: Sequence[str]) -> None:
        unknown = [l for l in layers if l not in self.layers]
        if unknown:
            raise StoreError(f"layers {unknown} are not in store {self.path!r}; it has {list(self.layers)}")

    # -- arrays -------------------------------------------------------------------------
    def zarr_array(self, split: str, layer: str) -> zarr.Array:
        self._split(split)
        self._check_layers([layer])
        return self.root[f"{split}/layers/{layer}"]

    def dask_array(self, split: str, layer: str, dtype: str = "float32"):
        """The layer as a lazy dask array [N, T, D], decoded to `dtype`, one dask chunk per shard
        (one storage object per task, rather than many small partial reads). Needs the dask extra.

        Checked as `read` and `batches` check: the split must be complete (allow_partial: an
        unstamped chunk reads as whatever is there, unchecked: mask it out), every stamped
        chunk's objects must exist (before the graph is built), and a block refuses, when
        computed, non-finite values of the computed samples of its stamped chunks, and a store
        replaced since the graph was built. Skipped samples' rows are included: mask them with
        `valid(split)`."""
        require_extra("CacheReader.dask_array", "dask", "dask")
        import dask.array as da

        z = self.zarr_array(split, layer)
        n = self.num_samples(split)
        done = self._done(split)
        if not done.all() and not self.allow_partial:
            raise StoreError(f"split {split!r} of {self.path!r} is incomplete")
        stored = [z] + ([self.root[f"{split}/scales/{layer}"]] if self.encoding.has_scales else [])
        for c in np.flatnonzero(done):
            start, stop = self.plan.chunk_range(int(c), n)
            for arr in stored:
                self.objects.require(arr, start, stop, int(c))
        blocks = z.shards or z.chunks
        arr = da.from_zarr(z, chunks=blocks)
        valid = da.from_array(self._whole(split, "valid", done) & self.plan.per_sample(done, n), chunks=arr.chunks[0])
        first = da.from_array(np.arange(n), chunks=arr.chunks[0])  # each block's sample numbers, for the error
        check = partial(_decoded_finite, decode=partial(self.encoding.decode_numpy, dtype=dtype), path=f"{split}/layers/{layer}",
                        where=self.path, unchanged=partial(_require_creation, self.location, self.creation, self.path))
        meta = np.empty((0, 0, 0), dtype)
        if not self.encoding.has_scales:
            return da.blockwise(check, "ntd", arr, "ntd", valid, "n", first, "n", dtype=dtype, meta=meta)
        scales = da.from_zarr(stored[1]).rechunk((arr.chunks[0], -1))
        return da.blockwise(check, "ntd", arr, "ntd", valid, "n", first, "n", scales, "nd", dtype=dtype, meta=meta)

    def read(self, split: str, layers: Sequence[str], start: int, stop: int, out: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Samples [start, stop) of each layer, decoded; skipped (invalid) samples included. Every
        chunk of the range must be stamped (allow_partial: an unwritten one would read as the
        fill value, NaN rows that look like skipped samples)."""
        self._check_layers(layers)
        done = self._done(split)
        unwritten = [c for c, _ in self._chunks_in(split, start, stop) if not done[c]]
        if unwritten:
            raise StoreError(f"store {self.path!r}: chunks {unwritten} of {split!r} (samples {start}..{stop - 1}) are not stamped "
                             f"(unfinished: rerun the extract command; marked complete: `python -m pipeline verify {self.path} --repair` first)")
        g = self.root[split]
        computed = torch.from_numpy(self._whole(split, "valid")[start:stop].copy())  # skipped samples were never computed
        result = {}
        for name in layers:
            stored = self._checked(g[f"layers/{name}"], start, stop)
            scales = self._checked(g[f"scales/{name}"], start, stop) if self.encoding.has_scales else None
            result[name] = self.encoding.decode(stored, scales, out)
            for c, (a, b) in self._chunks_in(split, start, stop):
                require_finite(result[name][a - start : b - start][computed[a - start : b - start]], f"{split}/layers/{name}", a, b, self.path, c)
        self.require_unchanged()
        return result

    def _chunks_in(self, split: str, start: int, stop: int) -> list[tuple[int, tuple[int, int]]]:
        """(chunk, (first, end)) of every chunk overlapping samples [start, stop), clipped to it."""
        n, per = self.num_samples(split), self.plan.samples_per_chunk
        out = []
        for c in range(start // per, -(-stop // per)):
            a, b = self.plan.chunk_range(c, n)
            out.append((c, (max(a, start), min(b, stop))))
        return out

    def _checked(self, arr: zarr.Array, start: int, stop: int, chunk: int | None = None) -> np.ndarray:
        """arr[start:stop] once the objects of its chunks are known to exist (named per chunk)."""
        split = arr.path.split("/")[0]
        for c, (a, b) in [(chunk, (start, stop))] if chunk is not None else self._chunks_in(split, start, stop):
            self.objects.require(arr, a, b, c)
        return read_region(arr, start, stop, self.path, chunk)

    # -- statistics ---------------------------------------------------------------------
    def feature_stats(self, split: str, layers: Sequence[str], keep: Optional[np.ndarray] = None,
                      views: Literal["clean", "random"] = "clean") -> dict[str, dict[str, torch.Tensor]]:
        """Per layer, the per-channel means and stds (float64) of the valid samples of `split`
        (cache/stats.py), from the sums stage one stored per chunk. keep: a bool mask [N] of
        the samples to describe (e.g. train minus its validation carve): the left-out samples'
        sums are read from their features and subtracted, so the result is that of `keep` alone.
        views: "random" describes what an epoch with views="random" reads, every view of the
        split alike (the clean one and the augmented ones); "clean" the clean view alone."""
        self._check_layers(layers)
        n_chunks = self.plan.n_chunks(self.num_samples(split))
        groups = [view_group(split, v) for v in range(self.views(split) if views == "random" else 1)]
        done = self._done(split)
        for g in groups[1:]:
            done &= self._done(g)
        if not done.all():
            raise StoreError(f"split {split!r} of {self.path!r} is incomplete: its feature statistics need every chunk")
        valid = self._whole(split, "valid", done)  # the same in every view (the writer finalizes no store where it is not)
        totals = {}
        for name in layers:
            totals[name] = 0
            for g in groups:
                arr = self.root[f"{g}/stats/{name}"]
                for c in range(n_chunks):
                    self.objects.require(arr, c, c + 1, c)
                rows = read_region(arr, 0, n_chunks, self.path)
                require_finite(rows, arr.path, 0, n_chunks, self.path)
                totals[name] = totals[name] + rows.sum(axis=0)
        self.require_unchanged()
        samples = int(valid.sum()) * len(groups)
        if keep is not None:
            left_out = valid & ~keep
            samples -= int(left_out.sum()) * len(groups)
            for batch in self.batches(split, list(layers), 1024, shuffle=False, keep=left_out, views="all" if views == "random" else "clean"):
                for name in layers:
                    totals[name] = totals[name] - sums(batch.features[name], np.ones(len(batch.labels), bool), self.layers[name])
        if samples == 0:
            raise StoreError(f"split {split!r} of {self.path!r}: no valid sample to compute feature statistics from")
        return {name: summarize(totals[name], samples, self.layers[name]) for name in layers}

    # -- held in RAM --------------------------------------------------------------------
    def hold(self, split: str, layers: Sequence[str], views: Literal["clean", "random", "all"] = "clean",
             budget: Optional[int] = None, device: str | torch.device = "cpu") -> bool:
        """Keep these layers of `split` (and of its augmented views, unless views is "clean") in
        memory as stored, checked once as a streamed read checks them, for every later read of
        this store by any reader in this process (cache/resident.py): in RAM, or on `device` (a
        GPU: batches are then gathered and decoded there). When they would take what is held
        past `budget` bytes (None: half the memory available now, on the device for a GPU),
        other stores held there are forgotten first, least recently held first; returns False
        and holds nothing new when they still would not fit, or the split is incomplete: reads
        then stream as before."""
        self._check_layers(layers)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # as tensors name it: "cuda:0", not "cuda"
            device = torch.device("cuda", torch.cuda.current_device())
        with resident.HOLDING:
            return self._hold(split, layers, views, budget, device)

    def _hold(self, split: str, layers: Sequence[str], views: str, budget: Optional[int], device: torch.device) -> bool:
        groups = [split] + ([view_group(split, v) for v in range(1, self.views(split))] if views != "clean" else [])
        wanted = [(g, f"{kind}/{name}") for g in groups for name in layers for kind in self._stored_kinds]
        found = {(g, p): resident.get(self.identity, f"{g}/{p}") for g, p in wanted}
        todo = [key for key, a in found.items() if a is None]
        elsewhere = [a for a in found.values() if a is not None]
        # What is new on this device: arrays read now, and those held on another device, moved.
        need = sum(self.root[g][p].nbytes for g, p in todo) + sum(a.nbytes for a in elsewhere if a.device != device)
        budget = resident.default_budget(device) if budget is None else budget
        if any(self.missing_chunks(g) for g in groups):
            log.info("%s of %s is incomplete: streaming from the store", split, self.path)
            return False
        for store in resident.make_room(self.identity, need, budget, device):
            log.info("%s: forgot what %s held on %s (the least recently held store) to make room", self.path, store.split("#", 1)[0], device)
        if resident.held_bytes(device) + need > budget:
            log.info("%s of %s: %.0f MB to hold on %s, %.0f MB held there, budget %.0f MB: streaming from the store", split, self.path,
                     need / 1e6, device, resident.held_bytes(device) / 1e6, budget / 1e6)
            return False
        valid = self._whole(split, "valid")  # the split's mask decides which rows every view group gives, as when streamed
        checked = {}  # put only once every array is read, checked and on the device: a hold is all or nothing
        for g in groups:
            loaded = {p: self._checked(self.root[g][p], 0, self.num_samples(g)) for gg, p in todo if gg == g}
            for name in layers:  # what a streamed read refuses: non-finite values of computed samples
                if not any(f"{kind}/{name}" in loaded for kind in self._stored_kinds):
                    continue  # checked when it was held
                # A layer and its scales are checked together: one may be new and the other held already.
                both = {p: loaded[p] if p in loaded else found[g, p].cpu().numpy() for p in (f"{k}/{name}" for k in self._stored_kinds)}
                scales = both.get(f"scales/{name}")
                for c in range(self.plan.n_chunks(self.num_samples(g))):  # a chunk at a time: no whole-array temporaries
                    a, b = self.plan.chunk_range(c, self.num_samples(g))
                    finite = self.encoding.finite_rows(both[f"layers/{name}"][a:b], None if scales is None else scales[a:b])
                    if not finite[valid[a:b]].all():
                        raise non_finite_error(f"{g}/layers/{name}", a, b, self.path, c)
            checked.update({f"{g}/{p}": torch.from_numpy(values).to(device) for p, values in loaded.items()})
        if todo:
            self.require_unchanged()  # held under this store's identity: they must be its values
        for path, values in checked.items():
            resident.put(self.identity, path, values)
        resident.touch(self.identity)
        for g, p in wanted:  # held by an earlier run on another device: moved, not read again
            resident.move(self.identity, f"{g}/{p}", device)
        for name in ("labels", "valid"):  # read and kept now (with the stamps, read above): all else an epoch reads
            self._whole(split, name)
        if todo:
            log.info("%s of %s: %d array(s), %.0f MB held on %s (%.0f MB in all)", split, self.path, len(todo), need / 1e6, device,
                     resident.held_bytes() / 1e6)
        return True

    @property
    def _stored_kinds(self) -> list[str]:
        """The arrays each layer is stored as: its values, and their scales where the encoding has them."""
        return ["layers", "scales"] if self.encoding.has_scales else ["layers"]

    def _held(self, path: str) -> Optional[torch.Tensor]:
        return resident.get(self.identity, path) if self.read_held else None

    def release(self) -> None:
        """Forget what this store holds in RAM, for every reader of it in this process (after
        a hold in progress, which would otherwise put its arrays back after this)."""
        with resident.HOLDING:
            resident.release(self.identity)

    # -- mini-batches -------------------------------------------------------------------
    def batches(
        self,
        split: str,
        layers: Sequence[str],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        buffer_chunks: int = 4,
        prefetch: int = 2,
        keep: Optional[np.ndarray] = None,
        out: torch.dtype = torch.float32,
        views: Literal["clean", "random", "all"] = "clean",
    ) -> Iterator[Batch]:
        """One epoch of mini-batches with the same permutation for every layer.

        keep: optional bool mask [N] of the samples to use (e.g. a validation split carved
        from train); invalid (skipped) samples are always left out.
        views: "clean" reads view 0; "random" reads, for every chunk, one of the split's views
            drawn from (seed, epoch, chunk): each sample still comes once per epoch, with one
            view, the same for every layer. Views are independent augmentations, so sharing the
            draw within a chunk changes no sample's distribution, and keeps reads one object
            per chunk. A split stored without views reads view 0 either way. "all": every view
            of every sample, one view after the other (K passes; for solvers that take the
            augmented set whole).
        """
        if views == "all":
            for v in range(self.views(split)):
                yield from self._epoch(split, layers, batch_size, shuffle, seed, epoch, buffer_chunks, prefetch, keep, out, "clean", v)
            return
        yield from self._epoch(split, layers, batch_size, shuffle, seed, epoch, buffer_chunks, prefetch, keep, out, views, 0)

    def _epoch(self, split, layers, batch_size, shuffle, seed, epoch, buffer_chunks, prefetch, keep, out, views, view) -> Iterator[Batch]:
        """One pass of `batches`; views "clean" reads view `view`, "random" draws one per chunk."""
        self._check_layers(layers)
        n = self.num_samples(split)
        count = self.views(split) if views == "random" else 1
        stamped = self._done(split)  # read once per epoch: the stamps are one object per chunk
        for v in range(1, count) if views == "random" else [view] if view else []:
            stamped &= self._done(view_group(split, v))  # a chunk is read once the views it may be read from are written
        done = np.flatnonzero(stamped)
        if len(done) < self.plan.n_chunks(n) and not self.allow_partial:
            raise StoreError(f"split {split!r} of {self.path!r} is incomplete")
        # Seeded apart from the windows' permutations ([seed, epoch, w]: window 1's would be this very stream).
        drawn = np.random.default_rng([seed, epoch, 0, 1]).integers(0, count, size=self.plan.n_chunks(n)) if count > 1 else None
        group_of = {int(c): view_group(split, int(drawn[c]) if drawn is not None else view) for c in done}
        order = np.random.default_rng([seed, epoch]).permutation(done) if shuffle else done
        windows = [order[i : i + buffer_chunks] for i in range(0, len(order), buffer_chunks)]
        # Each window is read and permuted on a worker thread with its own seeded generator,
        # so the consumer's thread only slices batches.
        perm_seeds = [[seed, epoch, w] if shuffle else None for w in range(len(windows))]
        labels_all = self._whole(split, "labels", stamped)
        # Skipped (corrupt) samples never reach training; read the mask once per epoch.
        valid = self._whole(split, "valid", stamped)
        usable = valid if keep is None else valid & keep

        # The held arrays this epoch reads, taken once: a release() by another thread meanwhile
        # drops them from the process's table, not from this epoch.
        held = {(g, kind, name): self._held(f"{g}/{kind}/{name}") for g in set(group_of.values()) for name in layers
                for kind in self._stored_kinds}
        # All held, on one device (runs on another device may hold some, which then stream).
        if all(a is not None for a in held.values()) and len({a.device for a in held.values()}) == 1:
            yield from self._held_epoch(held, split, layers, windows, usable, perm_seeds, group_of, labels_all, batch_size, out)
            return

        def submit(pool, w):
            return pool.submit(self._read_window, split, layers, windows[w], usable, out, perm_seeds[w], group_of)

        with ThreadPoolExecutor(max_workers=max(1, prefetch)) as pool:
            futures: list[Future] = [submit(pool, w) for w in range(min(prefetch, len(windows)))]
            next_window = len(futures)
            carry: Optional[tuple[dict, np.ndarray]] = None
            while futures:
                feats, idx = futures.pop(0).result()
                if next_window < len(windows):
                    futures.append(submit(pool, next_window))
                    next_window += 1
                pos = 0
                if carry is not None:  # complete the previous window's leftovers first
                    need = batch_size - len(carry[1])
                    if len(idx) < need:
                        carry = ({k: torch.cat([carry[0][k], v]) for k, v in feats.items()}, np.concatenate([carry[1], idx]))
                        continue
                    sl = np.concatenate([carry[1], idx[:need]])
                    yield Batch({k: torch.cat([carry[0][k], v[:need]]) for k, v in feats.items()}, torch.from_numpy(labels_all[sl]), torch.from_numpy(sl))
                    carry, pos = None, need
                while pos + batch_size <= len(idx):
                    sl = idx[pos : pos + batch_size]
                    yield Batch({k: v[pos : pos + batch_size] for k, v in feats.items()}, torch.from_numpy(labels_all[sl]), torch.from_numpy(sl))
                    pos += batch_size
                if pos < len(idx):
                    carry = ({k: v[pos:] for k, v in feats.items()}, idx[pos:])
            if carry is not None:
                sl = carry[1]
                yield Batch(carry[0], torch.from_numpy(labels_all[sl]), torch.from_numpy(sl))

    def _held_epoch(self, arrays, split, layers, windows, usable, perm_seeds, group_of, labels_all, batch_size, out) -> Iterator[Batch]:
        """`_epoch` for a split whose arrays are all held in RAM (`arrays`: (group, kind, layer)
        -> the held values): the same samples in the same order (each window's samples, permuted
        by its seed, one window after the other, cut into batches), each batch gathered from
        memory and decoded alone, on the device that holds the arrays. No window is assembled,
        no thread is needed, and no store metadata is read (the reader keeps a complete
        split's). Labels and indices stay on the CPU."""
        order = [self._window_order(split, chunks, usable, perm_seeds[w])[0] for w, chunks in enumerate(windows)]
        order = np.concatenate(order) if order else np.zeros(0, np.int64)
        groups = sorted(set(group_of.values()))
        per_chunk = np.full(self.plan.n_chunks(self.num_samples(split)), -1)
        for c, g in group_of.items():
            per_chunk[c] = groups.index(g)
        source = per_chunk[order // self.plan.samples_per_chunk]  # the group each sample is read from
        held = {(k, name): [arrays[g, k, name] for g in groups] for k in self._stored_kinds for name in layers}
        device = held["layers", layers[0]][0].device
        for start in range(0, len(order), batch_size):
            sl, src = order[start: start + batch_size], source[start: start + batch_size]
            # Which rows each group gives, and where they go, worked out on the CPU (no device sync).
            picks = [np.flatnonzero(src == s) for s in range(len(groups))]
            rows = [torch.from_numpy(sl[p]).to(device, non_blocking=True) for p in picks]
            order_back = torch.from_numpy(np.argsort(np.concatenate(picks))).to(device, non_blocking=True) if len(groups) > 1 else None
            stored = {key: _gather_rows(arrays, rows, order_back) for key, arrays in held.items()}
            feats = {name: self.encoding.decode(stored["layers", name], stored.get(("scales", name)), out) for name in layers}
            yield Batch(feats, torch.from_numpy(labels_all[sl]), torch.from_numpy(sl))

    def _window_order(self, split: str, chunks: np.ndarray, usable: np.ndarray, perm_seed=None):
        """The samples a window yields, in order: its chunks' usable samples, permuted by
        perm_seed. Also, per chunk, (chunk, start, stop, kept offsets or None for all), and the
        permutation of their concatenation."""
        n = self.num_samples(split)
        parts, idx_parts = [], []
        for c in sorted(int(c) for c in chunks):
            start, stop = self.plan.chunk_range(c, n)
            keep = np.flatnonzero(usable[start:stop])
            parts.append((c, start, stop, None if len(keep) == stop - start else keep))
            idx_parts.append(start + keep)
        idx = np.concatenate(idx_parts)
        perm = np.random.default_rng(perm_seed).permutation(len(idx)) if perm_seed is not None else None
        return (idx[perm] if perm is not None else idx), parts, perm

    def _read_window(self, split: str, layers: Sequence[str], chunks: np.ndarray, usable: np.ndarray, out: torch.dtype, perm_seed=None,
                     group_of: Optional[dict[int, str]] = None):
        """Read chunks (chunk c from group_of[c]: the split or one of its views), drop the
        samples `usable` [N] excludes, permute, decode. Everything before the final decode
        happens in the stored dtype (half the bytes of float32 for fp16)."""
        order, parts, perm = self._window_order(split, chunks, usable, perm_seed)
        rows = [(self.root[group_of[c] if group_of is not None else split], c, start, stop, keep) for c, start, stop, keep in parts]
        feats, streamed = {}, False
        for name in layers:
            stored = self._gather(f"layers/{name}", rows, perm)
            scales = self._gather(f"scales/{name}", rows, perm) if self.encoding.has_scales else None
            feats[name] = self.encoding.decode(stored, scales, out)
            held = all(self._held(f"{g.path}/layers/{name}") is not None for g, *_ in rows)
            streamed |= not held
            if not held and not torch.isfinite(feats[name]).all():  # held arrays were checked once; find the chunk to name it
                self._name_non_finite(name, rows)
        if streamed:  # read from the store: it must still be the one opened
            self.require_unchanged()
        return feats, order

    def _gather(self, path: str, rows, perm: Optional[np.ndarray]) -> np.ndarray:
        parts = []
        for g, chunk, start, stop, keep in rows:
            held = self._held(f"{g.path}/{path}")
            # Part of what a window reads may be held (another run's layers), on any device. A
            # copy: a slice of a held CPU array is a view of it, and a batch that a consumer
            # edits in place must not change what later reads of it return.
            block = held[start:stop].cpu().numpy().copy() if held is not None else self._checked(g[path], start, stop, chunk)
            parts.append(block if keep is None else block[keep])
        joined = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return joined if perm is None else joined[perm]

    def _name_non_finite(self, name: str, rows) -> None:
        for g, chunk, start, stop, keep in rows:
            scales = g[f"scales/{name}"][start:stop] if self.encoding.has_scales else None
            values = self.encoding.decode(g[f"layers/{name}"][start:stop], scales)
            require_finite(values if keep is None else values[keep], f"{g.path}/layers/{name}", start, stop, self.path, chunk)


def _gather_rows(arrays: list[torch.Tensor], rows: list[torch.Tensor], order_back: Optional[torch.Tensor]) -> torch.Tensor:
    """One batch's samples: rows[s] of arrays[s] (the held split and its views), concatenated,
    then put back in the batch's order. index_select only: torch has no index_put for the
    uint16 of bfloat16 bits."""
    if len(arrays) == 1:
        return arrays[0].index_select(0, rows[0])
    parts = torch.cat([arr.index_select(0, r) for arr, r in zip(arrays, rows)])
    return parts.index_select(0, order_back)


def open_store(path: str | Path | StoreLocation, allow_partial: bool = False, storage_options: Optional[dict] = None) -> CacheReader:
    """Open a store (a local path or an fsspec URL) read-only; refuses an incomplete one unless allow_partial."""
    return CacheReader(path, allow_partial=allow_partial, storage_options=storage_options)


def _require_creation(location: StoreLocation, creation: str, path: str) -> None:
    """`CacheReader.require_unchanged`, as a function of what it needs, so a dask block can
    run it on a worker after its read. The root's attributes as they are now ({} while no store
    is at the path); any other error (a throttled or reset request) is retried, then reported
    as itself: never as a replaced store."""
    for attempt in range(3):
        try:
            attrs = location.read_root_attributes()
            break
        except FileNotFoundError:  # nothing there (mid-replacement)
            attrs = {}
            break
        except Exception as e:  # retried, then raised as what it was
            error = e
            if attempt < 2:
                time.sleep(0.5 * (attempt + 1))
    else:
        raise StoreError(f"store {path!r}: cannot read its root to check that it is still the store this run opened: "
                         f"{type(error).__name__}: {error}") from error
    manifest = attrs.get(MANIFEST_KEY)
    if CREATING_KEY in attrs or manifest is None or _creation(manifest) != creation:
        raise StoreError(f"store {path!r} was replaced while this run read it (an `extract --overwrite`?); "
                         "what was read may mix both stores: rerun on the new one")


def _decoded_finite(stored: np.ndarray, valid: np.ndarray, samples: np.ndarray, scales: Optional[np.ndarray] = None, *, decode,
                    path: str, where: str, unchanged) -> np.ndarray:
    """One dask block of `dask_array`: refused when the store was replaced since the graph was
    built (the block's read may hold the new store's values), decoded with the writer's
    decoder, and refused when a computed sample holds a non-finite value (a damaged object, or
    fp16 read back from an overflow)."""
    unchanged()
    values = decode(stored) if scales is None else decode(stored, scales)
    if len(values):
        require_finite(values[valid], path, int(samples[0]), int(samples[-1]) + 1, where)
    return values


def _creation(manifest: dict) -> str:
    """What a store holds and which creation of it (a store made again in the same second keeps
    created_at), from its manifest alone: what a reader re-checks, and with the path what names
    its held arrays."""
    fingerprint = hashlib.sha256(json.dumps(manifest["fingerprint"], sort_keys=True).encode()).hexdigest()[:16]
    return f"{fingerprint}#{manifest.get('creation_id') or manifest.get('created_at')}"
