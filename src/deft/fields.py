"""Dataclass fields whose help text becomes the CLI's ``--help`` (read by ``deft.cli``), and the type / choice
introspection the CLI, ``--config`` files and ``deft sweep`` suite files share."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import field
from typing import Any

from .errors import ConfigError


def help_field(text: str, *, choices: Sequence[Any] | None = None, **kw: Any) -> Any:
    """A dataclass field with ``--help`` text; ``choices`` become the CLI flag's allowed values (argparse
    rejects anything else naming the flag, and ``--config`` files are checked against them too)."""
    metadata: dict[str, Any] = {"help": text}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(metadata=metadata, **kw)


def field_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_list) of an annotation such as ``int | None`` or ``list[str] | None``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def field_default(f: dataclasses.Field) -> Any:
    """The default of a field: its ``default``, or a fresh value of its ``default_factory``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name!r} has no default")


def field_choices(f: dataclasses.Field, tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a field: its ``choices`` metadata, or the values of a ``Literal`` type."""
    if "choices" in f.metadata:
        return tuple(f.metadata["choices"])
    return tuple(typing.get_args(tp)) if typing.get_origin(tp) is typing.Literal else None


def check_choices(values: dict[str, Any], cls: type, what: str) -> None:
    """Values from a --config file get the same choice check argparse gives flags."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        choices = field_choices(f, field_type(hints[f.name])[0])
        if choices and f.name in values and values[f.name] is not None:
            given = values[f.name] if isinstance(values[f.name], list) else [values[f.name]]
            bad = [v for v in given if v not in choices]
            if bad:
                raise ConfigError(
                    f"{what}: {f.name} (--{f.name.replace('_', '-')}) {bad[0]!r} is not one of "
                    f"{', '.join(map(str, choices))}"
                )
