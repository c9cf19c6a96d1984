"""Stage two's speed, side by side in one run, on an existing store.

    python benchmarks/bench_train.py stores/fashion_mnist_lite0.zarr [--samples 2048] [--layer blocks.6]

1. one epoch of 1 InCA adapter vs 16 InCA adapters (a learning-rate grid, trained fused)
   vs 16 mixed adapters (linear + InCA on every layer, 2 learning rates each) in one pass;
2. one epoch of the same InCA adapter from the cache vs with the backbone in the loop
   (decode + preprocess + frozen forward every step, as training without a cache would);
3. a sweep of K configurations: extract once + K cached trainings vs K online trainings,
   from the measured per-epoch times and the extraction rate.
Prints a markdown table; writes bench_out/bench_train.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import open_store  # noqa: E402
from pipeline.adapters import build_adapter  # noqa: E402
from pipeline.config import TrainConfig, build  # noqa: E402
from pipeline.data import open_split  # noqa: E402
from pipeline.data.loader import make_loader  # noqa: E402
from pipeline.backbones.taps import LayerTaps  # noqa: E402
from pipeline.train import run_train  # noqa: E402
from pipeline.training.frozen_backbone import backbone_of, extract_config_of  # noqa: E402


def cached_epoch(store: str, adapters: list[dict], batch_size: int, epochs: int = 2) -> float:
    """Seconds of one training epoch (reading + all adapters' steps; validation excluded),
    the faster of `epochs` epochs so that one-off warm-up does not count."""
    with tempfile.TemporaryDirectory() as out:
        cfg = build(TrainConfig, {"store": store, "output": out, "epochs": epochs, "batch_size": batch_size, "warmup_epochs": 0,
                                  "val_fraction": 0.02, "save_top": 0, "adapters": adapters})
        return min(run_train(cfg)["summary"]["epoch_seconds"])


def online_epoch(store: str, layer: str, batch_size: int, samples: int) -> float:
    """One epoch of the same InCA adapter with decode + preprocess + backbone forward per step."""
    reader = open_store(store)
    ecfg = extract_config_of(reader.manifest)
    backbone = backbone_of(reader.manifest, store)
    taps = LayerTaps(backbone.model, (layer,), False, backbone.image_size)
    source = open_split(ecfg.data, "train")
    idx = np.arange(min(samples, len(source)))
    loader = make_loader(source, backbone.transform(), idx, backbone.image_size, batch_size, 2, False)
    adapter = build_adapter("inca", reader.layers, len(reader.classes), layer=layer, num_heads=4, dim=64, num_queries=2)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    labels = torch.from_numpy(source.labels)
    t0 = time.perf_counter()
    for i, images, _ in loader:
        feats = taps(images)
        loss = torch.nn.functional.cross_entropy(adapter(feats), labels[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def extract_rate(manifest: dict, samples: int) -> float:
    """img/s of extracting the store's own config, measured on `samples` train images."""
    from dataclasses import replace

    from pipeline.extract import run_extract

    cfg = extract_config_of(manifest)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = replace(cfg, store=replace(cfg.store, path=f"{tmp}/s.zarr"), data=replace(cfg.data, splits=("train",), limit=samples))
        t0 = time.perf_counter()
        run_extract(cfg)
        return samples / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--layer", default="blocks.6")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--sweep", type=int, default=16, help="K configurations in the sweep estimate")
    ap.add_argument("--epochs", type=int, default=8, help="epochs per configuration in the sweep estimate")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    reader = open_store(args.store)
    n = reader.num_samples("train")
    inca = {"kind": "inca", "layers": [args.layer], "hparams": {"num_heads": 4, "dim": 64, "num_queries": 2}}
    one = cached_epoch(args.store, [{**inca, "lr": 1e-3}], args.batch_size)
    lrs = [float(x) for x in np.geomspace(1e-4, 1e-2, 16)]
    sixteen = cached_epoch(args.store, [{**inca, "lr": lrs}], args.batch_size)
    layers = list(reader.layers)
    mixed_entries = [{"kind": "linear", "layers": layers, "lr": [1e-3, 3e-3]},
                     {**inca, "layers": layers, "lr": [1e-3, 3e-3]}]
    mixed_n = 4 * len(layers)
    mixed = cached_epoch(args.store, mixed_entries, args.batch_size)
    online = online_epoch(args.store, args.layer, args.batch_size, n)
    extract_s = n / extract_rate(reader.manifest, samples=1024)
    k, e = args.sweep, args.epochs
    sweep_cached = extract_s + k * e * one
    sweep_online = k * e * online
    result = {"train_samples": n, "layer": args.layer, "one_adapter_epoch_s": one, "sixteen_fused_epoch_s": sixteen,
              "mixed_adapters": mixed_n, "mixed_epoch_s": mixed, "online_epoch_s": online, "extract_train_split_s": extract_s,
              "sweep_K": k, "sweep_epochs": e, "sweep_cached_s": sweep_cached, "sweep_online_s": sweep_online}
    print(f"\n{n} training samples, batch {args.batch_size}, InCA on {args.layer}; epoch = one training pass incl. reading, validation excluded\n")
    print("| measure | seconds | ratio |\n|---|---:|---:|")
    print(f"| 1 InCA adapter, one epoch from the cache | {one:.1f} | 1.00 |")
    print(f"| 16 InCA adapters (lr grid), fused, one pass | {sixteen:.1f} | **{sixteen / one:.2f}** x one |")
    print(f"| {mixed_n} mixed adapters (linear + InCA x every layer x 2 lr), one pass | {mixed:.1f} | {mixed / one:.2f} x one |")
    print(f"| 1 InCA adapter, one epoch with the backbone in the loop | {online:.1f} | **{online / one:.1f}** x cached |")
    print(f"| extract the train split once ({n / extract_s:.0f} img/s) | {extract_s:.1f} | |")
    print(f"| sweep of {k} configs x {e} epochs: extract once + cached | {sweep_cached:.0f} | 1.00 |")
    print(f"| same sweep, backbone in the loop | {sweep_online:.0f} | **{sweep_online / sweep_cached:.1f}** x cached |")
    Path("bench_out").mkdir(exist_ok=True)
    Path("bench_out/bench_train.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
