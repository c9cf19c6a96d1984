"""Outputs are never mixed: a used train folder is refused (or replaced whole with
--overwrite), an interrupted run leaves the folder as it was, and predict's task columns are
unique."""

from __future__ import annotations

import csv

import pytest

from cache import ConfigError
from pipeline.cli import main
from pipeline.config import to_dict
from pipeline.runners.extract import run_extract
from pipeline.runners.predict import task_names
from pipeline.runners.train import run_train
from pipeline.training.output import OutputInUse
from tests.conftest import colour_folder, tiny_config
from tests.test_train import train_config

LINEAR = [{"kind": "linear", "layers": ["blocks.5"], "lr": [0.01, 0.003]}]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outputs")
    cfg = tiny_config(tmp, colour_folder(tmp / "images", per_class=4), "backbone.layers=[-1]")
    run_extract(cfg)
    return cfg.store.path, tmp / "images"


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_used_output_is_refused_and_overwrite_replaces_it_whole(store, tmp_path):
    out = tmp_path / "run"
    run_train(train_config(store[0], out, LINEAR, epochs=1, save_top=2))
    first = files(out)
    with pytest.raises(OutputInUse, match="already holds files"):
        run_train(train_config(store[0], out, [{"kind": "inca", "layers": ["blocks.5"]}], epochs=1, save_top=1))
    assert files(out) == first  # untouched

    run_train(train_config(store[0], out, [{"kind": "inca", "layers": ["blocks.5"], "hparams": {"num_heads": 2}}], epochs=1, save_top=1),
              overwrite=True)
    adapters = sorted(p.name for p in (out / "adapters").iterdir())
    assert len(adapters) == 1 and adapters[0].startswith("01_inca")  # none of the old run's two adapters remain
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_a_second_run_on_one_output_is_refused_before_it_trains(store, tmp_path, monkeypatch):
    """It trained to its end, then was refused (its results lost) with advice to pass --overwrite."""
    from cache import StoreError
    from cache.lease import StoreLease
    from cache.location import StoreLocation
    from pipeline.runners import train

    out = tmp_path / "run"
    monkeypatch.setattr(train, "plan_training", lambda cfg: pytest.fail("the second run began"))
    with StoreLease(StoreLocation(str(out)), what="output"):  # the first run, training
        for overwrite in (False, True):
            with pytest.raises(StoreError, match=r"output '.*run' is being written by pid \d+ .*one writer at a time"):
                run_train(train_config(store[0], out, LINEAR, epochs=1), overwrite=overwrite)
    assert not out.exists()


def test_overwrite_never_replaces_a_folder_that_is_not_a_runs_output(store, tmp_path, monkeypatch):
    """`output: ""` (the current directory) or a project folder with --overwrite: the folder
    was replaced by the run's files, everything in it deleted."""
    from cache import ConfigError

    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "notes.txt").write_text("mine")
    before = files(project)
    with pytest.raises(OutputInUse, match="is not a run's output .*--overwrite replaces only a run's output folder"):
        run_train(train_config(store[0], project, LINEAR, epochs=1), overwrite=True)
    assert files(project) == before and sorted(p.name for p in tmp_path.iterdir()) == ["project"]
    monkeypatch.chdir(project)
    with pytest.raises(ConfigError, match="output: got '', expected a folder path"):
        run_train(train_config(store[0], "", LINEAR, epochs=1), overwrite=True)
    assert files(project) == before


def test_overwrite_through_a_symlinked_output_replaces_its_target_and_keeps_the_link(store, tmp_path):
    """It used to put the new folder where the link was, then fail with a traceback removing
    the renamed link (rmtree on a symlink)."""
    import os

    real, link = tmp_path / "disk" / "run", tmp_path / "run"
    run_train(train_config(store[0], real, LINEAR, epochs=1, save_top=0))
    os.symlink(real, link, target_is_directory=True)
    run_train(train_config(store[0], link, [{"kind": "inca", "layers": ["blocks.5"]}], epochs=1, save_top=1), overwrite=True)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert [p.name for p in (real / "adapters").iterdir()] and "inca@" in (real / "results.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "run"] and sorted(p.name for p in real.parent.iterdir()) == ["run"]


def test_an_interrupted_run_leaves_the_output_as_it_was(store, tmp_path, monkeypatch):
    import pipeline.runners.train

    out = tmp_path / "run"
    run_train(train_config(store[0], out, LINEAR, epochs=1, save_top=1))
    before = files(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.runners.train, "write_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train(train_config(store[0], out, LINEAR, epochs=1, save_top=1), overwrite=True)
    assert files(out) == before
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_the_cli_refuses_a_used_output_in_one_line(store, tmp_path, capsys):
    import yaml

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"store": store[0], "output": str(tmp_path / "run"), "epochs": 1, "batch_size": 8,
                                      "test_split": "val", "adapters": LINEAR}))
    assert main(["train", str(config)]) == 0
    assert main(["train", str(config)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: output ")
    assert main(["train", str(config), "--overwrite"]) == 0


def test_a_full_disk_is_one_line_and_leaves_outputs_as_they_were(store, tmp_path, capsys, monkeypatch):
    """train, sweep and predict showed a raw OSError traceback; predict left a CSV cut short,
    some images' predictions missing, under the real name."""
    import errno
    import os

    import yaml

    import pipeline.runners.predict
    import pipeline.runners.train
    import pipeline.sweeping.results_log

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    run_train(train_config(store[0], tmp_path / "run", LINEAR, epochs=1, save_top=1))
    before = files(tmp_path / "run")
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"store": store[0], "output": str(tmp_path / "run"), "epochs": 1, "batch_size": 8,
                                      "test_split": "val", "adapters": LINEAR}))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"store": store[0], "output": str(tmp_path / "sweep"), "epochs": 1, "batch_size": 8,
                                     "test_split": "val", "space": [{"kind": "linear", "lr": [0.01, 0.1]}]}))
    adapter = str(next((tmp_path / "run" / "adapters").iterdir()))
    (tmp_path / "preds.csv").write_text("old\n")
    for argv, what, where in [
            (["train", str(config), "--overwrite"], "output", (pipeline.runners.train, "write_report")),
            (["sweep", str(sweep), "--workers", "0"], "sweep output", (pipeline.sweeping.results_log.TrialsLog, "append")),
            (["predict", "--adapter", adapter, str(store[1] / "val"), "--out", str(tmp_path / "preds.csv")], "predictions",
             (pipeline.runners.predict.csv.DictWriter, "writerows"))]:
        with monkeypatch.context() as m:
            m.setattr(*where, full)
            assert main(argv) == 2, argv
            line = capsys.readouterr().err.strip().splitlines()[-1]
            assert line.startswith(f"error: {what} ") and "no space left on the device (ENOSPC)" in line, line
    assert files(tmp_path / "run") == before and (tmp_path / "preds.csv").read_text() == "old\n"
    assert not any(p.name.startswith(".") and "partial" in p.name for p in tmp_path.iterdir())


def test_predictions_through_a_link_reach_its_target_and_a_refused_read_is_not_a_write(store, tmp_path, monkeypatch, capsys):
    """Writing beside the link and moving onto it replaced the link, the target left stale;
    a store the run may not read was reported as 'output ...: permission denied'."""
    import errno
    import os

    import pipeline.runners.train

    run_train(train_config(store[0], tmp_path / "run", LINEAR, epochs=1, save_top=1))
    adapter = str(next((tmp_path / "run" / "adapters").iterdir()))
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "preds.csv").write_text("old\n")
    os.symlink(tmp_path / "disk" / "preds.csv", tmp_path / "preds.csv")
    assert main(["predict", "--adapter", adapter, str(store[1] / "val"), "--out", str(tmp_path / "preds.csv")]) == 0
    assert (tmp_path / "preds.csv").is_symlink() and (tmp_path / "disk" / "preds.csv").read_text().startswith("image,")
    assert main(["predict", "--adapter", adapter, str(store[1] / "val"), "--out", str(tmp_path / "disk")]) == 2
    assert "is a folder; give the file to write" in capsys.readouterr().err.splitlines()[-1]  # a raw IsADirectoryError before

    def unreadable(path, **kwargs):  # a store beside the output, as runs/ and stores/ often are
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "stores" / "s.zarr" / "zarr.json"))

    monkeypatch.setattr(pipeline.runners.train, "open_store", unreadable)
    with pytest.raises(PermissionError):  # not a user's write: shown as itself, with its traceback
        run_train(train_config(store[0], tmp_path / "again", LINEAR, epochs=1))


def test_two_adapters_of_one_run_get_two_prediction_columns(store, tmp_path):
    run_train(train_config(store[0], tmp_path / "colour", LINEAR, epochs=1, save_top=2))
    dirs = sorted(str(p) for p in (tmp_path / "colour" / "adapters").iterdir())
    out = tmp_path / "preds.csv"
    assert main(["predict", *(a for d in dirs for a in ("--adapter", d)), str(store[1] / "val"), "--out", str(out)]) == 0
    header = next(csv.reader(out.open()))
    names = [d.split("/")[-1] for d in dirs]
    assert header == ["image", f"colour/{names[0]}", f"colour/{names[0]}_prob", f"colour/{names[1]}", f"colour/{names[1]}_prob"]


def test_a_task_name_clash_is_an_error():
    assert task_names(["a/adapters/01_x", "b/adapters/01_x"]) == ["a", "b"]
    with pytest.raises(ConfigError, match="would share the task name"):
        task_names(["runs/a/adapters/01_x", "other/a/adapters/01_y", "runs/a/adapters/01_x"])
    assert task_names(["x/a/adapters/01_x", "y/a"]) == ["a/01_x", "a"]


def test_a_task_named_like_another_column_is_an_error():
    """A run folder called `image`, or tasks `x` and `x_prob`, used to overwrite a column."""
    with pytest.raises(ConfigError, match=r"would share the task name\(s\) \['image'\]"):
        task_names(["runs/image/adapters/01_a"])
    with pytest.raises(ConfigError, match=r"would share the task name\(s\) \['x', 'x_prob'\]"):
        task_names(["runs/x/adapters/01_a", "runs/x_prob/adapters/01_a"])


def test_an_adapter_predicted_beside_one_from_a_normed_store_gets_its_own_features(tmp_path):
    """Two stores of one backbone, one tapped through the final norm: predict used to feed
    both adapters the first store's kind of features."""
    from pipeline.runners.predict import run_predict

    images = colour_folder(tmp_path / "images", per_class=4)
    normed = tiny_config(tmp_path / "a", images, "backbone.layers=[-1]", "backbone.through_final_norm=true")
    raw = tiny_config(tmp_path / "b", images, "backbone.layers=[-1]")
    dirs = []
    for name, cfg in (("normed", normed), ("raw", raw)):
        run_extract(cfg)
        run_train(train_config(cfg.store.path, tmp_path / name, [{"kind": "linear", "layers": ["blocks.5"]}], epochs=1, save_top=1))
        dirs.append(str(next((tmp_path / name / "adapters").iterdir())))
    for order in (dirs, dirs[::-1]):  # whichever comes first, each adapter gets what it gets alone
        together = run_predict(order, [str(images / "val")])
        for d, name in zip(dirs, ("normed", "raw")):
            alone = run_predict([d], [str(images / "val")])
            assert [r[f"{name}_prob"] for r in together] == [r[f"{name}_prob"] for r in alone], (name, order)


def test_a_path_through_a_file_is_one_line_naming_the_file(store, tmp_path, capsys):
    """store.path, output or --out under an existing file were raw FileExistsError or
    NotADirectoryError tracebacks."""
    import yaml

    blocking = tmp_path / "photo.jpg"
    blocking.write_bytes(b"x")
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"store": store[0], "output": str(blocking / "run"), "epochs": 1, "test_split": "val",
                                      "adapters": LINEAR}))
    runs = [["train", str(config)],
            ["extract", str(tmp_path / "extract.yaml")]]
    cfg = tiny_config(tmp_path, store[1], f"store.path={blocking / 'x.zarr'}")
    (tmp_path / "extract.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    for argv in runs:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"'{blocking}' is a file where the path needs a folder" in err and "choose another path" in err, (argv, err)
        assert len(err.strip().splitlines()) == 1
    assert main(["train", str(config), f"output={blocking}", "--overwrite"]) == 2  # the output itself is a file
    assert f"output '{blocking}' is a file; choose a folder" in capsys.readouterr().err
    assert blocking.read_bytes() == b"x"


def test_overwriting_the_working_directory_prints_the_new_results(store, tmp_path, monkeypatch, capsys):
    """`train C.yaml output=. --overwrite` from inside a run folder replaced it, then read
    ./results.md from the deleted working directory: a FileNotFoundError traceback."""
    import yaml

    run = tmp_path / "run"
    run_train(train_config(store[0], run, LINEAR, epochs=1))
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"store": store[0], "output": ".", "epochs": 1, "test_split": "val", "adapters": LINEAR}))
    monkeypatch.chdir(run)
    assert main(["train", str(config), "--overwrite", "-q"]) == 0
    assert "| adapter |" in capsys.readouterr().out
