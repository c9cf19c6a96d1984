"""How layer values are encoded on disk: storage dtypes and compressors.

- float16 / float32: numpy's own.
- bfloat16: numpy has none, so the raw bfloat16 bits are stored as uint16 (array attribute
  "encoding": "bfloat16"); any reader can recover values as (uint32(bits) << 16).view(float32).
- int8: per-sample, per-channel symmetric quantisation: scale[n, d] = max_t |x[n, t, d]| / 127
  (stored as float16 in scales/<layer>), q = round(x / scale). Worth it for full token maps,
  where it halves fp16's size; for pooled layers (T = 1, 2) the scales cost more than they save.

Every array's codecs end with crc32c (zarr v3's core checksum codec, after the compressor), so
a flipped bit or a truncated object is refused on read instead of decoding to other values.
Layer arrays are filled with NaN (the bfloat16 NaN bits; int8 layers through their scales),
so a chunk that is absent reads as non-finite, never as plausible zeros.
"""

from __future__ import annotations

import numpy as np
import torch
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

ZARR_DTYPE = {"float16": "float16", "bfloat16": "uint16", "float32": "float32", "int8": "int8"}
BFLOAT16_NAN_BITS = 0x7FC0


def checked_codecs(name: str, level: int) -> list:
    """The bytes-to-bytes codecs of an array: the compressor, then a crc32c of its output."""
    if name == "none":
        compressors = []
    elif name == "zstd":
        compressors = [ZstdCodec(level=level)]
    elif name == "lz4":
        compressors = [BloscCodec(cname="lz4", clevel=max(1, min(level, 9)), shuffle="shuffle")]
    else:
        raise ValueError(f"store.compressor.name: got {name!r}, expected zstd, lz4 or none")
    return compressors + [Crc32cCodec()]


def fill_value(dtype: str):
    """What an unwritten element of a layer array reads as: NaN, or 0 for int8 (whose NaN
    scales make the decoded value NaN)."""
    return {"float16": float("nan"), "float32": float("nan"), "bfloat16": BFLOAT16_NAN_BITS, "int8": 0}[dtype]


def encode(x: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float tensor [B, T, D] -> (stored array, int8 scales [B, D] or None)."""
    x = x.detach().to("cpu", torch.float32)
    if dtype == "float32":
        return x.numpy(), None
    if dtype == "float16":
        return x.to(torch.float16).numpy(), None
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), None
    if dtype == "int8":
        scale = (x.abs().amax(dim=1) / 127.0).to(torch.float16).to(torch.float32)  # [B, D]
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(x / safe[:, None, :]).clamp_(-127, 127).to(torch.int8)
        return q.numpy(), scale.to(torch.float16).numpy()
    raise ValueError(f"unknown storage dtype {dtype!r}")


def decode(stored: np.ndarray, dtype: str, scales: np.ndarray | None = None, out: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored array -> float tensor (the inverse of `encode`, up to its rounding)."""
    t = torch.from_numpy(np.ascontiguousarray(stored))
    if dtype == "bfloat16":
        return t.view(torch.bfloat16).to(out)
    if dtype == "int8":
        return (t.to(torch.float32) * torch.from_numpy(scales.astype(np.float32))[:, None, :]).to(out)
    return t.to(out)


__all__ = ["ZARR_DTYPE", "checked_codecs", "fill_value", "encode", "decode"]
