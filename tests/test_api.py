"""The Python API for notebooks: `from pipeline import extract, train, sweep, predict, load_config`."""

import csv
import subprocess
import sys

import pytest
import yaml

from cache import ConfigError, open_store
from pipeline import extract, load_config, predict, sweep, train
from pipeline.config import ExtractConfig, TrainConfig, to_dict
from pipeline.training.output import OutputInUse
from tests.conftest import REPO, colour_folder, tiny_config


def test_import_pipeline_stays_light():
    code = "import sys, pipeline; print(sorted({'torch', 'zarr', 'numpy', 'timm', 'yaml'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout == "[]\n"


def test_the_core_needs_no_dask():
    """dask is an extra: the CLI and the runners import without it (None in sys.modules makes
    any import of it fail), and a job that needs it says how to install it."""
    code = (
        "import sys; sys.modules['dask'] = sys.modules['distributed'] = None\n"
        "import pipeline.cli, pipeline.runners.extract, pipeline.runners.train, pipeline.runners.predict, pipeline.runners.sweep\n"
        "from cache import FeatureCacheError\n"
        "from pipeline.runners.distributed_extract import run_distributed_extract\n"
        "try:\n"
        "    run_distributed_extract(None)\n"
        "except FeatureCacheError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout == ("ConfigError extract --workers/--scheduler (extraction on a dask cluster) needs dask and distributed, "
                          "not installed here: pip install 'featurecache[dask]'\n")


def test_load_config_takes_a_path_a_dict_or_a_config(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "images")
    data = to_dict(cfg)
    path = tmp_path / "extract.yaml"
    path.write_text(yaml.safe_dump(data))
    for source in (data, path, str(path), cfg):
        assert load_config("extract", source) == cfg
        assert load_config(ExtractConfig, source, ["store.dtype=int8"]).store.dtype == "int8"
    with pytest.raises(ConfigError, match=r"config kind 'extrakt': expected one of \['extract', 'train', 'sweep', 'bench'\]"):
        load_config("extrakt", data)
    with pytest.raises(ConfigError, match="got a ExtractConfig, expected a TrainConfig"):
        load_config(TrainConfig, cfg)
    with pytest.raises(ConfigError) as e:  # every problem of a dict at once, as for a file
        load_config("extract", {**data, "store": {"path": "s", "dtype": "fp16"}, "extra": 1})
    assert len(e.value.problems) == 2 and str(e.value).startswith("2 problem(s) in the config given:")


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    images = colour_folder(tmp / "images", per_class=4)
    cfg = to_dict(tiny_config(tmp, images, "backbone.layers=[-1]"))
    return tmp, images, cfg


def test_extract_train_predict_from_a_notebook(stage_one):
    tmp, images, cfg = stage_one
    plan = extract(cfg, dry_run=True)
    assert "blocks.5" in plan.report() and not (tmp / "store.zarr").exists()  # the plan only
    extract(cfg, ["runtime.batch_size=4"])  # a dict and an override, as on the command line
    assert open_store(cfg["store"]["path"]).num_samples("val") == 12

    train_cfg = {"store": cfg["store"]["path"], "output": str(tmp / "run"), "test_split": "val", "epochs": 2, "batch_size": 8,
                 "adapters": [{"kind": "linear", "lr": [0.003, 0.03]}]}
    results = train(train_cfg, ["save_top=1"])
    assert len(results["rows"]) == 2 and len(results["summary"]["saved"]) == 1
    with pytest.raises(OutputInUse, match="already holds files"):  # a user error (FeatureCacheError), as in the CLI
        train(train_cfg)

    (adapter,) = results["summary"]["saved"]
    rows = predict(adapter, images / "val", out=tmp / "p.csv")
    assert len(rows) == 12 and set(rows[0]) == {"image", "run", "run_prob"}
    assert list(csv.DictReader((tmp / "p.csv").open())) == [{k: str(v) for k, v in r.items()} for r in rows]
    assert predict([adapter], [str(p) for p in sorted((images / "val" / "red").iterdir())]) == rows[8:]


def test_sweep_in_this_process(stage_one):
    tmp, _, cfg = stage_one
    extract(cfg)  # complete already when run after the test above: nothing to compute
    out = sweep({"store": cfg["store"]["path"], "output": str(tmp / "sweep"), "val_fraction": 0.25, "epochs": 1, "batch_size": 8,
                 "space": [{"kind": "linear", "lr": [0.003, 0.03]}]}, workers=0)
    assert out["trials"] == 2 and len(out["rows"]) == 2 and set(out["best"]) == {"linear"}


def test_the_api_names_stay_functions_when_the_runners_are_imported():
    """The runners live in pipeline.runners, so importing one never shadows the API function."""
    import inspect

    import pipeline
    import pipeline.runners.extract  # noqa: F401  (the import under test)

    assert pipeline.extract is extract and inspect.isfunction(extract)
    assert "dry_run" in str(inspect.signature(extract))
