"""The real benchmark: accuracy, cost and speed of every method, on real data and weights.

    python -m pipeline bench configs/bench_real.yaml [dotted.key=value ...] [--overwrite]

print the cost -> per case: extract (resumes a partial store, reuses a complete one) ->
each adapter method's grid once per seed, chosen on mean validation -> the chosen config
alone in a fresh process (wall time, peak memory) -> scikit-learn reference -> full
fine-tuning paragon -> storage options -> speed ratios -> BENCHMARKS.md + plots.
Every unit of work is saved under OUTPUT/units as it finishes, keyed by its settings and
the store's fingerprint, so an interrupted run resumes and a finished one only re-reports.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from cache import open_store
from pipeline.adapters.base import last_layer_name, layers_in_backbone_order
from pipeline.benchmarking import methods as M
from pipeline.benchmarking.finetune import finetune
from pipeline.benchmarking.machine import machine_info
from pipeline.benchmarking.measured import run_measured
from pipeline.benchmarking.report import HEADLINE_END, HEADLINE_START, PLOTS, has_headline_block, with_standalone_sections, write_benchmarks, write_headline
from pipeline.benchmarking.sklearn_reference import SOLVER_TOL, fit_logistic
from pipeline.benchmarking.speed import measure_speed
from pipeline.benchmarking.store_variants import disk_per_sample, option_label, variant_config
from pipeline.benchmarking.units import Units, key_hash
from pipeline.benchmarking.views_study import run_views_study, views_config
from pipeline.config import ConfigError, ExtractConfig, load_config, to_dict
from pipeline.config.bench_config import BenchCase, BenchConfig, method_id
from pipeline.runners.extract import plan_extraction, run_extract

log = logging.getLogger(__name__)


def run_bench(cfg: BenchConfig, config_path: str, overwrite: bool = False) -> dict:
    """overwrite: replace a store the bench extracts (a case's, a storage option's, a views
    store) that was made differently, e.g. from images copied again (new mtimes); a complete
    store made the same way is reused either way, and so are the units computed on it."""
    t_start = time.perf_counter()
    out = Path(cfg.output)
    units = Units(out / "units")
    extract_cfgs = {case.name: load_config(ExtractConfig, case.extract, list(case.overrides)) for case in cfg.cases}
    _check_before_any_work(cfg, extract_cfgs)
    _print_cost(cfg, extract_cfgs)
    cases = [_run_case(cfg, case, extract_cfgs[case.name], units, out, overwrite) for case in cfg.cases]
    speed = None
    if cfg.speed is not None:
        ecfg = extract_cfgs[cfg.speed.case]
        store = ecfg.store.path
        speed = units.get("speed", {"store": key_hash(open_store(store).fingerprint.to_json()), "settings": to_dict(cfg.speed),
                                    "epochs": cfg.epochs, "batch_size": cfg.batch_size},
                          lambda: measure_speed(ecfg, store, to_dict(cfg.speed), cfg.epochs, cfg.batch_size))
        speed["case"] = cfg.speed.case
    result = {"config_path": config_path, "config": to_dict(cfg), "machine": machine_info(), "cases": cases, "speed": speed,
              "wall_s": time.perf_counter() - t_start, "units_reused": units.reused, "units_computed": units.computed}
    report = write_benchmarks(out, result)
    if cfg.readme:
        write_headline(Path(cfg.readme), result)
    if cfg.report:
        # The copy (e.g. at the repository root) links its plots by the same relative path, and
        # keeps the sections that stand-alone scripts (benchmarks/) wrote into it.
        target = Path(cfg.report)
        target.parent.mkdir(parents=True, exist_ok=True)
        previous = target.read_text() if target.exists() else ""
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(with_standalone_sections(report.read_text(), previous))
        tmp.replace(target)
        shutil.copytree(out / PLOTS, target.parent / PLOTS, dirs_exist_ok=True)
    log.info("bench done in %.0f s (%d units computed, %d reused); report %s", result["wall_s"], units.computed, units.reused, report)
    return result


def _check_before_any_work(cfg: BenchConfig, extract_cfgs: dict) -> None:
    """What would otherwise fail hours in: every store variant's and views store's config (a
    typo in store_variants was found after extraction and the grids), and the README's
    headline markers (found at the very end, with every result computed)."""
    for case in cfg.cases:
        for option in case.store_variants:
            variant_config(extract_cfgs[case.name], option)
        if case.views is not None:
            for k in case.views.counts:
                views_config(extract_cfgs[case.name], k, case.views.augment)
    if cfg.readme and not has_headline_block(Path(cfg.readme)):
        raise ConfigError(f"readme: {cfg.readme!r} has no headline block to rewrite; add the two marker lines "
                          f"{HEADLINE_START!r} and {HEADLINE_END!r}, or set readme: null")


def _print_cost(cfg: BenchConfig, extract_cfgs: dict) -> None:
    for case in cfg.cases:
        plan = plan_extraction(extract_cfgs[case.name])
        runs = len(case.methods) * len(cfg.seeds)
        fine = case.finetune
        print(f"== case {case.name}\n{plan.report()}\n"
              f"   stage two: {len(case.methods)} adapter method(s) x {len(cfg.seeds)} seeds = {runs} grid runs of {cfg.epochs} epochs"
              + (f"; sklearn x {len(cfg.seeds)}" if case.sklearn else "")
              + (f"; full fine-tuning {fine.epochs} epochs at {fine.image_size} px x {len(fine.seeds or cfg.seeds)} seeds" if fine else "")
              + (f"; {len(case.store_variants)} storage option store(s) to extract and train" if case.store_variants else "")
              + (f"; views study: stores with {list(case.views.counts)} views per training image, {len(case.views.methods)} "
                 f"method(s) x {len(cfg.seeds)} seeds each" if case.views else ""),
              flush=True)


def _run_case(cfg: BenchConfig, case: BenchCase, ecfg: ExtractConfig, units: Units, out: Path, overwrite: bool) -> dict:
    log.info("case %s: extract (a complete store is reused)", case.name)
    t0 = time.perf_counter()
    done = run_extract(ecfg, overwrite)
    extract_s = time.perf_counter() - t0
    store = ecfg.store.path
    reader = open_store(store)
    store_key = key_hash(reader.fingerprint.to_json())
    # Stage one's cost, for the accuracy-vs-time comparison: only a run that computed the whole
    # store measured it (a reused or resumed store leaves it unknown rather than wrong).
    whole = done.streamed == sum(reader.num_samples(s) for s in reader.splits)
    extraction = units.get(f"{case.name}.extract", {"store": store_key},
                           lambda: {"extract_s": extract_s if whole else None, "images": done.streamed})
    last = last_layer_name(reader.layers)
    result = {"name": case.name, "backbone": ecfg.backbone.name, "weights": ecfg.backbone.weights,
              "image_size": list(reader.fingerprint.preprocessing["input_size"][1:]),
              "backbone_params": reader.manifest.backbone_parameters, "store": disk_per_sample(store),
              "splits": {s: int(reader.valid(s).sum()) for s in reader.splits}, "last_layer": last,
              "train_split": case.train_split, "test_split": case.test_split, "rows": [], "per_layer": {},
              "extract_s": extraction["extract_s"]}
    chosen, all_grids = {}, []
    for entry in case.methods:
        method = method_id(entry)
        grids = []
        for seed in cfg.seeds:
            settings = M.train_settings(cfg, case, seed)
            grid = units.get(f"{case.name}.{method}.seed{seed}", {"store": store_key, "entry": to_dict(entry), "settings": settings},
                             lambda: M.train_grid(store, entry, settings, str(out / "runs" / case.name / f"{method}_seed{seed}")))
            grids.append(grid)
        all_grids.append(grids)
        rows = _method_rows(entry, grids, last)
        for row in rows:
            if row["kind"] == "ensemble":
                row["wall_s"] = sum(g["wall_s"] for g in grids) / len(grids)
                row["time_note"] = "the whole grid, fused, end to end"
                continue
            single = M.member_entry(entry, row["config_id"], store)
            settings = M.train_settings(cfg, case, cfg.seeds[0])
            solo = units.get(f"{case.name}.{method}.solo.{row['config_id']}",
                             {"store": store_key, "entry": to_dict(single), "settings": settings},
                             lambda: run_measured(M.train_solo, store, to_dict(single), settings))
            row.update(wall_s=solo["wall_s"], peak_mb=solo["peak_mb"], gpu_peak_mb=solo["gpu_peak_mb"], solo_test_acc=solo["result"]["test_acc"])
            if entry.kind in ("linear", "inca") and entry.solver == "adamw":
                chosen.setdefault(entry.kind, single)
        result["rows"] += rows
        if entry.kind in ("inca", "linear"):
            result["per_layer"][method] = M.per_layer(grids, entry.kind)
    if len(all_grids) > 1:
        pooled = M.pooled_greedy(all_grids, "greedy ensemble over every method's grid (calibrated)", case.ensemble_top_k)
        if pooled is not None:
            pooled["wall_s"] = sum(sum(g["wall_s"] for g in grids) / len(grids) for grids in all_grids)
            pooled["time_note"] = "every grid, fused, end to end"
            result["rows"].append(pooled)
    if case.sklearn is not None:
        result["rows"].append(_sklearn_row(cfg, case, store, store_key, last, units))
        if case.sklearn.per_layer:
            result["sklearn_per_layer"] = _sklearn_per_layer(cfg, case, store, store_key, reader, units)
    if case.finetune is not None:
        result["rows"].append(_finetune_row(cfg, case, ecfg, store_key, units))
    # The store as extracted is the baseline each storage option is compared with.
    options = ((),) + case.store_variants if case.store_variants else ()
    result["store_variants"] = [_store_variant(cfg, case, ecfg, option, chosen, units, out, overwrite) for option in options]
    if case.views is not None:
        result["views"] = run_views_study(cfg, case, ecfg, units, out, overwrite)
    return result


def _method_rows(entry, grids: list[dict], last: str) -> list[dict]:
    kind = entry.kind
    if kind == "linear":
        how = "L-BFGS, exact" if entry.solver == "lbfgs" else "AdamW" if entry.standardize is not False else "AdamW, raw features"
        rows = [M.choose(grids, f"linear probe ({how}), last layer ({last})", lambda r: r["layer"] == last),
                M.choose(grids, f"linear probe ({how}), best layer (chosen on val)")]
    elif kind == "inca":
        width = f"dim-{entry.hparams['dim']} bottleneck" if entry.hparams.get("dim") else "full width"
        rows = [M.choose(grids, f"InCA ({width}), top-1 over layers (chosen on val)"),
                M.ensemble(grids, f"InCA ({width}), top-k ensemble (calibrated)"),
                M.ensemble(grids, f"InCA ({width}), greedy ensemble (calibrated)", "greedy")]
    else:
        rows = [M.choose(grids, {"losa": "LoSA", "vqt": "VQT"}.get(kind, kind))]
    return [r for r in rows if r is not None]


def _sklearn_fits(cfg: BenchConfig, case: BenchCase, store: str, store_key: str, layer: str, units: Units, name: str) -> list[dict]:
    """One unit per seed: every C of the grid fitted on that seed's carve (sklearn_reference.py)."""
    s = case.sklearn
    fits = []
    for seed in cfg.seeds:
        args = (store, layer, s.C, case.train_split, case.test_split, cfg.val_fraction, seed, s.max_iter)
        fits.append(units.get(f"{case.name}.{name}.seed{seed}", {"store": store_key, "args": args, "report": "per_C"},
                              lambda: fit_logistic(*args)))
    return fits


def _sklearn_choice(fits: list[dict]) -> tuple[float, dict]:
    """The C with the best mean validation accuracy over the seeds (the protocol of every
    method), and its per-seed results."""
    Cs = [r["C"] for r in fits[0]["per_C"]]
    C = max(Cs, key=lambda c: (M.mean_accuracy(next(r for r in f["per_C"] if r["C"] == c)["val_acc"] for f in fits), -Cs.index(c)))
    return C, M.spread([next(r for r in f["per_C"] if r["C"] == C) for f in fits])


def _sklearn_row(cfg: BenchConfig, case: BenchCase, store: str, store_key: str, last: str, units: Units) -> dict:
    s = case.sklearn
    layer = s.layer or last
    fits = _sklearn_fits(cfg, case, store, store_key, layer, units, "sklearn")
    C, chosen = _sklearn_choice(fits)
    solo_args = (store, layer, (C,), case.train_split, case.test_split, cfg.val_fraction, cfg.seeds[0], s.max_iter)
    solo = units.get(f"{case.name}.sklearn.solo", {"store": store_key, "args": solo_args}, lambda: run_measured(fit_logistic, *solo_args))
    return {"method": f"sklearn LogisticRegression, last layer ({layer})",
            "config": f"C {C:g} chosen on mean validation from {list(s.C)} (each seed's own choice: {[f['C'] for f in fits]}), lbfgs "
                      f"to tol {SOLVER_TOL:g} ({_converged(fits, C, s.max_iter)}), standardized",
            "kind": "sklearn", "layer": layer, "params": fits[0]["params"], "pct_backbone": None,
            "wall_s": solo["wall_s"], "peak_mb": solo["peak_mb"], "gpu_peak_mb": solo["gpu_peak_mb"], **chosen}


def _converged(fits: list[dict], C: float, max_iter: int) -> str:
    """Whether every seed's fit of the chosen C converged before max_iter, for the report."""
    runs = [next(r for r in f["per_C"] if r["C"] == C) for f in fits]
    if all(r["converged"] for r in runs):
        return f"converged in {max(r['iterations'] for r in runs)} iterations at most"
    return f"**not converged** within {max_iter} iterations on {sum(not r['converged'] for r in runs)} seed(s)"


def _sklearn_per_layer(cfg: BenchConfig, case: BenchCase, store: str, store_key: str, reader, units: Units) -> dict:
    """scikit-learn on every cached layer, C chosen on mean validation: the per-layer tables' reference."""
    out = {}
    for layer in layers_in_backbone_order(reader.layers):
        C, chosen = _sklearn_choice(_sklearn_fits(cfg, case, store, store_key, layer, units, f"sklearn.{layer}"))
        out[layer] = {"C": C, **chosen}
    return out


def _finetune_row(cfg: BenchConfig, case: BenchCase, ecfg: ExtractConfig, store_key: str, units: Units) -> dict:
    """Each lr on the first seed, the best validation accuracy chooses one, the other seeds run at it.
    Every run is one unit, timed alone in a fresh process; the chosen lr's first-seed run is reused."""
    s = case.finetune
    seeds = s.seeds or cfg.seeds
    fixed = {k: v for k, v in to_dict(s).items() if k not in ("lr", "seeds")}

    def run(lr: float, seed: int) -> dict:
        args = (to_dict(ecfg), {**fixed, "lr": lr}, seed, case.train_split, case.test_split, cfg.val_fraction)
        # The store's fingerprint too: it names the images (their ids and content stamps) the run reads.
        return units.get(f"{case.name}.finetune.lr{lr:g}.seed{seed}", {"args": args, "store": store_key}, lambda: run_measured(finetune, *args))

    search = {lr: run(lr, seeds[0]) for lr in s.lrs}
    lr = max(s.lrs, key=lambda x: search[x]["result"]["val_acc"])  # the first listed of equals
    runs = [search[lr]] + [run(lr, seed) for seed in seeds[1:]]
    results = [r["result"] for r in runs]
    budget = "" if s.time_budget_s is None else f", budget {s.time_budget_s:g} s of training per run"
    paragon = {"lr": lr, "lr_seed": seeds[0], "lr_search": [{"lr": x, "val_acc": search[x]["result"]["val_acc"]} for x in s.lrs],
               "search_wall_s": sum(r["wall_s"] for r in search.values()), "image_size": results[0]["image_size"],
               "crop_scale": list(s.crop_scale), "epochs_planned": s.epochs, "time_budget_s": s.time_budget_s,
               "epochs_run": [r["epochs_run"] for r in results], "best_epoch": [r["best_epoch"] for r in results],
               "stopped_by_budget": [r["stopped_by_budget"] for r in results], "converged": [r["converged"] for r in results],
               "converged_rule": results[0]["converged_rule"], "history": [r["history"] for r in results]}
    return {"method": "full fine-tuning (paragon)",
            "config": f"lr {lr:g} (chosen on val, seed {seeds[0]}, from {list(s.lrs)}), up to {s.epochs} epochs{budget}, "
                      f"{paragon['image_size']} px, random resized crop {list(s.crop_scale)} + flip, AdamW wd {s.weight_decay:g}, "
                      f"batch {s.batch_size}; epochs run {paragon['epochs_run']}, best val epoch {paragon['best_epoch']}, "
                      f"converged {paragon['converged']}",
            "kind": "finetune", "layer": None, "params": results[0]["params"], "pct_backbone": 100.0,
            "wall_s": sum(r["wall_s"] for r in runs) / len(runs), "peak_mb": max(r["peak_mb"] for r in runs),
            "gpu_peak_mb": runs[0]["gpu_peak_mb"], "device": results[0]["device"], "paragon": paragon, **M.spread(results)}


def _store_variant(cfg: BenchConfig, case: BenchCase, ecfg: ExtractConfig, option: tuple[str, ...], chosen: dict, units: Units, out: Path,
                   overwrite: bool) -> dict:
    vcfg = variant_config(ecfg, option) if option else ecfg
    if option:
        log.info("case %s: storage option %s", case.name, option_label(option))
        run_extract(vcfg, overwrite)
    store = vcfg.store.path
    store_key = key_hash(open_store(store).fingerprint.to_json())
    row = {"option": option_label(option), "store": store, **disk_per_sample(store), "accuracy": {}}
    for kind in ("linear", "inca"):
        if kind not in chosen:
            continue
        grids = []
        for seed in cfg.seeds:
            settings = M.train_settings(cfg, case, seed)
            grids.append(units.get(f"{case.name}.storage.{key_hash(option)}.{kind}.seed{seed}",
                                   {"store": store_key, "entry": to_dict(chosen[kind]), "settings": settings},
                                   lambda: M.train_grid(store, chosen[kind], settings, str(out / "runs" / case.name / f"storage_{kind}_seed{seed}"))))
        row["accuracy"][kind] = {"config": grids[0]["rows"][0]["adapter"], **M.spread([g["rows"][0] for g in grids])}
    return row
