"""Resumable benchmark work: each unit's result is a JSON file keyed by what produced it.

A unit (one method's grid for one seed, one fine-tuning run, one speed measurement) is
recomputed only when its key changes: the key holds the unit's settings, the store's
fingerprint, the version of the code that computes results (CODE_VERSION: a hash of the
modules that compute units and all they import) and the machine (CPU, cores, GPU, torch
threads, Python and package versions: a unit's times and memory are that machine's, and the
report prints the machine it ran on), so a rerun after an interruption picks up where it
stopped, a changed config or store redoes exactly the units it touches, and a change to that
code or machine redoes them all (a change to how results are reported redoes nothing).
Files are written whole, then renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from pipeline.benchmarking.machine import machine_info
from pipeline.code_version import code_version

log = logging.getLogger(__name__)


def key_hash(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


# The modules whose functions compute or measure units; what they import decides the numbers too.
COMPUTING_MODULES = ("pipeline.benchmarking.methods", "pipeline.benchmarking.finetune", "pipeline.benchmarking.sklearn_reference",
                     "pipeline.benchmarking.speed", "pipeline.benchmarking.views_study", "pipeline.benchmarking.store_variants",
                     "pipeline.benchmarking.measured")


# A hand-kept list of files missed pipeline/runners/train.py and the configs' defaults: a
# bench rerun after changing them reported the old numbers under the new commit.
CODE_VERSION = code_version(COMPUTING_MODULES)


class Units:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.reused = 0
        self.computed = 0
        # What a unit's numbers depend on besides its key; not the date, commit or free memory.
        self.machine = {k: v for k, v in machine_info().items() if k in ("cpu", "cores", "gpu", "torch_threads", "python", "packages")}

    def get(self, name: str, key: Any, compute: Callable[[], Any]) -> Any:
        path = self.directory / f"{name}.json"
        digest = key_hash({"key": key, "code": CODE_VERSION, "machine": self.machine})
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
