"""Building a :class:`WSMConfig` from dicts and YAML files, dot-notation overrides, dumping."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from wsm_megatron.data.config import DataConfig
from wsm_megatron.training.config.checkpoint import CheckpointConfig
from wsm_megatron.training.config.corpus import CORPUS_PENDING, CorpusConfig
from wsm_megatron.training.config.errors import ConfigError
from wsm_megatron.training.config.logging import LoggingConfig
from wsm_megatron.training.config.merge import MergeConfig
from wsm_megatron.training.config.model import ModelConfig
from wsm_megatron.training.config.parallel import ParallelismConfig
from wsm_megatron.training.config.run import WSMConfig
from wsm_megatron.training.config.train import TrainConfig

_SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelismConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "corpus": CorpusConfig,
    "checkpoint": CheckpointConfig,
    "merge": MergeConfig,
    "logging": LoggingConfig,
}


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` as type ``tp`` (YAML-level conversions only), or ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(tp)
        if value is None and type(None) in arms:
            return None
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return _coerce(arm, value, key)
            except ConfigError:
                continue
        expected = " or ".join(_type_name(a) for a in arms)
        raise ConfigError(f"{key}: expected {expected}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        # PyYAML reads "3e-3" (no dot) as a string; accept any finite number written out.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # "1e6" written for an integer
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if number.is_integer() and abs(number) < 2**53:
                    return int(number)
    elif tp in (bool, str):
        if isinstance(value, tp):
            return value
    else:
        raise AssertionError(f"unsupported config type {tp!r} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build_section(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(
                f"{prefix}.{key}: unknown key (valid keys: {', '.join(sorted(fields))})"
            )
    missing = [
        name
        for name, f in fields.items()
        if name not in raw
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}.{missing[0]}: required, not set")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}.{name}") for name, value in raw.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # a section's own validation (the data section's)
        message = str(err)
        own = f"{cls.__name__}."  # keys named by class: data.split, not data.split
        if message.startswith(own):
            raise ConfigError(f"{prefix}.{message[len(own) :]}") from None
        raise ConfigError(f"{prefix}: {message}") from None


def config_from_dict(raw: Mapping[str, Any]) -> WSMConfig:
    """Build and validate a :class:`WSMConfig` from nested mappings (a parsed YAML file)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping of sections, got {raw!r}")
    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(f"{key}: unknown section (valid sections: {', '.join(_SECTIONS)})")
    for name in ("model", "train", "data"):
        if name not in raw:
            raise ConfigError(f"{name}: required section, not set")
    corpus = _build_section(CorpusConfig, raw.get("corpus"), "corpus")
    sections = {
        name: _build_section(cls, raw[name], name)
        for name, cls in _SECTIONS.items()
        if name in raw and name not in ("data", "corpus")
    }
    data = dict(raw["data"] or {})
    if corpus.name is not None:
        for key in (
            "train_data",
            "valid_data",
            "tokenizer_type",
            "tokenizer_model",
            "vocab_file",
            "merge_file",
        ):
            if data.get(key) not in (None, CORPUS_PENDING):
                raise ConfigError(
                    f"data.{key}: comes from corpus.name={corpus.name}; "
                    f"set corpus.name=null to use your own data"
                )
        data.update(train_data=CORPUS_PENDING, valid_data=CORPUS_PENDING)
    return WSMConfig(data=_build_section(DataConfig, data, "data"), corpus=corpus, **sections)


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p for p in parts):
            raise ConfigError(f"{item}: an override is section.key=value, e.g. train.lr=3e-3")
        if len(parts) < 2:
            raise ConfigError(f"{key}: not a section.key; {_where_is(key, text)}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{key}: cannot parse value {text!r}: {problem}") from None
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _where_is(key: str, value: str) -> str:
    """A hint for an override without its section: the sections that have ``key``."""
    if key in _SECTIONS:
        return f"{key} is a section: set one of its keys, e.g. {key}.<key>={value}"
    owners = [
        name for name, cls in _SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}
    ]
    if owners:
        return "did you mean " + " or ".join(f"{o}.{key}={value}" for o in owners) + "?"
    return f"overrides are section.key=value, sections: {', '.join(_SECTIONS)}"


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> WSMConfig:
    """Read a YAML config (or start empty), apply dot-notation overrides and validate."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return config_from_dict(apply_overrides(raw, overrides))


def dump_config(config: WSMConfig) -> str:
    """The resolved configuration as YAML (what a run records next to its checkpoints)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
