"""``deft`` command line: thin over :mod:`deft.run`; every flag is a field of a typed dataclass.

A YAML or JSON file given with ``--config`` sets the same fields (by their Python names); flags on the
command line win over the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from .cli_compress import EXTRA_COMMANDS as _COMPRESS_COMMANDS
from .cli_extra import EXTRA_COMMANDS as _REPORT_COMMANDS
from .io import read_mapping
from .run import CompareArgs, MeasureArgs, RunError, SkipArgs, TrainArgs

COMMANDS: dict[str, tuple[type, str]] = {
    "train": (TrainArgs, "fine-tune with PEFT + density loss; writes results.json, a plot and the adapter"),
    "compare": (CompareArgs, "PEFT (alpha=0) vs DEFT over seeds; prints the paper-style table"),
    "measure": (MeasureArgs, "activation density of a model or trained adapter on a dev set"),
    "skip": (SkipArgs, "ADA-DEFT: skip silent MLP blocks of a trained run under a bounded metric drop"),
}
# commands whose recipes live beside their library module: name -> (args class, help, function)
EXTRA: dict[str, tuple[type, str, Any]] = {**_COMPRESS_COMMANDS, **_REPORT_COMMANDS}
COMMANDS.update({k: (c, h) for k, (c, h, _) in EXTRA.items()})


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_list) of an annotation such as ``int | None`` or ``list[str] | None``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _add_fields(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, is_list = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f.metadata.get("help", "") + (f" (default: {default})" if default not in (None, False) else "")
        if f.metadata.get("positional"):  # e.g. `deft report RUN_DIR...`; "*" lets --config name them instead
            parser.add_argument(f.name, type=tp, nargs="*" if is_list else "?", default=None, help=help_,
                                metavar=f.name.upper())
        elif tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(flag, type=tp, nargs="+" if is_list else None, default=None, help=help_,
                                metavar=f.name.upper())


def _read_config(path: str, cls: type, what: str = "--config") -> dict[str, Any]:
    try:
        data = read_mapping(path, what)
    except (OSError, ValueError) as e:
        raise RunError(str(e)) from None
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RunError(f"{what} {path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deft", description="Density-efficient fine-tuning (DEFT)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=(cls.__doc__ or help_).strip())
        p.add_argument("--config", help="YAML or JSON file with option values (flags override it)")
        _add_fields(p, cls)
    return parser


def parse(argv: Sequence[str] | None = None) -> tuple[str, Any]:
    ns = build_parser().parse_args(argv)
    cls, _ = COMMANDS[ns.command]
    values: dict[str, Any] = _read_config(ns.config, cls) if ns.config else {}
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name)
        if v is not None and not (f.metadata.get("positional") and v == []):
            values[f.name] = v
    return ns.command, cls(**values)


def main(argv: Sequence[str] | None = None) -> int:
    from . import run

    try:
        command, args = parse(argv)
        if command == "train":
            res = run.train(args)
            print(f"{res['main_metric']}: {res['metric']:.4f}   density: {100 * res['density']['overall']:.2f} %")
            print(f"results: {Path(args.output) / 'results.json'}\nplot:    {Path(args.output) / 'layerwise_density.png'}")
        elif command == "compare":
            run.compare(args)
        elif command == "measure":
            run.measure(args)
        elif command == "skip":
            run.skip(args)
        elif command in EXTRA:
            EXTRA[command][2](args)
    except (RunError, ValueError, OSError) as e:
        # our errors (and transformers' "not a local folder / hub id") name the option or file at fault:
        # show them without a stack trace; DEFT_DEBUG=1 shows the trace
        if os.environ.get("DEFT_DEBUG"):
            raise
        print(f"deft {command if 'command' in locals() else ''}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndeft: interrupted; finished runs and the last checkpoint are kept (rerun with --resume)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
