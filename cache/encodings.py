"""How a layer's float values are stored on disk: one registered encoding per storage dtype.

    ENCODINGS[name]  ->  zarr_dtype, itemsize, fill_value, scale_dtype / scale_bytes,
                         encode (float tensor -> stored array, scales or None),
                         decode (-> torch), decode_numpy (-> numpy, e.g. one dask block)

- float16 / float32: numpy's own.
- bfloat16: numpy has none, so the raw bfloat16 bits are stored as uint16 (array attribute
  "encoding": "bfloat16"); any reader can recover values as (uint32(bits) << 16).view(float32).
- int8: per-sample, per-channel symmetric quantisation: scale[n, d] = max_t |x[n, t, d]| / 127
  (stored as float16 in scales/<layer>), q = round(x / scale). Worth it for full token maps,
  where it halves fp16's size; for pooled layers (T = 1, 2) the scales cost more than they save.

Layer arrays are filled with NaN (the bfloat16 NaN bits; int8 layers through their NaN-filled
scales), so a chunk that is absent reads as non-finite, never as plausible zeros.

Everything that depends on the storage dtype is here: the writer, the reader (torch and
dask), verify, predict and the size estimates ask the encoding, never the dtype's name.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


def _cpu_float32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", torch.float32)


def _tensor(stored: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A stored array as a tensor: read from the store (numpy) or held in memory (a tensor,
    on the CPU or a GPU; decoding then happens there)."""
    return stored if isinstance(stored, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(stored))


@dataclass(frozen=True)
class Encoding:
    """One storage dtype. Subclasses say how values become stored bytes and back."""

    name: str
    zarr_dtype: str  # the dtype of the layer arrays
    fill_value: float | int  # what an unwritten element holds; decodes to NaN
    scale_dtype: Optional[str] = None  # the dtype of scales/<layer> [N, D], for encodings that need one
    description: str = ""  # one line, for listings

    @property
    def itemsize(self) -> int:
        """Bytes per stored value."""
        return np.dtype(self.zarr_dtype).itemsize

    @property
    def scale_bytes(self) -> int:
        """Bytes of scales per sample and channel (0: no scales array)."""
        return np.dtype(self.scale_dtype).itemsize if self.scale_dtype else 0

    @property
    def has_scales(self) -> bool:
        return self.scale_dtype is not None

    def bytes_per_sample(self, tokens: int, dim: int) -> int:
        """Uncompressed bytes of one sample of a [T, D] layer, its scales included."""
        return tokens * dim * self.itemsize + dim * self.scale_bytes

    def encode(self, x: torch.Tensor) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """float tensor [B, T, D] -> (stored array, scales [B, D] or None)."""
        raise NotImplementedError

    def decode(self, stored: np.ndarray | torch.Tensor, scales: np.ndarray | torch.Tensor | None = None,
               out: torch.dtype = torch.float32) -> torch.Tensor:
        """Stored array (numpy, or a tensor on any device) -> float tensor on the same device
        (the inverse of `encode`, up to its rounding)."""
        raise NotImplementedError

    def decode_numpy(self, stored: np.ndarray, scales: Optional[np.ndarray] = None, dtype="float32") -> np.ndarray:
        """Stored array -> float numpy array of `dtype`; for float32, equal to `decode`."""
        raise NotImplementedError

    def finite_rows(self, stored: np.ndarray, scales: Optional[np.ndarray] = None) -> np.ndarray:
        """Per sample [N] (bool): whether every value `decode` gives it (in float32) is finite,
        read from the stored values without decoding them (a held store is checked whole:
        decoding it would take seconds and four times its size in RAM for a moment)."""
        raise NotImplementedError


@dataclass(frozen=True)
class NativeFloat(Encoding):
    """A float dtype numpy and torch both have: stored as it is."""

    def encode(self, x):
        return _cpu_float32(x).to(getattr(torch, self.zarr_dtype)).numpy(), None

    def decode(self, stored, scales=None, out=torch.float32):
        return _tensor(stored).to(out)

    def decode_numpy(self, stored, scales=None, dtype="float32"):
        return stored.astype(dtype)

    def finite_rows(self, stored, scales=None):  # widening to float32 keeps a value finite or not
        return np.isfinite(stored).reshape(len(stored), -1).all(axis=1)


@dataclass(frozen=True)
class BFloat16Bits(Encoding):
    """bfloat16 as its raw bits in uint16: the upper half of a float32."""

    def encode(self, x):
        return _cpu_float32(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), None

    def decode(self, stored, scales=None, out=torch.float32):
        return _tensor(stored).view(torch.bfloat16).to(out)

    def decode_numpy(self, stored, scales=None, dtype="float32"):
        return (stored.astype(np.uint32) << 16).view(np.float32).astype(dtype)

    def finite_rows(self, stored, scales=None):  # non-finite: the 8 exponent bits all set
        return ((stored & 0x7F80) != 0x7F80).reshape(len(stored), -1).all(axis=1)


@dataclass(frozen=True)
class Int8Absmax(Encoding):
    """int8 with a per-sample, per-channel scale: value = q * scale, scale = absmax / 127 rounded
    up to a float16 (rounded to nearest, a channel with absmax below ~8e-3 got a subnormal scale
    below absmax / 127, so its largest values clamped at 127: errors up to a third of absmax,
    and 0 for the whole channel below absmax ~4e-6)."""

    def encode(self, x):
        x = _cpu_float32(x)
        absmax = x.abs().amax(dim=1)  # [B, D]
        scale = (absmax / 127.0).to(torch.float16)
        short = scale.to(torch.float32) * 127.0 < absmax
        scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale).to(torch.float32)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(x / safe[:, None, :]).clamp_(-127, 127).to(torch.int8)
        return q.numpy(), scale.to(torch.float16).numpy()

    def decode(self, stored, scales=None, out=torch.float32):
        return (_tensor(stored).to(torch.float32) * _tensor(scales).to(torch.float32)[:, None, :]).to(out)

    def decode_numpy(self, stored, scales=None, dtype="float32"):
        return stored.astype(dtype) * scales[:, None, :].astype(dtype)

    def finite_rows(self, stored, scales=None):
        # |q| <= 127 times a finite float16 scale (<= 65504) is finite in float32; a non-finite
        # scale makes every value of its channel non-finite (0 * NaN included).
        return np.isfinite(scales).reshape(len(scales), -1).all(axis=1)


BFLOAT16_NAN_BITS = 0x7FC0

# The storage dtypes, in the order configs and errors list them.
ENCODINGS: dict[str, Encoding] = {
    e.name: e
    for e in (
        NativeFloat("float16", "float16", float("nan"), description="2 bytes a value; finite up to 65504"),
        BFloat16Bits("bfloat16", "uint16", BFLOAT16_NAN_BITS, description="2 bytes a value; float32's range, 8-bit mantissa"),
        NativeFloat("float32", "float32", float("nan"), description="4 bytes a value; the backbone's values exactly"),
        Int8Absmax("int8", "int8", 0, scale_dtype="float16",  # 0 * a NaN scale reads as NaN
                   description="1 byte a value + a float16 scale per sample and channel; for full token maps"),
    )
}


def encoding(name: str) -> Encoding:
    """The registered encoding called `name`; a ValueError listing them otherwise."""
    if name not in ENCODINGS:
        near = difflib.get_close_matches(str(name), list(ENCODINGS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown storage dtype {name!r}, expected one of {list(ENCODINGS)}{hint}")
    return ENCODINGS[name]


__all__ = ["BFLOAT16_NAN_BITS", "ENCODINGS", "Encoding", "encoding"]
