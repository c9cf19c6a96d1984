"""Config: YAML files in configs/ loaded into frozen, validated dataclasses."""

import dataclasses
import os
from typing import Any, Sequence, Union

from pipeline.config.bench_config import BenchConfig
from pipeline.config.extract_config import ExtractConfig
from pipeline.config.loader import ConfigError, apply_overrides, build, load_yaml, to_dict
from pipeline.config.sweep_config import SweepConfig
from pipeline.config.train_config import AdapterEntry, TrainConfig

# The job each shipped YAML is for (its first line names the command).
CONFIG_CLASSES = {"extract": ExtractConfig, "train": TrainConfig, "sweep": SweepConfig, "bench": BenchConfig}


def load_config(kind_or_class: Union[str, type], source: Any, overrides: Sequence[str] = ()) -> Any:
    """Build and validate a config (all problems at once) from a YAML path, a dict, or a config
    dataclass (built again, so that it is checked and overrides apply), with dotted overrides.

    kind_or_class: a key of CONFIG_CLASSES ("extract", "train", "sweep", "bench") or the class.
    """
    if isinstance(kind_or_class, str):
        if kind_or_class not in CONFIG_CLASSES:
            raise ConfigError(f"config kind {kind_or_class!r}: expected one of {list(CONFIG_CLASSES)} or a config class")
        cls = CONFIG_CLASSES[kind_or_class]
    else:
        cls = kind_or_class
    if dataclasses.is_dataclass(source) and not isinstance(source, type):
        if not isinstance(source, cls):
            raise ConfigError(f"config: got a {type(source).__name__}, expected a {cls.__name__}")
        data, where = to_dict(source), f"the {cls.__name__} given"
    elif isinstance(source, dict):
        data, where = source, "the config given"
    elif isinstance(source, (str, os.PathLike)):
        data, where = load_yaml(source), str(source)
    else:
        raise ConfigError(f"config: got a {type(source).__name__}, expected a YAML path, a dict or a {cls.__name__}")
    _refuse_another_jobs_config(cls, data, where)
    try:
        return build(cls, apply_overrides(data, list(overrides)), source=where)
    except ConfigError as e:
        # A problem under a key given as an override is the command line's, not the file's.
        given = [o.split("=", 1)[0].strip() for o in overrides]
        if not any(_under(p, key) for p in e.problems for key in given):
            raise
        raise ConfigError([p + (" (given on the command line)" if any(_under(p, key) for key in given) else "") for p in e.problems],
                          where) from None


def _under(problem: str, key: str) -> bool:
    return bool(key) and (problem.startswith(f"{key}:") or problem.startswith(f"{key}.") or problem.startswith(f"{key}["))


def _refuse_another_jobs_config(cls: type, data: Any, where: str) -> None:
    """An extract config given to train listed every key as unknown (with 'did you mean'
    guesses); say which job's config it is instead, when its top-level keys are that job's."""
    if not isinstance(data, dict) or not data:
        return
    keys = set(map(str, data))
    ours = {f.name for f in dataclasses.fields(cls)}
    if len(keys - ours) < 2:
        return
    mine = {c: k for k, c in CONFIG_CLASSES.items()}.get(cls)
    if mine is None:  # a config class of the caller's own: no job to name
        return
    for kind, other in CONFIG_CLASSES.items():
        if other is not cls and keys <= {f.name for f in dataclasses.fields(other)}:
            raise ConfigError(f"this is {_a(kind)} config (its keys {sorted(keys - ours)} are {kind}'s), not {_a(mine)} config: "
                              f"run `{kind}` with it", where)


def _a(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


__all__ = [
    "AdapterEntry", "BenchConfig", "CONFIG_CLASSES", "ConfigError", "ExtractConfig", "SweepConfig", "TrainConfig",
    "apply_overrides", "build", "load_config", "load_yaml", "to_dict",
]
