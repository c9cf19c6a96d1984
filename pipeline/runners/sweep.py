"""Offline hyperparameter search over adapters, trained from the feature cache on dask.

    python -m pipeline sweep configs/sweep_fashion_mnist_lite0.yaml [key=value ...] [--workers N | --scheduler tcp://HOST:PORT]

config -> trials (grid or seeded random samples; see pipeline.config.sweep_config; or, for
`search: tpe`, batches asked of Optuna's TPE and told their results: pipeline.sweeping.tpe) ->
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

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

from cache import CacheReader, FeatureCacheError, cannot_write, open_store
from cache.lease import StoreLease
from cache.location import StoreLocation
from pipeline.adapters import adapter_class, build_adapter
from pipeline.code_version import code_version
from pipeline.config import ConfigError, TrainConfig, to_dict
from pipeline.config.sweep_config import SweepConfig
from pipeline.dask_cluster import dask_client, require_dask, workers_per_host
from pipeline.devices import resolve_device, usable_cores
from pipeline.sweeping.export import best_per_kind, results_markdown, write_best_train_config
from pipeline.sweeping.jobs import JOB_MODULES, Job, plan_jobs, run_job, rung_history, trial_member, trial_rows
from pipeline.sweeping.plots import plot_scores
from pipeline.sweeping.results_log import TrialsLog
from pipeline.sweeping.space import Trial, make_trials
from pipeline.sweeping.tpe import TpeSearch
from pipeline.training.members import check_layers
from pipeline.training.output import SWEEP_FILE, check_sweep_output
from pipeline.training.splits import resolve_splits

log = logging.getLogger(__name__)


class SweepJobsFailed(FeatureCacheError):
    """Some jobs failed after their retries; finished trials are kept in trials.jsonl."""


JOB_RETRIES = 2


def run_sweep(cfg: SweepConfig, scheduler: Optional[str] = None, workers: Optional[int] = None) -> dict:
    """scheduler: address of a running dask scheduler; otherwise a LocalCluster of `workers`
    processes (None: one per core, or one when the jobs train on a GPU: each worker would hold
    its own copy of the store in the GPU's memory), or no dask at all when workers == 0."""
    if workers is None:
        workers = 1 if resolve_device(cfg.device, "device").type == "cuda" else usable_cores()
    if workers < 0:
        raise ConfigError(f"workers: got {workers}, expected >= 0 (0: run the jobs in this process)")
    if scheduler or workers:
        require_dask("a sweep on dask (--workers 0 runs its jobs in this process without it)")
    out = Path(cfg.output)
    # One driver per output folder, from before it reads or writes anything there: two would
    # append to one trials.jsonl and study journal.
    lease = StoreLease(StoreLocation(str(out)), what="sweep output folder")
    writes = dict(what=f"sweep output {str(out)!r}", kept="the trials finished so far are kept in trials.jsonl",
                  rerun="rerun the same command to go on")
    check_sweep_output(out)
    with cannot_write(**writes):
        out.mkdir(parents=True, exist_ok=True)
    with cannot_write(**writes, under=(out, lease.local_path)), lease:  # a refused read elsewhere is not this write's
        return _sweep(cfg, out, scheduler, workers)


def _sweep(cfg: SweepConfig, out: Path, scheduler: Optional[str], workers: int) -> dict:
    (out / SWEEP_FILE).write_text(json.dumps(to_dict(cfg), indent=2))
    reader = open_store(cfg.store, storage_options=cfg.storage_options)
    _check_layers(cfg, reader)
    resolve_splits(cfg, reader)  # a split the store lacks failed every job, three tries each, and a rerun again
    fingerprint = hashlib.sha256(json.dumps(reader.fingerprint.to_json(), sort_keys=True, default=str).encode()).hexdigest()
    # The code too: a rerun after an upgrade trains again, rather than ranking two versions' rows together.
    context = {"store": fingerprint, "train": cfg.train_settings(), "code": code_version(JOB_MODULES)}
    results = TrialsLog(out / "trials.jsonl")
    if scheduler:
        where = f"on the dask cluster at {scheduler}"
    else:
        where = f"on {workers} local dask worker processes" if workers else "in this process"

    t0 = time.perf_counter()
    with _executor(scheduler, workers) as executor:
        if cfg.search == "tpe":
            ids, failed, jobs, already = _run_tpe(cfg, context, reader, results, executor, where, t0)
        else:
            trials = make_trials(cfg, context)
            _check_architectures(trials, reader)
            todo = [t for t in trials if t.id not in results.rows]
            planned = plan_jobs(todo, cfg, reader.layers)
            log.info("plan: %d trials (%s search), %d already in %s; %d to run in %d fused jobs of <= %d trials, %s; "
                     "each job reads the cache once per epoch for %d epochs", len(trials), cfg.search, len(trials) - len(todo),
                     results.path, len(todo), len(planned), cfg.trials_per_job, where, cfg.epochs)
            ours = {t.id for t in trials}
            prepare = _with_history(cfg, reader, lambda: [r for i, r in results.rows.items() if i in ours])
            failed = [job.id for job, rows in _run_jobs(planned, executor, prepare, results, t0) if rows is None]
            ids, jobs, already = [t.id for t in trials], len(planned), len(trials) - len(todo)

    rows = [results.rows[i] for i in dict.fromkeys(ids) if i in results.rows]
    best = _export(cfg, rows, out)
    if failed:
        raise SweepJobsFailed(f"{len(failed)} of {jobs} jobs failed ({', '.join(failed)}); see the log. "
                              f"Rerunning the sweep runs only their trials.")
    return {"trials": len(dict.fromkeys(ids)), "already_done": already, "jobs": jobs, "rows": rows, "best": best}


def _with_history(cfg: SweepConfig, reader: CacheReader, rows: Callable[[], list[dict]]) -> Callable[[Job], TrainConfig]:
    """A job's train config as it is handed out: for the store the driver opened (a job
    refuses another one at the path), and with pruning, the rung values the sweep's finished
    trials reached so far (`rows()`), which its members are ranked against."""
    if not cfg.pruning:
        return lambda job: dataclasses.replace(job.config, store_creation=reader.creation)
    return lambda job: dataclasses.replace(job.config, store_creation=reader.creation, rung_history=rung_history(rows()))


def _run_jobs(jobs: list[Job], executor, prepare: Callable[[Job], TrainConfig], results: TrialsLog,
              t0: float) -> Iterator[tuple[Job, Optional[list[dict]]]]:
    """Run the jobs; as each returns, append its trials' rows to trials.jsonl and yield
    (job, its rows), or (job, None) for a job that failed after its retries."""
    for done, (job, outcome) in enumerate(executor(jobs, prepare), 1):
        if isinstance(outcome, Exception):
            log.error("job %s (%d trials) failed: %r", job.id, len(job.trials), outcome)
            yield job, None
            continue
        rows = trial_rows(job, outcome)
        for row in rows:
            results.append(row)
        log.info("job %d/%d (%s) done after %.0f s: %d trials, best val acc %.4f", done, len(jobs), job.id,
                 time.perf_counter() - t0, len(rows), max(r["metrics"]["val_acc"] for r in rows))
        yield job, rows


def _run_tpe(cfg: SweepConfig, context: dict, reader: CacheReader, results: TrialsLog, executor, where: str,
             t0: float) -> tuple[list[str], list[str], int, int]:
    """Ask, train and tell batches until num_trials are told; (trial ids told, failed job ids,
    jobs run, trials told before this run)."""
    search = TpeSearch(cfg, context, Path(cfg.output))
    search.recover(results.rows)
    failed: list[str] = []
    jobs_run, already = 0, search.finished()
    if already >= cfg.num_trials:
        log.info("plan: %d trials (tpe search, study %s in %s), all told already", cfg.num_trials, search.study.study_name, search.path)
        return search.finished_ids(), failed, jobs_run, already
    batch = cfg.trials_per_job * executor.slots
    log.info("plan: %d trials (tpe search, study %s in %s), %d already told; batches of %d (%d per job, %d worker slot(s)) %s; "
             "each job reads the cache once per epoch for %d epochs", cfg.num_trials, search.study.study_name, search.path,
             already, batch, cfg.trials_per_job, executor.slots, where, cfg.epochs)

    def sweep_rows() -> list[dict]:  # the rows of this study's trials: the rung history pruning ranks against
        known = search.known_ids()
        return [r for i, r in results.rows.items() if i in known]

    prepare = _with_history(cfg, reader, sweep_rows)
    while (left := cfg.num_trials - search.finished()) > 0:
        asked = search.ask(min(batch, left))
        waiting: dict[str, list[int]] = {}  # trial id -> the proposals it answers
        for number, trial in asked:
            if trial.id in results.rows:  # a configuration trained before: its row is its value
                search.tell(number, results.rows[trial.id])
            else:
                waiting.setdefault(trial.id, []).append(number)
        fresh = list({t.id: t for _, t in asked if t.id in waiting}.values())
        _check_architectures(fresh, reader)
        jobs = plan_jobs(fresh, cfg, reader.layers)
        jobs_run += len(jobs)
        for job, rows in _run_jobs(jobs, executor, prepare, results, t0):
            for trial in job.trials:
                for number in waiting.pop(trial.id, []):
                    search.tell(number, results.rows.get(trial.id) if rows is not None else None)
            if rows is None:
                failed.append(job.id)
        if failed:
            break  # as for grid and random: report, keep what finished; a rerun asks again
        log.info("tpe: %d of %d trials told; best val acc so far %.4f", search.finished(), cfg.num_trials, search.best_value())
    return search.finished_ids(), failed, jobs_run, already


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


class _Executor:
    """Runs jobs in this process, or on one dask client kept for the whole sweep and started
    only when a job (or `slots`) first needs it, so a sweep with nothing left to run starts
    no cluster. `slots` is how many jobs run at once (TPE asks that many jobs' worth of
    trials per batch)."""

    def __init__(self, scheduler: Optional[str], workers: int, stack: contextlib.ExitStack):
        self.scheduler, self.workers, self.stack = scheduler, workers, stack
        self.in_process = not scheduler and workers == 0
        self.client, self.per_host = None, None
        # In task keys: a scheduler keeps the first task of a key and drops a later one's
        # function, so another driver's job of the same id would run in this one's place.
        self.run = uuid.uuid4().hex[:8]

    def _start(self) -> None:
        if self.client is None:
            self.client = self.stack.enter_context(dask_client(self.scheduler, self.workers))
            self.per_host = workers_per_host(self.client)
            log.info("dask: %d workers on %d host(s); dashboard %s", sum(self.per_host.values()), len(self.per_host),
                     self.client.dashboard_link)

    @property
    def slots(self) -> int:
        if self.in_process:
            return 1
        self._start()
        return sum(self.per_host.values())

    def __call__(self, jobs: list[Job], prepare: Callable[[Job], TrainConfig]) -> Iterator[tuple[Job, object]]:
        """Yield (job, rows or the exception it ended with) as jobs finish. Each job's config
        is `prepare(job)` when it is handed out, after the rows of the jobs that finished
        before it were taken in; on dask, 2 jobs per worker are out at a time."""
        if not jobs:
            return
        if self.in_process:
            for job in jobs:
                try:
                    yield job, run_job(prepare(job), None)
                except Exception as e:  # as on dask: report the job, go on with the others
                    yield job, e
            return
        from distributed import as_completed

        self._start()
        waiting, futures = iter(jobs), {}
        code = code_version(JOB_MODULES)  # each worker checks that it runs this code

        def submit(job: Job):
            future = self.client.submit(run_job, prepare(job), self.per_host, code, key=f"sweep-job-{self.run}-{job.id}", pure=False, retries=JOB_RETRIES)
            futures[future] = job
            return future

        finished = as_completed([submit(job) for job in itertools.islice(waiting, 2 * self.slots)])
        for future in finished:
            try:
                yield futures[future], future.result()
            except Exception as e:
                yield futures[future], e
            following = next(waiting, None)
            if following is not None:
                finished.add(submit(following))


@contextlib.contextmanager
def _executor(scheduler: Optional[str], workers: int) -> Iterator[_Executor]:
    with contextlib.ExitStack() as stack:  # closes the dask client, if one was started
        yield _Executor(scheduler, workers, stack)


def _export(cfg: SweepConfig, rows: list[dict], out: Path) -> dict:
    # What an earlier run in this folder exported goes first: a rerun over another space (or
    # one whose every trial was pruned) must not leave the last search's best config or plots.
    for stale in [out / "best_train_config.yaml", out / "results.md", *out.glob("score_vs_*.png")]:
        stale.unlink(missing_ok=True)
    if not rows:
        return {}
    best = best_per_kind(rows)
    for kind in sorted({r["config"]["kind"] for r in rows} - set(best)):  # pruning ranks across kinds, and trials diverge
        ends = {"pruned" if r["metrics"].get("pruned_at") is not None else "diverged" for r in rows if r["config"]["kind"] == kind}
        why = " or ".join(f"{'pruning stopped' if e == 'pruned' else 'non-finite outputs ended'}" for e in sorted(ends, reverse=True))
        log.warning("no %s trial trained to the end with finite outputs (%s every one); it is not in the best train config", kind, why)
    if not best:
        (out / "results.md").write_text(results_markdown(rows, best))
        log.warning("no trial trained to the end: no best train config written; see %s", out / "results.md")
        return best
    write_best_train_config(cfg, best, out / "best_train_config.yaml")
    (out / "results.md").write_text(results_markdown(rows, best))
    plots = plot_scores(rows, out)
    log.info("%d trials reported in %s; best per kind: %s; %d plots; best train config %s", len(rows), out / "results.md",
             ", ".join(f"{k} {r['metrics']['val_acc']:.4f}" for k, r in best.items()), len(plots), out / "best_train_config.yaml")
    return best
