"""Offline hyperparameter search over adapters, trained from the feature cache on dask.

    python -m pipeline sweep configs/sweep_fashion_mnist_lite0.yaml [key=value ...] [--workers N | --scheduler tcp://HOST:PORT]

config -> trials (grid or seeded random samples; see pipeline.config.sweep_config) ->
drop the trials already in OUTPUT/trials.jsonl -> pack the rest into fused jobs (one
`train` run each, one cache pass per epoch for all its trials) -> log the cost -> run the
jobs as dask tasks (a local cluster of worker processes, an existing cluster, or, with
--workers 0, here in this process) -> as each job returns, append its trials' rows to
trials.jsonl -> best configuration per kind (by validation accuracy) as a train config,
results table, plots.

Only this driver writes trials.jsonl, and only after a job has returned: a worker killed in
the middle of a job leaves no row, and dask runs the job again (on worker death it
reschedules the task; `retries` covers exceptions raised by a job).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Optional

from cache import CacheReader, FeatureCacheError, open_store
from pipeline.adapters import adapter_class, build_adapter
from pipeline.config import ConfigError, to_dict
from pipeline.config.sweep_config import SweepConfig
from pipeline.dask_cluster import dask_client, require_dask, workers_per_host
from pipeline.sweeping.export import best_per_kind, results_markdown, write_best_train_config
from pipeline.sweeping.jobs import Job, plan_jobs, run_job, trial_member, trial_rows
from pipeline.sweeping.plots import plot_scores
from pipeline.sweeping.results_log import TrialsLog
from pipeline.sweeping.space import Trial, make_trials
from pipeline.training.members import check_layers

log = logging.getLogger(__name__)


class SweepJobsFailed(FeatureCacheError):
    """Some jobs failed after their retries; finished trials are kept in trials.jsonl."""


JOB_RETRIES = 2


def run_sweep(cfg: SweepConfig, scheduler: Optional[str] = None, workers: Optional[int] = None) -> dict:
    """scheduler: address of a running dask scheduler; otherwise a LocalCluster of `workers`
    processes (None: one per core), or no dask at all when workers == 0."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 0:
        raise ConfigError(f"workers: got {workers}, expected >= 0 (0: run the jobs in this process)")
    if scheduler or workers:
        require_dask("a sweep on dask (--workers 0 runs its jobs in this process without it)")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    reader = open_store(cfg.store, storage_options=cfg.storage_options)
    _check_layers(cfg, reader)
    fingerprint = hashlib.sha256(json.dumps(reader.fingerprint.to_json(), sort_keys=True, default=str).encode()).hexdigest()
    trials = make_trials(cfg, {"store": fingerprint, "train": cfg.train_settings()})
    _check_architectures(trials, reader)
    results = TrialsLog(out / "trials.jsonl")
    todo = [t for t in trials if t.id not in results.rows]
    jobs = plan_jobs(todo, cfg, reader.layers)
    if scheduler:
        where = f"on the dask cluster at {scheduler}"
    else:
        where = f"on {workers} local dask worker processes" if workers else "in this process"
    log.info("plan: %d trials (%s search), %d already in %s; %d to run in %d fused jobs of <= %d trials, %s; "
             "each job reads the cache once per epoch for %d epochs", len(trials), cfg.search, len(trials) - len(todo),
             results.path, len(todo), len(jobs), cfg.trials_per_job, where, cfg.epochs)

    t0, failed = time.perf_counter(), []
    for done, (job, outcome) in enumerate(_execute(jobs, scheduler, workers), 1):
        if isinstance(outcome, Exception):
            log.error("job %s (%d trials) failed: %r", job.id, len(job.trials), outcome)
            failed.append(job.id)
            continue
        rows = trial_rows(job, outcome)
        for row in rows:
            results.append(row)
        log.info("job %d/%d (%s) done after %.0f s: %d trials, best val acc %.4f", done, len(jobs), job.id,
                 time.perf_counter() - t0, len(rows), max(r["metrics"]["val_acc"] for r in rows))

    rows = [results.rows[t.id] for t in trials if t.id in results.rows]
    best = _export(cfg, rows, out) if rows else {}
    if failed:
        raise SweepJobsFailed(f"{len(failed)} of {len(jobs)} jobs failed ({', '.join(failed)}); see the log. "
                           f"Rerunning the sweep runs only their trials.")
    return {"trials": len(trials), "already_done": len(trials) - len(todo), "jobs": len(jobs), "rows": rows, "best": best}


def _check_layers(cfg: SweepConfig, reader: CacheReader) -> None:
    """Every layer of every space entry that the store lacks, in one error (as `train` does)."""
    named = []
    for i, entry in enumerate(cfg.space):
        named += [(f"space[{i}].layer", entry.layer or ()), (f"space[{i}].layers", [l for s in entry.layers or () for l in s])]
    check_layers(named, reader.layers, cfg.store)


def _check_architectures(trials: list[Trial], reader: CacheReader) -> None:
    """Build each distinct architecture once here, so that an impossible combination (say a
    width that the number of heads does not divide) stops the sweep before any job runs."""
    problems, seen = [], set()
    for t in trials:
        if adapter_class(t.kind).requires_backbone_modules:
            continue
        try:
            shape = trial_member(t, reader.layers).shape_key
            if shape in seen:
                continue
            seen.add(shape)
            build_adapter(t.kind, reader.layers, len(reader.classes), **t.hparams)
        except (ConfigError, ValueError) as e:  # AdapterConfigError, or torch refusing the shapes
            problems.append(f"{t.kind} {json.dumps(t.hparams)}: {e}")
    if problems:
        raise ConfigError(problems, "the search space (these combinations cannot be built)")


def _execute(jobs: list[Job], scheduler: Optional[str], workers: int) -> Iterator[tuple[Job, object]]:
    """Yield (job, rows or the exception it ended with) as jobs finish."""
    if not jobs:
        return
    if not scheduler and workers == 0:
        for job in jobs:
            try:
                yield job, run_job(job.config, None)
            except Exception as e:  # as on dask: report the job, go on with the others
                yield job, e
        return
    from distributed import as_completed

    with dask_client(scheduler, workers) as client:
        per_host = workers_per_host(client)
        log.info("dask: %d workers on %d host(s); dashboard %s", sum(per_host.values()), len(per_host), client.dashboard_link)
        futures = {client.submit(run_job, job.config, per_host, key=f"sweep-job-{job.id}", pure=False, retries=JOB_RETRIES): job
                   for job in jobs}
        for future in as_completed(futures):
            try:
                yield futures[future], future.result()
            except Exception as e:
                yield futures[future], e


def _export(cfg: SweepConfig, rows: list[dict], out: Path) -> dict:
    best = best_per_kind(rows)
    write_best_train_config(cfg, best, out / "best_train_config.yaml")
    (out / "results.md").write_text(results_markdown(rows, best))
    plots = plot_scores(rows, out)
    log.info("%d trials reported in %s; best per kind: %s; %d plots; best train config %s", len(rows), out / "results.md",
             ", ".join(f"{k} {r['metrics']['val_acc']:.4f}" for k, r in best.items()), len(plots), out / "best_train_config.yaml")
    return best
