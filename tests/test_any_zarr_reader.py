"""Any zarr v3 implementation reads the whole store: every array, opened by tensorstore (an
independent implementation in C++), equals what zarr-python reads, sample ids included."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from pipeline.runners.extract import run_extract
from tests.conftest import tiny_config

ts = pytest.importorskip("tensorstore", reason="tensorstore is not installed (pip install -e '.[dev]' installs it)")


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_tensorstore_opens_every_array_of_a_store(tmp_path, image_folder, dtype):
    cfg = tiny_config(tmp_path, image_folder, f"store.dtype={dtype}")
    run_extract(cfg)
    root = zarr.open_group(cfg.store.path, mode="r")
    arrays = [name for name, node in root.members(max_depth=None) if isinstance(node, zarr.Array)]
    assert {"train/sample_ids", "train/sample_id_offsets", "train/labels", "train/valid", "train/chunk_done"} <= set(arrays)
    assert any(a.startswith("train/layers/") for a in arrays)
    for name in arrays:
        opened = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{cfg.store.path}/{name}"}}, open=True).result()
        np.testing.assert_array_equal(opened.read().result(), root[name][:], err_msg=name)
    # The ids decode from core types alone.
    data = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{cfg.store.path}/val/sample_ids"}}).result().read().result()
    offsets = root["val/sample_id_offsets"][:]
    assert bytes(data[offsets[0]:offsets[1]]).decode() == "cat/cat_000.jpg"
