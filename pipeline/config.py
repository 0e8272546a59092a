"""Typed run configs: frozen dataclasses, YAML snapshots of them, and `key=value` overrides.

Each config is a frozen dataclass whose fields carry a docstring (the string literal under the field). A run
loads a YAML file (optional), applies `key=value` overrides from the command line, coerces every value to the
field's type, validates it (`__post_init__`), and saves the resolved config beside what it writes.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from pipeline.errors import ConfigError
from pipeline.io import write_text_atomic

C = TypeVar("C")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field, by field name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type, base: Any = None, prefix: str = "") -> str:
    """A help text listing every setting (sections expanded as `section.key`) with its type, default and
    docstring; `base` is an instance whose values are the defaults (a section's stage-specific defaults)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = getattr(base, f.name) if base is not None else _default_of(f)
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(describe(hints[f.name], default if default is not dataclasses.MISSING else None,
                                  f"{prefix}{f.name}."))
            continue
        shown = "required" if default is dataclasses.MISSING else f"default {_plain(default)!r}"
        lines.append(f"{prefix}{f.name} ({_type_name(hints[f.name])}, {shown}): {docs.get(f.name, '')}")
    return "\n".join(lines)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn ['a=1', 'b.c=x'] into {'a': '1', 'b': {'c': 'x'}} (values stay strings; coercion comes later)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _coerce(value: Any, tp: Any, name: str, default: Any = None) -> Any:
    """Convert a YAML or command-line value to the field type `tp`, or raise a ConfigError saying how to fix it
    (`default`: the field's default, on which a section's values are laid)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name, default)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: cannot be null")
    if origin is Literal:
        for option in args:
            if value == option or str(value) == str(option):
                return option
        raise ConfigError(f"{name}: got {value!r}; expected one of {', '.join(map(str, args))}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: got {value!r}; expected a list (in YAML) or comma-separated values")
        return tuple(_coerce(v, args[0], name) for v in value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a section of settings, got {value!r}")
        return build(tp, value, prefix=f"{name}.", base=default if isinstance(default, tp) else None)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{name}: got {value!r}; expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: got {value!r}; expected an integer")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: got {value!r}; expected an integer") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: got {value!r}; expected a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}: got {value!r}; expected text")
        return str(value)
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{name}: got {value!r}; expected a path")
        return Path(value)
    raise TypeError(f"config field {name}: unsupported type {tp!r}")


def build(cls: type[C], values: dict[str, Any], prefix: str = "", base: C | None = None) -> C:
    """Construct config `cls` from a dict of raw values laid on its defaults, or on `base`'s values when given
    (unknown keys and bad values raise ConfigError)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown setting '{prefix}{unknown[0]}'; valid settings: {', '.join(prefix + n for n in fields)}"
        )
    kwargs = {key: _coerce(value, hints[key], prefix + key,
                           getattr(base, key) if base is not None else _default_of(fields[key]))
              for key, value in values.items()}
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    missing = [name for name, f in fields.items() if name not in kwargs and _default_of(f) is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required setting '{prefix}{missing[0]}' (give it as {prefix}{missing[0]}=...)")
    return cls(**kwargs)


def _dotted(raw: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in raw.items():
        keys += _dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def check_renamed(cls: type, raw: dict[str, Any], source: str) -> None:
    """A setting that was renamed is an error that names its new key. `cls.RENAMED` maps an old dotted key to the
    new one; an old key ending in '.' renames a whole section ('model.': 'user.')."""
    renamed = getattr(cls, "RENAMED", {})
    for key in _dotted(raw):
        new = renamed.get(key) or next((new + key[len(old):] for old, new in renamed.items()
                                        if old.endswith(".") and key.startswith(old)), None)
        if new is not None:
            raise ConfigError(f"setting '{key}'{source} was renamed: use {new}")


def load(cls: type[C], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
         **values: Any) -> C:
    """Load config `cls` from an optional YAML file, then keyword values, then `key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f", line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        raw = loaded
    check_renamed(cls, raw, f" in {path}" if path is not None else "")
    raw = _merge(raw, {k: v for k, v in values.items() if v is not None})
    given = parse_overrides(list(overrides))
    check_renamed(cls, given, "")
    return build(cls, _merge(raw, given))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain YAML/JSON-able values."""
    return _plain(config)


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def save(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text_atomic(path, to_yaml(config))
