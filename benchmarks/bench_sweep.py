"""Sweep throughput on an existing store: trials per hour with 1 vs 2 dask workers.

    python benchmarks/bench_sweep.py stores/fashion_mnist_lite0.zarr [--workers 0 1 2] [--epochs 1] [--trials-per-job 4] [--prune] [--seeds 1]

The sweep is a 16-trial grid: linear probes on blocks.6 and bn2 and InCA (dim 32, 2 or 4
heads) on blocks.6, each at 2 learning rates x 2 weight decays, so 4 fused groups of 4
trials; with 4 trials per job that is 4 jobs. For each worker count, the sweep's own local
cluster is started and its workers import the pipeline (the start-up a user waits for once
per sweep, timed apart), then the whole sweep runs from scratch on it. 0 workers = the jobs
in this process, no dask (torch's default thread count here).
--seeds N: every configuration once per seed 0..N-1 (16 N trials; a configuration's seeds
fuse). --prune: successive halving (min 1 epoch, reduction factor 3); a pruned trial counts
as a trial, as it would in a search.
Prints a markdown table; writes bench_out/bench_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import SweepConfig, build  # noqa: E402
from pipeline.dask_cluster import local_cluster  # noqa: E402
from pipeline.runners.sweep import run_sweep  # noqa: E402

SPACE = [
    {"kind": "linear", "layer": ["blocks.6", "bn2"], "lr": [1e-3, 3e-3], "weight_decay": [1e-4, 1e-3]},
    {"kind": "inca", "layer": ["blocks.6"], "hparams": {"num_heads": [2, 4], "dim": 32}, "lr": [1e-3, 3e-3], "weight_decay": [1e-4, 1e-3]},
]


def timed_sweep(store: str, workers: int, epochs: int, trials_per_job: int, prune: bool, seeds: int) -> dict:
    from distributed import Client

    with tempfile.TemporaryDirectory() as out:
        cfg = build(SweepConfig, {"store": store, "output": out, "epochs": epochs, "batch_size": 256, "warmup_epochs": 0,
                                  "test_split": "test", "trials_per_job": trials_per_job,
                                  "space": [{**entry, "seeds": list(range(seeds))} for entry in SPACE],
                                  **({"pruning": {"min_epochs": 1, "reduction_factor": 3}} if prune else {})})
        if workers == 0:
            startup, t0 = 0.0, time.perf_counter()
            result = run_sweep(cfg, workers=0)
        else:
            t0 = time.perf_counter()
            with local_cluster(workers) as cluster:
                with Client(cluster) as client:
                    client.run(__import__, "pipeline.sweeping.jobs")  # torch, timm, zarr: seconds per worker
                startup, t0 = time.perf_counter() - t0, time.perf_counter()
                result = run_sweep(cfg, scheduler=cluster.scheduler_address)
        wall = time.perf_counter() - t0
    return {"workers": workers, "trials": result["trials"], "jobs": result["jobs"], "startup_s": startup, "sweep_s": wall,
            "pruned": sum(r["metrics"]["pruned_at"] is not None for r in result["rows"]),
            "trials_per_hour": result["trials"] / wall * 3600, "train_s": sum(r["metrics"]["train_s"] for r in result["rows"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--trials-per-job", type=int, default=4)
    parser.add_argument("--prune", action="store_true")
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = [timed_sweep(args.store, w, args.epochs, args.trials_per_job, args.prune, args.seeds) for w in args.workers]
    base = results[0]["sweep_s"]
    pruned = f", {results[0]['pruned']} pruned" if args.prune else ""
    print(f"\nSweep of {results[0]['trials']} trials in {results[0]['jobs']} jobs, {args.epochs} epoch(s){pruned}, store {args.store}\n")
    print("| workers | cluster start-up s | sweep s | trials / hour | speed-up | adapter steps, all trials (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        label = "0 (in process)" if r["workers"] == 0 else str(r["workers"])
        print(f"| {label} | {r['startup_s']:.1f} | {r['sweep_s']:.1f} | {r['trials_per_hour']:.0f} | {base / r['sweep_s']:.2f}x | {r['train_s']:.1f} |")
    out = Path("bench_out")
    out.mkdir(exist_ok=True)
    (out / "bench_sweep.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
