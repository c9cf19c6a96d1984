"""Layers held in memory, in their stored dtype, shared by every reader of a store in a process.

Reading a store every epoch re-reads and re-decompresses the same chunks: for a store that
fits in memory, `CacheReader.hold(...)` reads each array of a split (and of its views) once,
checks it as a streamed read would (every stamped chunk's objects present, checksums, finite
values for computed samples), and keeps the raw values here. Batches then slice them from
RAM by the same permutation, so they equal streamed batches value for value. On a GPU run
the arrays live on the GPU, and batches are gathered and decoded there: no host-to-device
copy per batch.

The arrays are kept per process and keyed by the store's identity (its location and a hash of
its manifest's fingerprint and creation time) and the array's path, so every fused group of
a `train`, and every sweep job a dask worker runs on the same store, decode a store once.
A hold that does not fit the budget first forgets other stores, least recently held first;
what still does not fit streams, as before; the choice is logged.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

log = logging.getLogger(__name__)

# (store identity, array path) -> the array's values as stored (a CPU tensor shares the
# numpy array's memory).
_ARRAYS: dict[tuple[str, str], torch.Tensor] = {}
# Store identities, least recently held first: which store a hold that does not fit forgets first.
_RECENT: dict[str, None] = {}
_LOCK = threading.Lock()  # guards _ARRAYS and _RECENT
# One hold at a time per process, so that its budget check and its loads are one step: two
# threads holding at once could otherwise both pass the budget, or both read the same store.
HOLDING = threading.Lock()
# How many arrays were read into RAM by this process (tests count decodes with it).
loads = 0


def available_bytes() -> int:
    """The memory the kernel says can be given to a process without swapping (MemAvailable),
    or the physical memory where /proc/meminfo is absent."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget(device: torch.device = torch.device("cpu")) -> int:
    """Half of the memory available to hold arrays on `device` (RAM, or a GPU's memory): what
    is free now plus what is held there already. Room is left for the adapters, the batches
    and whatever else the machine runs."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_bytes()
    return (free + held_bytes(device)) // 2


def get(store: str, path: str) -> torch.Tensor | None:
    return _ARRAYS.get((store, path))


def held_bytes(device: torch.device | None = None) -> int:
    """Bytes held on `device` (None: anywhere)."""
    with _LOCK:
        arrays = list(_ARRAYS.values())
    return sum(a.nbytes for a in arrays if device is None or a.device == device)


def put(store: str, path: str, values: torch.Tensor) -> None:
    global loads
    with _LOCK:
        _ARRAYS[(store, path)] = values
        loads += 1


def move(store: str, path: str, device: torch.device) -> None:
    """Keep a held array on `device` from now on (a copy; nothing is read again)."""
    with _LOCK:
        values = _ARRAYS.get((store, path))
        if values is not None and values.device != device:
            _ARRAYS[(store, path)] = values.to(device)


def touch(store: str) -> None:
    """Mark `store` as the most recently held."""
    with _LOCK:
        _RECENT.pop(store, None)
        _RECENT[store] = None


def make_room(store: str, need: int, budget: int, device: torch.device) -> list[str]:
    """Forget other stores' arrays on `device`, least recently held first, until `need` more
    bytes fit `budget` there; nothing when even that would not make them fit (a long-lived
    dask worker would otherwise keep every store it held, and later stores would stream).
    Returns the stores forgotten. An epoch reading one of them keeps its arrays until it ends."""
    with _LOCK:
        sizes: dict[str, int] = {}
        for (s, _), a in _ARRAYS.items():
            if s != store and a.device == device:
                sizes[s] = sizes.get(s, 0) + a.nbytes
        over = sum(a.nbytes for a in _ARRAYS.values() if a.device == device) + need - budget
        if over <= 0 or sum(sizes.values()) < over:
            return []
        victims, rank = [], {s: i for i, s in enumerate(_RECENT)}
        for s in sorted(sizes, key=lambda s: rank.get(s, -1)):
            if over <= 0:
                break
            victims.append(s)
            over -= sizes[s]
        for key in [k for k in _ARRAYS if k[0] in victims and _ARRAYS[k].device == device]:
            del _ARRAYS[key]
        return victims


def release(store: str | None = None) -> None:
    """Forget the arrays of one store (None: of every store)."""
    with _LOCK:
        for key in [k for k in _ARRAYS if store is None or k[0] == store]:
            del _ARRAYS[key]
        for s in [s for s in _RECENT if store is None or s == store]:
            del _RECENT[s]
