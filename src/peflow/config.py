"""Typed stage configs: one keyword-only dataclass per stage.

A field's help text lives in its metadata (`opt(default, "help")`), so the
command line, the TorchX component and the Airflow Params are all generated
from the same dataclass.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a default and a help text."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def req(help: str, **kw: Any) -> Any:
    """A required dataclass field with a help text."""
    return dataclasses.field(metadata={"help": help, **kw})


def field_help(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", ""))


def base_type(tp: Any) -> Any:
    """`int | None` -> int; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def resolved_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """The dataclass fields of `cls` with their evaluated type hints."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON-able values."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    """Build a config from a mapping; unknown keys raise ValueError naming them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(names)}")
    return cls(**dict(values))
