"""Reading stored bytes so that damage is an error naming the array and the chunk, never a value.

Three kinds of damage, each caught here:
- a flipped or truncated object: crc32c (the last codec of every array) or the decompressor
  fails; zarr raises, and the read is reported as a StoreError naming array and chunk;
- a missing object (a deleted shard file): zarr would read the fill value without a word, so
  before reading, the object that holds a stamped chunk must be listed in the store;
- values that decode but are not finite (NaN is also what an absent chunk inside a shard
  reads as): refused after decoding.
"""

from __future__ import annotations

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from cache.errors import StoreError


def object_key(arr: zarr.Array, sample: int) -> str:
    """The store key of the object (shard, or chunk when unsharded) holding `sample`."""
    outer = (arr.shards or arr.chunks)[0]
    return f"{arr.path}/{arr.metadata.encode_chunk_key((sample // outer,) + (0,) * (arr.ndim - 1))}"


def stored_keys(arr: zarr.Array) -> frozenset[str]:
    """Every object key under the array (one listing)."""

    async def collect():
        return frozenset([k async for k in arr.store_path.store.list_prefix(arr.path + "/")])

    return sync(collect())


class ObjectIndex:
    """Which objects exist, one listing per array, kept for the life of a reader (listed again
    before a key is called missing)."""

    def __init__(self, where: str):
        self.where = where
        self._keys: dict[str, frozenset[str]] = {}

    def require(self, arr: zarr.Array, start: int, stop: int, chunk: int | None = None) -> None:
        keys = self._keys.get(arr.path)
        if keys is None:
            keys = self._keys[arr.path] = stored_keys(arr)
        outer = (arr.shards or arr.chunks)[0]
        for first in range(start - start % outer, stop, outer):
            key = object_key(arr, first)
            if key not in keys:  # listed again before refusing: a chunk stamped since the listing (a reader of a store being written)
                keys = self._keys[arr.path] = stored_keys(arr)
            if key not in keys:
                raise StoreError(f"store {self.where!r}: {_what(arr.path, start, stop, chunk)} is stamped complete but its "
                                 f"object {key!r} is missing; run `python -m pipeline verify {self.where} --repair`, then the "
                                 "same extract command to recompute it")


def read_region(arr: zarr.Array, start: int, stop: int, where: str, chunk: int | None = None) -> np.ndarray:
    """arr[start:stop], with undecodable bytes reported as a StoreError."""
    try:
        return arr[start:stop]
    except Exception as e:  # crc32c mismatch, a truncated or garbled compressed object
        raise StoreError(f"store {where!r}: {_what(arr.path, start, stop, chunk)} cannot be decoded "
                         f"({type(e).__name__}: {str(e)[:120]}); run `python -m pipeline verify {where} --repair`, then the "
                         "same extract command to recompute it") from e


def require_finite(values: torch.Tensor | np.ndarray, path: str, start: int, stop: int, where: str, chunk: int | None = None) -> None:
    finite = torch.isfinite(values).all() if isinstance(values, torch.Tensor) else np.isfinite(values).all()
    if not finite:
        raise non_finite_error(path, start, stop, where, chunk)


def non_finite_error(path: str, start: int, stop: int, where: str, chunk: int | None = None) -> StoreError:
    return StoreError(f"store {where!r}: {_what(path, start, stop, chunk)} holds non-finite values (damaged, or never "
                      f"written); run `python -m pipeline verify {where} --repair`, then the same extract command")


def _what(path: str, start: int, stop: int, chunk: int | None) -> str:
    return f"{path} chunk {chunk} (samples {start}..{stop - 1})" if chunk is not None else f"{path} samples {start}..{stop - 1}"
