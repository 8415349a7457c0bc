"""Typed stage configs: one keyword-only dataclass per stage.

A field's help text and its checks live in its metadata (`opt(default, "help",
choices=..., min=...)`), so the command line, the TorchX component, the
Airflow Params and the validation before a run are all generated from the
same dataclass. `check_config` runs those checks and the config's own
`validate()`; every failure is a `ConfigError` naming the field and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A value in a run's or a stage's configuration is wrong: fail at once, never retry."""


class InputError(ValueError):
    """An input handed to a stage (data folder, checkpoint, model id) is missing or unreadable."""


Choices = Iterable[str] | Callable[[], Iterable[str]]


def opt(default: Any, help: str, *, choices: Choices | None = None, min: float | None = None,
        key: bool = True, **kw: Any) -> Any:
    """A dataclass field with a default and a help text.

    Args:
        choices: the allowed values (or a function returning them, read when checked).
        min: the smallest allowed number.
        key: False for options that cannot change what the stage writes (threads, progress
            bars): they are left out of the stage's output key.
    """
    meta = {"help": help, "choices": choices, "min": min, "key": key, **kw}
    return dataclasses.field(default=default, metadata=meta)


def req(help: str, **kw: Any) -> Any:
    """A required dataclass field with a help text."""
    return dataclasses.field(metadata={"help": help, "key": True, **kw})


def field_help(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", ""))


def field_choices(f: dataclasses.Field) -> list[str] | None:
    """The allowed values of a field, or None when any value of its type goes."""
    choices = f.metadata.get("choices")
    if choices is None:
        return None
    return list(choices() if callable(choices) else choices)


def in_key(f: dataclasses.Field) -> bool:
    """Whether a field takes part in the stage's output key (it can change the output)."""
    return bool(f.metadata.get("key", True))


def base_type(tp: Any) -> Any:
    """`int | None` -> int; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def optional(tp: Any) -> bool:
    """Whether a field type admits None."""
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def resolved_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """The dataclass fields of `cls` with their evaluated type hints."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON-able values."""
    return dataclasses.asdict(cfg)


def key_dict(cfg: Any) -> dict[str, Any]:
    """The fields of `cfg` that can change its stage's output (see `opt(key=...)`)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if in_key(f)}


def from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    """Build a config from a mapping; unknown keys raise ConfigError naming them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(names)}")
    return cls(**dict(values))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` as the field type `tp` (strings from a form or a command line become numbers)."""
    if value is None:
        if optional(tp):
            return None
        raise ConfigError(f"{where}: a value is required")
    typ = base_type(tp)
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif typ in (int, float) and not isinstance(value, bool):
        try:
            number = typ(value)
        except (TypeError, ValueError):
            pass
        else:
            if typ is float or float(value) == number:
                return number
    elif typ is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")


def replace(cfg: Any, changes: Mapping[str, Any], *, where: str = "") -> Any:
    """`dataclasses.replace` with values coerced to the field types; unknown names raise ConfigError."""
    fields = dict((f.name, tp) for f, tp in resolved_fields(type(cfg)))
    prefix = where or type(cfg).__name__
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}: unknown option(s) {unknown}; known: {sorted(fields)}")
    return dataclasses.replace(cfg, **{k: coerce(v, fields[k], f"{prefix}.{k}") for k, v in changes.items()})


def check_config(cfg: Any, *, where: str = "") -> None:
    """Check every field of `cfg` against its metadata (type, choices, min), then `cfg.validate()`.

    Raises ConfigError naming the field (`<where>.<field>`) and the allowed values.
    """
    prefix = where or type(cfg).__name__
    for f, tp in resolved_fields(type(cfg)):
        value = getattr(cfg, f.name)
        name = f"{prefix}.{f.name}"
        coerce(value, tp, name)
        if value is None:
            continue
        choices = field_choices(f)
        if choices is not None and value not in choices:
            raise ConfigError(f"{name}: {value!r} is not one of {choices}")
        low = f.metadata.get("min")
        if low is not None and value < low:
            raise ConfigError(f"{name}: must be >= {low}, got {value!r}")
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{prefix}: {e}") from None


def check_block_or_auto(value: str, field: str) -> None:
    """A layer option: a block number (negative counts from the end) or `auto`; ValueError otherwise."""
    if value != "auto":
        try:
            int(value)
        except ValueError:
            raise ValueError(f"{field} must be a block number or 'auto', got {value!r}") from None
