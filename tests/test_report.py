"""Sweeps, the energy command, the CSV log callback and the HTML/Markdown report, on tiny real runs."""

from __future__ import annotations

import argparse
import base64
import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from deft import cli
from deft.analysis.report import build_report
from deft.analysis.report_plots import pareto_front
from deft.fields import build
from deft.recipes import train as train_recipe
from deft.recipes.common import RunError
from deft.recipes.compare import CompareArgs, compare
from deft.recipes.measure import EnergyArgs, energy
from deft.recipes.report import ReportArgs, report
from deft.recipes.sweep import SweepArgs, base_args, grid, point_name, read_rows, sweep
from deft.train.callbacks import DensityCSVCallback


def _base(model_dir, glue) -> dict:
    return dict(
        model=str(model_dir),
        task="sst2",
        data_dir=str(glue),
        epochs=1.0,
        batch_size=16,
        lr=1e-2,
        loss="tanh",
        logging_steps=1,
        quiet=True,
    )


@pytest.fixture(scope="module")
def runs(tiny_relu_model_dir, glue_dir, tmp_path_factory):
    """A 2 x 2 sweep (alpha 0 / 5, seeds 0 / 1), a compare folder and energy.json for two runs."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model gains nothing from threads, and loses a lot on a busy machine
    try:
        sargs = SweepArgs(
            base=_base(tiny_relu_model_dir, glue_dir), alphas=[0.0, 5.0], seeds=[0, 1], output=str(root / "sweep")
        )
        rows = sweep(sargs)
        # a compare folder made of copies of two sweep points: compare reuses finished runs, so nothing trains,
        # and the report must not count the copies twice
        for src, dst in (("a0-s0", "peft-seed0"), ("a5-s0", "deft-seed0")):
            shutil.copytree(root / "sweep" / src, root / "cmp" / dst)
        cmp_options = {"alpha": 5.0, "seeds": [0], "output": str(root / "cmp")}
        cargs = build(CompareArgs, {**_base(tiny_relu_model_dir, glue_dir), **cmp_options})
        compare(cargs)
        for point in ("a0-s0", "a5-s0"):
            energy(
                EnergyArgs(
                    model=str(tiny_relu_model_dir),
                    task="sst2",
                    data_dir=str(glue_dir),
                    adapter=str(root / "sweep" / point / "adapter"),
                    output=str(root / "sweep" / point),
                )
            )
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "sweep": root / "sweep", "cmp": root / "cmp", "rows": rows, "sweep_args": sargs}


def test_sweep_rows_csv_and_resume(runs, monkeypatch, capsys):
    out = runs["sweep"]
    assert [r["point"] for r in runs["rows"]] == ["a0-s0", "a0-s1", "a5-s0", "a5-s1"]
    assert all((out / p / "results.json").exists() for p in ("a0-s0", "a5-s1"))
    rows = read_rows(out / "sweep.jsonl")
    assert len(rows) == 4 and {r["alpha"] for r in rows} == {0.0, 5.0} and {r["seed"] for r in rows} == {0, 1}
    with (out / "sweep.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["point"] for r in table] == ["a0-s0", "a0-s1", "a5-s0", "a5-s1"]
    assert float(table[0]["density"]) == pytest.approx(rows[0]["density"])

    def no_training(args):
        raise AssertionError(f"trained {args.run.output} again")

    monkeypatch.setattr(train_recipe, "train", no_training)
    again = sweep(runs["sweep_args"])
    assert again == runs["rows"]
    assert len((out / "sweep.jsonl").read_text().splitlines()) == 4  # nothing appended twice

    # a finished point whose row was lost (crash between results.json and the append) gets its row back
    lines = (out / "sweep.jsonl").read_text().splitlines()
    (out / "sweep.jsonl").write_text("\n".join(lines[:3]) + '\n{"point": "a5-s1", "den')  # torn last line
    assert len(read_rows(out / "sweep.jsonl")) == 3
    assert [r["point"] for r in sweep(runs["sweep_args"])] == ["a0-s0", "a0-s1", "a5-s0", "a5-s1"]
    assert "adding its row" in capsys.readouterr().out


def test_sweep_grid_names_and_options(tmp_path):
    cfg = tmp_path / "base.yaml"
    cfg.write_text("model: minilm\ntask: rte\nepochs: 1\n")
    args = SweepArgs(
        base=str(cfg),
        set=["lr=3e-4", "target_modules=mlp", "max_train_samples=none"],
        methods=["lora", "ia3"],
        alphas=[0.0, 1e-3],
        eps=[1e-7, 1e-3],
        seeds=[0],
        output=str(tmp_path / "s"),
    )
    b = base_args(args)
    assert (b.data.task, b.optim.epochs, b.optim.lr, b.peft.target_modules, b.data.max_train_samples) == (
        "rte",
        1.0,
        3e-4,
        "mlp",
        None,
    )
    points = grid(args)
    # alpha = 0 ignores eps: one baseline per method and seed, not one per eps
    assert [p.name for p in points] == [
        "lora-a0-s0",
        "lora-a0.001-eps1e-07-s0",
        "lora-a0.001-eps0.001-s0",
        "ia3-a0-s0",
        "ia3-a0.001-eps1e-07-s0",
        "ia3-a0.001-eps0.001-s0",
    ]
    p = points[5]
    assert (p.args.peft.method, p.args.density.alpha, p.args.density.eps) == ("ia3", 1e-3, 1e-3) and p.args.run.resume
    assert p.args.run.output == str(tmp_path / "s" / "ia3-a0.001-eps0.001-s0")
    assert point_name({}) == "base"
    with pytest.raises(RunError, match="--base .*no such file"):
        base_args(SweepArgs(base=str(tmp_path / "missing.yaml")))
    with pytest.raises(RunError, match="unknown option 'lrr'"):
        base_args(SweepArgs(set=["lrr=1"]))
    with pytest.raises(RunError, match="expected a float"):
        base_args(SweepArgs(set=["lr=fast"]))
    with pytest.raises(RunError, match="sweep point .*alpha must be"):
        sweep(SweepArgs(alphas=[-1.0], output=str(tmp_path / "bad")))
    assert not (tmp_path / "bad" / "sweep.jsonl").exists()  # validated before anything ran


def test_energy_json_next_to_run(runs):
    e = json.loads((runs["sweep"] / "a5-s0" / "energy.json").read_text())["energy"]
    assert 0 < e["ratio"] < 1 and e["examples"] == 32
    assert set(e["by_op"]) >= {"mlp_down", "mlp_up", "attention_proj", "attention_matmul"}
    assert "DEFT" in e["op_help"]["mlp_down"]
    # the merged LoRA model sees the same W2 inputs as the trained run measured
    res = json.loads((runs["sweep"] / "a5-s0" / "results.json").read_text())
    downs = [layer for layer in e["layers"] if layer["op"] == "mlp_down"]
    assert [layer["act_in_nonzero"] for layer in downs] == [layer["nonzero"] for layer in res["density"]["layers"]]
    assert (runs["sweep"] / "a5-s0" / "energy_breakdown.png").stat().st_size > 1000
    assert (runs["sweep"] / "a5-s0" / "energy_breakdown.svg").exists()


def test_report_tables_images_and_configs(runs):
    out = runs["root"] / "report"
    single = runs["sweep"] / "a0-s0"  # also listed through the sweep: must appear once
    html_path, md_path = build_report([runs["sweep"], runs["cmp"], single], out)
    page = html_path.read_text()
    md = md_path.read_text()

    # self-contained: images inline, no external stylesheet / script / image
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) >= 4  # trade-off, density over steps, layerwise, energy
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert not re.search(r"<(link|script)\b|src=['\"]http", page)

    # the paper-style table: one row per setting (seeds merged), baseline, Density Change, energy ratio
    for needle in ("accuracy (%)", "density (%)", "Density Change %", "energy ratio", "baseline", " ± "):
        assert needle in page and needle in md
    table = md.split("## Results")[1].split("## Figures")[0]
    body = [line for line in table.splitlines() if line.startswith("| ") and "setting" not in line]
    assert len(body) == 2  # alpha 0 and alpha 5, two seeds each (the compare copies are not counted again)
    deft_row = next(line for line in body if "α=5" in line)
    assert re.search(r"\| 2 \|", deft_row) and "Not counted" in md
    cells = [c.strip() for c in deft_row.strip("|").split("|")]
    sweep_runs = [
        json.loads((runs["sweep"] / p / "results.json").read_text()) for p in ("a0-s0", "a0-s1", "a5-s0", "a5-s1")
    ]
    d_peft = sum(r["density"]["overall"] for r in sweep_runs[:2]) / 2
    d_deft = sum(r["density"]["overall"] for r in sweep_runs[2:]) / 2
    assert float(cells[4]) == pytest.approx((d_peft - d_deft) / d_peft * 100, abs=0.01)
    assert re.fullmatch(r"0\.\d{3} \(1 run\)", cells[7])  # only seed 0 has an energy.json
    e5 = json.loads((runs["sweep"] / "a5-s0" / "energy.json").read_text())["energy"]
    assert cells[7].startswith(f"{e5['ratio']:.3f}")

    # the energy section: one row per setting, W2 (mlp_down) called out
    energy = md.split("## Energy on a zero-skipping accelerator")[1].split("## Configurations")[0]
    assert "W2 input non-zero %" in energy and "mlp_down" in energy and "DEFT" in energy
    w2 = next(line for line in energy.splitlines() if line.startswith("| DEFT"))
    assert float(w2.split("|")[3]) == pytest.approx(100 * e5["by_op"]["mlp_down"]["input_nonzero_fraction"], abs=0.01)

    # figures exist as PNG and SVG, and the Markdown links them
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / link).exists() and (out / link).with_suffix(".svg").exists()
    # exact configs and versions
    assert '"lr": 0.01' in md and "transformers" in md and "torch" in page


def test_report_needs_runs(tmp_path):
    from deft.analysis.report import ReportError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no finished run"):
        build_report([tmp_path / "empty"], tmp_path / "r")
    with pytest.raises(RunError, match="at least one"):
        report(ReportArgs(output=str(tmp_path / "r")))


def test_pareto_front():
    pts = [(50.0, 80.0), (40.0, 80.0), (30.0, 70.0), (45.0, 85.0), (60.0, 84.0), (30.0, 60.0)]
    # (50, 80) is beaten by (40, 80); (60, 84) by (45, 85); (30, 60) by (30, 70)
    assert pareto_front(pts) == [2, 1, 3]
    assert pareto_front([(float("nan"), 1.0), (1.0, 1.0)]) == [1]


def test_csv_callback_grows_header_and_resumes(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    path = tmp_path / "train_log.csv"
    targs = TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[])
    state, control = TrainerState(), TrainerControl()
    cb = DensityCSVCallback(path)
    cb.on_train_begin(targs, state, control)
    for step, logs in (
        (1, {"loss": 0.7, "train_density": 0.5}),
        (2, {"loss": 0.6, "train_density": 0.4}),
        (2, {"eval_accuracy": 0.8, "eval_density_layer_0": 0.3}),
        (3, {"loss": 0.5}),
    ):
        state.global_step = step
        cb.on_log(targs, state, control, logs=logs)
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["step", "epoch", "loss", "train_density", "eval_accuracy", "eval_density_layer_0"]
    assert [r["step"] for r in rows] == ["1", "2", "2", "3"] and rows[2]["eval_density_layer_0"] == "0.3"
    assert rows[3]["train_density"] == ""

    # resuming from the step-2 checkpoint: step 3 will be logged again, so its old line goes
    state2 = TrainerState()
    state2.global_step = 2
    cb2 = DensityCSVCallback(path)
    cb2.on_train_begin(targs, state2, control)
    state2.global_step = 3
    cb2.on_log(targs, state2, control, logs={"loss": 0.45})
    rows = list(csv.DictReader(path.open()))
    assert [r["step"] for r in rows] == ["1", "2", "2", "3"] and rows[3]["loss"] == "0.45"


def test_every_command_fits_the_cli_parser():
    # the CLI builds every command's flags from its dataclass
    for name, cmd in cli.COMMANDS.items():
        p = argparse.ArgumentParser(prog=f"deft {name}")
        cli._add_fields(p, cmd.args)
        assert cmd.help and callable(cmd.run)
    p = argparse.ArgumentParser()
    cli._add_fields(p, SweepArgs)
    ns = p.parse_args(["--base", "b.yaml", "--alphas", "0", "0.5", "--seeds", "0", "1", "--set", "epochs=1"])
    assert (ns.base, ns.alphas, ns.seeds, ns.set) == ("b.yaml", [0.0, 0.5], [0, 1], ["epochs=1"])
    p = argparse.ArgumentParser()
    cli._add_fields(p, EnergyArgs)
    ns = p.parse_args(["--model", "m", "--no-merge-lora", "--hardware", "hw.yaml"])
    assert (ns.model, ns.merge_lora, ns.hardware) == ("m", False, "hw.yaml")


def test_group_settings_matches_baselines_by_activation_and_ignores_loss_options_at_alpha_0(tmp_path):
    from deft.analysis.report import Run, group_settings

    def fake(name, metric, density, **cfg):
        base = {"model": "m", "task": "sst2", "method": "lora", "alpha": 0.0, "loss": "l0", "eps": 1e-7, "seed": 0}
        return Run(
            tmp_path / name,
            {"config": {**base, **cfg}, "metric": metric, "density": {"overall": density}, "trainable_percent": 1.0},
        )

    runs = [
        fake("gelu-peft", 0.80, 1.0),  # written before --activation existed: no such key
        fake("gelu-peft-s1", 0.82, 1.0, seed=1, activation=None),
        fake("relu-peft-tanh", 0.78, 0.16, activation="relu", loss="tanh"),  # loss options mean nothing at alpha 0
        fake("relu-peft-l0", 0.76, 0.14, activation="relu", seed=1),
        fake("gelu-deft", 0.78, 0.8, alpha=3.0),
        fake("relu-deft", 0.74, 0.01, alpha=3.0, loss="tanh", activation="relu"),
    ]
    settings = {s.runs[0].dir.name: s for s in group_settings(runs)}
    assert len(settings) == 4
    assert [r.dir.name for r in settings["gelu-peft"].runs] == ["gelu-peft", "gelu-peft-s1"]
    assert [r.dir.name for r in settings["relu-peft-tanh"].runs] == ["relu-peft-tanh", "relu-peft-l0"]
    assert settings["gelu-deft"].baseline is settings["gelu-peft"]
    assert settings["relu-deft"].baseline is settings["relu-peft-tanh"]
    assert "activation=relu" in settings["relu-deft"].label and "loss" not in settings["relu-peft-tanh"].label


def test_committed_results_are_compact():
    """docs/results keeps what docs/RESULTS.md and `deft report` read: scripts/compact_results.py strips the
    rest of the training log and the per-module energy rows (the report's figures come out the same)."""
    root = Path(__file__).resolve().parents[1] / "docs" / "results"
    files = [*root.rglob("results.json"), *root.rglob("energy.json")]
    assert len(files) > 100
    for f in files:
        data = json.loads(f.read_text())
        assert f.stat().st_size < 100_000, f"{f}: run scripts/compact_results.py docs/results"
        assert all(set(h) <= {"step", "train_density"} for h in data.get("log_history", [])), f
        assert "layers" not in data.get("energy", {}), f
