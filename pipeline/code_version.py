"""Which version of this project's code computed a result: a hash of the sources that decide it.

`code_version(entry_modules)` hashes the entry modules and every module of this project they
import, transitively, at the top or inside a function (read statically, so a lazy import
counts). Results cached under it (bench units, sweep trials) are redone when that code
changes, and a dask worker whose code differs from its driver's is refused, so no table or
store mixes the output of two versions. Code that only reports or parses the command line
stays out unless an entry module imports it.

The versions of the libraries that compute with this code are part of it: a worker with
another torch or timm (another kernel, a fixed layer), another torchvision or Pillow (other
decoded or resized pixels) or another numpy (other permutations from the same seed) would
compute other values under the same project code.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from importlib import metadata
from pathlib import Path
from typing import Optional

from cache import FeatureCacheError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "cache")
COMPUTING_LIBRARIES = ("torch", "torchvision", "timm", "numpy", "pillow")


def _source(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    return next((f for f in (path / "__init__.py", path.with_suffix(".py")) if f.is_file()), None)


def _imported(path: Path) -> set[str]:
    """The project modules `path` imports: anywhere in a module (a function may import lazily),
    at the top only in a package's __init__ (pipeline/__init__.py's API functions import every
    runner lazily; importing the package runs none of them)."""
    tree = ast.parse(path.read_text())
    if path.name == "__init__.py":
        nodes = [n for top in tree.body if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(top)]
    else:
        nodes = list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:  # the project imports absolutely
            names.update([node.module] + [f"{node.module}.{a.name}" for a in node.names])  # a name may be a submodule
    # A package's __init__ runs before its submodules: each prefix counts.
    return {".".join(n.split(".")[:i]) for n in names if n.split(".")[0] in PACKAGES for i in range(1, n.count(".") + 2)}


def code_files(entry_modules: tuple[str, ...]) -> list[Path]:
    found, todo = set(), [_source(m) for m in entry_modules]
    while todo:
        path = todo.pop()
        if path not in found:
            found.add(path)
            todo += [f for f in map(_source, _imported(path)) if f is not None]
    return sorted(found)


def installed_version(package: str) -> Optional[str]:
    """A distribution's installed version, from its own record (nothing is imported); None
    where none is recorded under that name (not installed, or a fork such as Pillow-SIMD)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, Optional[str]]:
    """The installed version of each library that computes with this code."""
    return {name: installed_version(name) for name in COMPUTING_LIBRARIES}


@functools.lru_cache(maxsize=None)  # once per process: a dask worker checks it for every task
def code_version(entry_modules: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for f in code_files(entry_modules):
        digest.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    for name, version in library_versions().items():
        digest.update(f"{name}=={version}".encode() + b"\0")
    return digest.hexdigest()[:16]


def require_drivers_code(code: Optional[str], entry_modules: tuple[str, ...]) -> None:
    """Refuse to compute on a dask worker whose code is not its driver's: code is the driver's
    code_version(entry_modules) (None: not on dask)."""
    mine = code_version(entry_modules)
    if code is not None and mine != code:
        here = ", ".join(f"{name} {version}" for name, version in library_versions().items())
        raise FeatureCacheError(f"this dask worker runs other featurecache code or libraries than its driver (code version {mine}, "
                                f"the driver's {code}; here: {here}): install the same versions on every worker")
