"""A store's summary for humans and scripts: manifest, splits, layers, sizes, completeness."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from cache.reader import CacheReader
from cache.schema import view_group


def summarize(path: str | Path, storage_options: dict | None = None) -> dict:
    reader = CacheReader(path, allow_partial=True, storage_options=storage_options)
    m = reader.manifest
    splits = {}
    for split in reader.splits:
        valid = reader.valid(split)
        # Chunks of every view of the split: one killed while views were extracted is not "N/N".
        stamps = [reader.root[f"{view_group(split, v)}/chunk_done"][:] for v in range(reader.views(split))]
        done = stamps[0]  # the clean view's
        splits[split] = {
            "num_samples": reader.num_samples(split),
            "views": reader.views(split),
            "chunks_done": int(sum(np.count_nonzero(s) for s in stamps)),
            "chunks_total": int(sum(len(s) for s in stamps)),
            "skipped": int(np.count_nonzero(~valid[reader.plan.per_sample(done, reader.num_samples(split))])),
        }
    layers = []
    for name, spec in reader.layers.items():
        disk = sum(reader.location.size_bytes(f"{g}/layers/{name}") for g in m.groups)
        layers.append({**spec.to_json(), "dtype": reader.dtype, "bytes_on_disk": disk})
    return {
        "path": str(path),
        "complete": reader.is_complete(),
        "format_version": m.format_version,
        "backbone": dataclasses.asdict(m.fingerprint.backbone),
        "storage": dataclasses.asdict(m.fingerprint.storage),
        "preprocessing": m.fingerprint.preprocessing,
        "samples_per_chunk": reader.plan.samples_per_chunk,
        "chunks_per_shard": reader.plan.chunks_per_shard,
        "classes": list(m.classes),
        "splits": splits,
        "layers": layers,
        "bytes_on_disk": reader.location.size_bytes(),
        "package_version": m.package_version,
        "created_at": m.created_at,
        "skipped_ids": m.skipped,
    }

