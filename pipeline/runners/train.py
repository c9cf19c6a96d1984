"""Stage two: train many adapters from the feature cache in one pass per epoch, no backbone in the loop.

    python -m pipeline train configs/train_fashion_mnist_lite0.yaml [dotted.key=value ...]

setup (store, splits, members, fused groups) -> print the cost -> for each epoch, one
shuffled pass over the cache feeds every group -> validation per member (best state kept)
-> test, top-1 and top-k ensemble -> results table, plot, best adapters saved.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from cache import CacheReader, StoreError, open_store
from pipeline.adapters import FusedAdapters, StackedAdamW, build_adapter, per_member_cross_entropy, save_adapter
from pipeline.adapters.pooling import pool_tokens
from pipeline.adapters.standardize import Standardizer
from pipeline.config import TrainConfig, to_dict
from pipeline.config.train_config import promoted
from pipeline.devices import resolve_device
from pipeline.progress import quiet
from pipeline.training.convex_probe import fit_logistic_lbfgs, fold_standardization, standardize, standardize_fit
from pipeline.training.ensembles import calibrated_ensembles
from pipeline.training.evaluate import accuracy, split_logits
from pipeline.training.members import Member, expand, group_by_shape
from pipeline.training.output import staged_output
from pipeline.training.report import write_report
from pipeline.training.schedule import warmup_cosine
from pipeline.training.splits import Splits, count_samples, resolve_splits

log = logging.getLogger(__name__)


@dataclass
class Group:
    members: list[Member]
    fused: FusedAdapters
    optimizer: Optional[StackedAdamW]  # None: solved, not trained (lbfgs), or stopped by pruning
    seconds: float = 0.0
    best_val: torch.Tensor = None  # [N]
    best_params: dict = field(default_factory=dict)
    stopped: bool = False  # pruned or stopped early: no optimiser, validated no more, ends at its best state
    stale: torch.Tensor = None  # [N] epochs since each member last improved on validation

    def __call__(self, features):
        return self.fused(features)

    def eval(self):
        self.fused.eval()

    def train(self):
        self.fused.train()


@dataclass
class Run:
    """What setup decided: the store, the samples, the members in fused groups, the budget."""

    cfg: TrainConfig
    reader: CacheReader
    splits: Splits
    groups: list[Group]
    layers: list[str]  # every layer an adapter reads (validation, test)
    train_layers: list[str]  # those the trained (not solved) groups read each epoch
    epochs: int
    steps_per_epoch: int
    device: torch.device  # where the groups train (the held layers live there too)
    # Pruning: each member's best validation accuracy at each rung it reached, and the epoch
    # a stopped member stopped at.
    rung_acc: dict[str, dict[str, float]] = field(default_factory=dict)
    pruned_at: dict[str, int] = field(default_factory=dict)
    # Early stopping: the epoch after which a member stopped, its patience spent.
    stopped_early_at: dict[str, int] = field(default_factory=dict)


def run_train(cfg: TrainConfig, overwrite: bool = False, keep_held: bool = False, plot: bool = True) -> dict:
    """Train into cfg.output, which must be unused unless `overwrite` (then it is replaced
    once this run has finished); an interrupted run leaves it as it was. keep_held: leave the
    store's layers held in RAM for the next run in this process (a sweep worker's next job).
    plot: draw the accuracy-by-layer plot (a sweep job's results are plotted by the sweep).

    setup (store, splits, members, fused groups, the plan printed) -> train (one pass over
    the cache per epoch for every group, validation per member) -> finish (best states,
    test, ensembles, results, saved adapters)."""
    t_start = time.perf_counter()
    final = Path(cfg.output)
    with staged_output(final, overwrite) as out:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        run = plan_training(cfg)
        try:
            with (out / "metrics.jsonl").open("w") as metrics:  # closed however training ends
                epoch_seconds = _train_epochs(run, metrics)
            results = _finish(run, out, final, epoch_seconds, plot)
        finally:
            if not keep_held:
                run.reader.release()
    log.info("done in %.1f s; results in %s", time.perf_counter() - t_start, final)
    return results


def plan_training(cfg: TrainConfig) -> Run:
    """setup: the store (its layers held in RAM when they fit), the splits, the members in
    fused groups (solved ones solved), the plan logged."""
    device = resolve_device(cfg.device, "device")
    reader = open_store(cfg.store, storage_options=cfg.storage_options)
    if cfg.store_creation is not None and reader.creation != cfg.store_creation:
        raise StoreError(f"store {cfg.store!r} is not the store this sweep job was planned on (fingerprint#creation "
                         f"{cfg.store_creation}, found {reader.creation}): it was extracted again, or this host has another copy")
    splits = resolve_splits(cfg, reader)
    members = expand(cfg.adapters, reader.layers, cfg.seed, cfg.store)
    backbone_modules = _backbone_modules(reader) if any(m.kind == "vqt" for m in members) else None
    num_classes = len(reader.classes)
    shapes = group_by_shape(members)
    # One adapter per architecture says which layers its group reads: they are held in RAM
    # first, so that the standardizer's statistics and every epoch read them from there.
    reads = [build_adapter(ms[0].kind, reader.layers, num_classes, backbone_modules=backbone_modules, **ms[0].hparams).required_layers()
             for ms in shapes]
    layers = sorted({l for r in reads for l in r}, key=list(reader.layers).index)
    trained = [r for ms, r in zip(shapes, reads) if ms[0].solver == "adamw"]  # solved groups (lbfgs) are done at setup
    train_layers = [l for l in layers if any(l in r for r in trained)]
    _hold_in_memory(cfg, reader, splits, layers, train_layers, device)
    standardized = sorted({l for ms, r in zip(shapes, reads) if ms[0].standardize and ms[0].solver == "adamw" for l in r},
                          key=list(reader.layers).index)
    standardizer = _standardizer(reader, splits, standardized, cfg.views)
    groups = [_make_group(ms, reader, num_classes, backbone_modules, standardizer, splits, cfg.views, device) for ms in shapes]
    n_train = int(count_samples(reader, splits.train, splits.train_keep))
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch)) if trained else 0
    if epochs > cfg.epochs:
        log.info("min_steps=%d: %d epochs instead of %d (%d steps per epoch)", cfg.min_steps, epochs, cfg.epochs, steps_per_epoch)
    if trained and cfg.warmup_epochs >= epochs:
        log.warning("warmup_epochs=%g covers all %d epochs: the learning rate rises the whole run and never decays; "
                    "give fewer warm-up epochs", cfg.warmup_epochs, epochs)
    log.info(
        "plan: %d adapters in %d fused groups on %s, %d trainable parameters in all; %d train samples x %d epochs "
        "(%d steps); reading %d layers (%.1f MB per epoch); val %s (%d), test %s",
        len(members), len(groups), device, sum(g.fused.template.num_trainable_parameters() * len(g.members) for g in groups),
        n_train, epochs, steps_per_epoch * epochs, len(train_layers),
        n_train * sum(reader.layers[l].tokens * reader.layers[l].dim * 4 for l in train_layers) / 1e6,
        splits.val, int(count_samples(reader, splits.val, splits.val_keep)), splits.test,
    )
    if cfg.pruning and trained:
        log.info("pruning: at epochs %s, members outside the top 1/%d of the values reached there stop (%d earlier values given)",
                 cfg.pruning.rungs(epochs), cfg.pruning.reduction_factor, sum(len(v) for v in cfg.rung_history.values()))
    return Run(cfg, reader, splits, groups, layers, train_layers, epochs, steps_per_epoch, device)


def _hold_in_memory(cfg: TrainConfig, reader: CacheReader, splits: Splits, layers: list[str], train_layers: list[str],
                    device: torch.device) -> None:
    """The training layers (every view the epochs draw from), then the evaluated splits, held
    on the training device (RAM, or the GPU's memory) while they fit the budget; the rest
    streams (cache/resident.py)."""
    budget = None if cfg.memory_budget_mb is None else int(cfg.memory_budget_mb * 1e6)
    if budget == 0:
        reader.read_held = False  # stream, even what another run in this process holds
        return
    if train_layers:
        reader.hold(splits.train, train_layers, cfg.views, budget, device)
    for split in dict.fromkeys(s for s in (splits.val, splits.test) if s is not None):
        reader.hold(split, layers, "clean", budget, device)


def _train_epochs(run: Run, metrics) -> list[float]:
    """Every epoch: one shuffled pass over the cache feeds every trained group, then each
    member is validated (its best state kept). Returns each pass's wall time."""
    cfg, reader, splits = run.cfg, run.reader, run.splits
    total_steps = run.steps_per_epoch * run.epochs
    rungs = cfg.pruning.rungs(run.epochs) if cfg.pruning else []
    step, epoch_seconds = 0, []
    for epoch in range(run.epochs):
        groups = [g for g in run.groups if not g.stopped]
        losses = [torch.zeros(len(g.members), device=run.device) for g in groups]
        # Features in the default dtype, as the adapters' parameters are made (float64 in exactness tests).
        bar = tqdm(reader.batches(splits.train, run.train_layers, cfg.batch_size, seed=cfg.seed, epoch=epoch, keep=splits.train_keep,
                                  out=torch.get_default_dtype(), views=cfg.views),
                   total=run.steps_per_epoch, desc=f"epoch {epoch + 1}/{run.epochs}", unit="batch", dynamic_ncols=True,
                   disable=quiet())
        seen, t_epoch = 0, time.perf_counter()
        for batch in bar:
            factor = warmup_cosine(step, total_steps, int(cfg.warmup_epochs * run.steps_per_epoch))
            # No copy when the batch was gathered where the layers are held.
            features = {k: v.to(run.device, non_blocking=True) for k, v in batch.features.items()}
            labels = batch.labels.to(run.device, non_blocking=True)
            for gi, g in enumerate(groups):
                if g.optimizer is None:
                    continue
                t0 = time.perf_counter()
                loss = train_step(g, features, labels, factor)
                g.seconds += time.perf_counter() - t0
                losses[gi] += loss * len(labels)
                if step % cfg.log_every == 0:
                    metrics.write(json.dumps({"step": step, "epoch": epoch, "group": gi, "lr_factor": factor,
                                              "loss": dict(zip((m.id for m in g.members), loss.tolist()))}) + "\n")
            seen += len(batch.labels)
            step += 1
            bar.set_postfix(samples_per_s=f"{seen / (time.perf_counter() - t_epoch):.0f}", refresh=False)
        epoch_seconds.append(time.perf_counter() - t_epoch)
        _validate(groups, reader, splits, run.layers, cfg.batch_size, epoch, [(l / max(seen, 1)).cpu() for l in losses], metrics, run.device)
        # A rung first: every member training this epoch reports its value there and competes,
        # whether or not its patience ran out now.
        if epoch + 1 in rungs and not _prune(run, epoch + 1):
            break
        if cfg.early_stopping_patience and not _stop_early(run, epoch + 1):
            log.info("early stop after epoch %d: every member went %d epochs without improving", epoch + 1, cfg.early_stopping_patience)
            break
    return epoch_seconds


def _prune(run: Run, epoch: int) -> int:
    """At a rung: record each training member's best validation accuracy, and split the
    members ASHA does not promote off into stopped groups. Returns how many still train."""
    reduction = run.cfg.pruning.reduction_factor
    values = {m.id: float(v) for g in run.groups if g.optimizer is not None for m, v in zip(g.members, g.best_val)}
    for member_id, value in values.items():
        run.rung_acc.setdefault(member_id, {})[str(epoch)] = value
    competing = list(values.values()) + list(run.cfg.rung_history.get(str(epoch), ()))
    going_on = _split_off(run, lambda g: torch.tensor([not promoted(values[m.id], competing, reduction) for m in g.members]),
                          run.pruned_at, epoch)
    log.info("epoch %d (a rung): %d of %d training members go on (top 1/%d of %d values at this rung), %d stopped",
             epoch, going_on, len(values), reduction, len(competing), len(values) - going_on)
    return going_on


def _stop_early(run: Run, epoch: int) -> int:
    """Stop each member whose validation accuracy has not improved for `early_stopping_patience`
    epochs, on its own: it is split off its fused group, so when a member stops never depends
    on the members trained beside it (before, a group trained on while any member improved).
    Returns how many members still train."""
    return _split_off(run, lambda g: g.stale >= run.cfg.early_stopping_patience, run.stopped_early_at, epoch)


def _split_off(run: Run, stopping: Callable[[Group], torch.Tensor], stopped_at: dict[str, int], epoch: int) -> int:
    """Split the training members that `stopping(group)` marks ([N] bool) off their fused groups
    into stopped groups, recording `epoch` for each in `stopped_at`; the others train on as
    before. Solved groups and groups stopped already are left as they are. Returns how many
    members still train."""
    groups = []
    for g in run.groups:
        stop = stopping(g) if g.optimizer is not None else None
        if stop is None or not bool(stop.any()):
            groups.append(g)
            continue
        stopped_at.update({m.id: epoch for m, s in zip(g.members, stop.tolist()) if s})
        if not bool(stop.all()):
            groups.append(_subgroup(g, (~stop).nonzero().flatten(), stopped=False))
        groups.append(_subgroup(g, stop.nonzero().flatten(), stopped=True))
    run.groups = groups
    return sum(len(g.members) for g in groups if g.optimizer is not None)


def _subgroup(g: Group, index: torch.Tensor, stopped: bool) -> Group:
    """The members of `g` at `index`, as they are now: training on with their own optimiser
    state, or stopped, without one (the share of the group's training time they took so far
    goes with them)."""
    fused = g.fused.subset(index)
    return Group([g.members[i] for i in index.tolist()], fused, None if stopped else g.optimizer.subset(index, fused.parameters()),
                 seconds=g.seconds * len(index) / len(g.members), best_val=g.best_val[index].clone(), stale=g.stale[index].clone(),
                 best_params={n: b[index].clone() for n, b in g.best_params.items()}, stopped=stopped)


def train_step(g: Group, features: dict[str, torch.Tensor], labels: torch.Tensor, lr_factor: float) -> torch.Tensor:
    """One optimiser step of every member of a fused group on one batch; their losses [M]."""
    loss = per_member_cross_entropy(g(features), labels)
    g.optimizer.zero_grad()
    loss.sum().backward()
    g.optimizer.set_lr_factor(lr_factor)
    g.optimizer.step()
    return loss.detach()


def _validate(groups, reader, splits, layers, batch_size, epoch, train_losses, metrics, device) -> None:
    """Each training member's validation accuracy: its best state kept, its epochs without improving counted."""
    logits, labels = split_logits(groups, reader, splits.val, layers, batch_size, splits.val_keep, device)
    accs = accuracy(logits, labels)
    offset = 0
    for g, train_loss in zip(groups, train_losses):
        acc = accs[offset: offset + len(g.members)]
        offset += len(g.members)
        better = acc > g.best_val
        g.stale = torch.where(better, 0, g.stale + 1)
        if better.any():
            g.best_val = torch.where(better, acc, g.best_val)
            on = better.to(next(iter(g.best_params.values())).device)  # the mask where the parameters are
            for name, p in g.fused.params.items():
                g.best_params[name][on] = p.detach()[on]
        for m, a, l in zip(g.members, acc, train_loss):
            metrics.write(json.dumps({"epoch": epoch, "member": m.name, "member_id": m.id, "train_loss": float(l), "val_acc": float(a)}) + "\n")
    metrics.flush()
    best = max(float(g.best_val.max()) for g in groups)
    log.info("epoch %d: best validation accuracy so far %.4f", epoch + 1, best)


def _finish(run: Run, out: Path, final: Path, epoch_seconds: list[float], plot: bool) -> dict:
    cfg, groups, reader, splits, layers = run.cfg, run.groups, run.reader, run.splits, run.layers
    # Every member ends at its best validation epoch.
    with torch.no_grad():
        for g in groups:
            for name, p in g.fused.params.items():
                p.copy_(g.best_params[name])
    val_logits, val_labels = split_logits(groups, reader, splits.val, layers, cfg.batch_size, splits.val_keep, run.device)
    val_acc = accuracy(val_logits, val_labels)
    test_acc = None
    if splits.test:
        test_logits, test_labels = split_logits(groups, reader, splits.test, layers, cfg.batch_size, device=run.device)
        test_acc = accuracy(test_logits, test_labels)
    # Ensembles of temperature-calibrated members, chosen on validation (training/ensembles.py),
    # whose ranking of single members is the one reported, saved and called top-1, and which
    # tells the members that diverged (non-finite validation logits).
    ensembles = calibrated_ensembles(val_logits, val_labels, test_logits if test_acc is not None else None,
                                     test_labels if test_acc is not None else None, k=cfg.ensemble_top_k)
    backbone_params = reader.manifest.backbone_parameters
    rows, adapters = [], []
    for g in groups:
        trained = [a.cpu() for a in g.fused.unstack()]  # saved and returned on the CPU, wherever they trained
        for m, adapter in zip(g.members, trained):
            i = len(rows)
            params = adapter.num_trainable_parameters()
            rows.append({
                "adapter": m.name, "member_id": m.id, "config_id": m.config_id,
                "kind": m.kind, "layer": m.layer_label, "lr": m.lr, "weight_decay": m.weight_decay, "seed": m.seed,
                "params": params, "pct_backbone": 100.0 * params / backbone_params if backbone_params else None,
                "val_acc": float(val_acc[i]), "test_acc": float(test_acc[i]) if test_acc is not None else None,
                "train_s": g.seconds / len(g.members), "fused_with": len(g.members),
                "pruned_at": run.pruned_at.get(m.id), "rung_acc": run.rung_acc.get(m.id, {}),
                "stopped_early_at": run.stopped_early_at.get(m.id),
                "diverged": i in ensembles.diverged,
            })
            adapters.append(adapter)
    diverged = [r["adapter"] for r in rows if r["diverged"]]
    if diverged:
        log.warning("%d member(s) diverged (non-finite validation logits even at their best epoch; lower their lr or weight decay): "
                    "%s. Each is reported, never ranked above a finite member, saved or put in an ensemble", len(diverged), diverged)
    order = list(ensembles.ranked)

    def by_id(report) -> dict:  # members by id; their names beside them, for people
        return {**report.to_dict(), "members": [rows[i]["member_id"] for i in report.members],
                "adapters": [rows[i]["adapter"] for i in report.members]}

    best = rows[order[0]]
    summary = {
        # None when every member diverged: no adapter to name, save or predict with.
        "top1": None if best["diverged"] else {k: best[k] for k in ("adapter", "member_id", "val_acc", "test_acc")},
        "ranking": [rows[i]["member_id"] for i in order],  # by validation accuracy, then calibrated NLL, then order
        # Each member's temperature (fitted on validation; None: diverged): with logits.npz, the ensembles can be rebuilt.
        "temperatures": {r["member_id"]: None if r["diverged"] else t for r, t in zip(rows, ensembles.temperatures)},
        "ensemble": by_id(ensembles.top_k),  # the top k by validation, calibrated probabilities averaged
        "greedy": by_id(ensembles.greedy),  # Caruana's forward selection with replacement on validation
        "train_seconds_total": sum(g.seconds for g in groups),
        "epoch_seconds": epoch_seconds,  # wall time of each training pass (reading + all steps)
    }
    # Every member's logits, for ensembles across runs (the benchmark pools its methods' grids).
    test = {"test_logits": test_logits.float().numpy(), "test_labels": test_labels.numpy()} if test_acc is not None else {}
    np.savez(out / "logits.npz", members=np.array([r["adapter"] for r in rows]), member_ids=np.array([r["member_id"] for r in rows]),
             val_logits=val_logits.float().numpy(), val_labels=val_labels.numpy(), **test)
    saved = []
    for rank, i in enumerate([i for i in order if not rows[i]["diverged"]][: cfg.save_top]):
        name = f"{rank + 1:02d}_{_slug(rows[i]['adapter'])}"
        save_adapter(adapters[i], out / "adapters" / name, reader.fingerprint, class_names=reader.classes)
        saved.append(str(final / "adapters" / name))
    summary["saved"] = saved
    write_report(out, rows, summary, list(reader.layers) if plot else None)
    return {"rows": rows, "summary": summary}


def _standardizer(reader: CacheReader, splits: Splits, layers: list[str], views: str) -> Optional[Standardizer]:
    """The per-channel affine of the layers that standardised members read (lbfgs standardises
    its pooled features itself), from the statistics of the training samples only (a
    validation carve is left out), over the views the epochs read (cfg.views)."""
    if not layers:
        return None
    log.info("standardize: per-channel statistics of %d layer(s) over the training samples", len(layers))
    stats = reader.feature_stats(splits.train, layers, keep=splits.train_keep, views=views)
    return Standardizer.from_stats(stats, reader.layers)


def _make_group(members: list[Member], reader: CacheReader, num_classes: int, backbone_modules, standardizer: Optional[Standardizer],
                splits: Splits, views: str, device: torch.device) -> Group:
    if members[0].solver == "lbfgs":
        return _solved_group(members, reader, num_classes, splits, views, device)
    adapters = []
    for m in members:
        torch.manual_seed(m.seed)  # a member's init depends on its own seed only
        adapter = build_adapter(m.kind, reader.layers, num_classes, backbone_modules=backbone_modules, **m.hparams)
        if m.standardize:
            adapter.standardize_with(standardizer)
        adapters.append(adapter.to(device))  # initialised on the CPU: the same init on any device
    fused = FusedAdapters(adapters, seeds=[m.seed for m in members])
    optimizer = StackedAdamW(fused.parameters(), lr=[m.lr for m in members], weight_decay=[m.weight_decay for m in members])
    best_params = {name: p.detach().clone() for name, p in fused.params.items()}
    return Group(members, fused, optimizer, best_val=torch.full((len(members),), -1.0, dtype=torch.float64), best_params=best_params,
                 stale=torch.zeros(len(members), dtype=torch.long))


# Largest |gradient component| of the mean loss at which a solved probe stops: the objective is
# then within about gtol^2 / (2 l2) of its minimum (< 1e-8 for l2 >= 1e-4), while 1e-10 took
# 2,000 iterations on a 1280-channel layer for no change in any prediction.
LBFGS_GTOL = 1e-6


def _solved_group(members: list[Member], reader: CacheReader, num_classes: int, splits: Splits, views: str, device: torch.device) -> Group:
    """Linear probes solved exactly (convex_probe.py), one per L2 strength, largest first and
    each warm-started from the previous; weights folded onto raw pooled features."""
    t0 = time.perf_counter()
    adapters = [build_adapter(m.kind, reader.layers, num_classes, **m.hparams) for m in members]
    probe = adapters[0]
    pooled, labels = [], []
    # views "random": the augmented set whole, every view of every sample.
    views = "all" if views == "random" else "clean"
    for batch in reader.batches(splits.train, [probe.spec.name], 1024, shuffle=False, keep=splits.train_keep, views=views):
        # Views are held (or streamed) each on its own, so batches may come from RAM or the GPU.
        pooled.append(pool_tokens(batch.features[probe.spec.name], probe.spec, probe.hparams.pool).double().to(device))
        labels.append(batch.labels)
    mean, std = standardize_fit(torch.cat(pooled))
    x, y = standardize(torch.cat(pooled), mean, std), torch.cat(labels)
    start = None
    for i in sorted(range(len(members)), key=lambda i: -members[i].weight_decay):
        weight, bias, info = fit_logistic_lbfgs(x, y, num_classes, members[i].weight_decay, init=start, gtol=LBFGS_GTOL)
        start = (weight, bias)
        if not info.converged:
            log.warning("%s: L-BFGS stopped after %d iterations without converging (|grad|_max %.1e)", members[i].name, info.iterations, info.grad_max)
        weight, bias = fold_standardization(weight, bias, mean, std)
        with torch.no_grad():
            adapters[i].head.weight.copy_(weight)
            adapters[i].head.bias.copy_(bias)
    fused = FusedAdapters([a.to(device) for a in adapters])
    best_params = {name: p.detach().clone() for name, p in fused.params.items()}
    return Group(members, fused, None, seconds=time.perf_counter() - t0, best_val=torch.full((len(members),), -1.0, dtype=torch.float64),
                 best_params=best_params, stale=torch.zeros(len(members), dtype=torch.long))


def _backbone_modules(reader: CacheReader):
    from pipeline.training.frozen_backbone import rebuild_backbone

    return rebuild_backbone(reader.fingerprint, f"store {reader.path!r}").model


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=@" else "_" for c in name)[:80]
