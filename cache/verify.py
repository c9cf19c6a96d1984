"""Read every stamped chunk of every array of a store and report what is damaged.

    python -m pipeline verify STORE [--repair]

A chunk is bad when an object holding it is missing, fails its crc32c or does not decode,
(layers) holds non-finite values for a sample that was computed, or holds values whose sums
are not the feature sums stamped beside them (stats/: written from the same values, so an
object swapped for another intact one, which its crc32c passes, is caught). A store marked
complete is bad where a chunk is unstamped (its stamp object was lost), and a split with
views where a sample is valid in some views and not others. `repair` unstamps the bad
chunks and marks the store incomplete, under the writer's lease, so that the same extract
command recomputes exactly those chunks and nothing else. Arrays written once at creation
(labels, sample ids) cannot be recomputed chunk by chunk: their damage is reported with the
advice to extract again with --overwrite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cache.errors import StoreError
from cache.integrity import read_region
from cache.lease import StoreLease
from cache.reader import CacheReader
from cache.schema import MANIFEST_KEY, Manifest, split_of
from cache.stats import one_row_of_sums
from cache.writer import mixed_validity


@dataclass
class SplitReport:
    split: str
    chunks: int
    stamped: int
    bad: dict[int, list[str]] = field(default_factory=dict)  # chunk -> what is wrong with it
    unrecoverable: list[str] = field(default_factory=list)  # damage a chunk rerun cannot mend
    checked_arrays: list[str] = field(default_factory=list)
    valid: np.ndarray = None  # [N] the valid mask as read (True where a chunk was not read)
    valid_read: set = field(default_factory=set)  # the stamped chunks whose valid mask was read


def verify_store(path: str, repair: bool = False, storage_options: dict | None = None) -> list[SplitReport]:
    reader = CacheReader(path, allow_partial=True, storage_options=storage_options)
    reports = [_verify_split(reader, group) for group in reader.manifest.groups]
    _check_views_agree(reader, {r.split: r for r in reports})
    reader.require_unchanged()  # the reports describe the store that was read, not one put there since
    if repair and any(r.bad for r in reports):
        _unstamp(reader, {r.split: sorted(r.bad) for r in reports if r.bad})
    return reports


def _verify_split(reader: CacheReader, split: str) -> SplitReport:
    """One split, or one augmented view of it (split is then its group, "train/views/2")."""
    g = reader.root[split]
    n = reader.num_samples(split)
    n_chunks = reader.plan.n_chunks(n)
    stamps = g["chunk_done"]
    done = np.zeros(n_chunks, dtype=bool)
    report = SplitReport(split, n_chunks, 0)
    for c in range(n_chunks):  # one object per stamp: a damaged stamp is a damaged chunk
        try:
            done[c] = bool(stamps[c])
        except Exception as e:
            report.bad.setdefault(c, []).append(f"chunk_done: its stamp cannot be read ({type(e).__name__})")
    report.stamped = int(done.sum())
    if reader.manifest.complete:  # every chunk was stamped when the manifest was: a lost stamp reads as 0
        for c in np.flatnonzero(~done):
            if int(c) not in report.bad:  # an unreadable stamp is reported once, above
                report.bad[int(c)] = ["chunk_done: unstamped in a store marked complete (its stamp object is missing)"]

    for name in ("labels", "sample_ids", "sample_id_offsets") if split == split_of(split) else ():  # a view's are its split's
        try:
            reader.objects.require(g[name], 0, max(g[name].shape[0], 1))
            read_region(g[name], 0, g[name].shape[0], reader.path)
        except Exception as e:
            report.unrecoverable.append(f"{name}: {_reason(e)}")

    arrays = ["valid"] + [f"layers/{l}" for l in reader.layers]
    if reader.encoding.has_scales:
        arrays += [f"scales/{l}" for l in reader.layers]
    report.checked_arrays = arrays
    valid = np.ones(n, dtype=bool)
    decoded_sums: dict[tuple[str, int], tuple[int, np.ndarray]] = {}  # (layer, chunk) -> (row, that row of the sums) of the values read
    for path in arrays:
        arr = g[path]
        for c in np.flatnonzero(done):
            start, stop = reader.plan.chunk_range(int(c), n)
            try:
                values = reader._checked(arr, start, stop, int(c))
            except StoreError as e:
                report.bad.setdefault(int(c), []).append(f"{path}: {_reason(e)}")
                continue
            if path == "valid":
                valid[start:stop] = values
                report.valid_read.add(int(c))
            elif path.startswith("layers/"):
                scales = g[f"scales/{path[7:]}"][start:stop] if reader.encoding.has_scales else None
                try:
                    decoded = reader.encoding.decode(values, scales)
                except Exception:
                    continue  # the scales' own damage is reported under scales/
                if not np.isfinite(decoded[valid[start:stop]].numpy()).all():
                    report.bad.setdefault(int(c), []).append(f"{path}: non-finite values")
                elif int(c) in report.valid_read:
                    decoded_sums[path[7:], int(c)] = one_row_of_sums(decoded, valid[start:stop], reader.layers[path[7:]])
    for layer in reader.layers:  # feature sums: one object per chunk, indexed by chunk
        path = f"stats/{layer}"
        report.checked_arrays.append(path)
        for c in np.flatnonzero(done):
            try:
                rows = reader._checked(g[path], int(c), int(c) + 1, int(c))
            except StoreError as e:
                report.bad.setdefault(int(c), []).append(f"{path}: {_reason(e)}")
                continue
            if not np.isfinite(rows).all():
                report.bad.setdefault(int(c), []).append(f"{path}: non-finite values")
                continue
            row, values = decoded_sums.get((layer, int(c)), (None, None))
            if row is not None and not _same_sums(values, rows[0][row]):
                report.bad.setdefault(int(c), []).append(f"{path}: not the sums of the chunk's values (an object was replaced?)")
    report.valid = valid
    return report


def _check_views_agree(reader: CacheReader, reports: dict[str, "SplitReport"]) -> None:
    """A sample valid in some views of its split and not in others (the writer refuses to
    finalize that): the chunks holding it are bad in every view."""
    for split in reader.manifest.splits:
        groups = [g for g in reports if split_of(g) == split]
        if len(groups) < 2:
            continue
        n = reader.num_samples(split)
        read = np.array([all(c in reports[g].valid_read for g in groups) for c in range(reader.plan.n_chunks(n))])
        mixed = mixed_validity(np.stack([reports[g].valid for g in groups])) & reader.plan.per_sample(read, n)  # where every view's mask was read
        for c in sorted({int(i) // reader.plan.samples_per_chunk for i in np.flatnonzero(mixed)}):
            for g in groups:
                reports[g].bad.setdefault(c, []).append("valid: a sample is valid in some views and not in others")


def _same_sums(recomputed: np.ndarray, stored: np.ndarray) -> bool:
    """The writer summed these very values in float64; another device or CPU may add them in
    another order (last-bit differences), while another object's values differ at their own scale."""
    return bool(np.allclose(recomputed, stored, rtol=1e-9, atol=1e-9 * max(1.0, float(np.abs(stored).max()))))


def _reason(e: Exception) -> str:
    text = str(e)
    if "is missing" in text:
        return "object missing"
    if "cannot be decoded" in text:
        return "checksum or decoding failed"
    return f"{type(e).__name__}: {text[:100]}"


def _unstamp(reader: CacheReader, bad: dict[str, list[int]]) -> None:
    with StoreLease(reader.location):
        # Replaced between the read and the lease: its chunks are sound, and unstamping them
        # would make a whole store incomplete.
        reader.require_unchanged()
        root = reader.location.open_group("r+")
        manifest = Manifest.from_json(root.attrs[MANIFEST_KEY], reader.path).reopened()
        root.attrs[MANIFEST_KEY] = manifest.to_json()  # first: from here on no reader takes the store as whole
        for split, chunks in bad.items():
            stamps = root[f"{split}/chunk_done"]
            for c in chunks:
                stamps[c] = 0
