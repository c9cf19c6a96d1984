"""Resumable benchmark work: each unit's result is a JSON file keyed by what produced it.

A unit (one method's grid for one seed, one fine-tuning run, one speed measurement) is
recomputed only when its key changes: the key holds the unit's settings, the store's
fingerprint and the version of the code that computes results (CODE_VERSION: a hash of the
modules that compute units and all they import), so a rerun after an interruption picks up
where it stopped, a changed config or store redoes exactly the units it touches, and a
change to that code redoes them all (a change to how results are reported redoes nothing).
Files are written whole, then renamed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def key_hash(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


# The modules whose functions compute or measure units; what they import decides the numbers too.
COMPUTING_MODULES = ("pipeline.benchmarking.methods", "pipeline.benchmarking.finetune", "pipeline.benchmarking.sklearn_reference",
                     "pipeline.benchmarking.speed", "pipeline.benchmarking.views_study", "pipeline.benchmarking.store_variants",
                     "pipeline.benchmarking.measured")


def code_files() -> list[Path]:
    """The project's sources that decide a unit's numbers: COMPUTING_MODULES and every module of
    this project they import, transitively, at the top or inside a function (read statically,
    so a lazy import counts). A hand-kept list missed pipeline/runners/train.py and the configs'
    defaults: a bench rerun after changing them reported the old numbers under the new commit.
    What only reports (runners/bench.py, report.py, machine.py, the CLI) is not among them."""
    root = Path(__file__).resolve().parents[2]

    def source(module: str) -> Path | None:
        path = root.joinpath(*module.split("."))
        return next((f for f in (path / "__init__.py", path.with_suffix(".py")) if f.is_file()), None)

    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:  # the project imports absolutely
                names.update([node.module] + [f"{node.module}.{a.name}" for a in node.names])  # a name may be a submodule
        # A package's __init__ runs before its submodule: each prefix counts.
        return {".".join(n.split(".")[:i]) for n in names if n.split(".")[0] in ("pipeline", "cache") for i in range(1, n.count(".") + 2)}

    found, todo = set(), [source(m) for m in COMPUTING_MODULES]
    while todo:
        path = todo.pop()
        if path not in found:
            found.add(path)
            todo += [f for f in map(source, imported(path)) if f is not None]
    return sorted(found)


def _code_version() -> str:
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for f in code_files():
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


CODE_VERSION = _code_version()


class Units:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.reused = 0
        self.computed = 0

    def get(self, name: str, key: Any, compute: Callable[[], Any]) -> Any:
        path = self.directory / f"{name}.json"
        digest = key_hash({"key": key, "code": CODE_VERSION})
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key_hash") == digest:
                self.reused += 1
                return saved["result"]
            log.info("unit %s: settings, store or code changed since it was computed; recomputing", name)
        result = compute()
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"key_hash": digest, "key": key, "result": result}, indent=1, default=str))
        os.replace(tmp, path)
        self.computed += 1
        return result
