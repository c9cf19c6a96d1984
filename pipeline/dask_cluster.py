"""The dask side shared by the distributed jobs (sweeps, extraction): a client for an existing
cluster or a local one, and how many torch threads each worker may use. dask is an optional
extra (`pip install 'featurecache[dask]'`): this module imports it only inside its functions,
and a job that needs it calls `require_dask` before it starts.

A local cluster (`--workers N`) listens on 127.0.0.1 only, its scheduler, workers and dashboard
alike: none of them asks for a password, and whoever reaches the scheduler runs code on the
workers. FEATURECACHE_DASK_HOST (or the `host` argument) names another interface to listen on,
e.g. 0.0.0.0 to reach it from elsewhere.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from contextlib import contextmanager
from typing import Optional

import torch

from cache import require_extra
from pipeline.devices import usable_cores

log = logging.getLogger(__name__)


HOST_ENV = "FEATURECACHE_DASK_HOST"
DEFAULT_HOST = "127.0.0.1"


def require_dask(what: str) -> None:
    """A ConfigError saying how to install dask unless it is installed; `what` needs it."""
    require_extra(what, "dask", "dask", "distributed")


@contextmanager
def dask_client(scheduler: Optional[str], workers: int, host: Optional[str] = None):
    from distributed import Client

    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    with local_cluster(workers, host) as cluster, Client(cluster) as client:
        yield client


def cluster_host(host: Optional[str] = None) -> str:
    """The interface a local cluster listens on: `host`, else $FEATURECACHE_DASK_HOST, else 127.0.0.1."""
    return host or os.environ.get(HOST_ENV) or DEFAULT_HOST


@contextmanager
def local_cluster(workers: int, host: Optional[str] = None):
    """The default cluster: `workers` worker processes on this machine, one thread each (a
    job is CPU-bound torch, so parallelism comes from processes), listening on `cluster_host(host)`."""
    import dask
    from distributed import LocalCluster

    host = cluster_host(host)
    # dask's dashboard_address ":0" would listen on every interface whatever `host` says.
    dashboard = f"[{host}]:0" if ":" in host else f"{host}:0"
    # Worker progress bars would interleave on this terminal; the driver logs progress. The
    # cluster's start/stop chatter (INFO) is muted while it lives; warnings, such as a
    # worker restarted after dying, still show.
    dask_log = logging.getLogger("distributed")
    level = dask_log.level
    dask_log.setLevel(logging.WARNING)
    try:
        # Environment set before each worker process is spawned (the nanny's `env` would come
        # too late: spawning re-imports the driver's main script, which may import tqdm).
        # dask's default MALLOC_TRIM_THRESHOLD_=65536 is dropped: it turns off glibc's dynamic
        # mmap threshold, so every tensor over 64 KiB is a fresh mmap + page faults, and the
        # jobs' adapter steps ran ~1.4x slower than in a plain process (measured here).
        environ = "distributed.nanny.pre-spawn-environ"
        with dask.config.set({f"{environ}.TQDM_DISABLE": "1", f"{environ}.MALLOC_TRIM_THRESHOLD_": None}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host=host,
                                   dashboard_address=dashboard)
        with cluster:
            yield cluster
    finally:
        dask_log.setLevel(level)


def workers_per_host(client) -> dict[str, int]:
    from distributed.comm import get_address_host

    info = client.scheduler_info()["workers"]
    threaded = [a for a, w in info.items() if w["nthreads"] > 1]
    if threaded:
        # torch's thread count is per process: two jobs in one worker would share it.
        log.warning("dask workers %s run several tasks at once; start them with --nthreads 1", threaded)
    return dict(Counter(get_address_host(a) for a in info))


def share_cores(per_host: Optional[dict[str, int]]) -> None:
    """Inside a dask task: give torch cores / (workers on this host) threads.

    Each worker would otherwise start one OpenMP thread per core, N workers x cores threads
    would fight for the cores, and OpenMP's spinning barriers make small models many times
    slower. (dask's nanny also sets OMP_NUM_THREADS=1, which would leave a lone worker on a
    big host with one thread.) None: not on dask, the caller's setting stays.
    """
    if per_host is None:
        return
    from distributed import get_worker
    from distributed.comm import get_address_host

    sharing = per_host.get(get_address_host(get_worker().address), 1)
    torch.set_num_threads(max(1, usable_cores() // sharing))


@contextmanager
def torch_threads(threads: Optional[int]):
    """Run the body with torch's intra-op thread count set to `threads` (None: as it is), then
    put the old count back. CPU kernels (oneDNN's convolutions, say) pick their blocking by the
    thread count, so two processes round the same input alike only with the same count."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
