"""featurecache's jobs: `extract` (stage one), `train`, `sweep` and `predict`, behind one CLI
(`featurecache`, or `python -m pipeline`) and this Python API for notebooks:

    from pipeline import extract, load_config, predict, train

    cfg = load_config("extract", "configs/fashion_mnist_lite0.yaml", ["data.limit=500"])
    extract(cfg, dry_run=True).report()           # the plan and its cost; nothing written
    extract(cfg)                                  # the store (resumes, never overwrites)
    results = train("configs/train_fashion_mnist_lite0.yaml", ["epochs=2"], overwrite=True)
    rows = predict(results["summary"]["saved"][:1], "photos/")

A config is a YAML path, a dict of the YAML's content or a config dataclass; overrides are
the CLI's dotted `key=value` strings. Errors a user can cause are FeatureCacheError (see
cache/errors.py). Importing `pipeline` stays light: each call imports what it needs.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

try:
    __version__ = version("featurecache")
except PackageNotFoundError:  # running from a checkout that was not pip-installed
    __version__ = "0+checkout"

if TYPE_CHECKING:
    from pipeline.runners.extract import Extraction, ExtractPlan

Paths = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def load_config(kind_or_class: Union[str, type], source: Any, overrides: Sequence[str] = ()) -> Any:
    """A validated config: kind_or_class is "extract", "train", "sweep", "bench" or the config
    class; source a YAML path, a dict, or a config dataclass (checked again, overrides applied).
    Every problem is listed in one ConfigError."""
    from pipeline import config

    return config.load_config(kind_or_class, source, overrides)


def extract(config: Any, overrides: Sequence[str] = (), *, dry_run: bool = False, overwrite: bool = False,
            workers: Optional[int] = None, scheduler: Optional[str] = None) -> "ExtractPlan | Extraction":
    """Stage one (`featurecache extract`): the store of `config`, or with dry_run only its plan
    (`.report()` prints the cost). workers / scheduler: on a local dask cluster of that many
    processes / on a running one."""
    cfg = load_config("extract", config, overrides)
    if dry_run:
        from pipeline.runners.extract import plan_extraction

        return plan_extraction(cfg)
    if workers or scheduler:
        from pipeline.runners.distributed_extract import run_distributed_extract

        return run_distributed_extract(cfg, scheduler=scheduler, workers=workers or 2, overwrite=overwrite)
    from pipeline.runners.extract import run_extract

    return run_extract(cfg, overwrite=overwrite)


def train(config: Any, overrides: Sequence[str] = (), *, overwrite: bool = False) -> dict:
    """Stage two (`featurecache train`): {"rows": one per adapter, "summary": top-1, ensembles,
    saved adapters}; the files are in the config's output folder."""
    from pipeline.runners.train import run_train

    return run_train(load_config("train", config, overrides), overwrite=overwrite)


def sweep(config: Any, overrides: Sequence[str] = (), *, workers: Optional[int] = None,
          scheduler: Optional[str] = None) -> dict:
    """A hyperparameter search (`featurecache sweep`); workers=0 runs its jobs in this process."""
    from pipeline.runners.sweep import run_sweep

    return run_sweep(load_config("sweep", config, overrides), scheduler=scheduler, workers=workers)


def predict(adapters: Paths, images: Paths, *, batch_size: int = 32, out: Optional[Union[str, os.PathLike]] = None) -> list[dict]:
    """Saved adapters (one directory or several: one task each) applied to image files or
    folders; one row per image ({"image", TASK, TASK_prob, ...}), also written to `out`
    (CSV, or JSON when it ends in .json) when given."""
    from pipeline.runners.predict import run_predict, write_predictions

    rows = run_predict(_paths(adapters), _paths(images), batch_size)
    if out is not None:
        write_predictions(rows, str(out))
    return rows


def _paths(p: Paths) -> list[str]:
    return [os.fspath(p)] if isinstance(p, (str, os.PathLike)) else [os.fspath(x) for x in p]


__all__ = ["__version__", "extract", "load_config", "predict", "sweep", "train"]
