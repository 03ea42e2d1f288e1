"""Arguments dataclasses as flat options: the one bridge between nested configs and the flat names the CLI,
``--config`` files, ``deft sweep`` suite files, ``deft tune`` search spaces and ``results.json`` use.

An arguments class may nest dataclasses (groups): ``TrainArgs.density`` is a :class:`deft.DensityConfig`,
``TrainArgs.optim`` the optimiser options. Every leaf field is one *option*; its flat name is the field's
name (or its ``metadata["option"]``, for a library field whose CLI name predates it: ``DensityConfig.kind``
is ``loss``), its flag ``--`` that name with dashes, and its help text and default are the field's own.
Flat names are unique within one arguments class (:func:`options` refuses a class where they are not),
so a flat mapping addresses every leaf without the groups:

* :func:`flat` turns an instance into ``{name: value}`` (what results.json's ``config`` holds);
* :func:`build` makes an instance from such a mapping, any subset of it, the rest at its defaults, every
  value checked against its field's type and choices first.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Any, TypeVar

from .errors import ConfigError, DeftError

T = TypeVar("T")

# what a file or flag writes for "no value" in an option that may be None (YAML reads `none` as a string)
NONE_WORDS = ("none", "null")


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


def is_group(tp: Any) -> bool:
    """Whether an annotation is a nested arguments dataclass (a group of options) rather than a value."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@dataclasses.dataclass(frozen=True)
class Option:
    """One leaf option of an arguments class."""

    name: str  # flat name: key in files, results.json and job.json; the flag is --name with dashes
    path: tuple[str, ...]  # attribute path from the arguments class, e.g. ("density", "kind")
    type: Any  # the value's Python type (bool, int, float, str; a Literal's is its values' type)
    is_list: bool
    optional: bool  # None is a value (written `none` or `null` in files and flags)
    default: Any
    choices: tuple[Any, ...] | None
    help: str
    positional: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_OPTIONS: dict[type, dict[str, Option]] = {}


def _options(cls: type) -> dict[str, Option]:
    if cls not in _OPTIONS:
        out: dict[str, Option] = {}
        # defaults are read off a default instance, so a group's default_factory (a subclass, or the library
        # class with other values) decides its leaves' defaults, as it decides what an instance holds
        _collect(cls, cls(), (), out)
        _OPTIONS[cls] = out
    return _OPTIONS[cls]


def _collect(cls: type, default: Any, prefix: tuple[str, ...], out: dict[str, Option]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        value = getattr(default, f.name)
        if is_group(tp):
            _collect(type(value), value, (*prefix, f.name), out)
            continue
        name = f.metadata.get("option", f.name)
        if name in out:
            where = ".".join(out[name].path)
            raise TypeError(f"{cls.__name__}: option {name!r} of {'.'.join((*prefix, f.name))} is also {where}")
        base, is_list = field_type(tp)
        choices = field_choices(f, base)
        if typing.get_origin(base) is typing.Literal:
            base = type(typing.get_args(base)[0])
        out[name] = Option(
            name=name,
            path=(*prefix, f.name),
            type=base,
            is_list=is_list,
            optional=type(None) in typing.get_args(tp),
            default=value,
            choices=choices,
            help=f.metadata.get("help", ""),
            positional=bool(f.metadata.get("positional")),
        )


def options(cls: type) -> Mapping[str, Option]:
    """Every leaf option of the arguments class ``cls`` by flat name, in field order (groups depth first).
    A TypeError when two leaves share a flat name: one flag could not address both."""
    return types.MappingProxyType(_options(cls))


def flat(obj: Any) -> dict[str, Any]:
    """``{flat name: value}`` of every option of the arguments instance ``obj`` (values copied)."""
    out = {}
    for opt in _options(type(obj)).values():
        value = obj
        for name in opt.path:
            value = getattr(value, name)
        out[opt.name] = copy.deepcopy(value)
    return out


def convert(opt: Option, value: Any, where: str = "") -> Any:
    """``value`` of option ``opt`` as a file (YAML / JSON) or Python gives it, checked against the option's
    type and choices; a number where a float goes becomes a float (YAML 1.1 reads ``1e-3`` as text, so a
    numeric string too), ``none`` / ``null`` in an optional option is None. A wrong value is one ConfigError
    naming ``where`` and the option."""
    at = f"{where}: " if where else ""
    if isinstance(value, str) and value.strip().lower() in NONE_WORDS and opt.optional:
        value = None
    if value is None:
        if opt.optional:
            return None
        raise ConfigError(f"{at}option {opt.name}: may not be null")
    if opt.is_list and not isinstance(value, (list, tuple)):
        raise ConfigError(f"{at}option {opt.name}: expected a list, got {value!r}")

    def one(v: Any) -> Any:
        tp = opt.type
        if tp is float and isinstance(v, (int, str)) and not isinstance(v, bool):
            try:
                v = float(v)
            except ValueError:
                pass
        if not isinstance(v, tp) or (isinstance(v, bool) and tp is not bool):
            what = f"{'a list of ' if opt.is_list else 'a '}{getattr(tp, '__name__', tp)}"
            raise ConfigError(f"{at}option {opt.name}: expected {what}, got {v!r}")
        if opt.choices and v not in opt.choices:
            raise ConfigError(f"{at}{opt.name} ({opt.flag}) {v!r} is not one of {', '.join(map(str, opt.choices))}")
        return v

    return [one(v) for v in value] if opt.is_list else one(value)


def check_known(cls: type, values: Mapping[str, Any], where: str) -> None:
    """A ConfigError naming ``where`` and the unknown option(s) unless every key of ``values`` is an option."""
    known = _options(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def build(cls: type[T], values: Mapping[str, Any], where: str = "") -> T:
    """An instance of the arguments class ``cls`` from flat option values (any subset; the others keep
    their defaults). Every value is checked by :func:`convert`; a group's own checks (DensityConfig's
    ``__post_init__`` ...) run as it is made. Any refusal is one ConfigError, prefixed with ``where``."""
    check_known(cls, values, where or cls.__name__)
    opts = _options(cls)
    by_path = {opts[k].path: convert(opts[k], v, where) for k, v in values.items()}
    try:
        return _replace(cls(), by_path)
    except (DeftError, ValueError) as e:
        if where:
            raise ConfigError(f"{where}: {e}") from None
        if isinstance(e, DeftError):
            raise
        raise ConfigError(str(e)) from None


def _replace(obj: Any, values: Mapping[tuple[str, ...], Any]) -> Any:
    """``obj`` with the leaves at ``values``' paths replaced, each changed group made anew (so its checks run)."""
    here: dict[str, Any] = {}
    below: dict[str, dict[tuple[str, ...], Any]] = {}
    for path, v in values.items():
        if len(path) == 1:
            here[path[0]] = v
        else:
            below.setdefault(path[0], {})[path[1:]] = v
    for name, sub in below.items():
        here[name] = _replace(getattr(obj, name), sub)
    return dataclasses.replace(obj, **here) if here else obj
