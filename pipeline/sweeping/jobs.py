"""Trials -> fused jobs, a job -> a train config, and the task a dask worker runs.

Trials with the same kind and architecture (differing in lr, weight decay or seed) form one
fused group, as in `train`. Groups are packed into jobs of at most `trials_per_job` trials,
groups reading the same layers next to each other, so one job's single cache pass per epoch
serves many trials. A group larger than the cap is cut into pieces of the cap.

A trial's result does not depend on which other trials share its job: the batches depend on
the seed and epoch only (not on which layers are read), each member's init on its own seed,
and the schedule is per step. Early stopping is not offered because in `train` it stops a
whole job at once, which would couple trials. Pruning (`pruning:`, successive halving) does
couple them, by design: a trial stops at a rung when its validation accuracy is not in the
top 1/reduction_factor of its job mates' and earlier trials' there (`rung_history`, which
the driver fills from trials.jsonl as it hands each job out).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from cache import LayerSpec, is_url
from pipeline.code_version import require_drivers_code
from pipeline.config import TrainConfig, build
from pipeline.config.sweep_config import SweepConfig
from pipeline.config.train_config import AdapterEntry
from pipeline.dask_cluster import share_cores
from pipeline.runners.train import run_train
from pipeline.sweeping.space import Trial
from pipeline.training.members import Member, expand


@dataclass(frozen=True)
class Job:
    id: str
    trials: tuple[Trial, ...]
    members: tuple[str, ...]  # the member id `train` gives each trial (its row's "member_id")
    config: TrainConfig


def adapter_entry(trial: Trial) -> dict:
    """The train config's `adapters` entry that expands to exactly this trial's member."""
    hparams = {k: v for k, v in trial.hparams.items() if k not in ("layer", "layers")}
    entry = {"kind": trial.kind, "hparams": hparams, "lr": trial.lr, "weight_decay": trial.weight_decay, "seeds": [trial.seed]}
    if "layer" in trial.hparams:
        entry["layers"] = [trial.hparams["layer"]]
    elif "layers" in trial.hparams:
        entry["layers"] = list(trial.hparams["layers"])
    return entry


def trial_member(trial: Trial, layers: Mapping[str, LayerSpec]) -> Member:
    """The member `train` makes of this trial, asked of `members.expand` itself, so its id,
    shape key and name always match the row `train` writes."""
    entry = build(AdapterEntry, adapter_entry(trial), source=f"trial {trial.id}")
    (member,) = expand((entry,), layers, trial.seed)
    return member


def plan_jobs(trials: list[Trial], cfg: SweepConfig, layers: Mapping[str, LayerSpec]) -> list[Job]:
    groups: dict[str, list[tuple[Trial, Member]]] = {}
    for t in trials:
        m = trial_member(t, layers)
        groups.setdefault(m.shape_key, []).append((t, m))
    pieces = [g[i: i + cfg.trials_per_job] for g in groups.values() for i in range(0, len(g), cfg.trials_per_job)]
    pieces.sort(key=lambda p: _layers_read(p[0][0]))  # stable: ties keep the trials' order
    jobs: list[list[tuple[Trial, Member]]] = []
    for piece in pieces:
        # `train` refuses the same member twice, so trials that make one member (one id) go
        # to different jobs.
        current = jobs[-1] if jobs else []
        fits = len(current) + len(piece) <= cfg.trials_per_job and not {m.id for _, m in current} & {m.id for _, m in piece}
        if current and fits:
            current.extend(piece)
        else:
            jobs.append(list(piece))
    return [_job(cfg, [t for t, _ in j], [m.id for _, m in j]) for j in jobs]


def _layers_read(trial: Trial) -> str:
    return json.dumps([trial.hparams.get("layer"), trial.hparams.get("layers")])


def _job(cfg: SweepConfig, trials: list[Trial], member_ids: list[str]) -> Job:
    job_id = hashlib.sha256(",".join(sorted(t.id for t in trials)).encode()).hexdigest()[:12]
    # Absolute paths: a worker's working directory need not be the driver's. A store URL
    # (s3://...) and its storage options travel as they are; each worker opens the store itself.
    store = cfg.store if is_url(cfg.store) else str(Path(cfg.store).resolve())
    data = {**cfg.train_settings(), "store": store, "storage_options": cfg.storage_options, "save_top": cfg.save_top,
            "memory_budget_mb": cfg.memory_budget_mb, "device": cfg.device, "output": str((Path(cfg.output) / "jobs" / job_id).resolve()),
            "adapters": [adapter_entry(t) for t in trials]}
    return Job(job_id, tuple(trials), tuple(member_ids), build(TrainConfig, data, source=f"job {job_id}"))


# What decides a trial's result besides its config, store and settings: this code and all it imports.
JOB_MODULES = ("pipeline.sweeping.jobs",)


def run_job(cfg: TrainConfig, workers_per_host: Optional[dict[str, int]], code: Optional[str] = None) -> list[dict]:
    """The dask task: train one job's members together and return `train`'s rows.

    workers_per_host: on dask, how torch threads are shared (see dask_cluster.share_cores);
    None in-process. code: the driver's code_version(JOB_MODULES); a worker running other
    code is refused (its rows would sit beside the driver's in one ranking).
    """
    require_drivers_code(code, JOB_MODULES)
    share_cores(workers_per_host)
    # The job's own folder: a retried job replaces it. The store stays held in RAM for the
    # worker's next job on it (keyed by the store's identity: cache/resident.py). The sweep
    # plots every trial's scores; a plot per job costs about what training a linear probe does.
    return run_train(cfg, overwrite=True, keep_held=True, plot=False)["rows"]


def rung_history(rows) -> dict[str, tuple[float, ...]]:
    """The validation accuracies the finished trials reached at each rung epoch."""
    out: dict[str, list[float]] = {}
    for row in rows:
        for epoch, value in row["metrics"].get("rung_acc", {}).items():
            out.setdefault(epoch, []).append(value)
    return {epoch: tuple(values) for epoch, values in out.items()}


def trial_rows(job: Job, rows: list[dict]) -> list[dict]:
    """Match `train`'s rows to the job's trials by member id; one row per trial (with the
    member's name, for people)."""
    by_id = {r["member_id"]: r for r in rows}
    missing = [i for i in job.members if i not in by_id]
    if missing or len(rows) != len(job.trials):
        raise RuntimeError(f"job {job.id}: expected rows for members {list(job.members)}, got {sorted(by_id)}")
    out = []
    for trial, member_id in zip(job.trials, job.members):
        r = by_id[member_id]
        out.append({"trial": trial.id, "config": trial.config(), "member": r["adapter"], "member_id": member_id, "job": job.id,
                    "metrics": {k: r[k] for k in ("val_acc", "test_acc", "params", "train_s", "pruned_at", "rung_acc", "stopped_early_at", "diverged")}})
    return out
