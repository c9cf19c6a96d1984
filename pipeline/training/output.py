"""A run's output folder is never mixed: one run's files, complete, or nothing.

A run writes into a hidden staging folder beside its output (`.NAME.partial-PID`) and renames
it into place when it finishes, so an interrupted run leaves no half-written results under the
real name. A used output folder (anything in it) is refused unless `overwrite`, which replaces
it whole once the new run has finished, and only when it is a run's output: `--overwrite` with
the output set to a project folder (or to "", the current directory) deleted that folder.
Stagings left by killed runs are removed.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cache import FeatureCacheError, cannot_write, pid_alive, replace_dir
from cache.lease import StoreLease
from cache.location import StoreLocation


class OutputInUse(FeatureCacheError):
    """The output folder holds another run's files."""


RUN_FILES = ("config.json", "metrics.jsonl")  # what every finished run's folder holds (a run writes them first)


def check_output(out: Path, overwrite: bool) -> None:
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():  # it read as "already holds files (another run's?)", and --overwrite as not a run's output
        raise OutputInUse(f"output {str(out)!r} is a file; choose a folder")
    if not overwrite:
        raise OutputInUse(f"output {str(out)!r} already holds files (another run's?); choose another output, "
                          "or pass --overwrite to replace it when this run finishes")
    if not out.is_dir() or not all((out / name).is_file() for name in RUN_FILES):
        raise OutputInUse(f"output {str(out)!r} holds files but is not a run's output (no {' and '.join(RUN_FILES)}); "
                          "--overwrite replaces only a run's output folder: choose another output")


SWEEP_FILE = "sweep_config.json"  # the first file a sweep writes: its folder, to resume in


def check_sweep_output(out: Path) -> None:
    """A sweep goes on in its own folder (trials.jsonl, the study); a folder holding anything
    else is refused. A sweep into a train run's folder wrote its results.md over the run's and
    mixed its files in; one into a store wrote among the store's arrays."""
    if out.exists() and not out.is_dir():
        raise OutputInUse(f"sweep output {str(out)!r} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / SWEEP_FILE).is_file():
        raise OutputInUse(f"sweep output {str(out)!r} holds files but is not a sweep's output (no {SWEEP_FILE}); "
                          "choose another output (a sweep's own folder is resumed)")


@contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yields the staging folder to write into; on success it becomes `out` (through a symlink,
    the folder it points to: the link stays, and the staging is made on the target's disk)."""
    check_output(out, overwrite)
    named, out = str(out), out.resolve()
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    # A full disk or an unwritable place is one line; a refused access elsewhere (reading the
    # store) is not this write's and passes as it is.
    writes = dict(what=f"output {named!r}", kept="the output folder is left as it was (the run writes beside it and moves in when done)")
    with cannot_write(**writes):
        out.parent.mkdir(parents=True, exist_ok=True)
    # One run per output folder at a time: a second run on it used to train to its end and only
    # then be refused (its results lost), with advice to pass --overwrite.
    lease = StoreLease(StoreLocation(str(out)), what="output")
    with cannot_write(**writes, under=(out, stage, out.parent / f".{out.name}.old-{os.getpid()}", lease.local_path)), lease:
        for stale in out.parent.glob(f".{out.name}.partial-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or not pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        try:
            yield stage
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        check_output(out, overwrite)  # again: another run may have finished into it meanwhile
        replace_dir(stage, out)
