"""One source of options: the library's DensityConfig / MethodConfig are deft train's density and PEFT options,
nested in TrainArgs and flattened into flags, files and results.json by deft.fields (flat / build)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from deft import cli
from deft.errors import ConfigError
from deft.fields import build, flat, options
from deft.methods import MethodConfig
from deft.recipes.compare import CompareArgs
from deft.recipes.train import TrainArgs
from deft.recipes.tune import TuneArgs
from deft.train.config import DensityConfig

from conftest import one_error_line

RESULTS = sorted((Path(__file__).resolve().parents[1] / "docs" / "results").glob("**/results.json"))
LIBRARY_GROUPS = {"density": DensityConfig, "peft": MethodConfig}


@dataclasses.dataclass
class _Inner:
    lr: float = 1.0


@dataclasses.dataclass
class _Clash:  # two leaves named lr: --lr could not address both
    optim: _Inner = dataclasses.field(default_factory=_Inner)
    lr: float = 2.0


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    return "".join(capsys.readouterr().out.split())  # argparse wraps lines (also at a hyphen): compare without spaces


def test_every_command_has_unique_option_names():
    for name, cmd in cli.COMMANDS.items():
        opts = options(cmd.args)  # refuses a class where two leaves share a name
        assert len({o.flag for o in opts.values()}) == len(opts), name
    with pytest.raises(TypeError, match="option 'lr' of lr is also optim.lr"):
        options(_Clash)


def _flags(command: str) -> dict[str, argparse.Action]:
    """Every flag of ``deft COMMAND`` -> its argparse action (a flag defined twice fails here)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out: dict[str, argparse.Action] = {}
    for action in sub.choices[command]._actions:
        for flag in action.option_strings:
            assert flag not in out, flag
            out[flag] = action
    return out


@pytest.mark.parametrize("group", sorted(LIBRARY_GROUPS))
def test_every_library_option_has_exactly_one_flag_with_the_library_help(group, capsys):
    cls = LIBRARY_GROUPS[group]
    flags, text = _flags("train"), _help("train", capsys)
    by_path = {o.path: o for o in options(TrainArgs).values()}
    for f in dataclasses.fields(cls):
        opt = by_path[(group, f.name)]
        assert opt.flag == "--" + f.metadata.get("option", f.name).replace("_", "-")
        action = flags[opt.flag]
        # one flag per field (a bool's --no-x is the same action), and no second spelling of it
        assert [k for k, a in flags.items() if a is action] in ([opt.flag], [opt.flag, f"--no-{opt.flag[2:]}"])
        assert action.help is not None and action.help.startswith(f.metadata["help"])
        assert "".join(f.metadata["help"].split()) in text
    # the density surrogate keeps its old flag, and only that one
    assert "--loss{l0,tanh}" in text and "--kind" not in flags


def test_flat_round_trip():
    args = cli.parse(
        ["train", "--lr", "2e-3", "--loss", "tanh", "--sites", "a.*", "b.*", "--quantize", "8", "--no-train-pooler"]
    )[1]
    assert build(TrainArgs, flat(args)) == args
    assert (args.optim.lr, args.density.kind, args.density.sites, args.backbone.quantize) == (
        2e-3,
        "tanh",
        ["a.*", "b.*"],
        8,
    )
    for cls in (TrainArgs, CompareArgs, TuneArgs):
        assert build(cls, flat(cls())) == cls()
        assert flat(build(cls, {})) == flat(cls())
    values = flat(args)
    values["report_to"].append("x")  # flat copies: the instance is not changed through it
    assert args.run.report_to == []


def test_old_flat_results_configs_load():
    assert len(RESULTS) > 100
    for path in RESULTS:
        cfg = json.loads(path.read_text())["config"]
        args = build(TrainArgs, cfg, str(path))
        new = flat(args)
        assert {k: new[k] for k in cfg} == cfg, path  # every stored value lands where it was
        assert args.density.kind == cfg["loss"] and args.optim.lr == cfg["lr"]


def test_build_names_the_option_and_the_source():
    with pytest.raises(ConfigError, match=r"^job x: unknown option\(s\) lrr; known: "):
        build(TrainArgs, {"lrr": 1}, "job x")
    with pytest.raises(ConfigError, match=r"^job x: option lr: expected a float, got 'fast'$"):
        build(TrainArgs, {"lr": "fast"}, "job x")
    with pytest.raises(ConfigError, match=r"^job x: loss \(--loss\) 'l1' is not one of l0, tanh$"):
        build(TrainArgs, {"loss": "l1"}, "job x")
    with pytest.raises(ConfigError, match=r"^job x: alpha must be a finite number >= 0"):
        build(TrainArgs, {"alpha": -1}, "job x")
    # YAML 1.1 reads 1e-3 as text and `none` as a word: both are what they say
    assert build(TrainArgs, {"lr": "1e-3", "max_train_samples": "none"}).optim.lr == 1e-3


def test_config_file_values_are_checked_naming_the_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: fast\n")
    assert cli.main(["train", "--config", str(cfg)]) == 2
    assert f"--config {cfg}: option lr: expected a float, got 'fast'" in one_error_line(capsys, "train")
