"""The store contract: the manifest is written and read as one typed object, its JSON carries
what a reader without this code needs, and a store of another format version is refused."""

import json

import pytest
import zarr

from cache import FORMAT_VERSION, Manifest, StoreError, open_store
from pipeline.runners.extract import run_extract
from tests.conftest import tiny_config


def test_the_manifest_round_trips_and_its_json_describes_the_store(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder, "backbone.cache_kv=true", "backbone.layers=[1]")
    run_extract(cfg)
    raw = zarr.open_group(cfg.store.path, mode="r").attrs["feature_cache"]
    manifest = Manifest.from_json(raw, cfg.store.path)
    assert manifest.to_json() == raw
    assert manifest.complete and manifest.splits["train"].num_samples == 12
    # The top level repeats layers, chunking and storage for readers that do not parse the fingerprint.
    assert raw["layers"] == raw["fingerprint"]["layers"] and raw["storage"] == raw["fingerprint"]["storage"]
    assert raw["samples_per_chunk"] == raw["fingerprint"]["layout"]["samples_per_chunk"]
    roles = {d["name"]: (d["role"], d["block_index"]) for d in raw["layers"]}
    assert roles["blocks.1"] == ("features", 1) and roles["kv.0"] == ("keys_values", 0)
    assert open_store(cfg.store.path).layers["kv.0"].role == "keys_values"


def test_a_store_of_another_format_version_is_refused_in_one_line(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder)
    run_extract(cfg)
    meta_path = tmp_path / "store.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["feature_cache"]["format_version"] = FORMAT_VERSION - 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=f"has format version {FORMAT_VERSION - 1}, this code reads {FORMAT_VERSION}.*--overwrite") as e:
        open_store(cfg.store.path)
    assert "\n" not in str(e.value)
