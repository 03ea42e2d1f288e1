"""``deft speed`` on a tiny run trained under thresholds: outputs checked, both sides timed, bad input named."""

from __future__ import annotations

import json

import pytest

from deft import cli
from deft.sparse import native

from conftest import one_error_line, tiny_run_flags


@pytest.fixture(scope="module")
def td_run(tiny_model_dir, glue_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "td"
    # no ramp: the tiny run is at its target from the first step, so it ends well below the kernel's limit
    extra = ("--quiet", "--target-density", "0.2", "--density-ramp", "0", "--alpha", "0")
    flags = tiny_run_flags(tiny_model_dir, glue_dir, out, *extra)
    assert cli.main(["train", *flags]) == 0
    return out


def test_speed_checks_and_times_the_sparse_model(td_run, tmp_path, capsys):
    assert cli.main(["speed", "--run", str(td_run), "--batches", "2", "--batch-size", "8", "--rounds", "2",
                     "--output", str(tmp_path)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "speed-up" in text and "dense" in text and "sparse" in text
    res = json.loads((tmp_path / "speed.json").read_text())
    assert res["batches"] == 2 and res["batch_size"] == 8 and res["rounds"] == 2
    assert res["dense_ms_per_batch"] > 0 and res["sparse_ms_per_batch"] > 0
    assert res["speedup"] == pytest.approx(res["dense_ms_per_batch"] / res["sparse_ms_per_batch"])
    assert res["compiled_kernel"] is (native.library() is not None)
    # trained at 0.2: the served model reads about a fifth of W2's inputs (real tokens; padding is mostly
    # below threshold too), far from all of them
    assert 0 < res["share_of_w2_inputs_read"] < 0.5
    trained = json.loads((td_run / "results.json").read_text())
    assert res["metric_of_the_run"] == {"accuracy": trained["metric"]}


def test_speed_refuses_a_run_without_thresholds(tiny_model_dir, glue_dir, tmp_path, capsys):
    out = tmp_path / "peft"
    flags = tiny_run_flags(tiny_model_dir, glue_dir, out, "--quiet", "--target-density", "none", "--alpha", "0")
    assert cli.main(["train", *flags]) == 0
    capsys.readouterr()
    assert cli.main(["speed", "--run", str(out)]) != 0
    assert "thresholds.json" in one_error_line(capsys, "speed")
    assert cli.main(["speed", "--run", str(tmp_path / "nowhere")]) != 0
    assert "no results.json" in one_error_line(capsys, "speed")


def test_speed_refuses_zero_batches(td_run, capsys):
    assert cli.main(["speed", "--run", str(td_run), "--batches", "0"]) != 0
    assert "--batches must be at least 1" in one_error_line(capsys, "speed")
