"""Suite files (benchmarks/suites/*.yaml) run by ``deft sweep``: every option checked before anything trains,
failed jobs counted and named, finished jobs skipped on a rerun. Jobs train the tiny BERT in subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from deft import cli
from deft.recipes.sweep import SweepArgs, _validate, suite_points

from conftest import one_error_line, sst2_folder

SUITES = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "suites").glob("*.yaml"))


def _suite(path: Path, groups: dict, **defaults) -> Path:
    path.write_text(yaml.safe_dump({"defaults": defaults, "groups": groups}))
    return path


def test_every_shipped_suite_parses_and_validates(tmp_path):
    assert len(SUITES) >= 4
    names = []
    for path in SUITES:
        points = suite_points(SweepArgs(suites=[str(path)], output=str(tmp_path)))
        _validate(points)  # the checks a sweep makes before its first job (task, method, density options)
        assert points and all(p.source == str(path) for p in points)
        for p in points:
            assert p.args.run.resume and p.args.run.output.startswith(str(tmp_path / p.name.split("/")[0]))
        names += [p.name for p in points]
    assert len(names) == len(set(names)) == 245  # the jobs behind docs/RESULTS.md's multi-seed tables
    # all files at once, with a group selection: the dry run lists the jobs as deft train command lines
    assert (
        cli.main(
            ["sweep", *map(str, SUITES), "--groups", "sst2-lora", "*-lora-cpu", "--dry-run", "--output", str(tmp_path)]
        )
        == 0
    )
    assert not any(tmp_path.iterdir())
    # --set overrides the files in every job; the PEFT jobs stay at alpha 0
    points = suite_points(SweepArgs(suites=[str(SUITES[0])], set=["data_dir=/data/glue", "alpha=7"]))
    assert {p.args.data.data_dir for p in points} == {"/data/glue"}
    assert {p.args.density.alpha for p in points if "/peft-" in p.name} == {0.0}
    assert {p.args.density.alpha for p in points if "/deft-" in p.name} == {7.0}


@pytest.mark.parametrize(
    "group, needle",
    [
        ({"lrr": 0.1}, "option 'lrr' (did you mean lr?)"),
        ({"lr": "fast"}, "option lr: expected a float, got 'fast'"),
        ({"loss": "l1"}, "loss (--loss) 'l1' is not one of l0, tanh"),
        ({"alpha": -1}, "alpha must be a finite number >= 0"),
        ({"seed": 3}, "option seed is set by the suite"),
    ],
)
def test_a_bad_option_fails_before_anything_trains(group, needle, tmp_path, capsys):
    path = _suite(tmp_path / "s.yaml", {"good": {}, "bad": group}, model="/never/loaded", seeds=[0, 1])
    assert cli.main(["sweep", str(path), "--output", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys, "sweep")
    job = "bad/deft-seed0" if "alpha" in group else "bad/peft-seed0"  # the PEFT job trains at alpha 0
    assert line.startswith(f"deft sweep: error: {path}: job {job}: ") and needle in line
    assert not (tmp_path / "out").exists()


def test_bad_suite_layout_and_group_selection(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups: [a, b]\n")
    assert cli.main(["sweep", str(bad)]) == 2
    assert f"{bad}: a suite file holds 'defaults'" in one_error_line(capsys, "sweep")
    path = _suite(tmp_path / "s.yaml", {"a": {"runs": ["peft", "baseline"]}})
    assert cli.main(["sweep", str(path), "--groups", "nope"]) == 2
    assert "--groups nope: no such group" in one_error_line(capsys, "sweep")
    assert cli.main(["sweep", str(path), "--dry-run"]) == 2
    assert f"{path}: group a: runs: expected a list of peft / deft" in one_error_line(capsys, "sweep")
    assert cli.main(["sweep", str(path), "--alphas", "1"]) == 2
    assert "--base and the grid lists" in one_error_line(capsys, "sweep")


def test_failed_job_is_counted_the_others_finish_and_a_rerun_skips_them(
    tiny_relu_model_dir, glue_dir, tmp_path, capsys
):
    broken = sst2_folder(tmp_path / "broken-glue", "sentence\tlabel\ngood film\t1\nbad film\tmaybe\n")
    path = _suite(
        tmp_path / "s.yaml",
        {"ok": {}, "broken": {"data_dir": str(broken), "runs": ["deft"]}},
        model=str(tiny_relu_model_dir),
        data_dir=str(glue_dir),
        epochs=1,
        batch_size=16,
        lr=1e-2,
        loss="tanh",
        alpha=5,
        seeds=[0],
    )
    out = tmp_path / "out"
    argv = ["sweep", str(path), "--output", str(out), "--workers", "2"]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    log = out / "broken" / "deft-seed0" / "job.log"
    assert f"1 of 3 points failed; logs: {log}" in captured.err
    assert "train.tsv:3" in log.read_text()  # the job's own error, in its log
    finished = [out / "ok" / run / "results.json" for run in ("peft-seed0", "deft-seed0")]
    assert all(f.exists() for f in finished)
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert sorted(r["point"] for r in rows) == ["ok/deft-seed0", "ok/peft-seed0"]
    assert [r["alpha"] for r in sorted(rows, key=lambda r: r["point"])] == [5.0, 0.0]

    # the rerun trains only the failed job (its data fixed now); the finished ones are not touched
    stamps = [f.stat().st_mtime_ns for f in finished]
    (broken / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    assert cli.main(argv) == 0
    assert "deft sweep: training 1 points" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in finished] == stamps
    assert (out / "broken" / "deft-seed0" / "results.json").exists()
    assert len((out / "sweep.jsonl").read_text().splitlines()) == 3
