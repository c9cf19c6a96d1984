"""Local-file moves that never leave a half-made folder under the real name, and the one
liveness check for what a process left behind (stores and run outputs share both)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(new: Path, path: Path) -> None:
    """Move the finished folder `new` into place; an old one is removed only after that."""
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.rename(path, old)
        os.rename(new, path)
        shutil.rmtree(old)
    else:
        os.rename(new, path)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with this pid is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # running, under another user
    return True
