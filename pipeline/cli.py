"""`python -m pipeline COMMAND ...`: a thin shell over the runners."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cache import StoreError

log = logging.getLogger("pipeline")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Feature-cache pipeline: extract once, train many adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("extract", help="stage one: stream a dataset through a frozen backbone into a zarr store")
    ex.add_argument("config", help="YAML file in configs/")
    ex.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. store.dtype=int8")
    ex.add_argument("--dry-run", action="store_true", help="print the plan (samples, layers, shapes, GB) and stop")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing store made with a different config")
    ex.add_argument("--scheduler", help="run on this dask cluster (tcp://HOST:PORT), shard-aligned pieces per worker")
    ex.add_argument("--workers", type=int, help="run on a local dask cluster of this many worker processes")

    tr = sub.add_parser("train", help="stage two: train many adapters from a store in one pass per epoch")
    tr.add_argument("config")
    tr.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. epochs=3")
    tr.add_argument("--overwrite", action="store_true", help="replace a used output folder (once this run has finished)")

    sw = sub.add_parser("sweep", help="hyperparameter search: many fused train jobs from a store, run on dask")
    sw.add_argument("config")
    sw.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. epochs=2 num_trials=20")
    sw.add_argument("--scheduler", metavar="ADDR", help="address of a running dask scheduler (tcp://HOST:PORT); default: a local cluster")
    sw.add_argument("--workers", type=int,
                    help="worker processes of the local cluster (default: one per core); 0 runs the jobs in this process")

    pr = sub.add_parser("predict", help="apply saved adapters (several tasks) to images, one backbone pass per batch")
    pr.add_argument("--adapters", nargs="+", required=True, help="saved adapter directories (runs/*/adapters/NN_*)")
    pr.add_argument("images", nargs="*", help="image files or folders (after the adapter directories)")
    pr.add_argument("--out", default="predictions.csv", help="CSV, or JSON when it ends in .json")
    pr.add_argument("--batch-size", type=int, default=32)

    be = sub.add_parser("bench", help="the real benchmark: accuracy, cost and speed of every method; writes BENCHMARKS.md")
    be.add_argument("config")
    be.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. epochs=2 seeds=[0]")

    ins = sub.add_parser("inspect", help="describe a store: manifest, splits, layers, sizes, completeness")
    ins.add_argument("store", help="a local path or a URL such as s3://bucket/prefix (credentials and endpoint from the environment)")
    ins.add_argument("--json", action="store_true", help="machine-readable output")

    ve = sub.add_parser("verify", help="read every stamped chunk of a store; report damaged or missing objects")
    ve.add_argument("store", help="a local path or a URL such as s3://bucket/prefix")
    ve.add_argument("--repair", action="store_true",
                    help="unstamp the damaged chunks, so that the same extract command recomputes exactly those")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    # S3 stores: botocore says where it found credentials and the endpoint, for every client.
    for chatty in ("botocore", "aiobotocore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    from pipeline.config import ConfigError
    from pipeline.distributed_extract import ExtractTasksFailed
    from pipeline.sweep import SweepJobsFailed

    try:
        if args.command == "extract":
            return _extract(args)
        if args.command == "train":
            return _train(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "predict":
            return _predict(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "verify":
            return _verify(args)
        if args.command == "bench":
            return _bench(args)
    except (ConfigError, StoreError, ValueError, FileNotFoundError, KeyError, SweepJobsFailed, ExtractTasksFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


def _extract(args) -> int:
    from pipeline.config import ExtractConfig, load_config
    from pipeline.extract import run_extract

    cfg = load_config(ExtractConfig, args.config, args.overrides)
    if (args.scheduler or args.workers) and not args.dry_run:
        from pipeline.distributed_extract import run_distributed_extract

        run_distributed_extract(cfg, scheduler=args.scheduler, workers=args.workers or 2, overwrite=args.overwrite)
        return 0
    plan = run_extract(cfg, dry_run=args.dry_run, overwrite=args.overwrite)
    if args.dry_run:
        print(plan.report())
    return 0


def _train(args) -> int:
    from pipeline.config import TrainConfig, load_config
    from pipeline.train import run_train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    run_train(cfg, overwrite=args.overwrite)
    print((Path(cfg.output) / "results.md").read_text())
    return 0


def _sweep(args) -> int:
    from pipeline.config import SweepConfig, load_config
    from pipeline.sweep import run_sweep

    cfg = load_config(SweepConfig, args.config, args.overrides)
    run_sweep(cfg, scheduler=args.scheduler, workers=args.workers)
    print((Path(cfg.output) / "results.md").read_text())
    return 0


def _bench(args) -> int:
    from pipeline.bench import run_bench
    from pipeline.config import BenchConfig, load_config

    cfg = load_config(BenchConfig, args.config, args.overrides)
    run_bench(cfg, args.config)
    print((Path(cfg.output) / "BENCHMARKS.md").read_text())
    return 0


def _predict(args) -> int:
    from pipeline.predict import run_predict, write_predictions

    # `--adapters A B img1 img2` reaches us as one list: adapters are the leading directories
    # that hold an adapter.json, images are the rest.
    paths = args.adapters + args.images
    n = next((i for i, p in enumerate(paths) if not (Path(p) / "adapter.json").is_file()), len(paths))
    adapters, images = paths[:n], paths[n:]
    if not adapters:
        from pipeline.predict import check_adapter_dirs

        check_adapter_dirs(paths[:1])  # the first path after --adapters must be one: say why it is not
    if not adapters or not images:
        raise ValueError(f"predict needs adapter directories (with adapter.json) then images; got adapters {adapters}, images {images}")
    rows = run_predict(adapters, images, args.batch_size)
    write_predictions(rows, args.out)
    print(f"{len(rows)} images, {len(adapters)} task(s) -> {args.out}")
    return 0


def _verify(args) -> int:
    from cache.verify import verify_store

    reports = verify_store(args.store, repair=args.repair)
    bad_chunks = sum(len(r.bad) for r in reports)
    for r in reports:
        state = "ok" if not r.bad and not r.unrecoverable else f"{len(r.bad)} bad chunk(s), {len(r.unrecoverable)} damaged array(s)"
        print(f"split {r.split}: {r.stamped}/{r.chunks} chunks stamped, {len(r.checked_arrays)} chunked arrays read: {state}")
        for chunk, problems in sorted(r.bad.items()):
            print(f"  chunk {chunk}: " + "; ".join(problems))
        for problem in r.unrecoverable:
            print(f"  {problem}")
    if any(r.unrecoverable for r in reports):
        raise StoreError(f"{args.store}: labels or sample ids are damaged; they are written once at creation, so extract the store "
                         "again with --overwrite")
    if bad_chunks and args.repair:
        print(f"unstamped {bad_chunks} chunk(s); run the same extract command to recompute exactly those")
        return 0
    if bad_chunks:
        print(f"{bad_chunks} damaged chunk(s); `verify --repair`, then the same extract command, recomputes them")
        return 1
    return 0


def _inspect(args) -> int:
    from cache.summary import summarize

    s = summarize(args.store)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"store      {s['path']}  ({'complete' if s['complete'] else 'INCOMPLETE'}, format v{s['format_version']}, {s['bytes_on_disk'] / 1e6:.1f} MB on disk)")
    b = s["backbone"]
    print(f"backbone   {b['name']} ({b['weights']} weights, sha256 {b['weights_sha256'][:16]}...)")
    p = s["preprocessing"]
    print(f"preprocess {p['input_size'][1]}x{p['input_size'][2]} {p['interpolation']}, mean {p['mean']}, std {p['std']}")
    print(f"storage    {s['storage']['dtype']}, tokens={s['storage']['tokens']}, {s['samples_per_chunk']} samples/chunk, {s['chunks_per_shard']} chunks/shard")
    print(f"classes    {len(s['classes'])}: {', '.join(map(str, s['classes'][:10]))}{' ...' if len(s['classes']) > 10 else ''}")
    for split, d in s["splits"].items():
        print(f"split      {split}: {d['num_samples']} samples, chunks {d['chunks_done']}/{d['chunks_total']}, {d['skipped']} skipped")
    print(f"{'layer':<20}{'[T, D]':>14}{'prefix':>8}{'grid':>10}{'MB on disk':>12}")
    for l in s["layers"]:
        grid = "x".join(map(str, l["grid"])) if l["grid"] else "-"
        print(f"{l['name']:<20}{str([l['tokens'], l['dim']]):>14}{l['prefix_tokens']:>8}{grid:>10}{l['bytes_on_disk'] / 1e6:>12.2f}")
    for split, ids in s["skipped_ids"].items():
        print(f"skipped in {split}: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}")
    return 0
