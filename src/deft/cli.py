"""``deft`` command line: one table of commands, each a recipe of :mod:`deft.recipes` over a typed
dataclass whose fields are its flags.

A YAML or JSON file given with ``--config`` sets the same fields (by their Python names); flags on the
command line win over the file. A field with ``metadata["positional"]`` is a positional argument
(``deft report RUN_DIR...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import traceback
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .console import cli_session
from .errors import DeftError
from .fields import check_choices, field_choices, field_default, field_type
from .recipes.common import read_config
from .recipes.compare import CompareArgs, compare
from .recipes.compress import PruneArgs, prune
from .recipes.measure import EnergyArgs, MeasureArgs, energy, measure
from .recipes.report import ReportArgs, report
from .recipes.skip import SkipArgs, skip
from .recipes.sweep import SweepArgs, sweep
from .recipes.train import TrainArgs, train
from .recipes.tune import TuneArgs, tune


def train_command(args: TrainArgs) -> dict[str, Any]:
    """``deft train``: :func:`deft.recipes.train.train`, then the metric and where the results are."""
    res = train(args)
    # under torchrun / accelerate launch every process runs the command; only the first one prints results
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{res['main_metric']}: {res['metric']:.4f}   density: {100 * res['density']['overall']:.2f} %")
        print(f"results: {Path(args.output) / 'results.json'}\nplot:    {Path(args.output) / 'layerwise_density.png'}")
    return res


@dataclasses.dataclass(frozen=True)
class Command:
    """One ``deft`` sub-command: its arguments dataclass (the flags), its one-line help, the recipe it runs."""

    args: type
    help: str
    run: Callable[[Any], Any]


COMMANDS: dict[str, Command] = {
    "train": Command(
        TrainArgs, "fine-tune with PEFT + density loss; writes results.json, a plot and the adapter", train_command
    ),
    "compare": Command(CompareArgs, "PEFT (alpha=0) vs DEFT over seeds; prints the paper-style table", compare),
    "measure": Command(MeasureArgs, "activation density of a model or trained adapter on a dev set", measure),
    "skip": Command(SkipArgs, "ADA-DEFT: skip silent MLP blocks of a trained run under a bounded metric drop", skip),
    "prune": Command(
        PruneArgs, "WANDA-prune a model (unstructured or N:M); writes masks, report and the pruned model", prune
    ),
    "energy": Command(EnergyArgs, "energy on a dense vs a zero-skipping accelerator (Sponge-style cost model)", energy),
    "sweep": Command(
        SweepArgs, "train a grid of alphas / eps / betas / methods / seeds, or suite files; resumable", sweep
    ),
    "report": Command(
        ReportArgs, "self-contained HTML + Markdown report (tables, plots, configs) of finished runs", report
    ),
    "tune": Command(
        TuneArgs,
        (
            "multi-objective search (metric up, density down) over train options; resumable, "
            "many workers can share one study"
        ),
        tune,
    ),
}


def _add_fields(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, is_list = field_type(hints[f.name])
        choices = field_choices(f, tp)
        if choices and typing.get_origin(tp) is typing.Literal:
            tp = type(choices[0])
        flag = "--" + f.name.replace("_", "-")
        default = field_default(f)
        help_ = f.metadata.get("help", "") + (f" (default: {default})" if default not in (None, False) else "")
        if f.metadata.get("positional"):  # e.g. `deft report RUN_DIR...`; "*" lets --config name them instead
            parser.add_argument(
                f.name, type=tp, nargs="*" if is_list else "?", default=None, help=help_, metavar=f.name.upper()
            )
        elif tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            # with choices, argparse's own error names the flag and lists them; the metavar shows them in --help
            parser.add_argument(
                flag,
                type=tp,
                nargs="+" if is_list else None,
                default=None,
                help=help_,
                choices=choices,
                metavar=None if choices else f.name.upper(),
            )


class _Parser(argparse.ArgumentParser):
    """argparse that reads ``--eps -1e-7`` as a value.

    argparse takes an argument starting with '-' for an option unless it matches its negative-number
    pattern, which (before Python 3.13) knows only ``-1`` and ``-1.5``: ``-1e-7`` became "expected one
    argument". The wider pattern below also matches exponents and ``-inf``; deft has no option that looks
    like a negative number, so nothing is lost.
    """

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf$", re.IGNORECASE)

    def error(self, message: str) -> typing.NoReturn:
        # one line, like deft's other errors; argparse's default puts the whole usage (40 lines for train) first
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_verbose(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="also show the libraries' load reports, warnings and log lines",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deft", description="Density-efficient fine-tuning (DEFT)")
    _add_verbose(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=(cmd.args.__doc__ or cmd.help).strip())
        p.add_argument("--config", help="YAML or JSON file with option values (flags override it)")
        # SUPPRESS: `deft -v train` must not be reset to False by the sub-command's own default
        _add_verbose(p, argparse.SUPPRESS)
        _add_fields(p, cmd.args)
    return parser


def parse(argv: Sequence[str] | None = None) -> tuple[str, Any]:
    """(command, its arguments dataclass) from the command line (and its --config file)."""
    command, args, _ = _parse(argv)
    return command, args


def _parse(argv: Sequence[str] | None) -> tuple[str, Any, bool]:
    ns = build_parser().parse_args(argv)
    cls = COMMANDS[ns.command].args
    values: dict[str, Any] = read_config(ns.config, cls) if ns.config else {}
    check_choices(values, cls, f"--config {ns.config}")
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name)
        if v is not None and not (f.metadata.get("positional") and v == []):
            values[f.name] = v
    return ns.command, cls(**values), bool(getattr(ns, "verbose", False))


def _command_of(argv: Sequence[str] | None) -> str | None:
    """The sub-command named on the command line, for error lines printed before parsing finished."""
    return next((a for a in (sys.argv[1:] if argv is None else argv) if a in COMMANDS), None)


def main(argv: Sequence[str] | None = None) -> int:
    prefix = f"deft {_command_of(argv)}" if _command_of(argv) else "deft"
    try:
        try:
            command, args, verbose = _parse(argv)
        except SystemExit as e:  # argparse has printed its one-line error; --help exits 0 and goes on up
            if e.code in (0, None):
                raise
            return e.code if isinstance(e.code, int) else 2
        with cli_session(verbose):
            COMMANDS[command].run(args)
    except DeftError as e:
        # a user error: its message names the option, file or model at fault; one line is enough
        # (DEFT_DEBUG=1 shows the trace)
        if os.environ.get("DEFT_DEBUG"):
            raise
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ndeft: interrupted; finished runs and the last checkpoint are kept (rerun with --resume)", file=sys.stderr
        )
        return 130
    except Exception:  # noqa: BLE001 - anything else is deft's fault, not the user's: show where it happened
        traceback.print_exc()
        print(f"{prefix}: this is a bug, please report it with the command and the traceback above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
