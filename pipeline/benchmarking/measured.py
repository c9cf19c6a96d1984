"""Run a function in a fresh process and report its wall time and peak memory.

A fresh process per measurement gives each method its own peak: the peak resident set size
(the kernel's high-water mark, VmHWM) minus the resident size just before the function
starts. Not ru_maxrss: Linux carries it across exec, so a spawned child would report its
parent's peak whenever that was higher. The high-water mark is reset to the current size
at the baseline, so the libraries loaded by then (the function's module is unpickled first,
and the modules here import what they use at the top: ~0.8 GB for a CUDA build of torch,
timm, zarr, dask) are not counted. On a GPU the CUDA allocator's peak is reported too.
"""

from __future__ import annotations

import multiprocessing
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
    _reset_peak()
    baseline = _status_mb("VmRSS")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = fn(*args)
    wall = time.perf_counter() - t0
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"result": result, "wall_s": wall, "peak_mb": max(0.0, _status_mb("VmHWM") - baseline), "gpu_peak_mb": gpu}


def _reset_peak() -> None:
    """Set the high-water mark to the current resident size ("5" to clear_refs, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the mark then also holds the imports' peak, which stays near the baseline


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB
