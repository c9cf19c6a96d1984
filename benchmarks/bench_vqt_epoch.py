"""VQT epoch time with keys/values cached in stage one vs projected every step, in one run.

    python benchmarks/bench_vqt_epoch.py configs/imagenette_dinov2.yaml "data.limit={train: 300, val: 100}"

Extracts the config with backbone.cache_kv=true into a temporary store (its size with and
without the kv layers is reported), then trains the same VQT adapter for 2 epochs reading
the cached K/V, and again recomputing them from the block inputs; reports the faster epoch
of each. Writes bench_out/bench_vqt_epoch.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import open_store  # noqa: E402
from pipeline.config import ExtractConfig, TrainConfig, build, load_config  # noqa: E402
from pipeline.runners.extract import run_extract  # noqa: E402
from pipeline.runners.train import run_train  # noqa: E402


def epoch_seconds(store: str, out: str, num_queries: int, use_cached_kv: bool) -> tuple[float, float]:
    cfg = build(TrainConfig, {"store": store, "output": out, "epochs": 2, "batch_size": 64, "val_fraction": 0.1,
                              "save_top": 0, "adapters": [{"kind": "vqt", "hparams": {"num_queries": num_queries, "use_cached_kv": use_cached_kv}}]})
    result = run_train(cfg)
    return min(result["summary"]["epoch_seconds"]), result["rows"][0]["val_acc"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(ExtractConfig, args.config, args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = replace(cfg, backbone=replace(cfg.backbone, cache_kv=True), store=replace(cfg.store, path=f"{tmp}/store.zarr"))
        run_extract(cfg)
        reader = open_store(cfg.store.path)
        kv_mb = sum(f.stat().st_size for f in Path(tmp, "store.zarr").rglob("*") if f.is_file() and "/layers/kv." in str(f)) / 1e6
        all_mb = sum(f.stat().st_size for f in Path(tmp, "store.zarr").rglob("*") if f.is_file()) / 1e6
        rows = []
        for q in args.queries:
            cached, acc_c = epoch_seconds(cfg.store.path, f"{tmp}/c{q}", q, True)
            fresh, acc_f = epoch_seconds(cfg.store.path, f"{tmp}/f{q}", q, False)
            rows.append({"num_queries": q, "epoch_s_cached_kv": cached, "epoch_s_recomputed_kv": fresh, "speedup": fresh / cached,
                         "val_acc_cached": acc_c, "val_acc_recomputed": acc_f})
    n = reader.num_samples("train")
    print(f"\n{cfg.backbone.name} at {cfg.preprocess.image_size}px, {n} train samples, batch 64; store {all_mb:.0f} MB of which K/V {kv_mb:.0f} MB\n")
    print("| queries per block | epoch, K/V recomputed | epoch, K/V from the cache | speed-up |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['num_queries']} | {r['epoch_s_recomputed_kv']:.1f} s | {r['epoch_s_cached_kv']:.1f} s | {r['speedup']:.2f}x |")
    Path("bench_out").mkdir(exist_ok=True)
    Path("bench_out/bench_vqt_epoch.json").write_text(json.dumps({"store_MB": all_mb, "kv_MB": kv_mb, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
