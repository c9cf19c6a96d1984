"""Adapter methods in the benchmark: a grid per seed, the choice on validation, a solo rerun.

Per method and seed, every grid point is trained fused from one pass over the cache per
epoch (stage two's trainer). The configuration with the best validation accuracy averaged
over the seeds is chosen; its test accuracy is reported as mean and spread over the seeds.
The chosen configuration is then trained alone in a fresh process (seed 0) for what one
user training that one adapter would pay: wall time and peak memory.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from cache import StoreError, open_store
from pipeline.config import AdapterEntry, TrainConfig, build, to_dict
from pipeline.runners.train import run_train
from pipeline.training.ensembles import calibrated_ensembles
from pipeline.training.members import Member, expand


def train_settings(bench, case, seed: int) -> dict:
    """The train-config keys shared by every adapter run of a case."""
    return {"train_split": case.train_split, "test_split": case.test_split, "val_fraction": bench.val_fraction,
            "epochs": bench.epochs, "min_steps": bench.min_steps, "batch_size": bench.batch_size, "warmup_epochs": bench.warmup_epochs,
            "seed": seed, "ensemble_top_k": case.ensemble_top_k}


def train_grid(store: str, entry: AdapterEntry, settings: dict, output: str) -> dict:
    """Every grid point of `entry` for one seed, fused; rows + the run's top-k ensemble, and the
    run's wall time end to end (setup, statistics, every epoch's training and validation, the
    test pass; a solved grid's solve), as a solo run is timed. No plot: sklearn draws none."""
    cfg = build(TrainConfig, {**settings, "store": store, "output": output, "save_top": 0, "adapters": [to_dict(entry)]})
    t0 = time.perf_counter()
    result = run_train(cfg, overwrite=True, plot=False)  # the bench's own run folder: a recomputed unit replaces it
    wall = time.perf_counter() - t0
    summary = result["summary"]
    return {"rows": result["rows"], "ensemble": summary["ensemble"], "greedy": summary["greedy"],
            "epoch_seconds": summary["epoch_seconds"], "wall_s": wall, "logits": str(Path(output) / "logits.npz")}


def train_solo(store: str, entry_dict: dict, settings: dict) -> dict:
    """One adapter trained alone (runs in a measured child process)."""
    with tempfile.TemporaryDirectory() as out:
        return train_grid(store, build(AdapterEntry, entry_dict), settings, out)["rows"][0]


def member_entry(entry: AdapterEntry, config_id: str, store: str) -> AdapterEntry:
    """The single-member entry that trains the grid configuration `config_id` of `entry` alone."""
    reader = open_store(store)
    member: Member = next(m for m in expand((entry,), reader.layers, 0) if m.config_id == config_id)
    hparams = {k: v for k, v in member.hparams.items() if k not in ("layer", "layers")}
    layers = member.hparams.get("layers") or ([member.hparams["layer"]] if "layer" in member.hparams else None)
    return replace(entry, layers=tuple(layers) if layers else None, hparams=hparams, lr=member.lr if entry.solver == "adamw" else entry.lr,
                   weight_decay=member.weight_decay, seeds=None)


def mean_accuracy(values) -> float:
    """The mean of accuracies over seeds, rounded to 12 places: each is k/n as a float, and two
    sets of seeds with the same total of correct samples can average one ulp apart, which
    turned an exact tie on validation into a choice (and a headline verdict). Distinct totals
    lie at least 1/(n seeds) apart, far above the rounding."""
    return round(statistics.fmean(values), 12)


def choose(grids: list[dict], label: str, keep: Callable[[dict], bool] = lambda r: True) -> Optional[dict]:
    """The grid configuration with the best mean validation accuracy over seeds (`grids`: one
    per seed; a configuration's members across seeds share its config_id). Ties go to the
    greater name, then the greater id. A configuration that diverged in any seed is never
    chosen (the trainer ranks such members last and a sweep never exports them)."""
    by_config: dict[str, list[dict]] = {}
    for grid in grids:
        for row in grid["rows"]:
            if keep(row) and not row.get("diverged"):
                by_config.setdefault(row["config_id"], []).append(row)
    complete = {c: rows for c, rows in by_config.items() if len(rows) == len(grids)}
    if not complete:
        return None
    config_id = max(complete, key=lambda c: (mean_accuracy(r["val_acc"] for r in complete[c]), complete[c][0]["adapter"], c))
    rows = complete[config_id]
    return {"method": label, "config": rows[0]["adapter"], "config_id": config_id, "kind": rows[0]["kind"], "layer": rows[0]["layer"],
            "params": rows[0]["params"], "pct_backbone": rows[0]["pct_backbone"], **spread(rows)}


def per_layer(grids: list[dict], kind: str) -> list[dict]:
    """For each layer, the best configuration of `kind` on that layer (chosen on validation)."""
    layers = []
    for row in grids[0]["rows"]:
        if row["kind"] == kind and row["layer"] not in layers:
            layers.append(row["layer"])
    return [choose(grids, layer, lambda r, l=layer: r["kind"] == kind and r["layer"] == l) for layer in layers]


def ensemble(grids: list[dict], label: str, which: str = "ensemble") -> dict:
    """The grid's calibrated top-k ("ensemble") or greedy ensemble, as chosen per seed on validation."""
    names = grids[0][which]["adapters"]
    how = (f"top {len(names)} by validation" if which == "ensemble" else
           f"greedy selection with replacement on validation ({sum(grids[0][which]['weights'])} picks)")
    return {"method": label, "config": f"{how}, temperature-calibrated softmax averaged; first seed: " + "; ".join(names),
            "kind": "ensemble", "layer": None, "params": None, "pct_backbone": None,
            **spread([g[which] for g in grids])}


def pooled_greedy(grids_by_method: list[list[dict]], label: str, k: int) -> Optional[dict]:
    """Greedy calibrated ensemble over every member of every method's grid, per seed (from
    the logits each grid run saved), chosen on validation."""
    per_seed = []
    for seed_grids in zip(*grids_by_method):
        parts = []
        for g in seed_grids:
            if not Path(g["logits"]).is_file():
                raise StoreError(f"{g['logits']} is missing (the bench's run folder was cleaned?); delete the units of that "
                                 "grid under OUTPUT/units to recompute it")
            part = np.load(g["logits"])
            # The run folder is rewritten by any later run of that method and seed: logits of
            # other members than the unit's rows would make a silently wrong ensemble.
            if "member_ids" not in part or list(part["member_ids"]) != [r["member_id"] for r in g["rows"]]:
                raise StoreError(f"{g['logits']} holds other members than its saved unit (a later run replaced the folder); "
                                 "delete the units of that grid under OUTPUT/units to recompute it")
            parts.append(part)
        if any("test_logits" not in p for p in parts):
            return None
        # The logits are in the order of the grid's rows: their ids, and names for the report.
        rows = [r for g in seed_grids for r in g["rows"]]
        result = calibrated_ensembles(np.concatenate([p["val_logits"] for p in parts]), parts[0]["val_labels"],
                                      np.concatenate([p["test_logits"] for p in parts]), parts[0]["test_labels"], k=k)
        per_seed.append({**result.greedy.to_dict(), "members": [rows[i]["member_id"] for i in result.greedy.members],
                         "adapters": [rows[i]["adapter"] for i in result.greedy.members]})
    first = per_seed[0]
    return {"method": label, "config": f"greedy over all {len(rows)} grid members, calibrated; first seed picks: "
                                       + "; ".join(f"{n} x{w}" for n, w in zip(first["adapters"], first["weights"])),
            "kind": "ensemble", "layer": None, "params": None, "pct_backbone": None, **spread(per_seed)}


def spread(rows: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds of val_acc and test_acc (no spread, None,
    from one seed)."""
    out = {"seeds": len(rows)}
    for key in ("val_acc", "test_acc"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = mean_accuracy(values) if values else None
        out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        out[f"{key}_all"] = values
    return out
