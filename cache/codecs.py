"""The bytes-to-bytes codecs of every array: a compressor, then a checksum.

Every array's codecs end with crc32c (zarr v3's core checksum codec, after the compressor), so
a flipped bit or a truncated object is refused on read instead of decoding to other values.
How layer values themselves are encoded (storage dtypes) is cache/encodings.py.
"""

from __future__ import annotations

from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

# The compressors, by the name store.compressor.name gives: level -> zarr codecs.
COMPRESSORS = {
    "zstd": lambda level: [ZstdCodec(level=level)],
    "lz4": lambda level: [BloscCodec(cname="lz4", clevel=level, shuffle="shuffle")],
    "none": lambda level: [],
}
# The levels each takes (the config refuses others: lz4's were clamped without a word, and
# zstd's failed inside zarr with a raw error). "none" takes any.
COMPRESSOR_LEVELS = {"zstd": (-131072, 22), "lz4": (1, 9)}


def checked_codecs(name: str, level: int) -> list:
    """The bytes-to-bytes codecs of an array: the compressor, then a crc32c of its output."""
    if name not in COMPRESSORS:
        raise ValueError(f"store.compressor.name: got {name!r}, expected zstd, lz4 or none")
    return COMPRESSORS[name](level) + [Crc32cCodec()]


__all__ = ["COMPRESSOR_LEVELS", "COMPRESSORS", "checked_codecs"]
