"""The CLI's own contract: its name, --version, help for every positional, `list` read from the
registries, exclusive options, -q/-v, and exit codes (2 and one line for a user error, a
traceback for anything else)."""

import argparse
import dataclasses
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args, get_type_hints

import pytest

import pipeline.cli as cli
from cache import ConfigError, StoreMismatchError
from pipeline import __version__
from pipeline.adapters import ADAPTERS
from pipeline.backbones.weights import OFFLINE_SOURCES
from pipeline.cli import build_parser, main
from pipeline.config.extract_config import DataConfig
from pipeline.data import DATA_SOURCES
from pipeline.runners.sweep import SweepJobsFailed

REPO = Path(__file__).resolve().parents[1]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_the_program_is_named_as_it_was_invoked(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"featurecache {__version__}\n"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/fc", "list", "bogus"])  # a console script under another name
    with pytest.raises(SystemExit):
        main()
    assert capsys.readouterr().err.startswith("usage: fc list")
    out = subprocess.run([sys.executable, "-m", "pipeline", "--version"], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout == f"python -m pipeline {__version__}\n"


def test_every_positional_has_help():
    parser = build_parser()
    assert all(a.help for a in parser._actions if not a.option_strings)  # COMMAND
    for name, parser in subcommands(parser).items():
        for action in parser._actions:
            if not action.option_strings:
                assert action.help, f"{name}: positional {action.dest!r} has no help"


def test_list_is_read_from_the_registries(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind, cls in ADAPTERS.items():
        assert f"  {kind} " in out
        for f in dataclasses.fields(cls.Hparams):
            assert f"{f.name}=" in out
    assert "num_heads=8" in out and "rank=16" in out  # defaults are shown
    for name in [*OFFLINE_SOURCES, "timm", "none", *DATA_SOURCES]:
        assert f"  {name} " in out
    for path in (REPO / "configs").glob("*.yaml"):
        assert f"  {path.name} " in out
    assert re.search(r"  train_fashion_mnist_lite0\.yaml +train    The main job's stage two", out)
    assert main(["list", "data"]) == 0
    assert capsys.readouterr().out.startswith("data kinds (extract: data.kind):")


def test_data_kinds_are_the_configs_choices():
    assert list(DATA_SOURCES) == list(get_args(get_type_hints(DataConfig)["kind"]))


@pytest.mark.parametrize("command", ["extract", "sweep"])
def test_workers_and_scheduler_exclude_each_other(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "x.yaml", "--workers", "2", "--scheduler", "tcp://h:8786"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_predict_takes_repeated_adapters_and_images_as_positionals(monkeypatch):
    seen = {}
    monkeypatch.setitem(cli.COMMANDS, "predict", lambda args: seen.update(vars(args)) or 0)
    for argv in (["predict", "--adapter", "a/01_x", "--adapter", "b/01_y", "img1.png", "folder/"],
                 ["predict", "img1.png", "folder/", "--adapter", "a/01_x", "--adapter", "b/01_y", "--out", "p.json"]):
        assert main(argv) == 0
        assert seen["adapter"] == ["a/01_x", "b/01_y"] and seen["images"] == ["img1.png", "folder/"]
    for argv in (["predict", "img.png"], ["predict", "--adapter", "a"], ["predict", "--adapters", "a", "img.png"]):
        with pytest.raises(SystemExit):
            main(argv)


def test_overrides_may_follow_options_and_nothing_else_may_be_left(monkeypatch, capsys):
    """`train C.yaml --overwrite epochs=1` was refused (argparse takes positionals before the
    first option only); anything after that is not KEY=VALUE still is."""
    seen = {}
    monkeypatch.setitem(cli.COMMANDS, "train", lambda args: seen.update(vars(args)) or 0)
    assert main(["train", "c.yaml", "lr=1", "--overwrite", "epochs=1", "-q", "seed=3"]) == 0
    assert seen["overrides"] == ["lr=1", "epochs=1", "seed=3"] and seen["overwrite"]
    with pytest.raises(SystemExit) as e:
        main(["train", "c.yaml", "--overwrite", "stray"])
    assert e.value.code == 2 and "unrecognized arguments: stray" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["predict", "img.png", "--adapter", "a", "--batch-size", "0"],
                                  ["predict", "img.png", "--adapter", "a", "--batch-size", "-1"],
                                  ["extract", "c.yaml", "--workers", "-1"], ["sweep", "c.yaml", "--workers", "x"]])
def test_counts_out_of_range_are_refused_by_argument(argv, capsys):
    """--batch-size -1 predicted nothing (exit 0), 0 crashed; extract --workers -1 hung."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and re.search(r"argument --(batch-size|workers): got .*, expected an integer >= [01]", capsys.readouterr().err)


def test_quiet_and_verbose_set_our_log_level_and_restore_it(monkeypatch):
    levels = []
    monkeypatch.setitem(cli.COMMANDS, "list", lambda args: levels.append(logging.getLogger("pipeline.runners.train").getEffectiveLevel()) or 0)
    before = logging.getLogger("pipeline").level
    for argv in (["list"], ["-q", "list"], ["list", "-v"], ["--verbose", "list"], ["list", "--quiet"]):
        assert main(argv) == 0
    assert levels == [logging.INFO, logging.WARNING, logging.DEBUG, logging.DEBUG, logging.WARNING]
    assert logging.getLogger("pipeline").level == before
    with pytest.raises(SystemExit):
        main(["list", "-q", "-v"])


@pytest.mark.parametrize("error", [ConfigError(["a: bad", "b: worse"], "x.yaml"), SweepJobsFailed("1 of 2 jobs failed"),
                                   StoreMismatchError("s.zarr", ["backbone.name: store has 'a', now 'b'"])],
                         ids=lambda e: type(e).__name__)
def test_a_user_error_is_exit_2_and_one_error_line(error, monkeypatch, capsys):
    def fails(args):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "list", fails)
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {error}\n" and len([l for l in err.splitlines() if l.startswith("error:")]) == 1


@pytest.mark.parametrize("bug", [ValueError("x"), KeyError("k"), FileNotFoundError("f"), RuntimeError("r")], ids=lambda e: type(e).__name__)
def test_anything_else_is_a_bug_and_shows_its_traceback(bug, monkeypatch):
    def fails(args):
        raise bug

    monkeypatch.setitem(cli.COMMANDS, "list", fails)
    with pytest.raises(type(bug)):
        main(["list"])


def test_a_missing_config_file_is_a_user_error(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope.yaml'}: config file '{tmp_path / 'nope.yaml'}' does not exist\n"


@pytest.mark.parametrize("command", ["extract", "train", "sweep", "bench"])
def test_ctrl_c_is_one_line_saying_what_is_kept(command, monkeypatch, capsys):
    """It was a KeyboardInterrupt traceback, as if a bug."""
    from pipeline import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, command, interrupted)
    assert main([command, "some.yaml"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert ("rerun" in err) and err.strip() == f"interrupted: {cli.INTERRUPTED[command]}"


def test_quiet_silences_the_progress_bars_too(tmp_path, image_folder, capsys):
    """-q is warnings only; extraction's and training's bars still drew."""
    import yaml

    from pipeline.config import to_dict
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, image_folder)
    (tmp_path / "extract.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"store": cfg.store.path, "output": str(tmp_path / "run"), "epochs": 1,
                                                         "test_split": "val", "adapters": [{"kind": "linear"}]}))
    assert main(["extract", str(tmp_path / "extract.yaml"), "-q"]) == 0
    assert main(["train", str(tmp_path / "train.yaml"), "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["train", str(tmp_path / "train.yaml"), "output=" + str(tmp_path / "run2")]) == 0
    assert "epoch 1/1" in capsys.readouterr().err  # drawn without -q


def test_the_python_api_draws_progress_bars_without_logging_configured(tmp_path, image_folder, capsys):
    """-q's silence reached API users, whose logging is unconfigured (root at WARNING)."""
    import logging

    from pipeline import extract
    from tests.conftest import tiny_config

    assert logging.getLogger("pipeline").level == logging.NOTSET
    extract(tiny_config(tmp_path, image_folder))
    assert "extract train" in capsys.readouterr().err
