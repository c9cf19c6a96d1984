"""YAML + dotted overrides -> frozen dataclasses, with every problem reported at once.

Typing drives validation: each dataclass field's annotation says what the YAML value must
be, so the schema lives in one place (the dataclass) and the error messages can name the
key, the value received and what was expected. Unknown keys suggest the nearest valid one.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import os
import re
import types
from pathlib import Path
from typing import Any, Literal, NewType, Union, get_args, get_origin, get_type_hints

import yaml

from cache import ConfigError  # one class for every config problem (cache never imports pipeline)

# A config string naming a file, a folder or a URL. A leading ~ is the user's home, as a shell
# reads it: `store.path: ~/x` was a folder named "~" in the working directory.
PathText = NewType("PathText", str)


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's numbers and no key given twice. YAML 1.1 (PyYAML's
    own) reads `016` as octal 14, `1:30` as 90 (base 60) and `1e-3` as a string: values a
    config would take silently. A key given twice kept the last value without a word."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: the keys it brings may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, collections.abc.Hashable):
                continue  # the base class refuses it, as "found unhashable key"
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                    "keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# YAML 1.2's core schema: decimal integers (leading zeros too), 0o and 0x; floats with a dot or
# an exponent, and .inf/.nan (which the config then refuses by name).
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                    list("-+0123456789"))
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))


def _construct_int(loader: _ConfigLoader, node) -> int:
    text = loader.construct_scalar(node)
    try:
        return int(text, 0) if text[:2].lower() in ("0o", "0x") else int(text)  # int("016", 0) refuses the leading zero
    except ValueError:  # `!!int 0b11`: a tag YAML 1.2's core schema does not read that way
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not an integer YAML 1.2 reads", node.start_mark) from None


def _construct_float(loader: _ConfigLoader, node) -> float:
    text = loader.construct_scalar(node)
    try:
        return float(text.lower().replace(".inf", "inf").replace(".nan", "nan"))
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a number YAML 1.2 reads", node.start_mark) from None


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_ConfigLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def parse_yaml(text) -> Any:
    """A config's YAML (a file's stream or one override's value) under the config's rules."""
    return yaml.load(text, Loader=_ConfigLoader)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError([f"config file {str(path)!r} is a directory; give a YAML file"], str(path))
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist"], str(path))
    try:
        with path.open() as f:
            data = parse_yaml(f)
        data = {} if data is None else data
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {_yaml_problem(e)}"], str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8 text: byte {e.start} is {e.object[e.start:e.start + 1]!r}"], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], str(path))
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (so 3, 1e-3, [1,2], null work)."""
    data = _deep_copy(data)
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r} is not of the form dotted.key=value")
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if child is None:  # an optional section left null (`pruning: null`): the override gives it
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"override {item!r}: {part!r} is not a section")
                break
            node = child
        else:
            try:
                node[parts[-1]] = parse_yaml(raw) if raw != "" else ""
            except yaml.YAMLError as e:
                problems.append(f"override {item!r}: the value is not valid YAML: {_yaml_problem(e)}")
    if problems:
        raise ConfigError(problems, "command-line overrides")
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's message on one line: where (1-based line and column), what, and what it was inside."""
    def where(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if not problem or mark is None:
        return " ".join(str(e).split())
    inside = f" ({context} at {where(context_mark)})" if context and context_mark is not None else ""
    return f"{where(mark)}: {problem}{inside}"


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def build(cls: type, data: Any, source: str = "config") -> Any:
    """Build dataclass `cls` from `data`; raise one ConfigError listing every problem."""
    problems: list[str] = []
    checks: list[str] = []
    obj = _build_dataclass(cls, data, "", problems, checks)
    if problems or checks:
        raise ConfigError(problems + checks, source)
    return obj


def _build_dataclass(cls: type, data: Any, prefix: str, problems: list[str], checks: list[str]) -> Any:
    """problems: what leaves a field without a usable value (the section is then not built);
    checks: what does not (unknown keys, each section's own `problems()`), so the sections
    around it are still built and checked: every problem is listed at once."""
    where = prefix.rstrip(".") or "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping, got {data!r}")
        return None
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(fields)}"
            checks.append(f"{prefix}{key}: unknown key{hint}")
    kwargs = {}
    n_before = len(problems)
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key, problems, checks)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{key}: required key is missing")
    if len(problems) > n_before:
        return None  # this section's own checks need well-typed values
    obj = cls(**kwargs)
    # Cross-field checks, run per section so one bad section doesn't hide another's problems.
    if hasattr(obj, "problems"):
        checks.extend(f"{prefix}{p}" for p in obj.problems())
    return obj


def _convert(tp: Any, value: Any, key: str, problems: list[str], checks: list[str] | None = None) -> Any:
    origin = get_origin(tp)
    checks = problems if checks is None else checks
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, f"{key}.", problems, checks)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        sections = [o for o in options if dataclasses.is_dataclass(o)]
        if isinstance(value, dict) and len(sections) == 1:  # an optional section: its own problems, by key
            return _convert(sections[0], value, key, problems, checks)
        for opt in options:
            if opt is type(None):
                continue
            trial: list[str] = []
            out = _convert(opt, value, key, trial)
            if not trial:
                return out
        problems.append(f"{key}: got {value!r}, expected {_describe(tp)}")
        return None
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            problems.append(f"{key}: got {value!r}, expected one of {list(allowed)}{hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: got {value!r}, expected {_describe(tp)}")
            return None
        (item_tp, *rest) = get_args(tp)
        if origin is tuple and Ellipsis not in rest and len(value) != 1 + len(rest):  # tuple[float, float]: exactly two
            problems.append(f"{key}: got {value!r}, expected {_describe(tp)}")
            return None
        items = [_convert(item_tp, v, f"{key}[{i}]", problems, checks) for i, v in enumerate(value)]
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: got {value!r}, expected a mapping")
            return None
        _, v_tp = get_args(tp)
        return {k: _convert(v_tp, v, f"{key}.{k}", problems, checks) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: got {value!r}, expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: got {value!r}, expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: got {value!r}, expected a number")
            return value
        if not math.isfinite(value):  # a NaN lr trained nothing and exited 0
            problems.append(f"{key}: got {value!r}, expected a finite number")
            return None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{key}: got {value!r}, expected a string")
        return value
    if tp is PathText:
        if not isinstance(value, str):
            problems.append(f"{key}: got {value!r}, expected a path")
            return value
        return os.path.expanduser(value)
    raise TypeError(f"config schema uses an unsupported type {tp!r} at {key}")


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is Literal:
        return f"one of {list(get_args(tp))}"
    if origin is tuple and get_args(tp)[1:] and Ellipsis not in get_args(tp):
        return f"a list of {len(get_args(tp))} ({', '.join(_describe(a) for a in get_args(tp))})"
    if origin in (list, tuple):
        return f"a list of {_describe(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", PathText: "a path"}.get(tp, getattr(tp, "__name__", str(tp)))


def to_dict(obj: Any) -> Any:
    """The resolved config as plain JSON-able data (saved beside every output)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


__all__ = ["ConfigError", "load_yaml", "parse_yaml", "apply_overrides", "build", "to_dict"]
