"""What the benchmark ran on: a reader needs it to judge every absolute number."""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

from pipeline.code_version import installed_version
from pipeline.devices import usable_cores


def machine_info() -> dict:
    import torch

    return {
        "date": datetime.date.today().isoformat(),
        "cpu": _cpu_model(),
        "cores": usable_cores(),
        "memory_gb": _memory_gb(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "packages": {p: installed_version(p) for p in ("torch", "timm", "zarr", "dask", "scikit-learn")},
        "commit": _git_commit(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def _git_commit() -> str | None:
    try:
        repo = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
