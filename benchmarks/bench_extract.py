"""Stage one's speed, side by side in one run.

    python benchmarks/bench_extract.py configs/fashion_mnist_lite0.yaml [dotted.key=value ...] [--repeats 2]

1. extract (store writes on a background thread) vs a bare loop of the same DataLoader and
   the same forward over the same images, storing nothing. Runs alternate (bare, extract,
   bare, extract, ...) so drift on a shared machine hits both; the ratio reported is the
   median over rounds of each round's extract/bare (the best of each side is shown too).
2. the cache reader (shuffled multi-layer mini-batches) vs plain zarr reading the same
   chunks in the same order vs the raw bytes of the store's files (cold page cache is not
   attempted: both read what the OS has cached, as training would after the first epoch).
Prints a markdown table and writes bench_out/bench_extract.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import open_store  # noqa: E402
from pipeline.config import ExtractConfig, load_config  # noqa: E402
from pipeline.data.loader import make_loader  # noqa: E402
from pipeline.extract import _workers, plan_extraction, run_extract  # noqa: E402


def bare_forward(plan) -> float:
    """img/s of loader + the same taps forward, nothing stored."""
    cfg = plan.cfg
    rates = []
    for source in plan.sources.values():
        loader = make_loader(source, plan.backbone.transform(), np.arange(len(source)), plan.backbone.image_size,
                             cfg.runtime.batch_size, _workers(cfg, False), False)
        t0 = time.perf_counter()
        n = 0
        for _, images, _ in loader:
            plan.taps(images)
            n += len(images)
        rates.append((n, time.perf_counter() - t0))
    return sum(n for n, _ in rates) / sum(t for _, t in rates)


def extract_rate(cfg: ExtractConfig, store: Path) -> float:
    """img/s while streaming (loader start to last chunk written), as for the bare loop;
    building the model and creating the store happen once per job and are not counted."""
    shutil.rmtree(store, ignore_errors=True)
    plan = run_extract(_with_store(cfg, store))
    return plan.streamed / plan.stream_seconds


def _with_store(cfg: ExtractConfig, store: Path) -> ExtractConfig:
    from dataclasses import replace

    return replace(cfg, store=replace(cfg.store, path=str(store)))


def read_rates(store: Path, batch_size: int) -> dict:
    reader = open_store(store)
    split = reader.splits[0]
    layers = list(reader.layers)
    n = reader.num_samples(split)
    decoded = sum(s.tokens * s.dim * 4 for s in reader.layers.values()) * n  # float32 out

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

    files = [f for f in (store / split / "layers").rglob("*") if f.is_file()]
    raw_bytes = sum(f.stat().st_size for f in files)
    t0 = time.perf_counter()
    for f in files:
        f.read_bytes()
    raw = time.perf_counter() - t0
    return {
        "samples": n, "layers": len(layers), "decoded_MB": decoded / 1e6, "on_disk_MB": raw_bytes / 1e6,
        "reader_s": ours, "plain_zarr_s": plain, "raw_bytes_s": raw,
        "reader_MBps": decoded / 1e6 / ours, "plain_zarr_MBps": decoded / 1e6 / plain, "raw_MBps": raw_bytes / 1e6 / raw,
        "reader_samples_per_s": n / ours,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(ExtractConfig, args.config, args.overrides)
    plan = plan_extraction(cfg)
    n = sum(len(s) for s in plan.sources.values())
    print(f"{cfg.backbone.name} at {plan.backbone.image_size}, {n} images, batch {cfg.runtime.batch_size}, "
          f"{torch.get_num_threads()} torch threads, {_workers(cfg, False)} loader workers")
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    store = work / "store.zarr"
    bare, ext = [], []
    for r in range(args.repeats):
        bare.append(bare_forward(plan))
        ext.append(extract_rate(cfg, store))
        print(f"  round {r + 1}: bare forward {bare[-1]:.1f} img/s, extract {ext[-1]:.1f} img/s")
    reads = read_rates(store, batch_size=256)
    result = {
        "backbone": cfg.backbone.name, "image_size": list(plan.backbone.image_size), "images": n,
        "bare_forward_img_s": max(bare), "extract_img_s": max(ext),
        "extract_over_bare": float(np.median([e / b for e, b in zip(ext, bare)])),
        "round_ratios": [e / b for e, b in zip(ext, bare)],
        "store_MB_on_disk": sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 1e6,
        **{f"read_{k}": v for k, v in reads.items()},
    }
    print("\n| measure | value |\n|---|---|")
    print(f"| bare forward (loader + forward_intermediates), best round | {result['bare_forward_img_s']:.1f} img/s |")
    print(f"| extract (same + encode + zarr write), best round | {result['extract_img_s']:.1f} img/s |")
    print(f"| **extract / bare**, median of {len(bare)} paired rounds | **{result['extract_over_bare']:.3f}** "
          f"(rounds: {', '.join(f'{r:.2f}' for r in result['round_ratios'])}) |")
    print(f"| reader, shuffled multi-layer batches | {reads['reader_MBps']:.0f} MB/s decoded ({reads['reader_samples_per_s']:.0f} samples/s) |")
    print(f"| plain zarr, same chunks, same order | {reads['plain_zarr_MBps']:.0f} MB/s decoded |")
    print(f"| **reader / plain zarr** | **{reads['plain_zarr_s'] / reads['reader_s']:.2f}** |")
    print(f"| raw bytes of the shard files | {reads['raw_MBps']:.0f} MB/s ({reads['on_disk_MB']:.0f} MB on disk) |")
    out = Path("bench_out")
    out.mkdir(exist_ok=True)
    (out / "bench_extract.json").write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
