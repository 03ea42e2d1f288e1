"""The command line end to end on a tiny BERT with the real MiniLM tokenizer and real SST-2 rows."""

from __future__ import annotations

import json

import pytest

from deft import cli
from deft.recipes.common import RunError
from deft.recipes.train import train

from conftest import sst2_folder, tiny_run_flags


def _train_flags(model_dir, glue, out, *extra):
    return ["train", *tiny_run_flags(model_dir, glue, out, "--quiet", *extra)]


def test_train_writes_results_plot_and_adapter(tiny_model_dir, glue_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_train_flags(tiny_model_dir, glue_dir, out)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "sst2" and res["main_metric"] == "accuracy"
    assert 0 <= res["metric"] <= 1 and 0 <= res["density"]["overall"] <= 1
    assert len(res["density"]["layers"]) == 2
    assert 0 < res["trainable_percent"] < 100
    assert res["train_examples"] == 48 and res["eval_examples"] == 32
    assert {"torch", "transformers", "peft"} <= set(res["versions"])
    assert (out / "layerwise_density.png").stat().st_size > 1000
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert "accuracy" in capsys.readouterr().out

    # measure the trained adapter: same dev set, same density as the run reported
    assert (
        cli.main(
            [
                "measure",
                "--model",
                str(tiny_model_dir),
                "--task",
                "sst2",
                "--data-dir",
                str(glue_dir),
                "--adapter",
                str(out / "adapter"),
                "--output",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    measured = json.loads((tmp_path / "m" / "density.json").read_text())["density"]
    assert measured["overall"] == pytest.approx(res["density"]["overall"], abs=1e-9)

    # a finished run is never overwritten by accident
    assert cli.main(_train_flags(tiny_model_dir, glue_dir, out)) == 2
    assert "already holds a finished run" in capsys.readouterr().err


def test_interrupted_run_resumes(tiny_model_dir, glue_dir, tmp_path, monkeypatch):
    from deft.train.trainer import DeftTrainer

    out = tmp_path / "run"
    original = DeftTrainer._save_checkpoint
    calls = {"n": 0}

    def crash_after_first_save(self, *a, **kw):
        original(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C right after epoch 1 was saved

    monkeypatch.setattr(DeftTrainer, "_save_checkpoint", crash_after_first_save)
    args = cli.parse(_train_flags(tiny_model_dir, glue_dir, out, "--epochs", "2"))[1]
    with pytest.raises(KeyboardInterrupt):
        train(args)
    assert not (out / "results.json").exists()
    assert list((out / "checkpoints").glob("checkpoint-*"))

    with pytest.raises(RunError, match="--resume"):
        train(args)
    args.run.resume = True
    res = train(args)
    steps = [h["step"] for h in res["log_history"] if "eval_accuracy" in h]
    assert steps == [3, 6]  # epoch 1 (before the crash, kept) and epoch 2 (after resuming); 48 rows / 16
    train_summaries = [h for h in res["log_history"] if "train_runtime" in h]
    assert len(train_summaries) == 1


def test_compare_table_and_reuse(tiny_model_dir, glue_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    flags = ["compare", *_train_flags(tiny_model_dir, glue_dir, out)[1:], "--alpha", "5", "--seeds", "0"]
    assert cli.main(flags) == 0
    text = capsys.readouterr().out
    assert "Density Change" in text and "PEFT" in text and "DEFT" in text
    summary = json.loads((out / "compare.json").read_text())["summary"]
    peft, deft_ = summary["rows"]["PEFT"], summary["rows"]["DEFT"]
    expected = (peft["density_mean"] - deft_["density_mean"]) / peft["density_mean"] * 100
    assert summary["density_change_percent"] == pytest.approx(expected)
    assert (out / "compare.csv").read_text().startswith("run,metric")
    assert (out / "layerwise_density.png").exists()
    assert cli.main(flags) == 0
    assert capsys.readouterr().out.count("reusing finished run") == 2


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["train", "--task", "foo"], "unknown task 'foo'"),
        (["train", "--alpha", "-1"], "alpha must be"),
        (["train", "--loss", "l3"], "argument --loss: invalid choice: 'l3' (choose from 'l0', 'tanh')"),
        (["train", "--method", "dora"], "argument --method: invalid choice: 'dora'"),
        (["train", "--model", "/no/such/model-dir"], "/no/such/model-dir"),
    ],
)
def test_bad_options_are_named(flags, needle, tmp_path, capsys):
    assert cli.main([*flags, "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: rte\nalpha: 2.5\nseeds: [0, 1]\n")
    cmd, args = cli.parse(["compare", "--config", str(cfg), "--alpha", "3"])
    assert (cmd, args.data.task, args.density.alpha, args.seeds) == ("compare", "rte", 3.0, [0, 1])
    bad = tmp_path / "bad.yaml"
    bad.write_text("tsak: rte\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "unknown option(s) tsak" in capsys.readouterr().err


def test_bad_data_file_names_file_and_line(tiny_model_dir, tmp_path, capsys):
    glue = sst2_folder(tmp_path / "glue", "sentence\tlabel\ngood film\t1\nbad film\tmaybe\n")
    assert cli.main(_train_flags(tiny_model_dir, glue, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "train.tsv:3" in err


def test_help_lists_documented_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--alpha" in text and "weight of the density loss" in text and "--granularity" in text
