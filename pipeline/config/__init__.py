"""Config: YAML files in configs/ loaded into frozen, validated dataclasses."""

from pipeline.config.bench_config import BenchConfig
from pipeline.config.extract_config import ExtractConfig
from pipeline.config.sweep_config import SweepConfig
from pipeline.config.train_config import AdapterEntry, TrainConfig
from pipeline.config.loader import ConfigError, apply_overrides, build, load_yaml, to_dict


# The job each shipped YAML is for (its first line names the command).
CONFIG_CLASSES = {"extract": ExtractConfig, "train": TrainConfig, "sweep": SweepConfig, "bench": BenchConfig}


def load_config(cls: type, path: str, overrides: list[str] = ()) -> object:
    """Read YAML, apply dotted overrides, build and validate `cls` (all problems at once)."""
    data = apply_overrides(load_yaml(path), list(overrides))
    return build(cls, data, source=str(path))


__all__ = ["AdapterEntry", "BenchConfig", "TrainConfig", "CONFIG_CLASSES", "ConfigError", "ExtractConfig", "SweepConfig", "load_config", "to_dict", "build", "apply_overrides", "load_yaml"]
