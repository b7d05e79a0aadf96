"""From YAML/JSON and dotted command-line overrides to a typed Config (strict: unknown keys named), and back to YAML."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from dist_train.config.checks import check_space, resolve
from dist_train.config.search import SearchDimension
from dist_train.config.sections import Config, to_dict
from dist_train.errors import ConfigError


def load_config(path: str | Path | None, overrides: list[str] = (), values: dict[str, Any] | None = None) -> Config:
    """Read YAML/JSON at `path` (None: all defaults), apply `key=value` overrides, then `values` (dotted key ->
    Python value), validate. Relative *.file paths resolve against the config file's directory."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_file(Path(path))
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(raw, key, value)
    return config_from_dict(raw, values, Path(path).parent if path is not None else Path.cwd())


def config_from_dict(raw: dict[str, Any], values: dict[str, Any] | None = None, base_dir: str | Path = ".") -> Config:
    """A validated Config from nested sections `raw` and dotted `values`; relative *.file paths made absolute
    against `base_dir` (so that the run directory's config.yaml works from anywhere)."""
    raw = copy.deepcopy(raw)
    for key, value in (values or {}).items():
        _set_dotted(raw, key, value)
    config = parse_keys(raw)
    for section in (config.model, config.loss, config.data):
        if section.file is not None:
            section.file = str((Path(base_dir) / section.file).absolute())
    config = resolve(config)
    if config.hpo.trials > 0:  # each value of the search space through the checks above, before anything trains
        check_space(config, lambda value: config_from_dict(raw, {**value, "hpo.trials": 0}, base_dir))
    return config


def parse_keys(raw: dict[str, Any]) -> Config:
    """The Config of nested sections `raw`, its keys and types checked (an unknown key is named with the nearest valid
    one), before the cross-field checks: also what a partial config (a snippet in the docs) is held to. `raw`'s
    hpo.space is made dotted in place."""
    if isinstance(raw.get("hpo"), dict) and isinstance(raw["hpo"].get("space"), dict):
        raw["hpo"]["space"] = _space_keys(raw["hpo"]["space"])
    return _build(Config, raw, "")


def _space_keys(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """hpo.space with dotted keys: `hpo.space.optim.lr={...}` on the command line nests the key ({optim: {lr: {...}}});
    a mapping that is not a dimension (no key of SearchDimension) is a level of the key."""
    dimension_keys = {f.name for f in dataclasses.fields(SearchDimension)}
    flat = {}
    for key, value in space.items():
        if isinstance(value, dict) and value and not set(value) & dimension_keys:
            flat.update(_space_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. optim.lr=3e-4)")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, raw[name], f"{prefix}{name}.")
        else:
            values[name] = _coerce(raw[name], kind, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Return `value` as type `kind` or raise a ConfigError naming `key`."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if kind is Any:
        return value
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        sections = [arg for arg in args if dataclasses.is_dataclass(arg)]
        if isinstance(value, dict) and sections:  # a mapping is that section: its own errors (did you mean) count
            return _build(sections[0], value, f"{key}.")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        names = ["a mapping" if dataclasses.is_dataclass(a) else getattr(a, "__name__", str(a)) for a in args]
        raise ConfigError(f"{key}: expected {' or '.join(names).replace('NoneType', 'null')}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off/false and yes/on/true as booleans: mean the word
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((a for a in args if isinstance(a, str) and a.lower() in words), value)
        if value in args and not isinstance(value, bool):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}{hint}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `3e-4` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(number):
                    return number
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"config type {kind} of {key} is not supported")
    raise ConfigError(f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
