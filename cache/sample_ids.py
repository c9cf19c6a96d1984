"""Sample ids in core zarr v3 data types, readable by any v3 implementation.

zarr-python's variable-length `string` data type is an extension that other implementations
(tensorstore, for one) cannot open, so the ids of a split are stored as two plain arrays:

    <split>/sample_ids         uint8 [total bytes]   the ids' UTF-8 bytes, concatenated
    <split>/sample_id_offsets  int64 [N + 1]         id i is bytes[offsets[i]:offsets[i + 1]]
"""

from __future__ import annotations

import numpy as np
import zarr


def write_sample_ids(group: zarr.Group, ids: list[str], codecs: list) -> None:
    encoded = [str(i).encode("utf-8") for i in ids]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    group.create_array("sample_ids", shape=(len(data),), dtype="uint8", chunks=(max(len(data), 1),), compressors=codecs,
                       fill_value=0, dimension_names=("byte",))[:] = data
    group.create_array("sample_id_offsets", shape=(len(offsets),), dtype="int64", chunks=(len(offsets),), compressors=codecs,
                       fill_value=0, dimension_names=("sample",))[:] = offsets


def read_sample_ids(group: zarr.Group) -> list[str]:
    data = group["sample_ids"][:].tobytes()
    offsets = group["sample_id_offsets"][:]
    return [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]
