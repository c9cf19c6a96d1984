"""Config validation: every problem named at once, overrides, and every shipped YAML is valid."""

from pathlib import Path

import pytest

from pipeline.config import CONFIG_CLASSES, ConfigError, ExtractConfig, apply_overrides, build, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_bad_key_is_named_in_one_error():
    bad = {
        "backbone": {"nmae": "test_vit", "layers": [0, 1.5]},
        "data": {"kind": "imagefolder", "root": "x", "on_corrupt": "ignore"},
        "store": {"path": "s", "dtype": "fp16"},
        "runtime": {"batch_size": 0},
        "extra_section": {},
    }
    with pytest.raises(ConfigError) as e:
        build(ExtractConfig, bad)
    msg = str(e.value)
    for expected in [
        "backbone.nmae: unknown key; did you mean 'name'?",
        "backbone.name: required key is missing",
        "backbone.layers[1]: got 1.5",
        "data.kind: got 'imagefolder'",
        "did you mean 'image_folder'?",
        "data.on_corrupt: got 'ignore', expected one of ['fail', 'skip']",
        "store.dtype: got 'fp16'",
        "runtime.batch_size: got 0, expected > 0",
        "extra_section: unknown key",
    ]:
        assert expected in msg, f"{expected!r} missing from:\n{msg}"
    assert len(e.value.problems) == 8


def test_dotted_overrides_are_parsed_as_yaml():
    data = apply_overrides({"store": {"path": "a"}}, ["store.dtype=int8", "backbone.layers=[0, -1]", "store.chunk_mb=0.5"])
    assert data["store"] == {"path": "a", "dtype": "int8", "chunk_mb": 0.5}
    assert data["backbone"]["layers"] == [0, -1]
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["store.dtype"])


def test_semantic_checks_name_key_and_value():
    with pytest.raises(ConfigError) as e:
        build(ExtractConfig, {
            "backbone": {"name": "m"}, "data": {"kind": "torchvision", "root": "r", "limit": {"tset": 3}},
            "store": {"path": "p", "chunks_per_shard": 0}, "preprocess": {"mean": [0.5, 0.5]},
        })
    msg = str(e.value)
    assert "data.name: required when kind is 'torchvision'" in msg
    assert "data.limit.tset: 'tset' is not one of splits" in msg
    assert "store.chunks_per_shard: got 0" in msg
    assert "preprocess.mean: got [0.5, 0.5], expected 3 values" in msg


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    """Line 1 is the command that runs the file; its job's config class must accept the rest."""
    first = path.read_text().splitlines()[0].split()
    assert first[:4] == ["#", "python", "-m", "pipeline"], f"{path.name} should start with the command that runs it"
    assert first[4] in CONFIG_CLASSES, f"{path.name}: unknown command {first[4]!r}"
    load_config(CONFIG_CLASSES[first[4]], str(path))


def test_config_choices_are_the_registries_names():
    """store.dtype, store.tokens, store.compressor.name and data.kind take exactly the names in
    their registries, and a wrong value's error lists them."""
    from cache import COMPRESSORS, ENCODINGS
    from pipeline.backbones.tokens import TOKEN_REDUCTIONS
    from pipeline.data import DATA_SOURCES

    shards = {"train": "train.tar", "val": "val.tar"}  # what data.kind webdataset needs besides its name
    base = {"backbone": {"name": "m"}, "data": {"kind": "npz", "root": "r", "name": "X", "shards": shards}, "store": {"path": "p"}}
    for key, registry in [("store.dtype", ENCODINGS), ("store.tokens", TOKEN_REDUCTIONS),
                          ("store.compressor.name", COMPRESSORS), ("data.kind", DATA_SOURCES)]:
        for name in registry:
            build(ExtractConfig, apply_overrides(base, [f"{key}={name}"]))
        with pytest.raises(ConfigError) as e:
            build(ExtractConfig, apply_overrides(base, [f"{key}=nope"]))
        assert f"{key}: got 'nope', expected one of {list(registry)}" in str(e.value)
