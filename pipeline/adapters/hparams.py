"""Validation of adapter hyperparameters against each adapter's frozen `Hparams` dataclass.

Every adapter declares its hyperparameters as a frozen dataclass whose field annotations are
the schema: `int`, `float`, `bool`, `str`, `Literal[...]`, `X | None` and `tuple[str, ...]`.
`parse_hparams` turns a plain mapping (typically read from YAML) into that dataclass, coercing
YAML's natural spellings (an int where a float is expected, a list for a tuple) and rejecting
anything else with a message naming the key, the value, the expectation and the valid keys.
Range checks that types cannot express live in each dataclass's `__post_init__`, through
`require_at_least`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from pipeline.adapters.errors import AdapterConfigError, did_you_mean


class HparamValueError(AdapterConfigError):
    """One hyperparameter value that does not fit its declared type or range."""

    def __init__(self, key: str, value: Any, expected: str):
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"hyperparameter {key!r} = {value!r} is invalid: expected {expected}")


def require_at_least(hparams: Any, key: str, minimum: int) -> None:
    """Range check for `__post_init__`: field `key` must be >= `minimum` (None passes)."""
    value = getattr(hparams, key)
    if value is not None and value < minimum:
        raise HparamValueError(key, value, f"an integer >= {minimum}")


def parse_hparams(kind: str, hparams_cls: type, raw: Mapping[str, Any], elsewhere: tuple[str, ...] = ()) -> Any:
    """Build `hparams_cls` from `raw`, raising AdapterConfigError that names the culprit.
    elsewhere: fields a config sets by other keys (an entry's `layers`), not listed as valid here."""
    fields = {f.name for f in dataclasses.fields(hparams_cls)}
    valid_keys = ", ".join(sorted(fields - set(elsewhere))) or "(none)"
    annotations = typing.get_type_hints(hparams_cls)
    for key, value in raw.items():
        if key not in fields:
            raise AdapterConfigError(
                f"adapter {kind!r} has no hyperparameter {key!r} (given {value!r})"
                f"{did_you_mean(key, fields)}; valid keys: {valid_keys}"
            )
    try:
        values = {key: _coerce(key, value, annotations[key]) for key, value in raw.items()}
        return hparams_cls(**values)
    except HparamValueError as error:
        raise AdapterConfigError(f"adapter {kind!r}: {error}; valid keys: {valid_keys}") from error


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        try:
            return _coerce(key, value, inner)
        except HparamValueError as error:
            raise HparamValueError(key, value, f"{error.expected} or null") from None
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise HparamValueError(key, value, "one of " + ", ".join(repr(a) for a in args))
    if origin is tuple:
        # YAML has no tuples: a list is the natural spelling of tuple[str, ...].
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise HparamValueError(key, value, "a list of strings")
    # bool is a subclass of int, but `num_heads: true` is never what was meant.
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is str and isinstance(value, str):
        return value
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise HparamValueError(key, value, names.get(annotation, str(annotation)))
