"""Training epochs from a store held in RAM, against streaming it and against the in-RAM floor.

    python benchmarks/bench_resident.py stores/fashion_mnist_lite0.zarr [--layers blocks.4 bn2] [--rounds 3]

For each layer, one InCA adapter and 16 fused InCA adapters (4 learning rates x 4 weight
decays) train one epoch three ways, side by side in one process, in alternating rounds:
- streamed: `memory_budget_mb: 0`, every batch read and decoded from the store (as before);
- held: the default, the layers held in RAM as stored (cache/resident.py), batches gathered
  by the same order and decoded per batch;
- floor: a bare loop of the same training steps over the same batches, already decoded to
  float32 tensors in a Python list (no reader at all).
The measurement is the bench's own (pipeline/benchmarking/speed.py: held_vs_floor), here for
any store and layers. The table reports the median of the rounds' ratios held / floor and
streamed / floor (1.0 = as fast as the floor; higher = faster). Prints a markdown table;
writes bench_out/bench_resident.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.benchmarking.speed import held_vs_floor  # noqa: E402


def adapters(layer: str, fused: int) -> dict:
    lrs, wds = ([1e-3, 2e-3, 3e-3, 5e-3], [0.0, 1e-4, 1e-3, 1e-2]) if fused == 16 else ([1e-3], [1e-4])
    return {"kind": "inca", "layers": [layer], "hparams": {"num_queries": 2, "num_heads": 4, "dim": 64}, "lr": lrs, "weight_decay": wds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--layers", nargs="+", default=["blocks.4", "bn2"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = [held_vs_floor(args.store, adapters(layer, fused), args.batch_size, args.rounds, "auto") for layer in args.layers for fused in (1, 16)]
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
