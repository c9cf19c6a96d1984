"""The error type of adapter configuration mistakes, and its "did you mean" hint.

Configuration errors come from YAML written by hand, so every message names the offending
value, what was expected, and the nearest valid spelling.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from cache import ConfigError


class AdapterConfigError(ConfigError):
    """An adapter kind, hyperparameter or layer selection that cannot be built (one message)."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A " (did you mean 'x'?)" suffix for the closest candidate, or "" when none is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {matches[0]!r}?)" if matches else ""
