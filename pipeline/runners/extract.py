"""Stage one: stream each split once through the frozen backbone into a zarr feature cache.

    python -m pipeline extract configs/fashion_mnist_lite0.yaml [dotted.key=value ...] [--dry-run] [--overwrite]

setup (backbone, layers, data, plan) -> print the cost -> open or resume the store ->
for each split, compute only the chunks not yet stamped -> finalize the manifest.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from cache import (
    BackboneRecord,
    BackgroundWriter,
    ChunkPlan,
    ConfigError,
    Fingerprint,
    LayerSpec,
    Manifest,
    StorageRecord,
    StoreError,
    StoreWriter,
    ViewsRecord,
    cannot_write,
    encoding,
    split_of,
    store_state,
    view_group,
)
from pipeline import __version__
from pipeline.backbones.build import Backbone, build_backbone
from pipeline.backbones.taps import LayerTaps
from pipeline.backbones.tokens import TOKEN_REDUCTIONS, reduce_tokens, reduced_spec
from pipeline.code_version import code_version
from pipeline.config import ExtractConfig, to_dict
from pipeline.data import CorruptImageError, SplitSource, open_split
from pipeline.data.augment import SeededView, train_transform
from pipeline.data.loader import make_loader
from pipeline.devices import resolve_device, usable_cores
from pipeline.progress import quiet

log = logging.getLogger(__name__)
EXTRACT_MODULES = ("pipeline.runners.extract",)  # what computes the features: this runner and all it imports


@dataclass
class ExtractPlan:
    cfg: ExtractConfig
    backbone: Backbone
    taps: LayerTaps
    raw_specs: list[LayerSpec]  # as the backbone produces them
    specs: list[LayerSpec]  # as stored, after token reduction
    sources: dict[str, SplitSource]
    chunks: ChunkPlan
    device: torch.device

    def bytes_per_sample(self, spec: LayerSpec) -> int:
        return encoding(self.cfg.store.dtype).bytes_per_sample(spec.tokens, spec.dim)

    def views(self, split: str) -> int:
        return self.cfg.store.views if split == self.cfg.augment.split else 1

    @property
    def groups(self) -> list[tuple[str, str, int]]:
        """(store group, split, view) of everything to compute: each split, then its augmented views."""
        return [(view_group(s, v), s, v) for s in self.sources for v in range(self.views(s))]

    def view_transform(self, view: int):
        """The clean extraction transform for view 0; the seeded train transform for the others."""
        if view == 0:
            return self.backbone.transform()
        return SeededView(train_transform(self.backbone.data_config, self.cfg.augment), self.cfg.augment.seed, view)

    def report(self) -> str:
        total_samples = sum(len(s) * self.views(k) for k, s in self.sources.items())
        views = ", ".join(f"{k}: {len(v)} x {self.views(k)} views" for k, v in self.sources.items() if self.views(k) > 1)
        lines = [
            f"backbone   {self.backbone.name} ({self.cfg.backbone.weights} weights, {self.backbone.num_parameters / 1e6:.1f}M params) on {self.device}",
            f"preprocess {_fmt_preprocess(self.backbone.data_config)}",
            "samples    " + ", ".join(f"{k}: {len(v)}" for k, v in self.sources.items()) + f" (total {total_samples} images to compute"
            + (f"; {views}, view 0 clean, the others {self.cfg.augment.policy}: that split costs {self.cfg.store.views}x on disk "
               "and in extraction time)" if views else ")"),
            f"storage    {self.cfg.store.dtype}, tokens={self.cfg.store.tokens}, {self.chunks.samples_per_chunk} samples/chunk, "
            f"{self.chunks.chunks_per_shard} chunks/shard, {self.cfg.store.compressor.name} compression",
            f"{'layer':<20}{'stored [T, D]':>16}{'KB/sample':>12}{'GB total':>11}",
        ]
        total = 0
        for spec in self.specs:
            b = self.bytes_per_sample(spec)
            total += b * total_samples
            lines.append(f"{spec.name:<20}{str([spec.tokens, spec.dim]):>16}{b / 1024:>12.1f}{b * total_samples / 1e9:>11.3f}")
        lines.append(f"{'all layers':<48}{total / 1e9:>11.3f} GB before compression -> {self.cfg.store.path}")
        lines.append(f"store      {store_state(self.cfg.store.path, fingerprint(self), self.cfg.store.storage_options, code_version(EXTRACT_MODULES))}")
        return "\n".join(lines)


def plan_extraction(cfg: ExtractConfig) -> ExtractPlan:
    device = resolve_device(cfg.runtime.device, "runtime.device")
    backbone = build_backbone(cfg.backbone, cfg.preprocess)
    taps = LayerTaps(backbone.model, cfg.backbone.layers, cfg.backbone.block_input, backbone.image_size, cfg.backbone.cache_kv,
                     cfg.backbone.through_final_norm)
    specs = [reduced_spec(s, cfg.store.tokens, cfg.store.grid_size) for s in taps.specs]
    k = cfg.store.grid_size
    finer = [f"{s.name} {tuple(s.grid)}" for s in taps.specs if TOKEN_REDUCTIONS[cfg.store.tokens].pools_grid and s.grid
             and (k > s.grid[0] or k > s.grid[1])]
    if finer:  # checked for new stores only: predict recomputes older ones as they were made
        raise ConfigError(f"store.grid_size: {k} exceeds the grid of layer(s) {', '.join(finer)}; pooling would repeat their "
                          "tokens, not summarise them: give at most the smallest grid of the stored layers")
    sources = {split: open_split(cfg.data, split) for split in cfg.data.splits}
    for split, source in sources.items():
        if source.ignored:
            shown = ", ".join(source.ignored[:5]) + (", ..." if len(source.ignored) > 5 else "")
            log.warning("split %s: %d path(s) under %s are not ROOT/SPLIT/CLASS/<image file> and are ignored (%s); "
                        "the store's manifest lists them under 'ignored'", split, len(source.ignored),
                        os.path.join(cfg.data.root, split), shown)
    shared = {f for a, b in itertools.combinations(sources.values(), 2) for f in set(a.origins) & set(b.origins)}
    if shared:
        raise ConfigError(f"data.splits: {sorted(shared)[:3]} belong to more than one split; their samples would be in both "
                          "(validation or test would hold training samples)")
    classes = {tuple(s.classes) for s in sources.values()}
    if len(classes) > 1:
        raise ConfigError(f"data.splits: the splits disagree on their classes: {[list(c) for c in classes]}")
    largest = max(len(s) for s in sources.values())
    bytes_per_value = encoding(cfg.store.dtype).itemsize  # chunks are sized by the values, not the scales
    if cfg.store.samples_per_chunk:
        chunks = ChunkPlan(cfg.store.samples_per_chunk, cfg.store.chunks_per_shard)
    else:
        widest = max(s.tokens * s.dim * bytes_per_value for s in specs)
        chunks = ChunkPlan.from_target(widest, cfg.store.chunk_mb, cfg.store.chunks_per_shard, largest)
    return ExtractPlan(cfg, backbone, taps, taps.specs, specs, sources, chunks, device)


def fingerprint(plan: ExtractPlan) -> Fingerprint:
    """Everything that decides the stored values and their layout; a store refuses any change."""
    cfg = plan.cfg
    return Fingerprint(
        backbone=BackboneRecord(plan.backbone.name, cfg.backbone.weights, plan.backbone.weights_sha256, dict(cfg.backbone.model_kwargs)),
        layers=tuple(plan.specs),
        storage=StorageRecord(cfg.store.dtype, cfg.store.tokens, cfg.store.grid_size if TOKEN_REDUCTIONS[cfg.store.tokens].pools_grid else None),
        preprocessing=_jsonable(plan.backbone.data_config),
        dataset={"kind": cfg.data.kind, "splits": {k: s.fingerprint() for k, s in plan.sources.items()}},
        views=ViewsRecord(cfg.augment.split, cfg.store.views, cfg.augment.describe()) if cfg.store.views > 1 else None,
        layout={
            "samples_per_chunk": plan.chunks.samples_per_chunk,
            "chunks_per_shard": plan.chunks.chunks_per_shard,
            "compressor": [cfg.store.compressor.name, cfg.store.compressor.level],
        },
        compute={"device": plan.device.type, "autocast": _autocast_dtype(plan)},
    )


def _autocast_dtype(plan: ExtractPlan) -> str | None:
    """The dtype the forward autocasts to (runtime.amp_dtype, on CUDA only), or None."""
    amp = plan.cfg.runtime.amp_dtype
    return amp if plan.device.type == "cuda" and amp != "float32" else None


@dataclass
class Extraction:
    """What one extract run did: its plan, the samples it computed and their wall time (from
    the first batch to the last write; 0 when the store was complete already)."""

    plan: ExtractPlan
    streamed: int = 0
    stream_seconds: float = 0.0


def run_extract(cfg: ExtractConfig, overwrite: bool = False) -> Extraction:
    """setup (the plan, printed with its cost) -> run (each split's missing chunks) -> finish
    (the manifest stamped complete). A dry run is plan_extraction(cfg).report()."""
    t0 = time.perf_counter()
    plan = plan_extraction(cfg)
    log.info("plan:\n%s", plan.report())
    done = Extraction(plan)
    with store_os_errors(cfg.store.path), open_writer(plan, overwrite) as writer:  # the lease is given back on any exit
        for group, split, _ in plan.groups:
            samples, seconds = extract_chunks(plan, writer, group, range(plan.chunks.n_chunks(len(plan.sources[split]))))
            done.streamed += samples
            done.stream_seconds += seconds
            if not samples:
                log.info("%s: complete, nothing to do", group)
        manifest = writer.finalize()
    report_skipped(manifest)
    skipped = sum(len(v) for v in manifest.skipped.values())
    log.info("store complete: %s (%.1f MB on disk, %d skipped sample(s), %.1f s)", cfg.store.path, writer.location.size_bytes() / 1e6, skipped,
             time.perf_counter() - t0)
    plan.taps.close()
    return done


def open_writer(plan: ExtractPlan, overwrite: bool = False, lease: bool = True, creation_id: str | None = None) -> StoreWriter:
    """Create the store for this plan, or reopen it when its fingerprint matches, under the
    store's writer lease (lease=False: a dask worker of the driver that holds it, writing into
    the store's creation `creation_id`, the driver's)."""
    cfg = plan.cfg
    return StoreWriter.open(
        cfg.store.path,
        fingerprint(plan),
        {k: (s.sample_ids, s.labels) for k, s in plan.sources.items()},
        (cfg.store.compressor.name, cfg.store.compressor.level),
        extra={
            "classes": tuple(next(iter(plan.sources.values())).classes),
            "backbone_parameters": plan.backbone.num_parameters,
            # Paths under a split's folder that are not samples (see pipeline/data/image_folder.py).
            "ignored": {k: list(s.ignored) for k, s in plan.sources.items() if s.ignored},
            "package_version": __version__,
            "code_version": code_version(EXTRACT_MODULES),
            "config": to_dict(cfg),
        },
        overwrite=overwrite,
        storage_options=cfg.store.storage_options,
        lease=lease,
        creation_id=creation_id,
    )


def store_os_errors(path: str):
    """A full disk or an unwritable store location becomes one StoreError naming the store.
    Chunks stamped before it stay valid (data first, stamp last): a rerun computes the rest."""
    return cannot_write(f"store {str(path)!r}", "the chunks stamped so far are kept", "rerun the same command to compute only the rest",
                        StoreError)


def report_skipped(manifest: Manifest) -> None:
    """Warn about a split whose every sample was skipped: nothing can be trained or scored on it."""
    for split, ids in manifest.skipped.items():
        n = manifest.splits[split].num_samples
        if len(ids) >= n:
            log.warning("split %s: all %d sample(s) were skipped as unreadable (listed in the manifest under 'skipped'); "
                        "`train` refuses this split", split, n)


def extract_chunks(plan: ExtractPlan, writer: StoreWriter, group: str, chunks: Iterable[int]) -> tuple[int, float]:
    """Compute the given chunks of one split, or of one augmented view of it (group
    "train/views/2"), that are not stamped yet; returns the samples computed and their wall time."""
    todo = sorted(set(chunks) & set(writer.missing_chunks(group)))
    if not todo:
        return 0, 0.0
    prepare_model(plan)
    view = next(v for g, _, v in plan.groups if g == group)
    return _extract_split(plan, writer, group, plan.sources[split_of(group)], plan.view_transform(view), todo)


def _extract_split(plan: ExtractPlan, writer: StoreWriter, split: str, source: SplitSource, transform, missing: list[int]) -> tuple[int, float]:
    cfg = plan.cfg
    n = len(source)
    indices = np.concatenate([np.arange(*plan.chunks.chunk_range(c, n)) for c in missing])
    log.info("%s: %d of %d chunks to compute (%d samples)", split, len(missing), plan.chunks.n_chunks(n), len(indices))
    loader = open_loader(plan, source, transform, indices)
    background = BackgroundWriter(writer, split, missing, cfg.runtime.write_queue)
    raw = {s.name: s for s in plan.raw_specs}
    bytes_per_sample = sum(plan.bytes_per_sample(s) for s in plan.specs)
    bar = tqdm(total=len(indices), unit="img", desc=f"extract {split}", dynamic_ncols=True,
               disable=quiet())  # -q: warnings only, bars included
    start, skipped = time.perf_counter(), 0
    try:
        for idx, images, errors in loader:
            valid = np.array([not e for e in errors], dtype=bool)
            if not valid.all():
                bad = [e for e in errors if e]
                if cfg.data.on_corrupt == "fail":
                    raise CorruptImageError(bad[0] + " (set data.on_corrupt=skip to skip such images)")
                skipped += len(bad)
                for e in bad:
                    log.warning("skipping: %s", e)
            feats = forward_batch(plan, images)
            feats = {k: reduce_tokens(v, raw[k], cfg.store.tokens, cfg.store.grid_size).float().cpu() for k, v in feats.items()}
            background.put(idx.numpy(), feats, valid)
            bar.update(len(idx))
            elapsed = time.perf_counter() - start
            bar.set_postfix(MBps=f"{bar.n * bytes_per_sample / 1e6 / max(elapsed, 1e-9):.1f}", skipped=skipped, refresh=False)
    except BaseException:
        background.abort()  # what was stamped stays; the rest is redone by the next run
        raise
    finally:
        bar.close()
    background.close()
    elapsed = time.perf_counter() - start
    log.info("%s: %d samples in %.1f s (%.1f img/s, %.1f MB/s written before compression)", split, len(indices), elapsed,
             len(indices) / elapsed, background.bytes_written / 1e6 / elapsed)
    return len(indices), elapsed


def open_loader(plan: ExtractPlan, source: SplitSource, transform, indices: np.ndarray):
    """The DataLoader extraction reads `indices` of `source` with: (indices, images, errors) batches."""
    on_cuda = plan.device.type == "cuda"
    return make_loader(source, transform, indices, plan.backbone.image_size, plan.cfg.runtime.batch_size, _workers(plan.cfg, on_cuda), on_cuda)


def forward_batch(plan: ExtractPlan, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tapped layers of one batch, on the plan's device (under its autocast on CUDA); the
    model must be there already (prepare_model)."""
    on_cuda = plan.device.type == "cuda"
    images = images.to(plan.device, non_blocking=True)
    if on_cuda:
        images = images.to(memory_format=torch.channels_last)
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(_autocast_dtype(plan))
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            return plan.taps(images)
    return plan.taps(images)


def prepare_model(plan: ExtractPlan) -> None:
    """Move the backbone (the module plan.taps runs) to the plan's device, in place."""
    model = plan.backbone.model.to(plan.device)
    if plan.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True


def _workers(cfg: ExtractConfig, on_cuda: bool) -> int:
    if cfg.runtime.num_workers is not None:
        return cfg.runtime.num_workers
    return min(4 if on_cuda else 2, usable_cores())


def _fmt_preprocess(dc: dict) -> str:
    mean, std = tuple(round(m, 3) for m in dc["mean"]), tuple(round(s, 3) for s in dc["std"])
    return f"{dc['input_size'][1]}x{dc['input_size'][2]}, {dc['interpolation']}, crop {dc['crop_pct']}, mean {mean}, std {std}"


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
