"""`featurecache COMMAND ...` (or `python -m pipeline COMMAND ...`): a thin shell over the runners.

Exit codes: 0 done; 1 `verify` found damage; 2 a user error (a FeatureCacheError: a config,
an argument, a file or a store that cannot be used), printed as one `error: ...` line.
Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from cache import FeatureCacheError, StoreError
from pipeline import __version__

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the shipped configs (a checkout, or an editable install)
OUR_LOGGERS = ("pipeline", "cache")


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    """prog: the name shown in usage lines; by default the name this was invoked by."""
    parser = build_parser(prog or _invoked_as(argv))
    args, extra = parser.parse_known_args(argv)
    # argparse takes KEY=VALUE overrides only before the first option (`train C.yaml --overwrite
    # epochs=1` was refused); the ones after it are overrides too, and nothing else may be left.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    with _logging(args.log_level):
        try:
            return COMMANDS[args.command](args)
        except FeatureCacheError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # Ctrl-C is not a bug: no traceback, and what an interruption keeps
            print(f"interrupted: {INTERRUPTED.get(args.command, 'nothing was written')}", file=sys.stderr)
            return 130  # 128 + SIGINT, as a shell reports it


def _invoked_as(argv: Optional[list[str]]) -> str:
    """The console script's name (featurecache); `python -m pipeline` passes its own (see __main__.py)."""
    if argv is not None or not sys.argv or not sys.argv[0]:
        return "featurecache"  # called in-process with arguments (tests, notebooks)
    return Path(sys.argv[0]).name


def build_parser(prog: str = "featurecache") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Feature-cache pipeline: extract once, train many adapters.",
        epilog="exit codes: 0 done, 1 `verify` found damage, 2 a user error (printed as one `error: ...` line)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_verbosity(parser, logging.INFO)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="the job to run (COMMAND -h: its options)")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _add_verbosity(p, argparse.SUPPRESS)  # -q/-v after the command too, without resetting one given before it
        return p

    ex = command("extract", "stage one: stream a dataset through a frozen backbone into a zarr store")
    _config_arguments(ex, "an extract config (configs/*.yaml)", "store.dtype=int8")
    ex.add_argument("--dry-run", action="store_true", help="print the plan (samples, layers, shapes, GB) and stop")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing store made with a different config")
    _dask_arguments(ex, workers_help="run on a local dask cluster of this many worker processes",
                    scheduler_help="run on this dask cluster (tcp://HOST:PORT), shard-aligned pieces per worker")

    tr = command("train", "stage two: train many adapters from a store in one pass per epoch")
    _config_arguments(tr, "a train config (configs/train_*.yaml)", "epochs=3")
    tr.add_argument("--overwrite", action="store_true", help="replace a used output folder (once this run has finished)")

    sw = command("sweep", "hyperparameter search: many fused train jobs from a store, run on dask")
    _config_arguments(sw, "a sweep config (configs/sweep_*.yaml)", "epochs=2 num_trials=20")
    _dask_arguments(sw, workers_help="worker processes of the local cluster (default: one per core, or one when training on a GPU); "
                                     "0 runs the jobs in this process",
                    scheduler_help="address of a running dask scheduler (tcp://HOST:PORT); default: a local cluster")

    pr = command("predict", "apply saved adapters (several tasks) to images, one backbone pass per batch")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders searched for images")
    pr.add_argument("--adapter", action="append", required=True, metavar="DIR",
                    help="a saved adapter directory (runs/*/adapters/NN_*); repeat it for several tasks")
    pr.add_argument("--out", default="predictions.csv", help="CSV, or JSON when it ends in .json")
    pr.add_argument("--batch-size", type=_counted(1), default=32)

    be = command("bench", "the real benchmark: accuracy, cost and speed of every method; writes BENCHMARKS.md")
    _config_arguments(be, "a bench config (configs/bench_real.yaml)", "epochs=2 seeds=[0]")
    be.add_argument("--overwrite", action="store_true",
                    help="replace a store the bench extracts when it was made differently (e.g. images copied again)")

    ins = command("inspect", "describe a store: manifest, splits, layers, sizes, completeness")
    ins.add_argument("store", help="a local path or a URL such as s3://bucket/prefix (credentials and endpoint from the environment)")
    ins.add_argument("--json", action="store_true", help="machine-readable output")

    ve = command("verify", "read every stamped chunk of a store; report damaged or missing objects (exit 1 if any)")
    ve.add_argument("store", help="a local path or a URL such as s3://bucket/prefix")
    ve.add_argument("--repair", action="store_true",
                    help="unstamp the damaged chunks, so that the same extract command recomputes exactly those")

    ls = command("list", "what can be chosen: adapter kinds, weight sources, data kinds, shipped configs")
    ls.add_argument("what", nargs="?", choices=sorted(LISTS), help="only this list (default: all of them)")
    return parser


def _add_verbosity(p: argparse.ArgumentParser, default) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.WARNING, default=default,
                   help="log warnings and errors only")
    g.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG, default=default,
                   help="log details too (each fused group, each adapter saved)")


def _config_arguments(p: argparse.ArgumentParser, what: str, example: str) -> None:
    p.add_argument("config", help=what)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"dotted key=value overrides (YAML values), e.g. {example}")


def _counted(least: int):
    """An argparse type: an integer >= least (a batch size of -1 predicted nothing, exit 0;
    --workers -1 waited for workers forever)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {text!r}, expected an integer >= {least}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"got {value}, expected an integer >= {least}")
        return value
    return parse


def _dask_arguments(p: argparse.ArgumentParser, workers_help: str, scheduler_help: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--workers", type=_counted(0), metavar="N", help=workers_help)
    g.add_argument("--scheduler", metavar="ADDR", help=scheduler_help)


@contextmanager
def _logging(level: int) -> Iterator[None]:
    """INFO by default; -v shows our DEBUG lines (not every library's), -q warnings only."""
    logging.basicConfig(level=max(level, logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    # S3 stores: botocore says where it found credentials and the endpoint, for every client.
    for chatty in ("botocore", "aiobotocore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    before = {name: logging.getLogger(name).level for name in OUR_LOGGERS}
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:  # main() called in-process (tests, notebooks) leaves the levels as it found them
        for name, old in before.items():
            logging.getLogger(name).setLevel(old)


# -- the commands ------------------------------------------------------------------------

def _extract(args) -> int:
    from pipeline.config import ExtractConfig, load_config
    from pipeline.runners.extract import plan_extraction, run_extract

    cfg = load_config(ExtractConfig, args.config, args.overrides)
    if args.dry_run:
        print(plan_extraction(cfg).report())
    elif args.scheduler or args.workers:
        from pipeline.runners.distributed_extract import run_distributed_extract

        run_distributed_extract(cfg, scheduler=args.scheduler, workers=args.workers or 2, overwrite=args.overwrite)
    else:
        run_extract(cfg, overwrite=args.overwrite)
    return 0


def _train(args) -> int:
    from pipeline.config import TrainConfig, load_config
    from pipeline.runners.train import run_train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    results = Path(cfg.output).resolve() / "results.md"  # now: `output=. --overwrite` replaces the working directory
    run_train(cfg, overwrite=args.overwrite)
    print(results.read_text())
    return 0


def _sweep(args) -> int:
    from pipeline.config import SweepConfig, load_config
    from pipeline.runners.sweep import run_sweep

    cfg = load_config(SweepConfig, args.config, args.overrides)
    run_sweep(cfg, scheduler=args.scheduler, workers=args.workers)
    print((Path(cfg.output) / "results.md").read_text())
    return 0


def _bench(args) -> int:
    from pipeline.config import BenchConfig, load_config
    from pipeline.runners.bench import run_bench

    cfg = load_config(BenchConfig, args.config, args.overrides)
    run_bench(cfg, args.config, overwrite=args.overwrite)
    print((Path(cfg.output) / "BENCHMARKS.md").read_text())
    return 0


def _predict(args) -> int:
    from pipeline.runners.predict import run_predict, write_predictions

    rows = run_predict(args.adapter, args.images, args.batch_size)
    write_predictions(rows, args.out)
    print(f"{len(rows)} images, {len(args.adapter)} task(s) -> {args.out}")
    return 0


def _verify(args) -> int:
    from cache import verify_store

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
    from cache import summarize

    s = summarize(args.store)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    state = "complete" if s["complete"] else "INCOMPLETE"
    print(f"store      {s['path']}  ({state}, format v{s['format_version']}, {s['bytes_on_disk'] / 1e6:.1f} MB on disk)")
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


# -- list: read from the registries, so it never drifts from what the config accepts -------

def _list(args) -> int:
    names = [args.what] if args.what else list(LISTS)
    print("\n\n".join(LISTS[name]() for name in names))
    return 0


def _adapter_kinds() -> str:
    from pipeline.adapters import ADAPTERS

    lines = ["adapter kinds (train: adapters[].kind; sweep: space[].kind), hyperparameters = defaults:"]
    for kind, cls in sorted(ADAPTERS.items()):
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        lines.append(f"  {kind:<14}{doc[0] if doc else cls.__name__}")
        hparams = ", ".join(f"{f.name}={_default(f)}" for f in dataclasses.fields(cls.Hparams))
        lines.append(f"  {'':<14}{hparams or '(no hyperparameters)'}")
    return "\n".join(lines)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return json.dumps(f.default) if f.default is None or isinstance(f.default, bool) else repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "(required)"


def _weight_sources() -> str:
    from pipeline.backbones.weights import OFFLINE_SOURCES

    lines = ["weight sources (extract: backbone.weights):",
             f"  {'timm':<26}timm's own pretrained weights (downloaded from the Hugging Face hub)",
             f"  {'none':<26}random initialisation (tests, smoke runs)"]
    for name, source in OFFLINE_SOURCES.items():
        lines.append(f"  {name:<26}offline, for backbone.name {source.timm_name}; from pip package {source.package}")
    lines.append(f"  {'PATH':<26}a local .safetensors / .pt / .pth state dict (tensors only, never unpickled objects)")
    return "\n".join(lines)


def _data_kinds() -> str:
    from pipeline.data import DATA_SOURCES

    lines = ["data kinds (extract: data.kind):"]
    lines += [f"  {kind:<14}{source.description}" for kind, source in DATA_SOURCES.items()]
    return "\n".join(lines)


def _shipped_configs() -> str:
    files = sorted(CONFIGS.glob("*.yaml"))
    if not files:
        return f"shipped configs: none in {CONFIGS} (they are in configs/ of a checkout)"
    lines = [f"shipped configs ({CONFIGS}):"]
    width = max(len(p.name) for p in files) + 2
    for path in files:
        command, about = _config_header(path)
        lines.append(f"  {path.name:<{width}}{command:<9}{about}")
    return "\n".join(lines)


def _config_header(path: Path) -> tuple[str, str]:
    """(the job, what the file is): line 1 is the command that runs it, the comment after it
    says what it is (its first sentence, shortened to one line)."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    command = header[0].split()[3] if header and header[0].startswith("python -m pipeline ") else ""
    text = " ".join(header[1:] if command else header)
    first = text.split(". ")[0].rstrip(".")
    return command, first if len(first) <= 100 else first[:97] + "..."


LISTS = {"adapters": _adapter_kinds, "weights": _weight_sources, "data": _data_kinds, "configs": _shipped_configs}

# What each command leaves when interrupted (the guarantees README's safety section describes).
INTERRUPTED = {
    "extract": "the chunks stamped so far are kept; rerun the same command to resume",
    "train": "the output folder is left as it was; rerun to train again",
    "sweep": "the finished trials are kept in trials.jsonl; rerun the same command to go on",
    "predict": "the output file is left as it was",
    "bench": "the finished units are kept; rerun the same command to resume",
    "verify": "verify alone changes nothing; a --repair cut short leaves the store incomplete: run it again",
}

COMMANDS = {"extract": _extract, "train": _train, "sweep": _sweep, "predict": _predict, "bench": _bench,
            "inspect": _inspect, "verify": _verify, "list": _list}
