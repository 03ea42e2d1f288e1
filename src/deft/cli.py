"""``deft`` command line: one table of commands, each a recipe of :mod:`deft.recipes` over a typed
dataclass whose fields are its flags.

A dataclass may nest groups of options (``TrainArgs.density`` is the library's DensityConfig): each leaf is one
flag of its flat name (:mod:`deft.fields`). A YAML or JSON file given with ``--config`` sets the same options
by those names; flags on the command line win over the file. A field with ``metadata["positional"]`` is a
positional argument (``deft report RUN_DIR...``).
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
from .fields import NONE_WORDS, Option, build, options
from .recipes.common import read_config
from .recipes.compare import CompareArgs, compare
from .recipes.compress import PruneArgs, prune
from .recipes.measure import EnergyArgs, MeasureArgs, energy, measure
from .recipes.report import ReportArgs, report
from .recipes.skip import SkipArgs, skip
from .recipes.speed import SpeedArgs, speed
from .recipes.sweep import SweepArgs, sweep
from .recipes.train import PRESET_KEY, TrainArgs, preset_names, train, with_preset
from .recipes.tune import TuneArgs, tune


def train_command(args: TrainArgs) -> dict[str, Any]:
    """``deft train``: :func:`deft.recipes.train.train`, then the metric and where the results are."""
    res = train(args)
    # under torchrun / accelerate launch every process runs the command; only the first one prints results
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{res['main_metric']}: {res['metric']:.4f}   density: {100 * res['density']['overall']:.2f} %")
        out = Path(args.run.output)
        print(f"results: {out / 'results.json'}\nplot:    {out / 'layerwise_density.png'}")
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
    "speed": Command(
        SpeedArgs, "forward time of a run trained under thresholds: dense vs served sparse, outputs checked", speed
    ),
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


def _flag_type(opt: Option) -> Any:
    """The argparse ``type`` of an option's flag: its value type, and ``none`` / ``null`` for None where it may be
    None (``--target-density none``)."""
    if not opt.optional or opt.is_list:
        return opt.type

    def parse(text: str) -> Any:
        return None if text.strip().lower() in NONE_WORDS else opt.type(text)

    parse.__name__ = opt.type.__name__  # argparse names it in "invalid float value: 'x'"
    return parse


def _add_fields(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per option of ``cls`` (nested groups flattened: :func:`deft.fields.options`; in ``--help`` each
    group is a section), its help and default the field's own. A flag not given is left out of the namespace
    (SUPPRESS), so a --config file keeps its values."""
    sections: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for opt in options(cls).values():
        where: Any = parser
        if len(opt.path) > 1:
            name = opt.path[0]
            if name not in sections:
                doc = " ".join((hints[name].__doc__ or "").split())
                sections[name] = parser.add_argument_group(f"{name} options", doc.split(". ")[0].rstrip(".") or None)
            where = sections[name]
        default = opt.default
        # 0 is shown (alpha 0 is a choice worth seeing); False and empty are "off"
        shown = default is not None and default is not False and default != []
        help_ = opt.help + (f" (default: {default})" if shown else "")
        if opt.positional:  # e.g. `deft report RUN_DIR...`; "*" lets --config name them instead
            where.add_argument(
                opt.name,
                type=opt.type,
                nargs="*" if opt.is_list else "?",
                default=None,
                help=help_,
                metavar=opt.name.upper(),
            )
        elif opt.type is bool:
            where.add_argument(opt.flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        else:
            choices, metavar = opt.choices, None if opt.choices else opt.name.upper()
            if choices and opt.optional:  # `--quantize none` undoes a config file's quantize
                choices, metavar = (*choices, None), "{" + ",".join(map(str, choices)) + ",none}"
            # with choices, argparse's own error names the flag and lists them; the metavar shows them in --help
            where.add_argument(
                opt.flag,
                type=_flag_type(opt),
                nargs="+" if opt.is_list else None,
                default=argparse.SUPPRESS,
                help=help_,
                choices=choices,
                metavar=metavar,
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
        if issubclass(cmd.args, TrainArgs):
            p.add_argument(
                "--preset",
                default=argparse.SUPPRESS,
                help=f"a named set of option values shipped with deft, one of {', '.join(preset_names())} (paper: the "
                "paper's exact-zero DEFT, alpha 3 without thresholds); a --config file and flags override it",
            )
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
    presets = issubclass(cls, TrainArgs)
    # flat option values, lowest precedence first: the --config file, then the flags given; a preset (named by
    # either) goes under both
    extra = (PRESET_KEY,) if presets else ()
    values: dict[str, Any] = read_config(ns.config, cls, extra=extra) if ns.config else {}
    for name, opt in options(cls).items():
        if not hasattr(ns, name):
            continue  # a flag not given (SUPPRESS)
        v = getattr(ns, name)
        if not (opt.positional and v in (None, [])):
            values[name] = v
    if presets:
        if hasattr(ns, PRESET_KEY):
            values[PRESET_KEY] = ns.preset
        values = with_preset(values)
    return ns.command, build(cls, values), bool(getattr(ns, "verbose", False))


def _command_of(argv: Sequence[str] | None) -> str | None:
    """The sub-command named on the command line, for error lines printed before parsing finished."""
    return next((a for a in (sys.argv[1:] if argv is None else argv) if a in COMMANDS), None)


def _close_distributed() -> None:
    """Under torchrun / accelerate launch, end the process group before the process exits: a gloo group left to
    the interpreter's teardown can abort a finished run ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")  # only if the command imported it: no torch import here
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
        _close_distributed()
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
