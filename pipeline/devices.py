"""Where a stage computes: `auto` is the GPU when CUDA is present, else the CPU; and how many
CPU cores this process may use."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from cache import ConfigError


def resolve_device(name: str, key: str) -> torch.device:
    """name: "auto", "cpu" or "cuda" (the config's value); key: its config key, for the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


# cgroup v2's CPU limit of this process's container ("QUOTA PERIOD" in microseconds, or "max").
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores() -> int:
    """The cores this process may run on. os.cpu_count() counts the host's: in a container
    limited to 2 of 64 cores (by affinity, or by a CPU quota as `docker --cpus 2` sets), the
    default sweep started 64 workers and gave each torch 64 threads."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity to read
        cores = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2 here, or a line we do not know: no quota read
        pass
    return max(1, cores)
