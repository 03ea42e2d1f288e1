"""benchmarks/mask_ablation.py on a tiny run trained under thresholds: the served metric, the dense one, one
layer at a time; a wrong folder gets one line."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from deft import cli

from conftest import tiny_run_flags

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mask_ablation.py"


@pytest.fixture(scope="module")
def bench():
    import sys

    # the script imports its helper by bare name (`from _common import ...`), as `python benchmarks/...` does
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("mask_ablation_bench", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(SCRIPT.parent))


@pytest.fixture(scope="module")
def td_run(tiny_model_dir, glue_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation") / "td"
    extra = ("--quiet", "--target-density", "0.2", "--density-ramp", "0", "--alpha", "0")
    assert cli.main(["train", *tiny_run_flags(tiny_model_dir, glue_dir, out, *extra)]) == 0
    return out


def test_scores_the_run_as_served_dense_and_one_layer_at_a_time(bench, td_run, tmp_path):
    out = bench.main(["--run", str(td_run), "--output", str(tmp_path / "a.json")])
    trained = json.loads((td_run / "results.json").read_text())
    # the run's own metric was computed by its trainer under the same thresholds
    assert out["all_thresholds"] == pytest.approx(trained["metric"])
    thresholds = json.loads((td_run / "adapter" / "thresholds.json").read_text())
    assert sorted(out["without_one_layer"]) == sorted(thresholds)
    assert json.loads((tmp_path / "a.json").read_text())["no_thresholds"] == out["no_thresholds"]


def test_zero_thresholds_score_as_the_dense_model(bench, td_run, tmp_path):
    # a threshold of 0 masks only exact zeros, which change nothing: every score is then the dense one
    run = tmp_path / "zero"
    shutil.copytree(td_run, run)
    th_file = run / "adapter" / "thresholds.json"
    th_file.write_text(json.dumps(dict.fromkeys(json.loads(th_file.read_text()), 0.0)))
    out = bench.main(["--run", str(run)])
    assert out["all_thresholds"] == out["no_thresholds"]
    assert set(out["without_one_layer"].values()) == {out["no_thresholds"]}


def test_a_folder_without_a_run_is_one_line(bench, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.main(["--run", str(tmp_path)])
    assert str(e.value) == f"mask_ablation: {tmp_path}: no results.json (not a finished deft train run)"
