"""Chunk and shard geometry along the sample axis, shared by the writer and the reader.

All arrays of a split share one chunk length along N (samples_per_chunk), so "chunk i" means
the same samples in every layer and a single completion stamp covers them all. Shards group
chunks_per_shard chunks into one object, so a large store is not millions of files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChunkPlan:
    samples_per_chunk: int
    chunks_per_shard: int

    @property
    def samples_per_shard(self) -> int:
        return self.samples_per_chunk * self.chunks_per_shard

    def n_chunks(self, n: int) -> int:
        return -(-n // self.samples_per_chunk)

    def chunk_range(self, chunk: int, n: int) -> tuple[int, int]:
        start = chunk * self.samples_per_chunk
        return start, min(start + self.samples_per_chunk, n)

    def per_sample(self, per_chunk: np.ndarray, n: int) -> np.ndarray:
        """A flag per chunk (its stamp, say) -> the same flag for each of its samples, [n] bool."""
        return np.repeat(np.asarray(per_chunk) != 0, self.samples_per_chunk)[:n]

    def shard_of(self, chunk: int) -> int:
        return chunk // self.chunks_per_shard

    @staticmethod
    def from_target(bytes_per_sample: int, target_mb: float, chunks_per_shard: int, largest_split: int) -> "ChunkPlan":
        """Samples per chunk so that the largest layer's chunk is about target_mb."""
        per_chunk = max(1, int(target_mb * 2**20 // max(bytes_per_sample, 1)))
        if per_chunk > 16:
            per_chunk -= per_chunk % 16  # round numbers make chunk boundaries easy to reason about
        return ChunkPlan(min(per_chunk, max(largest_split, 1)), chunks_per_shard)
