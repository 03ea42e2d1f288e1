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


# ---------------------------------------------------------------------------------------------- one set of defaults
def test_library_and_cli_defaults_are_the_same(tmp_path):
    from transformers import AutoModel, TrainingArguments

    from deft.testing import tiny_config
    from deft.train.trainer import DeftTrainer

    for cls in (TrainArgs, CompareArgs, TuneArgs):
        assert cls().density == DensityConfig() and cls().peft == MethodConfig(), cls
    assert cli.parse(["train"])[1] == TrainArgs() and cli.parse(["compare"])[1].density == DensityConfig()
    trainer = DeftTrainer(
        AutoModel.from_config(tiny_config("bert")), TrainingArguments(output_dir=str(tmp_path), report_to=[])
    )
    assert trainer.density == TrainArgs().density
    # the recommended recipe (issue 16): training under thresholds, no density loss
    d = DensityConfig()
    assert (d.alpha, d.target_density, d.straight_through, d.alpha_warmup) == (0.0, 0.05, True, 0.5)
    assert (MethodConfig().lora_bias, TrainArgs().optim.lr) == ("lora_only", 5e-4)


def test_help_defaults_come_from_the_library():
    flags = _flags("train")
    by_path = {o.path: o for o in options(TrainArgs).values()}
    for group, cls in LIBRARY_GROUPS.items():
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            help_ = flags[by_path[(group, f.name)].flag].help or ""
            shown = default is not None and default is not False
            assert help_.endswith(f"(default: {default})") == shown, (f.name, help_)
    assert flags["--target-density"].help.endswith("(default: 0.05)")
    assert flags["--lr"].help.endswith("(default: 0.0005)")


@pytest.mark.parametrize("off", [["--target-density", "0"], ["--target-density", "none"], ["--preset", "paper"]])
def test_target_density_can_be_switched_off(off):
    assert cli.parse(["train"])[1].density.target_density == 0.05
    assert cli.parse(["train", *off])[1].density.target_density is None


@pytest.mark.parametrize("text", ["target_density: 0\n", "target_density: none\n", "target_density: null\n"])
def test_target_density_off_in_files(tmp_path, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert cli.parse(["train", "--config", str(cfg)])[1].density.target_density is None
    assert DensityConfig(target_density=0).target_density is None
    with pytest.raises(ConfigError, match=r"target_density must be in \(0, 1\], or 0 / None for no thresholds"):
        DensityConfig(target_density=1.5)


def test_adaptive_without_a_density_loss_is_refused(capsys):
    """ADA-DEFT only reweights the density loss: under the default recipe (alpha 0) it would silently do nothing."""
    with pytest.raises(ConfigError, match="needs alpha > 0"):
        DensityConfig(adaptive=True)
    assert DensityConfig(adaptive=True, alpha=1.0).adaptive
    assert cli.main(["train", "--adaptive"]) == 2
    assert "needs alpha > 0" in capsys.readouterr().err
    assert cli.parse(["train", "--adaptive", "--preset", "paper"])[1].density.adaptive


def test_paper_preset_is_the_old_default_recipe():
    paper = cli.parse(["train", "--preset", "paper"])[1]
    d, old = paper.density, DensityConfig(alpha=3.0, target_density=None, straight_through=False)
    assert d == old and (d.alpha_warmup, paper.optim.lr, paper.peft.lora_bias) == (0.5, 1e-3, "lora_only")
    changed = {k for k, v in flat(paper).items() if v != flat(TrainArgs())[k]}
    assert changed == {"alpha", "target_density", "straight_through", "lr"}
    # shipped inside the package: pyproject's package-data names the presets folder
    assert 'recipes/presets/*.yaml"' in (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()


def test_preset_under_config_under_flags(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 2.0e-3\nalpha: 1\n")
    args = cli.parse(["train", "--preset", "paper", "--config", str(cfg), "--alpha", "2"])[1]
    # alpha: flag over file over preset; lr: file over preset; target_density: the preset over the default
    assert (args.density.alpha, args.optim.lr, args.density.target_density) == (2.0, 2e-3, None)
    cfg.write_text("preset: paper\nlr: 2.0e-3\n")  # a preset named in the file, still under the file's values
    args = cli.parse(["compare", "--config", str(cfg)])[1]
    assert (args.density.alpha, args.optim.lr, args.density.straight_through) == (3.0, 2e-3, False)
    assert cli.parse(["tune", "--preset", "paper"])[1].density.alpha == 3.0
    assert cli.main(["train", "--preset", "papr"]) == 2
    assert one_error_line(capsys, "train") == "deft train: error: --preset papr: no such preset; known: paper"
    cfg.write_text("preset: nope\n")
    assert cli.main(["compare", "--config", str(cfg)]) == 2
    assert "preset nope: no such preset; known: paper" in one_error_line(capsys, "compare")


def test_suite_preset_under_the_options_and_set(tmp_path):
    import yaml

    from deft.recipes.sweep import SweepArgs, suite_points

    path = tmp_path / "s.yaml"
    groups = {"paper": {}, "paper-lr": {"lr": 2e-3}, "default": {"preset": None}}
    path.write_text(yaml.safe_dump({"defaults": {"preset": "paper", "seeds": [0]}, "groups": groups}))
    jobs = {p.name: p.args for p in suite_points(SweepArgs(suites=[str(path)], output=str(tmp_path)))}
    assert jobs["paper/deft-seed0"].density == DensityConfig(alpha=3.0, target_density=None, straight_through=False)
    assert jobs["paper/peft-seed0"].density.alpha == 0.0 and jobs["paper-lr/deft-seed0"].optim.lr == 2e-3
    assert jobs["default/deft-seed0"].density == DensityConfig()  # `preset: null` undoes the file's default
    jobs = {p.name: p.args for p in suite_points(SweepArgs(suites=[str(path)], set=["preset=paper"]))}
    assert jobs["default/deft-seed0"].density.alpha == 3.0


def test_compare_peft_run_has_no_thresholds_loss_or_distillation(tmp_path, monkeypatch):
    from deft.recipes import compare as compare_recipe

    trained: list[TrainArgs] = []

    class Enough(Exception):
        pass

    def fake_train(args):
        trained.append(args)
        if len(trained) == 2:
            raise Enough

    monkeypatch.setattr(compare_recipe, "train", fake_train)
    args = cli.parse(["compare", "--output", str(tmp_path), "--alpha", "1", "--distill", "0.5"])[1]
    with pytest.raises(Enough):
        compare_recipe.compare(args)
    peft, deft_ = (a.density for a in trained)
    assert (peft.alpha, peft.target_density, peft.distill) == (0.0, None, 0.0)
    assert deft_ == args.density  # DEFT: the options given, the default thresholds included
    assert deft_.target_density == 0.05 and (deft_.alpha, deft_.distill) == (1.0, 0.5)
    assert [a.run.output for a in trained] == [str(tmp_path / "peft-seed0"), str(tmp_path / "deft-seed0")]
