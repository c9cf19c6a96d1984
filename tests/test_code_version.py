"""Results keyed by the code that computed them: sweep reruns after a code change, and dask
workers whose code is not their driver's."""

import json
import subprocess
import sys

import pytest

from cache import FeatureCacheError
from pipeline.code_version import ROOT, code_files, code_version, library_versions
from pipeline.config import SweepConfig, build, to_dict
from pipeline.runners.sweep import run_sweep
from pipeline.sweeping.jobs import JOB_MODULES, run_job
from tests.conftest import colour_folder, tiny_config


def test_the_files_cover_what_python_imports():
    """The oracle is Python's import system: every project module that importing the entry
    module loads is among the hashed files."""
    script = ("import sys, importlib\n"
              f"importlib.import_module({JOB_MODULES[0]!r})\n"
              "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.split('.')[0] in ('pipeline', 'cache')))")
    loaded = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert len(loaded) > 20 and {ROOT.joinpath(f).resolve() for f in loaded} <= set(code_files(JOB_MODULES))
    assert ROOT / "pipeline/cli.py" not in code_files(JOB_MODULES)  # the CLI only parses: out


def test_the_api_functions_lazy_imports_do_not_pull_in_every_runner():
    """pipeline/__init__.py's functions import every runner lazily; every module imports the
    package, so following them made the extract version hash plots and predict too: a
    comment there made every unfinished store unresumable."""
    from pipeline.runners.extract import EXTRACT_MODULES

    extract, job = set(code_files(EXTRACT_MODULES)), set(code_files(JOB_MODULES))
    for path in ("pipeline/training/report.py", "pipeline/sweeping/plots.py", "pipeline/runners/predict.py", "pipeline/sweeping/tpe.py",
                 "pipeline/runners/train.py"):
        assert ROOT / path not in extract, path
    assert ROOT / "pipeline/runners/train.py" in job and ROOT / "pipeline/sweeping/plots.py" not in job


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("colour")
    cfg = tiny_config(tmp, colour_folder(tmp / "images", per_class=4), "backbone.layers=[-1]")
    from pipeline.runners.extract import run_extract

    run_extract(cfg)
    return cfg.store.path


def sweep_config(store, out) -> SweepConfig:
    return build(SweepConfig, {"store": store, "output": str(out), "val_fraction": 0.25, "test_split": None, "epochs": 1,
                               "batch_size": 8, "trials_per_job": 2, "space": [{"kind": "linear", "lr": [0.01, 0.03]}]})


def test_a_sweep_rerun_after_a_code_change_trains_again(store, tmp_path, monkeypatch):
    cfg = sweep_config(store, tmp_path / "out")
    first = run_sweep(cfg, workers=0)
    assert first["already_done"] == 0 and run_sweep(cfg, workers=0)["already_done"] == 2  # same code: reused
    monkeypatch.setattr("pipeline.runners.sweep.code_version", lambda modules: "another")
    again = run_sweep(cfg, workers=0)
    assert again["already_done"] == 0 and again["jobs"] == 1  # the old rows are not ranked with the new ones
    assert {r["trial"] for r in again["rows"]}.isdisjoint(r["trial"] for r in first["rows"])
    lines = (tmp_path / "out" / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["trial"] == first["rows"][0]["trial"]  # kept in the file


def test_a_worker_running_other_code_is_refused(tmp_path):
    from pipeline.runners.distributed_extract import PIECE_MODULES, extract_piece

    assert code_version(JOB_MODULES) != "0" * 16
    with pytest.raises(FeatureCacheError, match="other featurecache code or libraries than its driver"):
        run_job(None, None, "0" * 16)  # refused before it looks at its config
    extract = tiny_config(tmp_path, tmp_path, "backbone.layers=[-1]")
    with pytest.raises(FeatureCacheError, match=f"code version {code_version(PIECE_MODULES)}, the driver's {'0' * 16}"):
        extract_piece(to_dict(extract), "train", [0], None, "0" * 16)


def test_a_worker_with_another_timm_is_refused(monkeypatch):
    """Same project code, another timm (a fixed layer computes other features): the worker's
    values would differ from the driver's under one code version."""
    driver, real = code_version(JOB_MODULES), library_versions()
    monkeypatch.setattr("pipeline.code_version.installed_version", lambda name: "9.9" if name == "timm" else real[name])
    code_version.cache_clear()
    try:
        with pytest.raises(FeatureCacheError, match=f"the driver's {driver}; here: .*timm 9.9"):
            run_job(None, None, driver)
    finally:
        code_version.cache_clear()  # the next caller hashes the real versions


def test_an_unfinished_store_is_not_resumed_by_other_code(tmp_path, monkeypatch):
    from cache import StoreMismatchError, open_store
    from pipeline.runners.extract import EXTRACT_MODULES, open_writer, plan_extraction, run_extract

    cfg = tiny_config(tmp_path, colour_folder(tmp_path / "images", per_class=2), "backbone.layers=[-1]")
    open_writer(plan_extraction(cfg)).close()  # begun, then interrupted
    assert open_store(cfg.store.path, allow_partial=True).manifest.code_version == code_version(EXTRACT_MODULES)
    monkeypatch.setattr("pipeline.runners.extract.code_version", lambda modules: "upgraded")
    with pytest.raises(StoreMismatchError, match=f"begun by code {code_version(EXTRACT_MODULES)}, this is upgraded"):
        run_extract(cfg)
    run_extract(cfg, overwrite=True)  # starts again, all of it by the new code
    assert open_store(cfg.store.path).manifest.code_version == "upgraded"
    monkeypatch.undo()
    run_extract(cfg)  # a finished store is read, whatever code made it: nothing to mix
