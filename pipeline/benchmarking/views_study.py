"""Augmented views against K: accuracy, disk, extraction time and epoch time per view count.

For each K of the case's `views.counts` the same images are extracted with store.views = K
(K = 1 is the case's own store) and every method of `views.methods` trains its grid once per
seed with train.views = random (one view per sample per epoch; the exact probe solves on
every view). Each method's configuration is chosen on mean validation at each K, as in the
main table, and the best single method on validation at each K is "the best cached method"
(a grid's greedy ensemble is reported beside it; it is chosen on validation, so its validation
accuracy cannot rank it against the others).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

from cache import open_store
from pipeline.benchmarking import methods as M
from pipeline.benchmarking.store_variants import disk_per_sample, variant_config
from pipeline.benchmarking.units import Units, key_hash
from pipeline.config import ExtractConfig, to_dict
from pipeline.config.bench_config import BenchCase, BenchConfig, method_id
from pipeline.runners.extract import run_extract

log = logging.getLogger(__name__)


def views_config(ecfg: ExtractConfig, views: int, overrides: tuple[str, ...]) -> ExtractConfig:
    """The case's extract config with K views (K = 1: the case's store as it is), its store
    beside the case's, named by K and a hash of the augmentation overrides."""
    if views == 1:
        return ecfg
    variant = variant_config(ecfg, (f"store.views={views}",) + tuple(overrides))
    path = Path(ecfg.store.path)
    name = f"{path.stem}.views{views}" + (f".{key_hash(list(overrides))[:8]}" if overrides else "") + path.suffix
    return replace(variant, store=replace(variant.store, path=str(path.with_name(name))))


def run_views_study(cfg: BenchConfig, case: BenchCase, ecfg: ExtractConfig, units: Units, out: Path, overwrite: bool = False) -> list[dict]:
    study = case.views
    rows = []
    for k in study.counts:
        vcfg = views_config(ecfg, k, study.augment)
        log.info("case %s: %d view(s) per training image", case.name, k)
        t0 = time.perf_counter()
        done = run_extract(vcfg, overwrite)
        seconds = time.perf_counter() - t0
        reader = open_store(vcfg.store.path)
        store_key = key_hash(reader.fingerprint.to_json())
        images = sum(reader.num_samples(s) * reader.views(s) for s in reader.splits)
        # Only a run that computed every view of every image measured the extraction time.
        extraction = units.get(f"{case.name}.views{k}.extract", {"store": store_key},
                               lambda: {"extract_s": seconds if done.streamed == images else None, "images": images})
        methods = {}
        for entry in study.methods:
            method = method_id(entry)
            grids = []
            # K = 1 with a method of the main table: the very same unit (a store without views
            # reads view 0 whatever `views` says), so it is reused, not retrained.
            shared = k == 1 and entry in case.methods
            for seed in cfg.seeds:
                settings = M.train_settings(cfg, case, seed) if shared else {**M.train_settings(cfg, case, seed), "views": "random"}
                name = f"{method}_seed{seed}" if shared else f"views{k}_{method}_seed{seed}"
                grids.append(units.get(f"{case.name}.{method}.seed{seed}" if shared else f"{case.name}.views{k}.{method}.seed{seed}",
                                       {"store": store_key, "entry": to_dict(entry), "settings": settings},
                                       lambda: M.train_grid(vcfg.store.path, entry, settings, str(out / "runs" / case.name / name))))
            chosen = M.choose(grids, method)
            epoch_s = statistics.fmean(statistics.fmean(g["epoch_seconds"]) for g in grids if g["epoch_seconds"]) \
                if any(g["epoch_seconds"] for g in grids) else None
            methods[method] = {**chosen, "grid_epoch_s": epoch_s, "grid_members": len(grids[0]["rows"])}
            if len(grids[0]["rows"]) > 1:  # the grid's greedy calibrated ensemble too (chosen on validation, so not a candidate for "best")
                methods[f"{method} greedy"] = {**M.ensemble(grids, f"{method} greedy", "greedy"), "grid_epoch_s": epoch_s}
        singles = [r for r in methods.values() if r["kind"] != "ensemble"]
        best = max(singles, key=lambda r: (r["val_acc"], r["method"]))
        rows.append({"views": k, "store": vcfg.store.path, **disk_per_sample(vcfg.store.path), "train_images": reader.num_samples(case.train_split),
                     "extract_s": extraction["extract_s"], "images_computed": extraction["images"], "methods": methods,
                     "best": best["method"]})
    return rows

