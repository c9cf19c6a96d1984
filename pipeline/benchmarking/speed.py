"""Speed and scale, measured side by side in one run on one case's store.

1. extract (store writes on a background thread) vs a bare loop of the same DataLoader and
   forward over the same images, storing nothing; runs alternate (bare, extract, bare, ...)
   so drift on a shared machine hits both, and the median of the per-round ratios is kept;
2. the cache reader (shuffled multi-layer mini-batches) vs plain zarr reading the same
   chunks in the same order vs the raw bytes of the shard files (all from the OS page
   cache, as training reads after its first epoch);
3. one epoch of 1 InCA adapter vs N fused InCA adapters (a learning-rate grid) vs mixed
   adapters (linear + InCA on every layer) in one pass; and, for 1 and for N fused adapters,
   one epoch with the store held in RAM vs streamed vs the floor (the same steps over the
   same batches already decoded to float32 in a list), in alternating rounds;
4. one epoch from the cache vs the same adapter with the backbone in the loop (decode +
   preprocess + frozen forward every step), per sample; and a sweep of K configurations:
   extract once + K cached trainings vs K online trainings, from the measured rates.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cache import open_store, resident
from pipeline.adapters.base import last_layer_name, layers_in_backbone_order
from pipeline.config import ExtractConfig, TrainConfig, build
from pipeline.devices import resolve_device
from pipeline.runners.extract import forward_batch, open_loader, plan_extraction, prepare_model, run_extract


def measure_speed(cfg: ExtractConfig, store: str, settings: dict, epochs: int, batch_size: int) -> dict:
    sample_cfg = replace(cfg, data=replace(cfg.data, splits=(cfg.data.splits[0],), limit=settings["images"]))
    out = {"extract": extract_vs_bare(sample_cfg, settings["rounds"]), "read": read_rates(store, batch_size)}
    reader = open_store(store)
    device = resolve_device(cfg.runtime.device, "runtime.device").type  # every measurement below runs where extraction runs
    layer = settings["layer"] or last_layer_name(reader.layers)
    inca = {"kind": "inca", "layers": [layer], "hparams": {"num_heads": 4, "dim": 64, "num_queries": 2}}
    n = settings["fused"]
    one = cached_epoch(store, [{**inca, "lr": 1e-3}], batch_size, device)
    fused = cached_epoch(store, [{**inca, "lr": [float(x) for x in np.geomspace(1e-4, 1e-2, n)]}], batch_size, device)
    layers = layers_in_backbone_order(reader.layers)
    mixed = cached_epoch(store, [{"kind": "linear", "layers": layers, "lr": [1e-3, 3e-3]}, {**inca, "layers": layers, "lr": [1e-3, 3e-3]}], batch_size, device)
    out["held"] = [held_vs_floor(store, {**inca, "lr": lrs}, batch_size, settings["rounds"], device)
                   for lrs in ([1e-3], [float(x) for x in np.geomspace(1e-4, 1e-2, n)])]
    online_s, online_n = online_epoch(sample_cfg, store, layer, batch_size)
    n_train = reader.num_samples(reader.splits[0])
    cached_per_sample, online_per_sample = one["seconds"] / one["samples"], online_s / online_n
    extract_s = n_train / out["extract"]["extract_img_s"]
    k = settings["sweep_configs"]
    out["train"] = {
        "layer": layer, "train_samples": one["samples"], "one_epoch_s": one["seconds"], "fused_n": n,
        "fused_epoch_s": fused["seconds"], "mixed_n": 4 * len(layers), "mixed_epoch_s": mixed["seconds"],
        "online_samples": online_n, "online_s": online_s, "online_over_cached_per_sample": online_per_sample / cached_per_sample,
        "sweep_k": k, "sweep_epochs": epochs, "extract_once_s": extract_s,
        "sweep_cached_s": extract_s + k * epochs * cached_per_sample * n_train,
        "sweep_online_s": k * epochs * online_per_sample * n_train,
    }
    return out


def extract_vs_bare(cfg: ExtractConfig, rounds: int) -> dict:
    plan = plan_extraction(cfg)
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        bare, ext = [], []
        for _ in range(rounds):
            bare.append(bare_forward(plan))
            shutil.rmtree(work / "store.zarr", ignore_errors=True)
            done = run_extract(replace(cfg, store=replace(cfg.store, path=str(work / "store.zarr"))))
            ext.append(done.streamed / done.stream_seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [e / b for e, b in zip(ext, bare)]
    return {"images": sum(len(s) for s in plan.sources.values()), "image_size": list(plan.backbone.image_size),
            "bare_img_s": max(bare), "extract_img_s": max(ext), "ratio_median": float(np.median(ratios)), "round_ratios": ratios}


def bare_forward(plan) -> float:
    """img/s of the same loader + forward as extraction's (same device, autocast, workers and
    pinning), nothing stored."""
    prepare_model(plan)
    n, seconds = 0, 0.0
    for source in plan.sources.values():
        loader = open_loader(plan, source, plan.backbone.transform(), np.arange(len(source)))
        t0 = time.perf_counter()
        for _, images, _ in loader:  # the taps run without autograd, as in extraction
            forward_batch(plan, images)
            n += len(images)
        _synchronize(plan.device)
        seconds += time.perf_counter() - t0
    return n / seconds


def read_rates(store: str, batch_size: int) -> dict:
    reader = open_store(store)
    split = reader.splits[0]
    layers = list(reader.layers)
    n = reader.num_samples(split)
    decoded = sum(s.tokens * s.dim * 4 for s in reader.layers.values()) * n / 1e6  # float32 MB out
    t0 = time.perf_counter()
    for _ in reader.batches(split, layers, batch_size, seed=0):
        pass
    ours = time.perf_counter() - t0
    order = np.random.default_rng([0, 0]).permutation(reader.plan.n_chunks(n))
    t0 = time.perf_counter()
    for c in order:
        a, b = reader.plan.chunk_range(int(c), n)
        for layer in layers:
            reader.zarr_array(split, layer)[a:b]
    plain = time.perf_counter() - t0
    files = [f for f in (Path(store) / split / "layers").rglob("*") if f.is_file()]
    on_disk = sum(f.stat().st_size for f in files) / 1e6
    t0 = time.perf_counter()
    for f in files:
        f.read_bytes()
    raw = time.perf_counter() - t0
    return {"samples": n, "layers": len(layers), "decoded_mb": decoded, "on_disk_mb": on_disk,
            "reader_mb_s": decoded / ours, "plain_zarr_mb_s": decoded / plain, "raw_mb_s": on_disk / raw,
            "reader_samples_s": n / ours, "reader_over_plain": plain / ours}


def cached_epoch(store: str, adapters: list[dict], batch_size: int, device: str, epochs: int = 2) -> dict:
    """Seconds of one training pass (reading + every adapter's steps; validation excluded),
    the faster of `epochs` so that one-off warm-up does not count."""
    from pipeline.runners.train import run_train

    with tempfile.TemporaryDirectory() as out:
        cfg = build(TrainConfig, {"store": store, "output": out, "epochs": epochs, "batch_size": batch_size, "warmup_epochs": 0,
                                  "val_fraction": 0.02, "save_top": 0, "adapters": adapters, "device": device})
        result = run_train(cfg)
    samples = round(open_store(store).num_samples(cfg.train_split) * (1 - cfg.val_fraction))
    return {"seconds": min(result["summary"]["epoch_seconds"]), "samples": samples}


def held_vs_floor(store: str, adapters: dict, batch_size: int, rounds: int, device: str) -> dict:
    """Seconds of one training epoch of the `adapters` entry (its members fused), three ways
    side by side, in alternating rounds after one warm-up: held (the store's layers in RAM,
    the default), streamed (`memory_budget_mb: 0`) and the floor (the same steps over the same
    batches, decoded to float32 beforehand and kept in a list: no reader at all). The ratios
    are the medians of the rounds' floor / held and floor / streamed (1.0: as fast as the floor).
    On a GPU the floor's epoch of float32 batches sits in its memory beside the held arrays."""
    from pipeline.runners.train import plan_training

    with tempfile.TemporaryDirectory() as out:
        base = {"store": store, "output": out, "epochs": 1, "batch_size": batch_size, "adapters": [adapters], "device": device}
        resident.release()
        streamed = plan_training(build(TrainConfig, {**base, "memory_budget_mb": 0}))
        held = plan_training(build(TrainConfig, base))
        if resident.held_bytes() == 0:
            raise RuntimeError(f"{store}: its layers do not fit half the available memory; nothing to compare")
        s = held.splits
        floor = [({k: v.to(held.device) for k, v in b.features.items()}, b.labels.to(held.device))  # on the training device
                 for b in held.reader.batches(s.train, held.train_layers, batch_size, seed=held.cfg.seed, epoch=0, keep=s.train_keep)]
        times: dict[str, list[float]] = {"floor": [], "held": [], "streamed": []}
        _epoch_seconds(held, floor)  # warm-up: allocator, thread pools
        for _ in range(rounds):
            times["floor"].append(_epoch_seconds(held, floor))
            times["held"].append(_epoch_seconds(held))
            times["streamed"].append(_epoch_seconds(streamed))
        resident.release()
    ratio = {k: float(np.median([f / t for f, t in zip(times["floor"], times[k])])) for k in ("held", "streamed")}
    return {"layer": adapters["layers"][0], "adapters": len(held.groups[0].members), "samples": sum(len(labels) for _, labels in floor),
            "device": str(held.device),
            "seconds": times, "held_over_floor": ratio["held"], "streamed_over_floor": ratio["streamed"]}


def _epoch_seconds(run, batches=None) -> float:
    """One training pass of every group of a planned run: over its reader's batches (moved to
    the run's device, as `train` does), or over `batches` ((features, labels) already there)."""
    from pipeline.runners.train import train_step

    cfg, s = run.cfg, run.splits
    if batches is None:
        batches = ((b.features, b.labels) for b in run.reader.batches(s.train, run.train_layers, cfg.batch_size, seed=cfg.seed, epoch=0,
                                                                       keep=s.train_keep))
    t0 = time.perf_counter()
    for features, labels in batches:
        features = {k: v.to(run.device, non_blocking=True) for k, v in features.items()}
        for g in run.groups:
            train_step(g, features, labels.to(run.device, non_blocking=True), 1.0)
    _synchronize(run.device)
    return time.perf_counter() - t0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the work is queued: time it done


def online_epoch(cfg: ExtractConfig, store: str, layer: str, batch_size: int) -> tuple[float, int]:
    """Seconds for the training samples of `cfg` (the speed case's sample of images) of the
    same InCA adapter with decode + preprocess + backbone forward per step (training without a
    cache). The forward is extraction's own (its device, autocast and loader), and the adapter
    trains on that device, as the cached epochs do."""
    from pipeline.adapters import build_adapter

    reader = open_store(store)
    plan = plan_extraction(cfg)
    prepare_model(plan)
    source = next(iter(plan.sources.values()))
    idx = np.random.default_rng(0).permutation(len(source))
    loader = open_loader(plan, source, plan.backbone.transform(), idx)
    adapter = build_adapter("inca", reader.layers, len(reader.classes), layer=layer, num_heads=4, dim=64, num_queries=2).to(plan.device)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    labels = torch.from_numpy(source.labels)
    t0 = time.perf_counter()
    for i, images, _ in loader:
        tokens = forward_batch(plan, images)[layer].float()
        loss = torch.nn.functional.cross_entropy(adapter({layer: tokens}), labels[i].to(plan.device, non_blocking=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _synchronize(plan.device)
    return time.perf_counter() - t0, len(idx)
