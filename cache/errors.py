"""The errors a user can cause, one family: each message says what was found and what to do.

    FeatureCacheError            the base: `featurecache` prints it as one `error: ...` line, exit 2
    ├── ConfigError              a config, an argument or a file the user named that cannot be used;
    │                            lists every problem at once (pipeline.adapters.AdapterConfigError,
    │                            a bad adapter kind, hyperparameter or layer choice, is one); also a
    │                            feature whose optional extra is not installed (require_extra)
    ├── StoreError               a store that cannot be used as asked (missing, incomplete, not ours)
    │   └── StoreMismatchError   made with another config, backbone or dataset (a store, or the
    │                            store an adapter was trained on); names every differing key
    └── CannotWrite              a full disk, a quota or an unwritable place (`cannot_write`)

Anything else that escapes is a bug, and the CLI shows its traceback. `cache` never imports
`pipeline`, so the family lives here and `pipeline` derives its own errors from it.
"""

from __future__ import annotations

import errno
import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class FeatureCacheError(Exception):
    """A mistake in what the user asked for, or a state of their data that stops the job."""

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls, *args)
        self._init_args = (args, kwargs)  # so that dask can send it back from a worker (see __reduce__)
        return self

    def __reduce__(self):
        # Exception pickles as cls(*self.args), i.e. with the message only; subclasses take
        # other arguments, so rebuild from the constructor's own.
        args, kwargs = self._init_args
        return _rebuild, (type(self), args, kwargs)


def _rebuild(cls: type, args: tuple, kwargs: dict) -> FeatureCacheError:
    return cls(*args, **kwargs)


class ConfigError(FeatureCacheError):
    """Every problem found in one config (or argument, or named file), one per line.

    problems: one message or a list; source: where they are (a config file, "command-line
    overrides"...), prefixed to a single problem and heading a list; None for none.
    """

    def __init__(self, problems: str | list[str], source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        if len(self.problems) == 1:
            super().__init__(f"{source}: {self.problems[0]}" if source else self.problems[0])
            return
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s)" + (f" in {source}" if source else "") + f":\n{lines}")


class StoreError(FeatureCacheError):
    """A store that cannot be used as asked (missing, incomplete, not ours)."""


class StoreMismatchError(StoreError):
    """Features made with a different config, backbone or dataset than those asked for.

    differences: one line per differing key (cache.fingerprint.differences); subject: what was
    made differently (default: the store at `path`).
    """

    def __init__(self, path: str, differences: list[str], hint: str = "", subject: str | None = None):
        self.path = path
        self.differences = differences
        lines = "\n".join(f"  - {d}" for d in differences)
        subject = subject or f"store {path!r} was made differently"
        super().__init__(f"{subject}:\n{lines}" + (f"\n{hint}" if hint else ""))


class CannotWrite(FeatureCacheError):
    """A write the machine refused: a full disk, a quota, a read-only or forbidden place."""


# What an OSError while writing means, for one line: the state of the user's machine, not a bug.
WRITE_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


@contextmanager
def cannot_write(what: str, kept: str, rerun: str = "rerun", error: type = CannotWrite, under: tuple[Path, ...] = ()) -> Iterator[None]:
    """Turn a write the machine refused into one `error` line: `what` was being written, why,
    what is `kept` as it was, and what to do (free space, or make the place writable), then
    `rerun`. Other OSErrors pass. With `under`, a refused access (EACCES, EPERM, EROFS) counts
    only for a file inside one of those paths: elsewhere it was a read, not this write."""
    try:
        yield
    except OSError as e:
        blocking = _file_on_the_path(e.filename) if e.errno in (errno.ENOTDIR, errno.EEXIST) else None
        if blocking:  # e.g. store.path: photos/cat.jpg/x.zarr (a raw FileExistsError or NotADirectoryError)
            raise error(f"{what}: {blocking!r} is a file where the path needs a folder; {kept}: choose another path, "
                        f"then {rerun}") from e
        reason = WRITE_OS_ERRORS.get(e.errno)
        if reason is None:
            raise
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        if under and not full and not any(_inside(e.filename, folder) for folder in under):
            raise
        at = f" at {e.filename!r}" if e.filename else ""
        fix = "free space" if full else "make the location writable"
        raise error(f"{what}: {reason} ({errno.errorcode[e.errno]}{at}); {kept}: {fix}, then {rerun}") from e


def _file_on_the_path(filename) -> str | None:
    """The existing file (not a folder) that a path runs through or would be made at, if any."""
    if filename is None:
        return None
    path = Path(os.fsdecode(filename))
    for part in (path, *path.parents):  # from the path up: the first that exists decides
        if part.is_dir():
            return None
        if part.exists() or part.is_symlink():
            return str(part)
    return None


def _inside(filename, folder: Path) -> bool:
    if filename is None:
        return False
    path, folder = Path(os.fsdecode(filename)).resolve(), folder.resolve()
    return path == folder or folder in path.parents


def require_extra(what: str, extra: str, *modules: str) -> None:
    """A ConfigError naming the extra to install unless every (top-level) module is there:
    `what` (a feature the user asked for) needs the optional dependencies of `extra`."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{what} needs {' and '.join(missing)}, not installed here: pip install 'featurecache[{extra}]'")
