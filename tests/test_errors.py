"""One error model: every error a user can cause is a FeatureCacheError, travels through dask
intact, and names what was wrong; one fingerprint comparison for stores and adapters."""

import dataclasses
import pickle

import pytest

from cache import BackboneRecord, ConfigError, FeatureCacheError, Fingerprint, StoreError, StoreMismatchError
from cache.fingerprint import differences
from pipeline.adapters import AdapterConfigError
from pipeline.adapters.hparams import HparamValueError
from pipeline.adapters.persistence import _check_fingerprint
from pipeline.config import ExtractConfig, build
from pipeline.data import CorruptImageError
from pipeline.runners.distributed_extract import ExtractTasksFailed
from pipeline.runners.sweep import SweepJobsFailed
from pipeline.training.output import OutputInUse
from tests.conftest import fake_fingerprint

EXAMPLES = [
    ConfigError(["a: got 1, expected 2", "b: unknown key"], "x.yaml"),
    ConfigError("data.root: 'x' does not exist"),
    AdapterConfigError("unknown adapter kind 'lineer'"),
    HparamValueError("rank", 0, "an integer >= 1"),
    StoreError("store 's' is incomplete"),
    StoreMismatchError("s.zarr", ["backbone.name: store has 'a', now 'b'"], "Use another store.path."),
    CorruptImageError("cannot read image 'x.jpg'"),
    OutputInUse("output 'runs/x' already holds files"),
    SweepJobsFailed("1 of 3 jobs failed"),
    ExtractTasksFailed("2 of 8 pieces failed"),
]


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda e: type(e).__name__)
def test_user_errors_are_one_family_and_survive_pickling(error):
    """Not ValueError/KeyError/RuntimeError: the CLI catches the family and nothing else.
    Pickled as dask sends a failed task's exception back (each class has its own arguments)."""
    assert isinstance(error, FeatureCacheError)
    assert not isinstance(error, (ValueError, KeyError, RuntimeError, OSError))
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert vars(back).get("problems") == vars(error).get("problems")


def test_config_error_lists_every_problem_or_is_one_line():
    assert str(ConfigError(["a: bad"], "x.yaml")) == "x.yaml: a: bad"
    assert str(ConfigError("a: bad")) == "a: bad"
    assert str(ConfigError(["a: bad", "b: worse"], "x.yaml")) == "2 problem(s) in x.yaml:\n  - a: bad\n  - b: worse"
    assert issubclass(AdapterConfigError, ConfigError) and issubclass(StoreMismatchError, StoreError)


def test_one_fingerprint_diff_for_stores_and_adapters():
    saved = {"backbone": {"name": "vit", "weights_sha256": "aa"}, "layers": [[1, 2]], "storage": {"dtype": "float16"}}
    given = {"backbone": {"name": "vit", "weights_sha256": "bb"}, "layers": ((1, 2),), "preprocessing": {"size": 64}}
    assert differences(saved, given) == [
        "backbone.weights_sha256: store has 'aa', now 'bb'",
        "preprocessing: store has <absent>, now {'size': 64}",
        "storage: store has {'dtype': 'float16'}, now <absent>",
    ]
    saved_fp, given_fp = fake_fingerprint(), dataclasses.replace(fake_fingerprint(), backbone=BackboneRecord("test_vit", "random", "b" * 64))
    with pytest.raises(StoreMismatchError) as e:
        _check_fingerprint("runs/x/adapters/01_a", saved_fp, given_fp)
    assert str(e.value).startswith("adapter in runs/x/adapters/01_a was trained on a different feature store:\n")
    assert e.value.differences == differences(saved_fp.to_json(), given_fp.to_json(), labels=("saved", "given"))
    assert f"  - backbone.weights_sha256: saved {'0' * 64!r}, given {'b' * 64!r}" in str(e.value)
    _check_fingerprint("d", saved_fp, Fingerprint.from_json(saved_fp.to_json()))  # a tuple equals the list it was saved as


def test_a_contradiction_between_sections_is_listed_with_the_other_problems():
    """backbone.cache_kv with store.tokens other than all is a config problem (not a run-time
    error), reported beside a section's own problem and an unknown key (neither hides it)."""
    with pytest.raises(ConfigError) as e:
        build(ExtractConfig, {"backbone": {"name": "test_vit", "cache_kv": True}, "data": {"kind": "image_folder", "root": "r"},
                              "store": {"path": "s", "tokens": "mean"}, "runtime": {"batch_size": 0}, "extra": 1})
    assert sorted(e.value.problems) == sorted([
        "runtime.batch_size: got 0, expected > 0",
        "extra: unknown key; valid keys: backbone, data, store, preprocess, runtime, augment",
        "backbone.cache_kv needs store.tokens='all' (VQT attends to every token), got 'mean'",
    ])
