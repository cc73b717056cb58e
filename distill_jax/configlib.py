"""Typed, frozen configs from YAML: nested dataclasses, dotted overrides, strict keys.

``load(cls, path, overrides)`` reads a YAML file into the dataclass ``cls`` (recursively), applies
``key.sub=value`` overrides (values parsed as YAML scalars), and rejects any unknown key with the
closest valid name. Values are checked against the field annotations (int, float, str, bool,
Literal, Optional, tuple/list, dict and nested dataclasses).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigKeyError(ValueError):
    """An unknown key, a bad value or a malformed override in a run config."""


def suggest(key: str, valid: Sequence[str]) -> str:
    """``; did you mean 'x'?`` for the closest of ``valid``, else the list of valid keys."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigKeyError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigKeyError as e:
                errors.append(str(e))
        raise ConfigKeyError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigKeyError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigKeyError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigKeyError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigKeyError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigKeyError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-2 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigKeyError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigKeyError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigKeyError(f"unknown config key {path!r}{suggest(key, list(fields))}")
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigKeyError(f"{where or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> Any:
    """Plain dict/list form of a config (for YAML/JSON output)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf that differs between two plain config dicts
    (a key present on one side only counts as ``None`` on the other)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            out += diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict (values parsed as YAML)."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigKeyError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigKeyError(f"override {item!r}: value is not valid YAML ({e})") from None
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if node.get(p) is None:  # an absent or null section: start it
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigKeyError(f"override {item!r}: {p!r} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return data


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(
            out.get(k), Mapping) else v
    return out


Resolver = Callable[[dict[str, Any], Path], dict[str, Any]]


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = (), *,
              resolve: Resolver | None = None) -> dict[str, Any]:
    """A YAML mapping; a top-level ``base: other.yaml`` (relative to this file) is read first
    and this file's keys are deep-merged over it (lists are replaced, not merged).
    ``resolve(data, directory)``, when given, rewrites each file's own mapping before the merge
    (e.g. relative paths made relative to the file's directory)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigKeyError(f"config file {path} is a directory; give a YAML file in it "
                             f"(e.g. {path / 'tiny.yaml'})")
    if path.resolve() in _seen:
        raise ConfigKeyError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()
        raise ConfigKeyError(f"{path}: not valid YAML: {' '.join(x.strip() for x in first)}") from None
    except UnicodeDecodeError as e:
        raise ConfigKeyError(f"{path}: not a text file ({e.reason} at byte {e.start}); give a "
                             "YAML config") from None
    if not isinstance(data, dict):
        raise ConfigKeyError(f"{path}: top level must be a mapping of sections")
    base = data.pop("base", None)
    if resolve is not None:
        data = resolve(data, path.parent)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigKeyError(f"{path}: 'base' must be a file name, got {base!r}")
    return _deep_merge(read_yaml(path.parent / base, _seen + (path.resolve(),), resolve=resolve), data)


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (), *,
         resolve: Resolver | None = None) -> T:
    """Load YAML ``path`` (or nothing) into ``cls`` with dotted ``overrides`` applied;
    ``resolve`` rewrites each file's mapping (see :func:`read_yaml`), not the overrides."""
    data = read_yaml(path, resolve=resolve) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def dump(cfg: Any) -> str:
    """YAML text of a config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
