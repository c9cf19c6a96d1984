"""Storage encodings (cache/encodings.py): for every registered dtype, the bytes a store holds
are those an oracle written here computes (numpy's float16 cast, a hand-written bfloat16
rounding, a hand-computed int8 scale), and the torch reader and the dask reader decode the
same stored bytes to the same values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from cache import ENCODINGS, BackgroundWriter, LayerSpec, StoreError, StoreWriter, open_store
from cache.encodings import encoding
from tests.conftest import fake_fingerprint

# Facts about the formats, written out rather than taken from the registry.
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "int8": 1}
SCALE_BYTES = {"float16": 0, "bfloat16": 0, "float32": 0, "int8": 2}  # int8: float16 per sample and channel
SPECS = [LayerSpec("tokens", 5, 6, prefix_tokens=1, grid=(2, 2)), LayerSpec("pooled", 1, 3)]
N = 10  # 3 chunks of 4 (the last one short), 2 chunks per shard


def features(n: int = N, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {s.name: torch.randn(n, s.tokens, s.dim, generator=g) * 3 for s in SPECS}
    out["tokens"][:, :, 0] = 0  # an all-zero channel: int8's scale is 0 there
    # Ties between two bfloat16 values (1 + 2^-8 and 1 + 3 * 2^-8): rounding goes to even.
    out["tokens"][0, 0, 1:3] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8])
    out["tokens"][1, 2, 4] = 60000.0  # large, still finite in float16
    return out


def write_store(path, dtype: str, feats: dict[str, torch.Tensor]) -> None:
    splits = {"train": ([f"s{i}" for i in range(N)], np.arange(N) % 2)}
    writer = StoreWriter.open(str(path), fake_fingerprint(SPECS, dtype, samples_per_chunk=4, chunks_per_shard=2), splits, ("zstd", 3), {})
    try:
        background = BackgroundWriter(writer, "train", writer.missing_chunks("train"))
        for start in range(0, N, 3):  # batches that straddle chunks
            idx = np.arange(start, min(start + 3, N))
            background.put(idx, {k: v[idx] for k, v in feats.items()}, np.ones(len(idx), bool))
        background.close()
        writer.finalize()
    finally:
        writer.close()


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounding to nearest even (finite values)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def int8_oracle(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample and channel: scale = the smallest float16 with scale * 127 >= absmax (the
    nearest one, or the next one up), q = round-half-even(x / scale)."""
    absmax = np.abs(x).max(axis=1)
    nearest = (absmax / np.float32(127)).astype(np.float16)
    up = np.nextafter(nearest, np.float16(np.inf))
    scale = np.where(nearest.astype(np.float32) * np.float32(127) >= absmax, nearest, up).astype(np.float16)
    s32 = scale.astype(np.float32)
    q = np.clip(np.rint(x / np.where(s32 > 0, s32, np.float32(1))[:, None, :]), -127, 127).astype(np.int8)
    return q, scale


def oracle(dtype: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(stored values, stored scales or None, decoded float32) for float32 input x [B, T, D]."""
    if dtype == "float32":
        return x, None, x
    if dtype == "float16":
        return x.astype(np.float16), None, x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        bits = bfloat16_bits(x)
        return bits, None, (bits.astype(np.uint32) << 16).view(np.float32)
    q, scale = int8_oracle(x)
    return q, scale, q.astype(np.float32) * scale.astype(np.float32)[:, None, :]


def test_the_registry_holds_every_storage_dtype():
    assert list(ENCODINGS) == list(ITEMSIZE)  # the config's store.dtype choices (tests/test_config.py)
    with pytest.raises(ValueError, match="unknown storage dtype 'int4'"):
        encoding("int4")


@pytest.mark.parametrize("dtype", list(ENCODINGS))
def test_stored_bytes_match_the_oracle_and_both_readers_agree(tmp_path, dtype):
    pytest.importorskip("dask.array")
    enc = ENCODINGS[dtype]
    feats = features()
    write_store(tmp_path / "store.zarr", dtype, feats)
    root = zarr.open_group(str(tmp_path / "store.zarr"), mode="r")
    reader = open_store(tmp_path / "store.zarr")
    assert enc.itemsize == ITEMSIZE[dtype] and enc.scale_bytes == SCALE_BYTES[dtype]
    for spec in SPECS:
        x = feats[spec.name].numpy()
        want_values, want_scales, want_decoded = oracle(dtype, x)
        arr = root[f"train/layers/{spec.name}"]
        assert arr.dtype.itemsize == enc.itemsize and arr.dtype == want_values.dtype
        stored = arr[:]
        assert stored.tobytes() == np.ascontiguousarray(want_values).tobytes()  # the very bytes
        if want_scales is None:
            assert f"train/scales/{spec.name}" not in root
        else:
            scales = root[f"train/scales/{spec.name}"]
            assert scales.dtype.itemsize == enc.scale_bytes
            assert scales[:].tobytes() == want_scales.tobytes()
        assert enc.bytes_per_sample(spec.tokens, spec.dim) == spec.tokens * spec.dim * ITEMSIZE[dtype] + spec.dim * SCALE_BYTES[dtype]

        torch_read = reader.read("train", [spec.name], 0, N)[spec.name]
        dask_read = reader.dask_array("train", spec.name).compute()
        assert torch_read.dtype == torch.float32 and dask_read.dtype == np.float32
        np.testing.assert_array_equal(torch_read.numpy(), want_decoded)
        np.testing.assert_array_equal(dask_read, want_decoded)
        batched = torch.cat([b.features[spec.name] for b in reader.batches("train", [spec.name], 3, shuffle=False)])
        np.testing.assert_array_equal(batched.numpy(), want_decoded)


def test_bfloat16_oracle_agrees_with_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = features()["tokens"].numpy()
    np.testing.assert_array_equal(bfloat16_bits(x), x.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert bfloat16_bits(np.float32([1 + 2**-8, 1 + 3 * 2**-8])).tolist() == [0x3F80, 0x3F82]  # ties to even


@pytest.mark.parametrize("dtype", list(ENCODINGS))
def test_unwritten_elements_decode_to_nan_in_both_decoders(dtype):
    enc = ENCODINGS[dtype]
    arr = zarr.create_array(zarr.storage.MemoryStore(), shape=(2, 3, 4), dtype=enc.zarr_dtype, fill_value=enc.fill_value)
    scales = None
    if enc.has_scales:
        scales = zarr.create_array(zarr.storage.MemoryStore(), shape=(2, 4), dtype=enc.scale_dtype, fill_value=float("nan"))[:]
    assert torch.isnan(enc.decode(arr[:], scales)).all()
    assert np.isnan(enc.decode_numpy(arr[:], scales)).all()


@pytest.mark.parametrize("dtype", list(ENCODINGS))
def test_decoders_agree_in_other_output_dtypes(dtype):
    """torch's and numpy's decoders round the same stored bytes alike in float64 and float16 too."""
    enc = ENCODINGS[dtype]
    values, scales = enc.encode(features()["tokens"])
    np.testing.assert_array_equal(enc.decode(values, scales, torch.float64).numpy(), enc.decode_numpy(values, scales, "float64"))
    np.testing.assert_array_equal(enc.decode(values, scales, torch.float16).numpy(), enc.decode_numpy(values, scales, "float16"))


@pytest.mark.parametrize("dtype", list(ENCODINGS))
def test_a_non_finite_value_never_enters_the_store(tmp_path, dtype):
    """Refused by the writer for every dtype (bfloat16 included: its stored bits are integers)."""
    feats = features()
    feats["pooled"][6, 0, 1] = float("inf")
    with pytest.raises(StoreError, match="pooled"):
        write_store(tmp_path / "store.zarr", dtype, feats)


@pytest.mark.parametrize("dtype", list(ENCODINGS))
def test_finite_rows_says_which_samples_decode_to_finite_values(dtype):
    """What a held store is checked with, against the definition: decode, then isfinite."""
    enc = encoding(dtype)
    stored, scales = enc.encode(features()["tokens"])
    stored, scales = stored.copy(), None if scales is None else scales.copy()
    # Sample 1: NaN; 2: +inf; 3: -inf, each written as the format holds it; 4: largest finite values.
    if dtype == "int8":  # values are q * scale: only a scale can be non-finite
        scales[1, 3], scales[2, 0], scales[3, 5] = np.nan, np.inf, -np.inf
        stored[4], scales[4] = 127, np.finfo(np.float16).max
    elif dtype == "bfloat16":
        stored[1, 0, 3], stored[2, 4, 1], stored[3, 2, 2] = 0x7FC1, 0x7F80, 0xFF80
        stored[4] = 0x7F7F  # the largest finite bfloat16
    else:
        stored[1, 0, 3], stored[2, 4, 1], stored[3, 2, 2] = np.nan, np.inf, -np.inf
        stored[4] = np.finfo(stored.dtype).max
    expected = torch.isfinite(enc.decode(stored, scales)).flatten(1).all(dim=1).numpy()
    assert expected.tolist() == [True, False, False, False] + [True] * (N - 4)
    assert enc.finite_rows(stored, scales).tolist() == expected.tolist()


@pytest.mark.parametrize("absmax", [1e-2, 1e-4, 1e-5, 3e-6])
def test_int8_keeps_small_channels(absmax):
    """A channel far below 1 gets a subnormal float16 scale; rounded to nearest it fell below
    absmax / 127, so the largest values clamped (errors of 2-30% of absmax, reviewer) and the
    channel read as 0 below ~4e-6. Rounded up, the error stays within half a scale step."""
    x = torch.linspace(-absmax, absmax, 255, dtype=torch.float32).reshape(1, 255, 1)
    enc = encoding("int8")
    q, scale = enc.encode(x)
    back = enc.decode(q, scale)
    step = float(scale.astype(np.float32).max())
    assert step * 127 >= absmax * (1 - 1e-7) and float((back - x).abs().max()) <= step / 2 * (1 + 1e-6)
    assert float((back - x).abs().max()) / absmax < 0.01
