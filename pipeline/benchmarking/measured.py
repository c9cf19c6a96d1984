"""Run a function in a fresh process and report its wall time and peak memory.

A fresh process per measurement gives each method its own peak: the peak resident set size
(ru_maxrss) minus the resident size just before the function starts. The function's own
module is imported by then (it is unpickled first), and the modules here import what they
use at the top, so the libraries' ~0.8 GB (a CUDA build of torch, timm, zarr, dask) are in
the baseline and one method's allocations never hide in another's. On a
GPU the CUDA allocator's peak is reported too.
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable


def run_measured(fn: Callable[..., Any], *args) -> dict:
    """{"result", "wall_s", "peak_mb", "gpu_peak_mb"} of fn(*args) run in a spawned process."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure, fn, args, _threads()).result()


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _measure(fn: Callable[..., Any], args: tuple, threads: int) -> dict:
    import torch

    # A spawned child inherits "spawn" as its start method; DataLoader workers need "fork"
    # (as in a normal main process) to receive the sources' local image loaders.
    multiprocessing.set_start_method("fork", force=True)
    torch.set_num_threads(threads)
    baseline = _rss_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = fn(*args)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"result": result, "wall_s": wall, "peak_mb": max(0.0, peak - baseline), "gpu_peak_mb": gpu}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20
