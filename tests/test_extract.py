"""Stage one end to end on a tiny timm model: the cache holds exactly what a live forward gives."""

import numpy as np
import pytest
import torch

from cache import StoreError, StoreMismatchError, open_store
from pipeline.backbones.build import build_backbone
from pipeline.backbones.taps import LayerTaps
from pipeline.backbones.tokens import reduce_tokens
from pipeline.data import open_split
from pipeline.runners.extract import plan_extraction, run_extract
from tests.conftest import tiny_config


def live_features(cfg, split):
    """The reference: a fresh model, the same images, a plain forward with hooks."""
    backbone = build_backbone(cfg.backbone, cfg.preprocess)
    source = open_split(cfg.data, split)
    transform = backbone.transform()
    images = torch.stack([transform(source.load(i)) for i in range(len(source))])
    taps = LayerTaps(backbone.model, cfg.backbone.layers, cfg.backbone.block_input, backbone.image_size)
    raw = taps(images)
    return {s.name: reduce_tokens(raw[s.name], s, cfg.store.tokens, cfg.store.grid_size) for s in taps.specs}


def assert_store_matches_live(cfg, atol):
    reader = open_store(cfg.store.path)
    for split in cfg.data.splits:
        expected = live_features(cfg, split)
        assert set(reader.layers) == set(expected)
        got = reader.read(split, list(expected), 0, reader.num_samples(split))
        for name, ref in expected.items():
            assert got[name].shape == ref.shape, name
            torch.testing.assert_close(got[name], ref, atol=atol, rtol=1e-2, msg=f"layer {name}, split {split}")
    return reader


def by_hand(tokens: torch.Tensor, reduction: str) -> torch.Tensor:
    """test_vit at 64 px: [B, 1 + 16, D], CLS then a 4x4 patch grid; `grid` = CLS + the means of
    its four 2x2 cells, row by row (store.grid_size 2)."""
    cls, patches = tokens[:, :1], tokens[:, 1:]
    mean = patches.mean(1, keepdim=True)
    if reduction == "grid":
        grid = patches.reshape(len(tokens), 4, 4, -1)
        cells = [grid[:, r:r + 2, c:c + 2].mean((1, 2)) for r in (0, 2) for c in (0, 2)]
        return torch.cat([cls, torch.stack(cells, 1)], 1)
    return {"all": tokens, "cls": cls, "mean": mean, "cls_mean": torch.cat([cls, mean], 1)}[reduction]


@pytest.mark.parametrize("tokens", ["all", "cls", "mean", "cls_mean", "grid"])
def test_vit_cache_equals_live_forward(tmp_path, image_folder, tokens):
    """Against timm's own forward, tapped with plain hooks, and each reduction by hand (the
    reference shares no code with the taps or the reductions)."""
    cfg = tiny_config(tmp_path, image_folder, f"store.tokens={tokens}")
    run_extract(cfg)
    reader = open_store(cfg.store.path)
    backbone = build_backbone(cfg.backbone, cfg.preprocess)
    model, transform = backbone.model, backbone.transform()
    for split in cfg.data.splits:
        source = open_split(cfg.data, split)
        images = torch.stack([transform(source.load(i)) for i in range(len(source))])
        seen = {}
        hooks = [model.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("embed", args[0])),
                 model.blocks[0].register_forward_hook(lambda m, a, out: seen.__setitem__("blocks.0", out)),
                 model.blocks[5].register_forward_hook(lambda m, a, out: seen.__setitem__("blocks.5", out)),
                 model.blocks[2].mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("blocks.2.mlp", out))]
        with torch.no_grad():
            model(images)
        for h in hooks:
            h.remove()
        got = reader.read(split, list(seen), 0, len(source))
        for name, raw in seen.items():
            assert raw.shape[1] == 17
            torch.testing.assert_close(got[name], by_hand(raw, tokens), atol=2e-3, rtol=1e-2, msg=f"layer {name}, split {split}")
    names = list(reader.layers)
    assert names == ["embed", "blocks.0", "blocks.5", "blocks.2.mlp"]  # block input first, then config order
    expected_tokens = {"all": 17, "cls": 1, "mean": 1, "cls_mean": 2, "grid": 1 + 4}[tokens]
    assert all(spec.tokens == expected_tokens for spec in reader.layers.values())
    assert reader.layers["blocks.0"].block_index == 0 and reader.layers["embed"].block_index == -1


def test_cnn_feature_maps_are_stored_as_tokens(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder, "backbone.name=test_efficientnet", "backbone.layers=[-1, 1, conv_head]")
    run_extract(cfg)
    reader = assert_store_matches_live(cfg, atol=2e-3)
    spec = reader.layers["conv_head"]
    assert spec.prefix_tokens == 0 and spec.grid is not None and spec.tokens == spec.grid[0] * spec.grid[1]
    assert "embed" not in reader.layers  # CNNs have no block-0 token input


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("bfloat16", 3e-2), ("int8", 3e-2)])
def test_storage_dtypes_round_trip(tmp_path, image_folder, dtype, atol):
    cfg = tiny_config(tmp_path, image_folder, f"store.dtype={dtype}")
    run_extract(cfg)
    assert_store_matches_live(cfg, atol=atol)
    reader = open_store(cfg.store.path)
    dask_layer = reader.dask_array("train", "blocks.0").compute()
    np.testing.assert_allclose(dask_layer, reader.read("train", ["blocks.0"], 0, 12)["blocks.0"].numpy(), atol=1e-6)


def test_store_layout_is_plain_zarr_v3(tmp_path, image_folder):
    """Any zarr v3 reader sees named, sharded arrays; our manifest is in the root attributes."""
    import zarr

    cfg = tiny_config(tmp_path, image_folder)
    run_extract(cfg)
    root = zarr.open_group(cfg.store.path, mode="r")
    arr = root["train/layers/blocks.0"]
    assert arr.metadata.zarr_format == 3
    assert arr.shape == (12, 17, 64) and arr.chunks == (4, 17, 64) and arr.shards == (8, 17, 64)
    assert arr.metadata.dimension_names == ("sample", "token", "channel")
    # Sample ids in core v3 types: UTF-8 bytes and [N + 1] offsets.
    data, offsets = root["train/sample_ids"][:].tobytes(), root["train/sample_id_offsets"][:]
    ids = [data[a:b].decode() for a, b in zip(offsets[:-1], offsets[1:])]
    assert ids[:3] == ["cat/cat_000.jpg", "cat/cat_001.jpg", "cat/cat_002.jpg"] and len(ids) == 12
    assert [c.to_dict()["name"] for c in arr.metadata.codecs[0].codecs][-1] == "crc32c"  # inside each shard: the checksum last
    assert root["train/labels"][:].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    manifest = root.attrs["feature_cache"]
    assert manifest["complete"] and manifest["classes"] == ["cat", "dog", "eel"]
    assert manifest["config"]["backbone"]["name"] == "test_vit"


def test_rerun_of_complete_store_writes_nothing(tmp_path, image_folder, monkeypatch):
    """Not a byte, not the root zarr.json, not a lease: so a rerun works on a read-only store."""
    import cache.lease

    cfg = tiny_config(tmp_path, image_folder)
    run_extract(cfg)
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file() and "images" not in p.parts}

    def no_lease(self):
        raise AssertionError("a rerun of a complete store took the writer's lease")

    monkeypatch.setattr(cache.lease.StoreLease, "acquire", no_lease)
    run_extract(cfg)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file() and "images" not in p.parts}
    assert files == after


def test_different_config_is_refused_with_the_difference(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder)
    run_extract(cfg)
    other = tiny_config(tmp_path, image_folder, "backbone.layers=[1]", "preprocess.image_size=48")
    with pytest.raises(StoreMismatchError) as e:
        run_extract(other)
    msg = str(e.value)
    assert "layers" in msg and "preprocessing.input_size: store has [3, 64, 64], now [3, 48, 48]" in msg
    assert open_store(cfg.store.path).layers.keys() == {"embed", "blocks.0", "blocks.5", "blocks.2.mlp"}  # untouched
    run_extract(other, overwrite=True)
    assert list(open_store(cfg.store.path).layers) == ["embed", "blocks.1"]


def test_store_from_another_backbone_is_refused(tmp_path, image_folder):
    run_extract(tiny_config(tmp_path, image_folder))
    with pytest.raises(StoreMismatchError, match="backbone.name: store has 'test_vit', now 'test_vit2'"):
        run_extract(tiny_config(tmp_path, image_folder, "backbone.name=test_vit2", "backbone.layers=[0]"))


def test_foreign_directory_is_never_touched(tmp_path, image_folder):
    (tmp_path / "store.zarr").mkdir()
    (tmp_path / "store.zarr" / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a feature-cache store"):
        run_extract(tiny_config(tmp_path, image_folder), overwrite=True)
    assert (tmp_path / "store.zarr" / "precious.txt").read_text() == "keep me"


def test_dry_run_writes_nothing(tmp_path, image_folder):
    plan = plan_extraction(tiny_config(tmp_path, image_folder))
    assert not (tmp_path / "store.zarr").exists()
    report = plan.report()
    assert "train: 12, val: 12" in report and "[17, 64]" in report and "GB" in report


def test_a_store_never_mixes_rows_of_another_forward_precision(tmp_path):
    """The fingerprint records how the forward ran (device kind, CUDA autocast dtype): a store
    begun under bf16 autocast on a GPU is not resumed by a float32 forward on a CPU, nor by
    runtime.amp_dtype: float32 on the GPU (bf16 moves features far more than float16 storage)."""
    import dataclasses

    from pipeline.runners.extract import open_writer
    from tests.conftest import colour_folder

    cfg = tiny_config(tmp_path, colour_folder(tmp_path / "images", per_class=2), "backbone.layers=[-1]")
    run_extract(cfg)
    assert open_store(cfg.store.path).fingerprint.compute == {"device": "cpu", "autocast": None}
    on_gpu = dataclasses.replace(plan_extraction(cfg), device=torch.device("cuda"))  # only its fingerprint is asked
    with pytest.raises(StoreMismatchError) as e:
        open_writer(on_gpu)
    assert e.value.differences == ["compute.autocast: store has None, now 'bfloat16'", "compute.device: store has 'cpu', now 'cuda'"]
    # A dask worker of a distributed extraction (no lease: its driver holds it) on a GPU host.
    with pytest.raises(StoreMismatchError, match="made differently from this worker's plan") as e:
        open_writer(on_gpu, lease=False)
    assert "compute.device: store has 'cpu', now 'cuda'" in e.value.differences
    float32 = tiny_config(tmp_path, tmp_path / "images", "backbone.layers=[-1]", "runtime.amp_dtype=float32")
    with pytest.raises(StoreMismatchError) as e:
        open_writer(dataclasses.replace(plan_extraction(float32), device=torch.device("cuda")))
    assert e.value.differences == ["compute.device: store has 'cpu', now 'cuda'"]


def test_the_plan_says_what_extraction_would_do_with_the_store_there(tmp_path, image_folder, monkeypatch):
    """A dry run printed the whole cost for a store it would reuse, resume or refuse."""
    from tests.conftest import interrupted_extraction

    cfg = tiny_config(tmp_path, image_folder)
    assert plan_extraction(cfg).report().endswith("store      no store there yet: the whole cost above")
    interrupted_extraction(cfg, monkeypatch)
    assert plan_extraction(cfg).report().endswith("unfinished with this config: only its missing chunks are computed")
    run_extract(cfg)
    assert plan_extraction(cfg).report().endswith("complete with this config: nothing to compute")
    other = tiny_config(tmp_path, image_folder, "preprocess.image_size=48")
    assert plan_extraction(other).report().endswith("made differently (in backbone.weights_sha256, layers, preprocessing.input_size): "
                                                    "refused, unless --overwrite replaces it")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert plan_extraction(tiny_config(tmp_path, image_folder, f"store.path={tmp_path / 'notes'}")).report().endswith(
        "something there is not a feature cache: refused")


def test_the_plan_says_it_cannot_tell_rather_than_fail(tmp_path, image_folder, monkeypatch):
    """An unreadable place or an unreachable endpoint made the plan (and --dry-run) a traceback."""
    from cache.location import StoreLocation

    def unreachable(self):
        raise ConnectionError("endpoint unreachable")

    monkeypatch.setattr(StoreLocation, "root_attributes", unreachable)
    assert "store      cannot tell what is there (ConnectionError: endpoint unreachable)" in plan_extraction(tiny_config(tmp_path, image_folder)).report()
