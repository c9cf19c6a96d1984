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

Byte for byte because every worker computes exactly the batches a single process would, with
the same torch thread count: CPU kernels (oneDNN's convolutions, say) choose how to block and
sum by the batch size and the thread count, so a sample in a batch of another size, or on
another number of threads, may differ by an ULP. So (1) a piece begins only where a single
process computing the same missing chunks would begin a batch (`shard_pieces`), and (2) each
task runs on the driver's torch thread count (`torch.get_num_threads()` there: what `extract`
without --workers uses in the same environment, OMP_NUM_THREADS or torch's default). Several
workers on one host then share its cores; to avoid that, give the driver fewer threads
(OMP_NUM_THREADS=cores/workers) and compare with a single-process run given as many.
A piece that dask retries after its worker died computes only what the first attempt left
unstamped, in batches of its own, so only those chunks may differ by an ULP.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import uuid
from dataclasses import replace
from typing import Callable, Optional

import torch

from cache import FeatureCacheError, split_of
from pipeline.code_version import code_version, require_drivers_code
from pipeline.config import ExtractConfig, build, to_dict
from pipeline.dask_cluster import dask_client, require_dask, torch_threads, workers_per_host
from pipeline.devices import usable_cores
from pipeline.runners.extract import Extraction, extract_chunks, open_writer, plan_extraction

log = logging.getLogger(__name__)
TASK_RETRIES = 2
PIECE_MODULES = ("pipeline.runners.distributed_extract",)  # what computes a piece: this code and all it imports


class ExtractTasksFailed(FeatureCacheError):
    """Some pieces failed after their retries; what they stamped is kept, rerun to finish."""


def run_distributed_extract(cfg: ExtractConfig, scheduler: Optional[str] = None, workers: int = 2, overwrite: bool = False,
                            host: Optional[str] = None) -> Extraction:
    """host: the interface a local cluster listens on (see dask_cluster.cluster_host)."""
    require_dask("extract --workers/--scheduler (extraction on a dask cluster)")
    t0 = time.perf_counter()
    threads = torch.get_num_threads()  # what this command without --workers would compute with
    plan = plan_extraction(cfg)
    log.info("plan:\n%s", plan.report())
    with open_writer(plan, overwrite) as writer:  # the driver holds the lease; workers write under it
        missing = {group: writer.missing_chunks(group) for group, _, _ in plan.groups}  # each split, then its views
        if any(missing.values()):
            from distributed import as_completed

            with dask_client(scheduler, workers, host) as client:
                per_host = workers_per_host(client)
                pieces = shard_pieces(missing, plan.chunks.chunks_per_shard, 2 * sum(per_host.values()), cfg.runtime.batch_size,
                                      lambda group, c: len(range(*plan.chunks.chunk_range(c, len(plan.sources[split_of(group)])))))
                log.info("dask: %d pieces of whole shards on %d workers, %d torch thread(s) each; dashboard %s",
                         len(pieces), sum(per_host.values()), threads, client.dashboard_link)
                cores = usable_cores()
                if not scheduler and workers * threads > cores:
                    log.warning("%d workers x %d torch threads (the driver's, so that the store equals a single-process run's) "
                                "share %d cores; OMP_NUM_THREADS=%d for this run (and a run without --workers to compare) avoids that",
                                workers, threads, cores, max(1, cores // workers))
                code = code_version(PIECE_MODULES)
                # Keys unique to this run: a scheduler keeps the first task of a key and drops a
                # later one's function, so another driver's piece of the same name would run instead.
                run = uuid.uuid4().hex[:8]
                futures = [client.submit(extract_piece, to_dict(cfg), split, chunks, writer.creation_id, code, threads, pure=False, retries=TASK_RETRIES,
                                         key=f"extract-{run}-{split}-{chunks[0]}") for split, chunks in pieces]
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
    streamed = sum(len(range(*plan.chunks.chunk_range(c, len(plan.sources[split_of(g)])))) for g, chunks in missing.items() for c in chunks)
    return Extraction(plan, streamed, time.perf_counter() - t0 if streamed else 0.0)


def shard_pieces(missing: dict[str, list[int]], chunks_per_shard: int, pieces_per_split: int, batch_size: int = 1,
                 chunk_len: Callable[[str, int], int] = lambda split, chunk: 1) -> list[tuple[str, list[int]]]:
    """Missing chunks grouped into whole shards, the shards of each split dealt into about
    `pieces_per_split` contiguous pieces (contiguous: each worker reads its images in order).

    A piece begins only after a multiple of `batch_size` missing samples of its split
    (`chunk_len(split, chunk)`: the samples of a chunk), where a single process computing the
    same missing chunks begins a batch, so that every batch is that process's. Where few shard
    boundaries qualify (a batch size that does not divide a shard's samples), pieces are fewer."""
    out = []
    for split, chunks in missing.items():
        shards: dict[int, list[int]] = {}
        for c in chunks:
            shards.setdefault(c // chunks_per_shard, []).append(c)
        runs: list[list[int]] = []  # shards between two places where a piece may begin
        done = 0
        for s in sorted(shards):
            if done % batch_size == 0:
                runs.append([])
            runs[-1].extend(shards[s])
            done += sum(chunk_len(split, c) for c in shards[s])
        n = max(1, min(pieces_per_split, len(runs)))
        bounds = [round(i * len(runs) / n) for i in range(n + 1)]
        for a, b in zip(bounds, bounds[1:]):
            if b > a:
                out.append((split, [c for run in runs[a:b] for c in run]))
    return out


def extract_piece(cfg_data: dict, split: str, chunks: list[int], creation_id: Optional[str], code: Optional[str],
                  threads: Optional[int] = None) -> int:
    """The dask task: rebuild the plan from the config, reopen the store (its fingerprint must
    match: a worker with other weights or data is refused; and it must be the creation the
    driver opened: a task that outlives its driver stamps nothing into the next run's store),
    compute the given chunks with `threads` torch threads (the driver's; None: this process's own).
    code: the driver's code_version(PIECE_MODULES); a worker running other code is refused,
    as its chunks could differ from the driver's."""
    require_drivers_code(code, PIECE_MODULES)
    with torch_threads(threads):
        return _extract_piece(build(ExtractConfig, cfg_data, source="the driver's config"), split, chunks, creation_id)


def _extract_piece(cfg: ExtractConfig, split: str, chunks: list[int], creation_id: Optional[str]) -> int:
    if multiprocessing.current_process().daemon and cfg.runtime.num_workers != 0:
        # dask workers are daemonic by default and may not start loader processes; the
        # workers themselves are the parallelism (dask config distributed.worker.daemon:
        # false lifts this).
        log.info("dask worker is daemonic: decoding images in the worker process")
        cfg = replace(cfg, runtime=replace(cfg.runtime, num_workers=0))
    plan = plan_extraction(cfg)
    try:
        return extract_chunks(plan, open_writer(plan, lease=False, creation_id=creation_id), split, chunks)  # the driver holds the lease
    finally:
        plan.taps.close()
