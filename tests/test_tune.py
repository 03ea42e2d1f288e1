"""``deft tune``: search-space parsing, bad inputs, the answer picker, and real studies on a tiny BERT."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deft import cli
from deft.fields import build
from deft.recipes import train as train_recipe
from deft.recipes import tune
from deft.recipes.tune import Param, TuneArgs, TuneError

optuna = pytest.importorskip("optuna")


def _flags(model_dir, glue, out, *extra):
    # one optimizer step per epoch: a trial takes seconds
    return [
        "tune",
        "--model",
        str(model_dir),
        "--task",
        "sst2",
        "--data-dir",
        str(glue),
        "--data-source",
        "local",
        "--output",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-train-samples",
        "16",
        "--max-eval-samples",
        "16",
        "--quiet",
        *extra,
    ]


def _study(out: Path, name: str = "deft-tune", url: str | None = None):
    return optuna.load_study(study_name=name, storage=url or f"sqlite:///{out / 'study.db'}")


def _fake_baseline(d: Path, metric: float, steps: tuple[int, ...] = (1,)) -> Path:
    """A finished plain-PEFT run folder as `deft train` writes it (the fields deft tune reads)."""
    d.mkdir(parents=True)
    history = [{"eval_accuracy": metric, "step": s, "epoch": i + 1} for i, s in enumerate(steps)]
    (d / "results.json").write_text(
        json.dumps(
            {
                "task": "sst2",
                "main_metric": "accuracy",
                "metric": metric,
                "config": {"alpha": 0.0},
                "density": {"overall": 0.9, "thresholds": None},
                "thresholds": None,
                "log_history": history,
            }
        )
    )
    return d


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------- search space
def test_space_file_is_parsed(tmp_path):
    space = tune.load_space(
        _write(
            tmp_path / "s.yaml",
            (
                "alpha: {low: 0.1, high: 10, log: true}\n"
                "alpha-warmup: {low: 0, high: 0.6, step: 0.2}\n"
                "lora_r: {low: 4, high: 16}\n"
                "eps: {low: 1, high: 100, log: true, int: true}\n"
                "method: {choices: [lora, ia3]}\n"
                "target_density: {choices: [null, 0.1]}\n"
            ),
        )
    )
    assert space["alpha"] == Param("alpha", low=0.1, high=10, log=True)
    assert space["alpha_warmup"] == Param("alpha_warmup", low=0, high=0.6, step=0.2)
    assert space["lora_r"].int  # an int option is searched over whole numbers without saying so
    assert space["eps"].int and space["eps"].log
    assert space["method"].choices == ("lora", "ia3")
    assert space["target_density"].choices == (None, 0.1)

    # the suggested values have the option's type and lie in the range
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    values = {k: p.suggest(trial) for k, p in space.items()}
    assert isinstance(values["lora_r"], int) and 4 <= values["lora_r"] <= 16
    assert 0.1 <= values["alpha"] <= 10 and values["method"] in ("lora", "ia3")
    assert any(values["alpha_warmup"] == pytest.approx(v) for v in (0.0, 0.2, 0.4, 0.6))


def test_default_space():
    space = tune.load_space(None)
    # the recommended recipe's knobs: training under thresholds, no density loss (alpha 0 by default)
    assert set(space) == {"target_density", "lr", "density_ramp", "straight_through"}
    assert space["target_density"] == Param("target_density", low=0.01, high=0.3, log=True)
    assert space["lr"] == Param("lr", low=3e-4, high=3e-3, log=True)
    assert space["straight_through"].choices == (False, True)
    assert tune.TuneArgs().density.alpha == 0.0 and tune.TuneArgs().optim.eval_every == 0.5


@pytest.mark.parametrize(
    "text, needle",
    [
        ("alphaa: {low: 1, high: 2}", "unknown option 'alphaa' (did you mean alpha?); known: model, "),
        ("alpha: {low: 1, high: 1}", "alpha: empty range: low 1 must be below high 1"),
        ("alpha: {low: 2, high: 1}", "empty range"),
        ("method: {choices: []}", "method: choices must be a non-empty list"),
        ("alpha: {low: 0, high: 1, log: true}", "log range needs low > 0"),
        ("alpha: {low: 1, high: 2, logg: true}", "unknown key(s) logg; known: low, high"),
        ("alpha: {high: 2}", "needs both low and high"),
        ("alpha: 3", "expected {low, high"),
        ("method: {low: 1, high: 2}", "a str option; give {choices"),
        ("lora_r: {choices: [4, x]}", "choice 'x' is not a valid int"),
        ("lora_r: {low: 4.5, high: 8}", "whole-number low and high"),
        ("output: {choices: [a, b]}", "output: cannot be searched"),
        ("{}", "defines no option to search"),
    ],
)
def test_bad_space_is_one_clear_error(tmp_path, text, needle):
    with pytest.raises(TuneError) as e:
        tune.load_space(_write(tmp_path / "s.yaml", text))
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--trials", "0"], "--trials must be a whole number >= 1, got 0"),
        (["--timeout", "0"], "--timeout must be"),
        (["--max-drop", "-1"], "--max-drop must be"),
        (
            ["--storage", "sqlite:////no/such/folder/study.db"],
            "--storage sqlite:////no/such/folder/study.db: cannot be opened",
        ),
        (["--storage", "not a url"], "--storage not a url: cannot be opened"),
        (["--baseline", "nowhere"], "--baseline nowhere: no results.json"),
        (["--loss", "nosuch"], "argument --loss: invalid choice: 'nosuch' (choose from 'l0', 'tanh')"),
    ],
)
def test_bad_options_are_one_clear_error(tmp_path, capsys, extra, needle):
    assert cli.main(["tune", "--output", str(tmp_path / "t"), *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_storage_error_hides_the_password(tmp_path):
    with pytest.raises(TuneError) as e:
        tune.open_storage("postgresql://deft:s3cret@127.0.0.1:1/db")
    assert "cannot be opened" in str(e.value) and "s3cret" not in str(e.value)


def test_missing_optuna_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    with pytest.raises(TuneError, match=r"pip install 'deft-sparsity\[tune\]'"):
        tune.tune(build(TuneArgs, {"output": str(tmp_path / "t"), "trials": 1}))


def test_missing_optuna_is_one_error_line_with_one_prefix(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)
    assert cli.main(["tune", "--output", str(tmp_path / "t"), "--trials", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "deft tune: error: Optuna is not installed: pip install 'deft-sparsity[tune]'"


def test_other_study_in_the_same_storage_is_refused(tmp_path):
    out = tmp_path / "t"
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    optuna.create_study(study_name="single", storage=url, direction="maximize")
    with pytest.raises(TuneError, match="'single' .* is not a deft tune study"):
        tune.tune(build(TuneArgs, {"output": str(out), "trials": 1, "storage": url, "study_name": "single"}))


# ---------------------------------------------------------------------------------------------- answers
ROWS = [
    {"number": 0, "metric": 0.900, "density": 0.80},  # the baseline
    {"number": 1, "metric": 0.897, "density": 0.30},  # within 0.5 points ...
    {"number": 3, "metric": 0.899, "density": 0.30},  # ... and better at the same density
    {"number": 2, "metric": 0.894, "density": 0.20},  # 0.6 points below
    {"number": 5, "metric": 0.895, "density": 0.25},  # exactly 0.5 points below: within
    {"number": 4, "metric": 0.850, "density": 0.05},
    {"number": 6, "metric": None, "density": None},  # failed / pruned: ignored
]


@pytest.mark.parametrize(
    "reference, max_drop, expected",
    [
        (0.90, 0.5, 5),
        (0.90, 0.4, 3),
        (0.90, 1.0, 2),
        (0.90, 0.0, 0),
        (0.90, 5.0, 4),
        (0.99, 0.5, None),
    ],
)
def test_pick_answer(reference, max_drop, expected):
    got = tune.pick_answer(ROWS, reference, max_drop)
    assert (got["number"] if got else None) == expected


def test_pareto_front():
    front = tune.pareto_front(ROWS)
    # 1 is beaten by 3 (same density, better); every other finished row is best at its density
    assert [r["number"] for r in front] == [4, 2, 5, 3, 0]
    assert tune.pareto_front(
        [{"number": 0, "metric": 0.5, "density": 0.5}, {"number": 1, "metric": 0.6, "density": 0.4}]
    ) == [{"number": 1, "metric": 0.6, "density": 0.4}]


def test_run_density_prefers_effective():
    assert tune.run_density({"density": {"overall": 0.4, "thresholds": None}}) == (0.4, "exact")
    assert tune.run_density({"density": {"overall": 0.4}, "thresholds": {"l0": 0.1}}) == (0.4, "effective")
    assert tune.run_density({"density": {"overall": 0.4, "thresholds": {"l0": 0.1}}}) == (0.4, "effective")
    assert tune.run_density({"density": {"overall": 0.4, "effective": 0.1}}) == (0.1, "effective")
    assert tune.run_density({"density": {"overall": 0.4}, "effective": {"overall": 0.2}}) == (0.2, "effective")


def test_eval_curve_and_prune_floor():
    res = {
        "main_metric": "accuracy",
        "metric": 0.9,
        "log_history": [
            {"loss": 1.0, "step": 1},
            {"eval_accuracy": 0.7, "step": 2},
            {"eval_accuracy": 0.85, "step": 4},
            {"train_runtime": 1.0, "step": 4},
        ],
    }
    curve = tune.eval_curve(res)
    assert curve == [[0.5, 0.7], [1.0, 0.9]]  # the final metric is the run's, at the end of training
    assert tune.prune_floor(curve, 0.25, 0.02) is None  # earlier than any baseline evaluation: never prune
    assert tune.prune_floor(curve, 0.5, 0.02) == pytest.approx(0.68)
    assert tune.prune_floor(curve, 0.75, 0.02) == pytest.approx(0.68)
    assert tune.prune_floor(curve, 1.0, 0.02) == pytest.approx(0.88)
    assert tune.prune_floor(None, 0.5, 0.02) is None


# ---------------------------------------------------------------------------------------------- studies
def test_study_writes_trials_front_and_resumes(tiny_model_dir, glue_dir, tmp_path, capsys):
    from deft.analysis.report import find_runs

    out = tmp_path / "tune"
    assert cli.main(_flags(tiny_model_dir, glue_dir, out, "--trials", "2", "--sampler-seed", "0")) == 0
    printed = capsys.readouterr().out
    assert "sparsest within 0.5 points of the PEFT baseline" in printed

    study = _study(out)
    t0, t1 = study.trials
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    # trial 0 is the enqueued PEFT baseline: density loss and masking off
    assert t0.user_attrs["role"] == "baseline" and t1.user_attrs["role"] == "search"
    base_res = json.loads((out / "trial-0000" / "results.json").read_text())
    assert base_res["config"]["alpha"] == 0 and base_res["config"]["target_density"] is None
    # trial 1 trained with the sampled options on top of the command's own
    res1 = json.loads((out / "trial-0001" / "results.json").read_text())
    for k in ("lr", "density_ramp", "straight_through", "target_density"):
        assert res1["config"][k] == pytest.approx(t1.params[k])
    assert res1["config"]["alpha"] == 0  # tune's default: the recommended recipe, no density loss
    assert res1["config"]["epochs"] == 1 and res1["config"]["max_train_samples"] == 16
    for t, res in ((t0, base_res), (t1, res1)):
        run_dir = out / f"trial-{t.number:04d}"
        assert (run_dir / "adapter").is_dir()
        assert t.user_attrs["run_dir"] == str(run_dir.resolve())
        assert t.values == [res["metric"], res["density"]["overall"]]
        assert t.user_attrs["metric"] == res["metric"] and t.user_attrs["density"] == res["density"]["overall"]
    assert t0.user_attrs["density_kind"] == "exact"
    assert t1.user_attrs["density_kind"] == "effective"  # trained under --target-density thresholds

    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["trials"]["complete"] == 2 and pareto["baseline"]["trial"] == 0
    assert pareto["front"] and {r["number"] for r in pareto["front"]} <= {0, 1}
    ans = pareto["answer"]
    assert ans["metric"] >= pareto["baseline"]["metric"] - 0.005
    assert ans["density"] == min(
        r["density"]
        for r in pareto["all_trials"]
        if r["metric"] is not None and r["metric"] >= pareto["baseline"]["metric"] - 0.005
    )
    with open(out / "pareto.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(pareto["front"]) and {"trial", "metric", "density", "run_dir", "alpha"} <= set(rows[0])
    assert (out / "pareto.png").stat().st_size > 1000
    assert len(find_runs([out])) == 2  # `deft report OUT` reads the trials as runs

    # resume: one more trial; the finished ones are kept as they are
    stamp = (
        (out / "trial-0000" / "results.json").stat().st_mtime_ns,
        (out / "trial-0001" / "results.json").stat().st_mtime_ns,
    )
    assert cli.main(_flags(tiny_model_dir, glue_dir, out, "--trials", "3")) == 0
    study = _study(out)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert [t.datetime_complete for t in study.trials[:2]] == [t0.datetime_complete, t1.datetime_complete]
    assert (
        (out / "trial-0000" / "results.json").stat().st_mtime_ns,
        (out / "trial-0001" / "results.json").stat().st_mtime_ns,
    ) == stamp
    assert json.loads((out / "pareto.json").read_text())["trials"]["complete"] == 3

    # the same command again: the study already has 3 trials, nothing is trained
    assert cli.main(_flags(tiny_model_dir, glue_dir, out, "--trials", "3")) == 0
    assert len(_study(out).trials) == 3


def test_failing_trial_is_recorded_and_study_goes_on(tmp_path, capsys):
    out = tmp_path / "tune"
    base = _fake_baseline(tmp_path / "peft", 0.8)
    space = _write(tmp_path / "space.yaml", "loss: {choices: [nosuch]}\n")
    flags = ["tune", "--output", str(out), "--space", space, "--baseline", str(base), "--trials", "2"]
    assert cli.main(flags) == 0
    study = _study(out)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]  # the second trial ran after the first failed
    for t in study.trials:
        assert "loss (--loss) 'nosuch' is not one of l0, tanh" in t.user_attrs["error"]
        assert t.user_attrs["run_dir"].endswith(f"trial-{t.number:04d}")
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["trials"]["fail"] == 2 and pareto["front"] == []
    # with no trial close enough, the given baseline is the answer
    assert pareto["answer"]["role"] == "baseline" and pareto["answer"]["run_dir"] == str(base.resolve())
    assert "the baseline itself" in capsys.readouterr().out


def test_hopeless_trial_is_pruned(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "tune"
    # a baseline at 99 % after epoch 1 of 2 (step 1 of 2): the tiny model is far more than 4 x 0.5 points below
    base = _fake_baseline(tmp_path / "peft", 0.99, steps=(1, 2))
    flags = _flags(tiny_model_dir, glue_dir, out, "--epochs", "2", "--baseline", str(base))
    assert cli.main([*flags, "--trials", "1"]) == 0
    (t,) = _study(out).trials
    assert t.state.name == "PRUNED"
    assert t.user_attrs["steps_planned"] == 2 and t.user_attrs["steps_run"] == 1
    assert t.user_attrs["evals"][0][0] == 1 and t.user_attrs["evals"][0][1] < 0.97
    assert not (out / "trial-0000" / "results.json").exists() and not (out / "trial-0000" / "checkpoints").exists()
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["pruning"] == {
        "enabled": True,
        "factor": 4.0,
        "margin_points": 2.0,
        "pruned_trials": 1,
        "steps_saved": 1,
    }

    assert cli.main([*flags, "--trials", "2", "--no-prune"]) == 0
    t = _study(out).trials[1]
    assert t.state.name == "COMPLETE" and t.user_attrs["steps_run"] == 2
    assert json.loads((out / "pareto.json").read_text())["pruning"]["steps_saved"] == 1


def _fake_train(calls):
    """Stands in for training where only the study's bookkeeping is tested: writes a results.json."""

    def train(args, setup=None, callbacks=None):
        calls.append(args)
        res = {
            "task": "sst2",
            "main_metric": "accuracy",
            "metric": 0.5,
            "config": {"alpha": args.density.alpha},
            "density": {"overall": 0.5},
            "log_history": [{"step": 3}],
        }
        Path(args.run.output).mkdir(parents=True, exist_ok=True)
        (Path(args.run.output) / "results.json").write_text(json.dumps(res))
        return res

    return train


def test_interrupted_trial_is_rerun_in_its_folder(tmp_path, monkeypatch):
    out = tmp_path / "tune"
    base = _fake_baseline(tmp_path / "peft", 0.6)
    args = build(TuneArgs, {"output": str(out), "baseline": str(base), "trials": 1, "sampler_seed": 0})

    def ctrl_c(args, setup=None, callbacks=None):
        (Path(args.run.output) / "checkpoints").mkdir(parents=True)  # as if an epoch had been saved
        raise KeyboardInterrupt

    monkeypatch.setattr(train_recipe, "train_with_setup", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        tune.tune(args)
    t0, t1 = _study(out).trials
    assert t0.state.name == "FAIL" and "interrupted" in t0.user_attrs["error"]
    assert t1.state.name == "WAITING" and t1.user_attrs["resumes"] == 0

    calls: list = []
    monkeypatch.setattr(train_recipe, "train_with_setup", _fake_train(calls))
    tune.tune(args)  # --trials 1: the interrupted trial does not count, its re-run does
    t0, t1 = _study(out).trials
    assert t1.state.name == "COMPLETE" and t1.params == t0.params
    assert len(calls) == 1 and calls[0].run.output == str(out / "trial-0000") and calls[0].run.resume  # resumed
    assert calls[0].density.target_density == pytest.approx(t0.params["target_density"])


def test_trial_of_a_dead_worker_is_rerun(tmp_path, monkeypatch):
    monkeypatch.setattr(tune, "HEARTBEAT_S", 1)
    monkeypatch.setattr(tune, "GRACE_S", 1)
    out = tmp_path / "tune"
    args = build(TuneArgs, {"output": str(out), "baseline": str(_fake_baseline(tmp_path / "peft", 0.6)), "trials": 1})

    def killed(args, setup=None, callbacks=None):
        raise SystemExit(137)  # not caught by Optuna: the trial stays RUNNING, like a process killed mid-trial

    monkeypatch.setattr(train_recipe, "train_with_setup", killed)
    with pytest.raises(SystemExit):
        tune.tune(args)
    assert _study(out).trials[0].state.name == "RUNNING"
    time.sleep(3)  # its heartbeat grows older than the grace period

    calls: list = []
    monkeypatch.setattr(train_recipe, "train_with_setup", _fake_train(calls))
    tune.tune(args)
    t0, t1 = _study(out).trials
    assert t0.state.name == "FAIL" and t1.state.name == "COMPLETE" and t1.user_attrs["resumes"] == 0
    assert t1.user_attrs["run_name"] == "trial-0000" and calls[0].run.output == str(out / "trial-0000")


def test_two_processes_share_one_study(tiny_model_dir, glue_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deft.cli",
                *_flags(tiny_model_dir, glue_dir, tmp_path / f"worker{i}", "--storage", url, "--trials", "2"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(x[-3000:] for x in logs)

    trials = _study(tmp_path, url=url).trials
    done = [t for t in trials if t.state.name == "COMPLETE"]
    # 2 asked for (the baseline and one search trial); two workers starting a trial at the same moment may add one
    assert 2 <= len(done) <= 3 and len(done) == len(trials)
    assert sum(t.user_attrs["role"] == "baseline" for t in done) == 1  # trained once, by one of them
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both trained trials of the one study
    for t in done:
        assert (Path(t.user_attrs["run_dir"]) / "results.json").exists()
        assert Path(t.user_attrs["run_dir"]).name == f"trial-{t.number:04d}"
    # the worker that finished last wrote the whole study into its pareto.json
    counts = [json.loads((tmp_path / f"worker{i}" / "pareto.json").read_text())["trials"]["complete"] for i in range(2)]
    assert max(counts) == len(done)


def test_eval_every_evaluates_mid_run(tiny_model_dir, glue_dir, tmp_path):
    """--eval-every 0.5 (tune's default): an evaluation half-way, so pruning has something to decide on."""
    from deft import ConfigError
    from deft.fields import build
    from deft.recipes.train import TrainArgs, train

    kw = dict(
        model=str(tiny_model_dir),
        data_dir=str(glue_dir),
        data_source="local",
        alpha=0.0,
        epochs=1,
        batch_size=4,
        max_train_samples=16,
        max_eval_samples=8,
        quiet=True,
    )
    res = train(build(TrainArgs, {**kw, "eval_every": 0.5, "output": str(tmp_path / "run")}))
    assert [h["step"] for h in res["log_history"] if "eval_accuracy" in h] == [2, 4]  # 4 steps, every 2
    with pytest.raises(ConfigError, match="--eval-every"):
        train(build(TrainArgs, {**kw, "eval_every": 1.5, "output": str(tmp_path / "bad")}))
