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

    # What data.kind torchvision and webdataset need besides their names (a kind refuses the other's).
    needs = {"torchvision": ["data.name=X"], "webdataset": ["data.shards={train: train.tar, val: val.tar}"]}
    base = {"backbone": {"name": "m"}, "data": {"kind": "npz", "root": "r"}, "store": {"path": "p"}}
    for key, registry in [("store.dtype", ENCODINGS), ("store.tokens", TOKEN_REDUCTIONS),
                          ("store.compressor.name", COMPRESSORS), ("data.kind", DATA_SOURCES)]:
        for name in registry:
            build(ExtractConfig, apply_overrides(base, [f"{key}={name}", *(needs.get(name, []) if key == "data.kind" else [])]))
        with pytest.raises(ConfigError) as e:
            build(ExtractConfig, apply_overrides(base, [f"{key}=nope"]))
        assert f"{key}: got 'nope', expected one of {list(registry)}" in str(e.value)


def test_yaml_numbers_are_read_as_written(tmp_path):
    """YAML 1.1 (PyYAML's default) read `batch_size: 016` as octal 14, `epochs=1:30` as 90
    (base 60) and `lr: 1e-3` as a string: each was taken, or refused, without a word."""
    cfg = tmp_path / "train.yaml"
    cfg.write_text("store: s.zarr\noutput: out\nbatch_size: 016\nseed: 0100\nadapters:\n  - {kind: linear, lr: 1e-3}\n")
    train = load_config("train", str(cfg))
    assert (train.batch_size, train.seed, train.adapters[0].lr) == (16, 100, 0.001)
    with pytest.raises(ConfigError, match=r"epochs: got '1:30', expected an integer"):
        load_config("train", str(cfg), ["epochs=1:30"])
    sweep = {"store": "s.zarr", "output": "o", "space": [{"kind": "linear", "lr": [1e-3, 3e-3]}]}
    assert load_config("sweep", apply_overrides(sweep, ["space=[{kind: linear, lr: [1e-3, 3e-3]}]"])).space[0].lr == [0.001, 0.003]


def test_a_key_given_twice_is_refused_by_line_and_a_merge_may_override(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("store: s.zarr\nepochs: 3\noutput: out\nepochs: 1\n")
    with pytest.raises(ConfigError, match=r"line 4, column 1: key 'epochs' is given twice \(lines 2 and 4\)"):
        load_config("train", str(cfg))
    base = "base: &b {kind: linear, lr: 0.1}\nstore: s.zarr\noutput: out\nadapters:\n  - {<<: *b, lr: 0.2}\n"
    from pipeline.config.loader import parse_yaml

    assert parse_yaml(base)["adapters"] == [{"kind": "linear", "lr": 0.2}]
    for text, problem in [("? [a, b]\n: 1\n", "found unhashable key"), ("epochs: !!int 0b11\n", "'0b11' is not an integer")]:
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=problem):
            load_config("train", str(cfg))


@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_a_number_that_is_not_finite_is_refused_by_key(value):
    """A NaN learning rate trained nothing and exited 0 (every member 'diverged')."""
    base = {"store": "s.zarr", "output": "o", "adapters": [{"kind": "linear"}]}
    with pytest.raises(ConfigError) as e:
        load_config("train", base, [f"adapters=[{{kind: linear, lr: {value}}}]", f"warmup_epochs={value}"])
    assert "adapters[0].lr" in str(e.value) and "warmup_epochs" in str(e.value)


def test_a_pair_takes_exactly_two_values_and_the_top_level_a_mapping(tmp_path):
    base = {"backbone": {"name": "m"}, "data": {"kind": "npz", "root": "r"}, "store": {"path": "p"}}
    for scale in ("[0.1, 0.5, 0.9]", "[0.5]"):
        with pytest.raises(ConfigError, match=r"augment.scale: got \[.*\], expected a list of 2 \(a number, a number\)"):
            load_config("extract", base, [f"augment.scale={scale}"])
    for text in ("false", "[]"):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ConfigError, match="top level must be a mapping"):
            load_config("train", str(tmp_path / "c.yaml"))


@pytest.mark.parametrize("space", ["[{kind: linear, lr: [.nan]}]", "[{kind: linear, lr: {low: 0.001, high: .inf}}]",
                                   "[{kind: inca, hparams: {dropout: [.nan]}}]"])
def test_a_sweep_axis_that_is_not_finite_is_refused(space):
    """lr [.nan] ran, every trial 'pruned', exit 0; a range to .inf overflowed while sampling."""
    with pytest.raises(ConfigError, match="expected finite numbers"):
        load_config("sweep", {"store": "s.zarr", "output": "o", "space": []}, [f"space={space}"])


def test_an_empty_path_is_refused_by_key():
    """"" is the current directory: a store written there, an output replaced there."""
    base = {"backbone": {"name": "m"}, "data": {"kind": "npz", "root": ""}, "store": {"path": " "}}
    with pytest.raises(ConfigError) as e:
        load_config("extract", base)
    assert "data.root: got '', expected a path" in str(e.value) and "store.path: got ' ', expected a path or URL" in str(e.value)
    webdataset = {**base, "data": {"kind": "webdataset", "root": "", "shards": {"train": "a.tar", "val": "b.tar"}}, "store": {"path": "p"}}
    with pytest.raises(ConfigError) as e:
        load_config("extract", webdataset)
    assert e.value.problems == ["data.root: got '', expected a path"]  # once, not again from the shards' check
    with pytest.raises(ConfigError, match="store: got '', expected a path or URL"):
        load_config("train", {"store": "", "output": "o", "adapters": [{"kind": "linear"}]})


def test_seeds_and_layer_lists_out_of_range_are_refused_by_key():
    """A negative seed raised a raw ValueError (numpy) or OverflowError (torch), bench's only
    after extraction; `layers: []` trained no member of its entry without a word."""
    base = {"store": "s.zarr", "output": "o", "adapters": [{"kind": "linear"}]}
    with pytest.raises(ConfigError) as e:
        load_config("train", base, ["seed=-1", "adapters=[{kind: linear, layers: [], seeds: [0, 18446744073709551616]}]"])
    for expected in ("seed: got -1, expected integers in [0, 2**63)", "adapters[0].layers: got [], expected 'all'",
                     "adapters[0].seeds: got [0, 18446744073709551616], expected integers in [0, 2**63)"):
        assert expected in str(e.value)
    with pytest.raises(ConfigError, match=r"adapters\[0\].seeds: got \[\], expected at least one seed"):
        load_config("train", base, ["adapters=[{kind: linear, seeds: []}]"])
    with pytest.raises(ConfigError, match=r"space\[0\].seeds: got \[-3\]"):
        load_config("sweep", {"store": "s.zarr", "output": "o", "space": [{"kind": "linear", "seeds": [-3]}]})


@pytest.mark.parametrize("override", ["backbone.model_kwargs.depth=2.5", "backbone.model_kwargs.num_heads=0", "store.compressor.level=99",
                                      "store.compressor={name: lz4, level: 0}"])
def test_values_the_backbone_or_compressor_cannot_take_are_config_errors(tmp_path, override):
    """timm's TypeError / ZeroDivisionError and zarr's ValueError came out as raw tracebacks;
    lz4 clamped a level outside 1..9 without a word."""
    from pipeline.runners.extract import plan_extraction
    from tests.conftest import tiny_config, write_image_folder

    with pytest.raises(ConfigError, match=r"backbone.model_kwargs: timm cannot build 'test_vit'|store.compressor.level: got"):
        plan_extraction(tiny_config(tmp_path, write_image_folder(tmp_path / "img", per_class=1), override))


def test_an_override_fills_a_section_left_null():
    """`pruning: null` then `pruning.min_epochs=2` said "'pruning' is not a section"."""
    cfg = load_config("train", {"store": "s.zarr", "output": "o", "pruning": None, "adapters": [{"kind": "linear"}]},
                      ["pruning.min_epochs=2"])
    assert cfg.pruning.min_epochs == 2


def test_a_data_key_the_kind_does_not_read_is_refused():
    """image_column on an idx source, or split_files naming no split, were ignored without a word."""
    base = {"backbone": {"name": "m"}, "data": {"kind": "idx", "root": "r", "splits": ["train", "test"], "image_column": "img",
                                                "download": True, "split_files": {"tset": "t10k"}}, "store": {"path": "p"}}
    with pytest.raises(ConfigError) as e:
        load_config("extract", base)
    assert sorted(p.split(":")[0] for p in e.value.problems) == ["data.download", "data.image_column", "data.split_files.tset"]
    assert "data.image_column: data.kind 'idx' does not read it (only huggingface); remove it" in str(e.value)


def test_a_leading_tilde_is_the_home_folder_in_every_path_key(tmp_path, monkeypatch, image_folder):
    """`store.path: ~/x` was a folder named "~" in the working directory."""
    from pipeline.runners.extract import run_extract
    from tests.conftest import tiny_config

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    extract = load_config("extract", {"backbone": {"name": "m", "weights": "~/w.pth"},
                                      "data": {"kind": "webdataset", "root": "~/d", "shards": {"train": "~/a.tar", "val": ["~/b.tar", "c.tar"]}},
                                      "store": {"path": "~/s.zarr"}})
    assert (extract.backbone.weights, extract.data.root, extract.store.path) == (f"{home}/w.pth", f"{home}/d", f"{home}/s.zarr")
    assert extract.data.shards == {"train": f"{home}/a.tar", "val": (f"{home}/b.tar", "c.tar")}
    idx = load_config("extract", {"backbone": {"name": "m"}, "data": {"kind": "idx", "root": "d", "split_files": {"train": "~/t-idx3-ubyte"}},
                                  "store": {"path": "s3://bucket/~x"}})
    assert idx.data.split_files == {"train": f"{home}/t-idx3-ubyte"} and idx.store.path == "s3://bucket/~x"
    train = load_config("train", {"store": "~/s.zarr", "output": "~/run", "adapters": [{"kind": "linear"}]})
    assert (train.store, train.output) == (f"{home}/s.zarr", f"{home}/run")
    sweep = load_config("sweep", {"store": "~/s.zarr", "output": "~/sweep", "space": [{"kind": "linear", "lr": [0.1]}]})
    assert (sweep.store, sweep.output) == (f"{home}/s.zarr", f"{home}/sweep")
    bench = load_config("bench", {"output": "~/b", "report": "~/B.md", "readme": "~/R.md",
                                  "cases": [{"name": "c", "extract": "~/e.yaml", "test_split": "val", "methods": [{"kind": "linear"}]}]})
    assert (bench.output, bench.report, bench.readme, bench.cases[0].extract) == (f"{home}/b", f"{home}/B.md", f"{home}/R.md", f"{home}/e.yaml")

    run_extract(tiny_config(tmp_path, image_folder, "store.path=~/store.zarr"))
    assert (home / "store.zarr" / "zarr.json").is_file() and not (tmp_path / "~").exists()


def test_another_jobs_config_is_named_as_such():
    """An extract config given to train listed every key as unknown, with 'did you mean' guesses."""
    with pytest.raises(ConfigError, match=r"this is an extract config \(its keys \['backbone', 'data', 'preprocess', 'runtime'\] are "
                                          r"extract's\), not a train config: run `extract` with it"):
        load_config("train", str(CONFIGS / "fashion_mnist_lite0.yaml"))
    with pytest.raises(ConfigError, match=r"this is a sweep config .* not a train config: run `sweep` with it"):
        load_config("train", str(CONFIGS / "sweep_fashion_mnist_lite0.yaml"))
    with pytest.raises(ConfigError) as e:  # one key of another job's is a typo, not another job's config
        load_config("train", {"store": "s", "output": "o", "adapters": [{"kind": "linear"}], "search": "grid"})
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith("search: unknown key")


def test_the_valid_hyperparameters_listed_are_those_hparams_takes():
    """`layer` was listed as valid, then refused in hparams for the entry's own `layers`."""
    for kind, entry in (("train", {"adapters": [{"kind": "inca", "hparams": {"num_head": 2}}]}),
                        ("sweep", {"space": [{"kind": "inca", "hparams": {"num_head": [2]}}]})):
        with pytest.raises(ConfigError, match=r"has no hyperparameter 'num_head' .*did you mean 'num_heads'\?\); valid keys: "
                                              r"dim, num_heads, num_queries, readout\b") as e:
            load_config(kind, {"store": "s", "output": "o", **entry})
        assert "layer" not in str(e.value).split("valid keys: ")[1]


def test_a_problem_in_an_override_is_said_to_come_from_the_command_line():
    """`error: configs/x.yaml: data.limit: got 0 ...` sent the user to a file that does not say 0."""
    with pytest.raises(ConfigError) as e:
        load_config("extract", str(CONFIGS / "cifar10_lite0.yaml"), ["data.limit=0", "preprocess.image_size=64"])
    assert e.value.problems == ["data.limit: got 0, expected a positive integer or null (given on the command line)"]
    with pytest.raises(ConfigError) as e:
        load_config("train", {"store": "s", "output": "o", "epochs": 0, "adapters": [{"kind": "linear"}]}, ["seed=1"])
    assert e.value.problems[0].startswith("epochs:") and "command line" not in str(e.value)
