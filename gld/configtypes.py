"""Typed-dataclass machinery behind `gld.config`: build a dataclass tree from plain dicts,
checking every key and type once, and turn it back into plain dicts.

Supported field types: bool, int, float, str, `Literal[...]`, `Optional[X]`, `tuple[X, ...]`,
`tuple[X, Y]`, `list[X]`, `dict[str, X]` and nested dataclasses. Errors name the dotted key,
what was given and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the dotted key."""


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return f"list of {len(args)} items ({', '.join(type_name(a) for a in args)})"
    if origin is list:
        return f"list of {type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of str to {type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"mapping (section {tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _fail(key: str, tp: Any, value: Any) -> typing.NoReturn:
    raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})")


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and return it in canonical form."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            value = to_dict(value)
        if not isinstance(value, dict):
            _fail(key, tp, value)
        return from_dict(tp, value, prefix=key + ".")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            _fail(key, tp, value)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        _fail(key, tp, value)
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        _fail(key, tp, value)
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            _fail(key, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {type_name(tp)}, got {len(value)} items: {value!r}")
        return tuple(coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            _fail(key, tp, value)
        return [coerce(get_args(tp)[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, tp, value)
        return {str(k): coerce(get_args(tp)[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "1e-4" as a string; accept plain numeric spellings.
            try:
                return float(value.strip())
            except ValueError:
                pass
        _fail(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(key, tp, value)
    if tp is Any:
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r} in a config dataclass")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`; missing keys keep their defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown key '{prefix}{key}'{hint}; allowed keys here: {', '.join(names)}"
            )
        kwargs[key] = coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain YAML-able data (tuples become lists) from a dataclass tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating mappings on the way."""
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(
                f"override '{dotted}': '{'.'.join(parts[: i + 1])}' is a value, not a section"
            )
        node = nxt
    node[parts[-1]] = value


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
