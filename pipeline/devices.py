"""The one rule for where a stage computes: `auto` is the GPU when CUDA is present, else the CPU."""

from __future__ import annotations

import torch

from cache import ConfigError


def resolve_device(name: str, key: str) -> torch.device:
    """name: "auto", "cpu" or "cuda" (the config's value); key: its config key, for the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)
