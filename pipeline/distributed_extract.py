"""Stage one on a dask cluster: the dataset cut into shard-aligned pieces across workers.

    python -m pipeline extract CONFIG --workers 4               (a local cluster)
    python -m pipeline extract CONFIG --scheduler tcp://HOST:PORT

The driver plans, prints the cost and creates (or reopens) the store. Each task computes the
unstamped chunks of whole shards, so no two workers ever write the same object, and every
chunk is stamped on its own. A task whose worker dies is retried by dask; a rerun of the same
command redoes only what is still unstamped. The driver stamps the manifest complete last.
The arrays equal a single-process run's, byte for byte (tested). Workers need the data at
the same paths as the driver (a shared file system) and reach the store there too, or at its
URL on object storage (s3://..., with the config's storage_options and their own credentials).
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from dataclasses import replace
from typing import Optional

from pipeline.config import ExtractConfig, build, to_dict
from pipeline.dask_cluster import dask_client, share_cores, workers_per_host
from pipeline.extract import ExtractPlan, extract_chunks, open_writer, plan_extraction

log = logging.getLogger(__name__)
TASK_RETRIES = 2


class ExtractTasksFailed(RuntimeError):
    """Some pieces failed after their retries; what they stamped is kept, rerun to finish."""


def run_distributed_extract(cfg: ExtractConfig, scheduler: Optional[str] = None, workers: int = 2, overwrite: bool = False) -> ExtractPlan:
    t0 = time.perf_counter()
    plan = plan_extraction(cfg)
    log.info("plan:\n%s", plan.report())
    with open_writer(plan, overwrite) as writer:  # the driver holds the lease; workers write under it
        missing = {split: writer.missing_chunks(split) for split in plan.sources}
        if any(missing.values()):
            from distributed import as_completed

            with dask_client(scheduler, workers) as client:
                per_host = workers_per_host(client)
                pieces = shard_pieces(missing, plan.chunks.chunks_per_shard, 2 * sum(per_host.values()))
                log.info("dask: %d pieces of whole shards on %d workers", len(pieces), sum(per_host.values()))
                futures = [client.submit(extract_piece, to_dict(cfg), split, chunks, per_host, pure=False, retries=TASK_RETRIES,
                                         key=f"extract-{split}-{chunks[0]}") for split, chunks in pieces]
                failed = []
                for future in as_completed(futures):
                    try:
                        future.result()
                    except Exception as e:  # report every failed piece, not just the first
                        failed.append(f"{future.key}: {e}")
                if failed:
                    raise ExtractTasksFailed(f"{len(failed)} of {len(pieces)} pieces failed; rerun to finish: " + "; ".join(failed))
        writer.finalize()
    log.info("store complete: %s (%.1f s)", cfg.store.path, time.perf_counter() - t0)
    plan.taps.close()
    return plan


def shard_pieces(missing: dict[str, list[int]], chunks_per_shard: int, pieces_per_split: int) -> list[tuple[str, list[int]]]:
    """Missing chunks grouped into whole shards, the shards of each split dealt into about
    `pieces_per_split` contiguous pieces (contiguous: each worker reads its images in order)."""
    out = []
    for split, chunks in missing.items():
        shards: dict[int, list[int]] = {}
        for c in chunks:
            shards.setdefault(c // chunks_per_shard, []).append(c)
        ordered = [shards[s] for s in sorted(shards)]
        n = max(1, min(pieces_per_split, len(ordered)))
        bounds = [round(i * len(ordered) / n) for i in range(n + 1)]
        for a, b in zip(bounds, bounds[1:]):
            if b > a:
                out.append((split, [c for shard in ordered[a:b] for c in shard]))
    return out


def extract_piece(cfg_data: dict, split: str, chunks: list[int], per_host: Optional[dict[str, int]]) -> int:
    """The dask task: rebuild the plan from the config, reopen the store (its fingerprint must
    match: a worker with other weights or data is refused), compute the given chunks."""
    share_cores(per_host)
    cfg = build(ExtractConfig, cfg_data, source="the driver's config")
    if multiprocessing.current_process().daemon and cfg.runtime.num_workers != 0:
        # dask workers are daemonic by default and may not start loader processes; the
        # workers themselves are the parallelism (dask config distributed.worker.daemon:
        # false lifts this).
        log.info("dask worker is daemonic: decoding images in the worker process")
        cfg = replace(cfg, runtime=replace(cfg.runtime, num_workers=0))
    plan = plan_extraction(cfg)
    try:
        return extract_chunks(plan, open_writer(plan, lease=False), split, chunks)  # the driver holds the lease
    finally:
        plan.taps.close()
