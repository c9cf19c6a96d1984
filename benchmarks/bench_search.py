"""How soon each search finds a configuration as good as the exhaustive grid's best.

    python benchmarks/bench_search.py [stores/bench/imagenette_lite0.zarr] [--epochs 4] [--trials-per-job 8] [--val-fraction 0.1]
                                      [--sampler-seeds 1] [--report BENCHMARKS.md]

One space of over 200 configurations on the store's layers: linear probes (every layer x 5 lr
x 3 weight decays), InCA (every layer but the first x 3 lr x 2 wd x 2 heads x 2 widths x 2
query counts) and LoSA over those layers (3 ranks x 3 lr). Every search runs in this process (`--workers 0`), one
after the other, with the store held in RAM for all of them (decoded once, before the first):
1. grid: every configuration; its best validation accuracy is the target;
2. random, 3. tpe, 4. tpe + pruning (successive halving, min 1 epoch, reduction factor 3):
   each as many trials as the grid ran (random: that many per entry, split evenly).
   The target: the grid's best minus 0.2 points; a search reaches it with its first trial
   row at or above that. With --sampler-seeds K, tpe and tpe + pruning run K times, the
   sampler alone reseeded (the sweep's seed, so the split and the training, stay fixed).
For each: trials run, time, the time the target was first reached (a trial row's arrival in
trials.jsonl), trials (completed or pruned) per hour, and the test accuracy of the
configuration it would export (the best by validation among its non-pruned trials). The
grid's best is also trained with seeds 0, 1, 2 to give the seed spread of its test accuracy.
Time is this process's CPU time (time.process_time; wall time beside it): run with
OMP_NUM_THREADS=1 it is the work done, so the ratios hold on a machine busy with other work.
Prints a markdown table; writes bench_out/bench_search.json and, with --report, the table as a
section of that markdown file (BENCHMARKS.md; `bench` keeps the section when it rewrites the file).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import open_store  # noqa: E402
from pipeline.benchmarking.machine import machine_info  # noqa: E402
from pipeline.benchmarking.report import replace_block, standalone_markers  # noqa: E402
from pipeline.config import SweepConfig, TrainConfig, build  # noqa: E402
from pipeline.runners.sweep import run_sweep  # noqa: E402
from pipeline.runners.train import plan_training, run_train  # noqa: E402
from pipeline.sweeping import results_log  # noqa: E402
from pipeline.sweeping.jobs import adapter_entry  # noqa: E402
from pipeline.sweeping.space import Trial  # noqa: E402

TOLERANCE = 0.002  # "within 0.2 points"


def space(layers: list[str]) -> list[dict]:
    """Linear probes on every layer; InCA and LoSA on all but the first (the layer with the
    most tokens: it would take most of a CPU run's time), as the bench's LoSA does."""
    deep = layers[1:] if len(layers) > 2 else layers
    return [
        {"kind": "linear", "layer": layers, "lr": [1e-3, 2e-3, 5e-3, 1e-2, 3e-2], "weight_decay": [0.0, 1e-4, 1e-2]},
        {"kind": "inca", "layer": deep, "lr": [1e-3, 3e-3, 1e-2], "weight_decay": [1e-4, 1e-2],
         "hparams": {"num_heads": [2, 4], "dim": [32, 64], "num_queries": [1, 2]}},
        {"kind": "losa", "layers": [deep], "lr": [1e-3, 3e-3, 1e-2], "hparams": {"rank": [8, 16, 32]}},
    ]


def grid_size(entries: list[dict]) -> int:
    total = 0
    for e in entries:
        n = len(e.get("layer") or e.get("layers"))
        for axis in (e["lr"], e.get("weight_decay", [0.0]), *e.get("hparams", {}).values()):
            n *= len(axis) if isinstance(axis, list) else 1
        total += n
    return total


class Stop(Exception):
    """Raised from a trial row's arrival: the search reached its trial cap."""


def run_search(name: str, base: dict, extra: dict, target: float | None, cap: int) -> dict:
    """One search from scratch, in a fresh output folder, to `cap` trials; each trial row's
    arrival time in trials.jsonl is recorded (TrialsLog.append, patched)."""
    real, arrivals = results_log.TrialsLog.append, []

    def append(log, row):
        real(log, row)
        arrivals.append((time.process_time() - c0, row))
        if len(arrivals) >= cap:
            raise Stop

    with tempfile.TemporaryDirectory() as out:
        cfg = build(SweepConfig, {**base, **extra, "output": out})
        results_log.TrialsLog.append = append
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            run_sweep(cfg, workers=0)
        except Stop:
            pass
        finally:
            results_log.TrialsLog.append = real
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = [r for _, r in arrivals]
    best = max((r for r in rows if r["metrics"].get("pruned_at") is None), key=lambda r: r["metrics"]["val_acc"])
    goal = best["metrics"]["val_acc"] if target is None else target  # the grid's own best is the target
    hit = next((t for t, r in arrivals if reaches(r, goal)), None)
    print(f"{name}: {len(rows)} trials in {cpu:.0f} CPU s ({wall:.0f} s wall); best val {best['metrics']['val_acc']:.4f}; "
          f"target reached at {'-' if hit is None else f'{hit:.0f} CPU s'}", flush=True)
    return {"search": name, "trials": len(rows), "pruned": sum(r["metrics"].get("pruned_at") is not None for r in rows),
            "wall_s": wall, "cpu_s": cpu, "target_cpu_s": hit, "trials_per_cpu_hour": 3600 * len(rows) / cpu,
            "trials_per_hour": 3600 * len(rows) / wall, "best": best}


@contextlib.contextmanager
def sampler_offset(k: int):
    """TPE's sampler seed shifted by k, nothing else: TpeSearch seeds the sampler from the
    sweep's seed, which also seeds the split and the training."""
    import optuna

    real = optuna.samplers.TPESampler

    def shifted(seed=None, **kw):
        return real(seed=None if seed is None else seed + 7919 * k, **kw)

    optuna.samplers.TPESampler = shifted
    try:
        yield
    finally:
        optuna.samplers.TPESampler = real


def reaches(row: dict, target: float) -> bool:
    return row["metrics"].get("pruned_at") is None and row["metrics"]["val_acc"] >= target - TOLERANCE


def seed_spread(base: dict, best: dict) -> list[float]:
    c = best["config"]
    entry = adapter_entry(Trial(best["trial"], c["kind"], c["hparams"], c["lr"], c["weight_decay"], 0))
    entry["seeds"] = [0, 1, 2]
    with tempfile.TemporaryDirectory() as out:
        keys = ("store", "epochs", "batch_size", "warmup_epochs", "val_fraction", "test_split", "seed")
        rows = run_train(build(TrainConfig, {**{k: base[k] for k in keys}, "output": out, "save_top": 0, "adapters": [entry]}))["rows"]
    return [r["test_acc"] for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store", nargs="?", default="stores/bench/imagenette_lite0.zarr")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--trials-per-job", type=int, default=8)
    p.add_argument("--test-split", default="val")
    # A larger validation carve separates configurations that a small one ties (0.1 of 3,000: 300 samples).
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--sampler-seeds", type=int, default=1, help="runs of tpe and tpe + pruning, each with another sampler seed")
    p.add_argument("--report", help="also write the table as a section of this markdown file (BENCHMARKS.md)")
    args = p.parse_args()
    logging.disable(logging.INFO)
    layers = list(open_store(args.store).layers)
    entries = space(layers)
    n = grid_size(entries)
    base = {"store": args.store, "epochs": args.epochs, "batch_size": 128, "warmup_epochs": 0.5, "val_fraction": args.val_fraction,
            "test_split": args.test_split, "seed": 0, "trials_per_job": args.trials_per_job, "space": entries}
    print(f"space: {n} configurations on {layers}; {args.epochs} epochs per trial", flush=True)
    with tempfile.TemporaryDirectory() as out:  # hold the store in RAM once, for every search
        plan_training(build(TrainConfig, {**{k: base[k] for k in ("store", "val_fraction", "test_split")}, "output": out,
                                          "adapters": [{"kind": "linear", "layers": "all"}]}))
    results = [run_search("grid", base, {"search": "grid"}, None, n)]
    target = results[0]["best"]["metrics"]["val_acc"]
    per_entry = -(-n // len(entries))
    results.append(run_search("random", base, {"search": "random", "num_trials": per_entry}, target, n))
    pruning = {"min_epochs": 1, "reduction_factor": 3}
    for k in range(args.sampler_seeds):
        suffix = f" (sampler seed +{k})" if k else ""
        with sampler_offset(k):
            results.append(run_search("tpe" + suffix, base, {"search": "tpe", "num_trials": n}, target, n))
            results.append(run_search("tpe + pruning" + suffix, base, {"search": "tpe", "num_trials": n, "pruning": pruning}, target, n))
    spread = seed_spread(base, results[0]["best"])
    threads = os.environ.get("OMP_NUM_THREADS")
    summary = {"machine": machine_info(), "command": " ".join(sys.argv), "env": f"OMP_NUM_THREADS={threads} " if threads else "",
               "configurations": n, "layers": layers,
               "epochs": args.epochs, "val_fraction": args.val_fraction, "target": target, "seed_test_acc": spread,
               "median_seed_test_acc": statistics.median(spread), "searches": results}
    text = markdown(summary)
    print("\n" + text)
    Path("bench_out").mkdir(exist_ok=True)
    Path("bench_out/bench_search.json").write_text(json.dumps(summary, indent=1, default=str))
    if args.report:
        replace_block(Path(args.report), *standalone_markers("benchmarks/bench_search.py"), text, append=True)


def markdown(s: dict) -> str:
    """The section for BENCHMARKS.md: what ran, on what, and one row per search."""
    m, spread = s["machine"], s["seed_test_acc"]
    grid_hit = s["searches"][0]["target_cpu_s"]
    lines = ["## Search speed: grid, random, TPE, TPE + pruning", "",
             f"`{s['env']}python {s['command']}` on {m['date']}, commit `{m['commit']}`, {m['cpu']}, {m['cores']} cores, "
             f"GPU: {m['gpu'] or 'none'}. {s['configurations']} configurations on {', '.join(s['layers'])}; {s['epochs']} epochs per "
             f"trial; validation {s['val_fraction']} of the training split. Time is the process's CPU time. Target: the grid's "
             f"best validation accuracy ({100 * s['target']:.2f}) minus {100 * TOLERANCE:.1f} points. The grid's best scores "
             f"{', '.join(f'{100 * a:.2f}' for a in spread)} on test over seeds 0-2.", "",
             "| search | trials | pruned | CPU s (wall s) | target reached at CPU s | sooner than grid | trials per CPU hour | "
             "exported best: val / test |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in s["searches"]:
        hit = r["target_cpu_s"]
        lines.append(f"| {r['search']} | {r['trials']} | {r['pruned']} | {r['cpu_s']:.0f} ({r['wall_s']:.0f}) | "
                     f"{'never' if hit is None else f'{hit:.0f}'} | {'-' if hit is None else f'{grid_hit / hit:.1f}x'} | "
                     f"{r['trials_per_cpu_hour']:,.0f} | {100 * r['best']['metrics']['val_acc']:.2f} / "
                     f"{100 * r['best']['metrics']['test_acc']:.2f} |")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
