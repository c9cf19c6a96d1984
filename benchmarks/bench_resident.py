"""Training epochs from a store held in RAM, against streaming it and against the in-RAM floor.

    python benchmarks/bench_resident.py stores/fashion_mnist_lite0.zarr [--layers blocks.4 bn2] [--rounds 3]

For each layer, one InCA adapter and 16 fused InCA adapters (4 learning rates x 4 weight
decays) train one epoch three ways, side by side in one process, in alternating rounds:
- streamed: `memory_budget_mb: 0`, every batch read and decoded from the store (as before);
- held: the default, the layers held in RAM as stored (cache/resident.py), batches sliced
  by the same permutation and decoded per batch;
- floor: a bare loop of the same training steps over the same batches, already decoded to
  float32 tensors in a Python list (no reader at all).
Each round times one epoch of each; the table reports the median of the rounds' ratios
held / floor and streamed / floor (1.0 = as fast as the floor; higher = faster). Prints a
markdown table; writes bench_out/bench_resident.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import resident  # noqa: E402
from pipeline.config import TrainConfig, build  # noqa: E402
from pipeline.runners.train import plan_training, train_step  # noqa: E402


def adapters(layer: str, fused: int) -> list[dict]:
    lrs, wds = ([1e-3, 2e-3, 3e-3, 5e-3], [0.0, 1e-4, 1e-3, 1e-2]) if fused == 16 else ([1e-3], [1e-4])
    return [{"kind": "inca", "layers": [layer], "hparams": {"num_queries": 2, "num_heads": 4, "dim": 64}, "lr": lrs, "weight_decay": wds}]


def epoch_seconds(run, batches=None) -> float:
    """One training pass of every group: over the reader's batches, or over `batches`."""
    cfg, s = run.cfg, run.splits
    source = batches if batches is not None else run.reader.batches(s.train, run.train_layers, cfg.batch_size, seed=cfg.seed, epoch=0,
                                                                     keep=s.train_keep)
    t0 = time.perf_counter()
    for b in source:
        feats, labels = (b.features, b.labels)
        for g in run.groups:
            train_step(g, feats, labels, 1.0)
    return time.perf_counter() - t0


def measure(store: str, layer: str, fused: int, rounds: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        base = {"store": store, "output": out, "epochs": 1, "batch_size": batch_size, "adapters": adapters(layer, fused)}
        resident.release()
        streamed = plan_training(build(TrainConfig, {**base, "memory_budget_mb": 0}))
        held = plan_training(build(TrainConfig, base))
        if resident.held_bytes() == 0:
            raise SystemExit(f"{store}: its layers do not fit half the available memory; nothing to compare")
        s = held.splits
        floor_batches = list(held.reader.batches(s.train, held.train_layers, batch_size, seed=held.cfg.seed, epoch=0, keep=s.train_keep))
        times = {"streamed": [], "held": [], "floor": []}
        epoch_seconds(held, floor_batches)  # warm-up: allocator, thread pools
        for _ in range(rounds):
            times["floor"].append(epoch_seconds(held, floor_batches))
            times["held"].append(epoch_seconds(held))
            times["streamed"].append(epoch_seconds(streamed))
        resident.release()
    ratio = {k: statistics.median(f / t for f, t in zip(times["floor"], times[k])) for k in ("held", "streamed")}
    return {"layer": layer, "adapters": fused, "samples": sum(len(b.labels) for b in floor_batches), "batch_size": batch_size,
            "seconds": times, "held_over_floor": ratio["held"], "streamed_over_floor": ratio["streamed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--layers", nargs="+", default=["blocks.4", "bn2"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = [measure(args.store, layer, fused, args.rounds, args.batch_size) for layer in args.layers for fused in (1, 16)]
    print("| layer | InCA adapters | floor epoch (s) | held epoch (s) | streamed epoch (s) | held speed / floor | streamed speed / floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = {k: statistics.median(v) for k, v in r["seconds"].items()}
        print(f"| {r['layer']} | {r['adapters']} | {t['floor']:.2f} | {t['held']:.2f} | {t['streamed']:.2f} | "
              f"**{r['held_over_floor']:.2f}** | {r['streamed_over_floor']:.2f} |")
    out = Path("bench_out")
    out.mkdir(exist_ok=True)
    (out / "bench_resident.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
