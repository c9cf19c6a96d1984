"""Resumable benchmark work: each unit's result is a JSON file keyed by what produced it.

A unit (one method's grid for one seed, one fine-tuning run, one speed measurement) is
recomputed only when its key changes: the key holds the unit's settings, the store's
fingerprint and the version of the code that computes results (CODE_VERSION), so a rerun
after an interruption picks up where it stopped, and a changed config, store or training
code redoes exactly the units it touches (a change to how results are reported redoes
nothing). Files are written whole, then renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def key_hash(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _code_version() -> str:
    """A hash of the sources that decide a unit's numbers: the store's code, the backbones,
    data sources, adapters and training, and the bench's own training code."""
    root = Path(__file__).resolve().parents[2]
    parts = ["cache", "pipeline/adapters", "pipeline/backbones", "pipeline/data", "pipeline/training", "pipeline/benchmarking/methods.py",
             "pipeline/benchmarking/finetune.py", "pipeline/benchmarking/sklearn_reference.py", "pipeline/benchmarking/speed.py"]
    digest = hashlib.sha256()
    for part in parts:
        path = root / part
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
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
