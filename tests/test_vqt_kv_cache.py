"""VQT with keys/values cached in stage one equals VQT computing them from the block inputs."""

import pytest
import torch

from cache import ConfigError, open_store
from pipeline.adapters import build_adapter
from pipeline.backbones.build import build_backbone
from pipeline.runners.extract import run_extract
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def kv_store(tmp_path_factory):
    from tests.conftest import write_image_folder

    tmp = tmp_path_factory.mktemp("kv")
    # float32 storage: both paths then start from exactly the same numbers.
    cfg = tiny_config(tmp, write_image_folder(tmp / "images"), "backbone.layers=[0, 1, 2, 3, 4, 5]",
                      "backbone.cache_kv=true", "store.dtype=float32")
    run_extract(cfg)
    return cfg


def test_store_holds_kv_of_every_block(kv_store):
    reader = open_store(kv_store.store.path)
    kv = [s for s in reader.layers.values() if s.role == "keys_values"]
    assert [(s.name, s.block_index) for s in kv] == [(f"kv.{i}", i) for i in range(6)]
    assert all(s.dim == 2 * 64 and s.tokens == 17 and s.prefix_tokens == 1 for s in kv)


def test_cached_kv_gives_the_same_logits(kv_store):
    reader = open_store(kv_store.store.path)
    model = build_backbone(kv_store.backbone, kv_store.preprocess).model
    with_kv = build_adapter("vqt", reader.layers, 3, backbone_modules=model, num_queries=2)
    without = {n: s for n, s in reader.layers.items() if s.holds_features}
    torch.manual_seed(0)
    plain = build_adapter("vqt", without, 3, backbone_modules=model, num_queries=2)
    plain.load_state_dict(with_kv.state_dict())
    assert with_kv.kv_cached and not plain.kv_cached
    assert all(l.startswith("kv.") for l in with_kv.required_layers()[:-1])
    feats = reader.read("train", list(reader.layers), 0, 12)
    # Eval mode: query dropout off, so both see the same queries.
    with_kv.eval()
    plain.eval()
    torch.testing.assert_close(with_kv(feats), plain(feats), atol=1e-5, rtol=1e-5)


def test_kv_layers_are_never_a_default_input(kv_store):
    reader = open_store(kv_store.store.path)
    assert build_adapter("linear", reader.layers, 3).required_layers() == ["blocks.5"]
    assert "kv.0" not in build_adapter("losa", reader.layers, 3, rank=2).required_layers()


def test_cache_kv_needs_all_tokens(tmp_path, image_folder):
    with pytest.raises(ConfigError, match="cache_kv needs store.tokens='all'"):
        run_extract(tiny_config(tmp_path, image_folder, "backbone.cache_kv=true", "store.tokens=mean"))
