"""A writer thread, so compression and disk I/O overlap the forward pass.

The extraction loop hands over batches (sample indices + float features) through a bounded
queue. The thread encodes them into per-chunk buffers and, once every missing chunk of a
shard is fully buffered, writes those chunks (whole shards in one go when the whole shard
was missing, so zarr never has to read-modify-write) and then stamps them complete.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict

import numpy as np
import torch

from cache.errors import StoreError
from cache.stats import sums
from cache.writer import StoreWriter

_STOP = object()


class BackgroundWriter:
    def __init__(self, writer: StoreWriter, split: str, missing_chunks: list[int], queue_size: int = 4):
        self.writer = writer
        self.split = split
        self.n = writer.manifest.record(split).num_samples
        self.plan = writer.plan
        self.specs = {spec.name: spec for spec in writer.layers}
        self.pending_by_shard: dict[int, set[int]] = defaultdict(set)
        for c in missing_chunks:
            self.pending_by_shard[self.plan.shard_of(c)].add(c)
        self.buffers: dict[int, dict] = {}  # chunk -> {"layers": {...}, "scales": {...}, "valid", "filled"}
        self.bytes_written = 0
        self.chunks_written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"cache-writer-{split}", daemon=True)
        self._thread.start()

    def put(self, indices: np.ndarray, features: dict[str, torch.Tensor], valid: np.ndarray) -> None:
        """Hand over one batch; blocks when the writer is `queue_size` batches behind."""
        self._raise_if_failed()
        self._queue.put((np.asarray(indices), features, np.asarray(valid, dtype=bool)))

    def close(self) -> None:
        """Flush everything and wait; re-raises a failure of the writer thread."""
        self._queue.put(_STOP)
        self._thread.join()
        self._raise_if_failed()
        leftover = {c for chunks in self.pending_by_shard.values() for c in chunks}
        if leftover:
            raise RuntimeError(f"split {self.split!r}: chunks {sorted(leftover)[:10]} were never fully fed to the writer")

    def abort(self) -> None:
        """Stop after the batches already queued; unfinished chunks stay unstamped (redone on rerun)."""
        self._queue.put(_STOP)
        self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            # The writer thread's own exception, so callers can tell a full disk (OSError) or a
            # refused value (StoreError) from a bug.
            raise self._error

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                self._absorb(*item)
        except BaseException as e:  # surfaced to the main thread by put()/close()
            self._error = e
            # Drain so a producer blocked on put() wakes up and sees the error.
            while True:
                try:
                    if self._queue.get_nowait() is _STOP:
                        return
                except queue.Empty:
                    return

    def _absorb(self, indices: np.ndarray, features: dict[str, torch.Tensor], valid: np.ndarray) -> None:
        enc = self.writer.encoding
        encoded = {name: enc.encode(t) for name, t in features.items()}
        for name, (values, scales) in encoded.items():
            # A stored inf or NaN would poison every adapter trained on it, so it never enters
            # the store (fp16 overflows above 65504; a backbone may overflow under autocast).
            with np.errstate(invalid="ignore", over="ignore"):  # decoded as the reader will (bfloat16's bits are integers)
                bad = ~np.isfinite(enc.decode_numpy(values, scales).reshape(len(values), -1)).all(axis=1)
            if scales is not None:
                bad |= ~np.isfinite(scales.astype(np.float32)).all(axis=1)
            bad &= valid
            if bad.any():
                raise StoreError(f"split {self.split!r}, layer {name!r}: non-finite values for samples {indices[bad][:5].tolist()} "
                                 f"as {self.writer.dtype} (an overflow?); try store.dtype=float32 or bfloat16")
        chunk_of = indices // self.plan.samples_per_chunk
        touched_shards = set()
        for chunk in np.unique(chunk_of):
            chunk = int(chunk)
            sel = np.flatnonzero(chunk_of == chunk)
            buf = self.buffers.get(chunk) or self._new_buffer(chunk, encoded)
            offsets = indices[sel] - buf["start"]
            for name, (values, scales) in encoded.items():
                buf["layers"][name][offsets] = values[sel]
                if scales is not None:
                    buf["scales"][name][offsets] = scales[sel]
            buf["valid"][offsets] = valid[sel]
            buf["filled"] += len(sel)
            touched_shards.add(self.plan.shard_of(chunk))
        for shard in sorted(touched_shards):
            self._flush_if_ready(shard)

    def _new_buffer(self, chunk: int, encoded: dict) -> dict:
        start, stop = self.plan.chunk_range(chunk, self.n)
        length = stop - start
        buf = {
            "start": start,
            "length": length,
            "layers": {n: np.zeros((length,) + v.shape[1:], v.dtype) for n, (v, _) in encoded.items()},
            "scales": {n: np.zeros((length,) + s.shape[1:], s.dtype) for n, (_, s) in encoded.items() if s is not None},
            "valid": np.zeros(length, dtype=bool),
            "filled": 0,
        }
        self.buffers[chunk] = buf
        return buf

    def _flush_if_ready(self, shard: int) -> None:
        chunks = sorted(self.pending_by_shard.get(shard, ()))
        if not chunks or any(c not in self.buffers or self.buffers[c]["filled"] < self.buffers[c]["length"] for c in chunks):
            return
        # Contiguous runs of chunks become one write each (the whole shard when all was missing).
        runs, run = [], [chunks[0]]
        for c in chunks[1:]:
            if c == run[-1] + 1:
                run.append(c)
            else:
                runs.append(run)
                run = [c]
        runs.append(run)
        for run in runs:
            bufs = [self.buffers[c] for c in run]
            layers = {n: np.concatenate([b["layers"][n] for b in bufs]) for n in bufs[0]["layers"]}
            scales = {n: np.concatenate([b["scales"][n] for b in bufs]) for n in bufs[0]["scales"]}
            self.writer.write(self.split, bufs[0]["start"], layers, scales, np.concatenate([b["valid"] for b in bufs]))
            self.bytes_written += sum(a.nbytes for a in layers.values())
        for c in chunks:  # from the values as stored, decoded as the reader decodes them
            buf = self.buffers[c]
            self.writer.write_stats(self.split, c, {
                n: sums(self.writer.encoding.decode(v, buf["scales"].get(n)), buf["valid"], self.specs[n])
                for n, v in buf["layers"].items()})
        self.writer.stamp(self.split, chunks)
        self.chunks_written += len(chunks)
        for c in chunks:
            del self.buffers[c]
        del self.pending_by_shard[shard]
