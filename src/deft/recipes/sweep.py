"""Ablation sweeps: one :func:`deft.recipes.train.train` per point of a grid over alpha, eps, beta, method and seed.

Each point trains into ``OUTPUT/<point-name>/``. A point whose ``results.json`` exists is not trained
again, so an interrupted sweep is continued by running the same command (an interrupted *point* resumes
from its last checkpoint). Every finished point adds one line to ``OUTPUT/sweep.jsonl``, and
``OUTPUT/sweep.csv`` is rewritten atomically after each, so both can be watched while the sweep runs.

Instead of a grid, suite files (``deft sweep benchmarks/suites/sst2-gpu.yaml --groups 'sst2-*'``) name groups
of PEFT / DEFT runs, each trained into ``OUTPUT/GROUP/{peft,deft}-seedN`` (a ``deft compare`` folder); every
job's options are checked before the first one starts (:func:`suite_points`).
"""

from __future__ import annotations

import csv
import difflib
import fnmatch
import io
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..analysis.report import read_rows
from ..errors import ConfigError, DeftError
from ..fields import NONE_WORDS, build, convert, flat, options
from ..fields import help_field as _h
from ..io import write_json, write_text
from .common import RunError
from .train import PRESET_KEY, TrainArgs, with_preset

GRID_AXES = {"methods": "method", "alphas": "alpha", "eps": "eps", "betas": "beta", "seeds": "seed"}
ROW_KEYS = (
    "point",
    "dir",
    "model",
    "task",
    "method",
    "alpha",
    "loss",
    "eps",
    "beta",
    "seed",
    "main_metric",
    "metric",
    "density",
    "union_density",
    "trainable_percent",
    "train_time_s",
)


@dataclass
class SweepArgs:
    """Arguments of ``deft sweep``: train every combination of the grid lists on top of one base config, or the
    groups of suite files (``deft sweep SUITE.yaml... --groups NAME...``)."""

    base: str | dict[str, Any] | TrainArgs | None = _h(
        "the TrainArgs of every run: a YAML/JSON file of `deft train` options (a mapping or TrainArgs in Python)",
        default=None,
    )
    set: list[str] | None = _h("KEY=VALUE overrides of base options, e.g. model=minilm task=rte epochs=1", default=None)
    alphas: list[float] | None = _h("density-loss weights to try (0 = the PEFT baseline)", default=None)
    eps: list[float] | None = _h("smooth-l0 eps values to try", default=None)
    betas: list[float] | None = _h("tanh slopes to try", default=None)
    methods: list[str] | None = _h("PEFT methods to try", default=None)
    seeds: list[int] | None = _h("seeds to try", default=None)
    output: str = _h("sweep folder: one sub-folder per point, sweep.jsonl, sweep.csv", default="runs/sweep")
    dry_run: bool = _h("only list the points (and which are finished)", default=False)
    suites: list[str] | None = field(
        default=None,
        metadata={
            "help": "suite files (YAML, see benchmarks/suites/): named groups of PEFT/DEFT runs instead of a grid "
            "(name them before list options such as --groups)",
            "positional": True,
        },
    )
    groups: list[str] | None = _h(
        "with suite files: only these groups (names or patterns such as 'sst2-*')", default=None
    )
    workers: int = _h(
        "points trained at once, each a `deft train` process logging to POINT/job.log "
        "(suite files always run so); a failed point does not stop the others",
        default=1,
    )


@dataclass(frozen=True)
class SweepPoint:
    name: str
    args: TrainArgs
    source: str = ""  # the suite file it comes from (for error lines)


def _convert(key: str, text: str) -> Any:
    """Parse VALUE of a ``--set KEY=VALUE`` with the type of the deft train option KEY."""
    opts = options(TrainArgs)
    if key not in opts:
        raise RunError(f"--set {key}=...: unknown option {key!r}; known: {', '.join(opts)}")
    opt = opts[key]
    if text.lower() in NONE_WORDS and opt.optional:
        return None
    try:
        if opt.type is bool and not opt.is_list:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if opt.is_list:
            return [opt.type(x) for x in text.split(",") if x]
        return opt.type(text)
    except ValueError:
        raise RunError(f"--set {key}={text}: expected a {getattr(opt.type, '__name__', opt.type)}") from None


def _build(values: Mapping[str, Any], where: str) -> TrainArgs:
    """The TrainArgs of flat option ``values``; a value they refuse is one RunError naming ``where``."""
    try:
        return build(TrainArgs, values, where)
    except DeftError as e:
        raise RunError(str(e)) from None


def base_args(args: SweepArgs) -> TrainArgs:
    """The TrainArgs every point starts from: ``base`` (file, mapping or TrainArgs), then ``set``; a ``preset`` named
    by either goes under both."""
    b = args.base
    if isinstance(b, TrainArgs):
        values = flat(b)
    elif isinstance(b, Mapping):
        values = dict(b)
    elif isinstance(b, str):
        from .common import read_config as _read_config

        values = _read_config(b, TrainArgs, what="--base", extra=(PRESET_KEY,))
    elif b is None:
        values = {}
    else:
        raise RunError(f"base must be a file, a mapping or TrainArgs, got {type(b).__name__}")
    unknown = sorted(set(values) - {*options(TrainArgs), PRESET_KEY})
    if unknown:
        raise RunError(f"base config: unknown option(s) {', '.join(unknown)}")
    values.update(_set_values(args.set))
    return _build(with_preset(values, "base config: preset"), "base config")


def _set_values(items: list[str] | None) -> dict[str, Any]:
    """The ``--set KEY=VALUE`` overrides, each value parsed with its TrainArgs field's type."""
    values = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise RunError(f"--set {item!r}: expected KEY=VALUE")
        key = key.strip().replace("-", "_")
        values[key] = text.strip() if key == PRESET_KEY else _convert(key, text.strip())
    return values


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def point_name(values: Mapping[str, Any]) -> str:
    """Folder name of a grid point, e.g. ``lora-a0.5-eps1e-07-s0``; only the swept axes appear."""
    short = {"method": "", "alpha": "a", "eps": "eps", "beta": "b", "seed": "s"}
    parts = [f"{short[k]}{_fmt(values[k])}" for k in short if k in values]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "-".join(parts)) or "base"


def grid(args: SweepArgs) -> list[SweepPoint]:
    """Every point of the grid, in a stable order (methods, alphas, eps, betas, seeds)."""
    base = base_args(args)
    axes = [(GRID_AXES[k], list(getattr(args, k))) for k in GRID_AXES if getattr(args, k) is not None]
    for key, listed in axes:
        if not listed:
            raise RunError(f"--{key}s: the list is empty")
    out = Path(args.output)
    points, seen = [], set()
    for combo in itertools.product(*[v for _, v in axes]):
        values = dict(zip([k for k, _ in axes], combo, strict=True))
        if values.get("alpha") == 0:
            # without the density loss its eps / beta change nothing: one PEFT baseline per method and seed
            values.pop("eps", None)
            values.pop("beta", None)
        name = point_name(values)
        if name in seen:
            continue  # the same value listed twice
        seen.add(name)
        kw = {**flat(base), **values, "output": str(out / name), "resume": True, "overwrite": False}
        points.append(SweepPoint(name, _build(kw, f"sweep point {name}")))
    return points


SUITE_KEYS = ("seeds", "runs", PRESET_KEY)  # a group's keys besides deft train options
RUNS = ("peft", "deft")
SET_BY_SUITE = ("output", "seed", "resume", "overwrite")  # each job's own folder and seed


def _suite_option(key: str, value: Any) -> Any:
    """``value`` of the deft train option ``key`` as a YAML file gives it, checked against its type and choices."""
    opts = options(TrainArgs)
    if key in SET_BY_SUITE:
        raise ConfigError(f"option {key} is set by the suite for each job (use seeds: [...] for seeds)")
    if key not in opts:
        close = difflib.get_close_matches(key, [*opts, *SUITE_KEYS], n=1)
        raise ConfigError(f"unknown option {key!r}" + (f" (did you mean {close[0]}?)" if close else ""))
    return convert(opts[key], value)


def _read_suites(paths: list[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Group name -> (suite file, the group's options over the file's ``defaults``), in file order."""
    from ..io import read_mapping

    groups: dict[str, tuple[str, dict[str, Any]]] = {}
    for path in paths:
        data = read_mapping(path, "suite")
        extra = sorted(set(data) - {"defaults", "groups"})
        if extra or not isinstance(data.get("groups"), dict) or not isinstance(data.get("defaults") or {}, dict):
            raise RunError(
                f"{path}: a suite file holds 'defaults' (options of every group) and 'groups' "
                f"(name: options), both mappings" + (f"; unknown key(s) {', '.join(extra)}" if extra else "")
            )
        for name, opts in data["groups"].items():
            if not isinstance(opts or {}, dict):
                raise RunError(f"{path}: group {name}: expected a mapping of options, got {opts!r}")
            if name in groups:
                raise RunError(f"{path}: group {name} is also in {groups[name][0]}; group names must be unique")
            groups[str(name)] = (path, {**(data.get("defaults") or {}), **(opts or {})})
    return groups


def suite_points(args: SweepArgs) -> list[SweepPoint]:
    """Every job of the selected groups of the suite files, each option checked before anything runs.

    A group is one ``deft compare`` folder: for each of its ``seeds``, the ``runs`` it names (``peft``:
    alpha 0; ``deft``: the group's alpha) train into ``OUTPUT/GROUP/{peft,deft}-seedN``, so ``deft compare``
    with the same options and ``--output OUTPUT/GROUP`` only summarises them. ``--set`` overrides the files.
    """
    if args.base is not None or any(getattr(args, k) is not None for k in GRID_AXES):
        raise RunError(
            "suite files set every run themselves: --base and the grid lists (--alphas ...) "
            "go without them (use --set KEY=VALUE to override an option in every job)"
        )
    groups = _read_suites(args.suites or [])
    patterns = args.groups or ["*"]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(g, pattern) for g in groups):
            raise RunError(
                f"--groups {pattern}: no such group in {', '.join(args.suites or [])}; groups: {', '.join(groups)}"
            )
    overrides = _set_values(args.set)
    out = Path(args.output)
    points = []
    for group in [g for g in groups if any(fnmatch.fnmatchcase(g, pat) for pat in patterns)]:
        path, opts = groups[group]
        opts = {**opts, **overrides}
        seeds, runs = opts.pop("seeds", [0]), opts.pop("runs", list(RUNS))
        preset = opts.pop(PRESET_KEY, None)
        where = f"{path}: group {group}"
        if not isinstance(seeds, list) or not seeds or not all(type(x) is int for x in seeds):
            raise RunError(f"{where}: seeds: expected a list of integers, got {seeds!r}")
        if not isinstance(runs, list) or not runs or not set(runs) <= set(RUNS):
            raise RunError(f"{where}: runs: expected a list of {' / '.join(RUNS)}, got {runs!r}")
        for seed in seeds:
            for label in runs:
                name = f"{group}/{label}-seed{seed}"
                try:
                    kw = {k: _suite_option(k, v) for k, v in opts.items()}
                except ConfigError as e:
                    raise RunError(f"{path}: job {name}: {e}") from None
                if preset is not None:  # under every option the files and --set give
                    kw = with_preset({**kw, PRESET_KEY: preset}, f"{path}: job {name}: preset")
                if label == "peft":  # the plain PEFT baseline, as deft compare trains it
                    kw.update(alpha=0.0, target_density=None, distill=0.0)
                kw.update(seed=seed, output=str(out / group / f"{label}-seed{seed}"), resume=True, overwrite=False)
                points.append(SweepPoint(name, _build(kw, f"{path}: job {name}"), source=path))
    return points


def train_command(a: TrainArgs) -> str:
    """``a`` as a ``deft train`` command line: model, task, method, alpha, seed and every option off its default."""
    words = ["deft", "train"]
    for name, value in flat(a).items():
        opt = options(TrainArgs)[name]
        if value == opt.default and name not in ("model", "task", "method", "alpha", "seed"):
            continue
        if value is None:
            words += [opt.flag, "none"]  # off where the default is on (--target-density)
        elif isinstance(value, bool):
            words.append(opt.flag if value else f"--no-{opt.flag[2:]}")
        else:
            words += [opt.flag, *map(_fmt, value if isinstance(value, list) else [value])]
    return shlex.join(words)


def _train_processes(points: list[SweepPoint], workers: int) -> Iterator[tuple[SweepPoint, int, Path, float]]:
    """Train ``points`` as ``deft train`` processes, ``workers`` at once; yields (point, exit code, log, seconds)
    as each ends. Each gets ``cores // workers`` torch threads unless OMP_NUM_THREADS says otherwise."""
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}

    def one(p: SweepPoint) -> tuple[SweepPoint, int, Path, float]:
        run_dir, start = Path(p.args.run.output), time.monotonic()
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "job.json", {**flat(p.args), "quiet": True})
        with open(run_dir / "job.log", "w", encoding="utf-8") as log:
            rc = subprocess.call(
                [sys.executable, "-m", "deft", "train", "--config", str(run_dir / "job.json")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return p, rc, run_dir / "job.log", time.monotonic() - start

    pool = ThreadPoolExecutor(workers)
    try:
        yield from (f.result() for f in as_completed([pool.submit(one, p) for p in points]))
    finally:  # on Ctrl-C (or an error here) no further job starts; the running ones get the signal too
        pool.shutdown(wait=True, cancel_futures=True)


def _validate(points: list[SweepPoint]) -> None:
    """Fail on a bad task before the first (maybe hour-long) point trains, not at point 17 (every other option
    was checked when its point was made)."""
    from ..data import glue_task

    for p in points:
        try:
            glue_task(p.args.data.task)
        except ValueError as e:
            raise RunError(f"{p.source}: job {p.name}: {e}" if p.source else f"sweep point {p.name}: {e}") from None


def _row(point: SweepPoint, res: Mapping[str, Any]) -> dict[str, Any]:
    cfg = res["config"]
    return {
        "point": point.name,
        "dir": point.name,
        "model": cfg["model"],
        "task": res["task"],
        "method": cfg["method"],
        "alpha": cfg["alpha"],
        "loss": cfg["loss"],
        "eps": cfg["eps"],
        "beta": cfg["beta"],
        "seed": cfg["seed"],
        "main_metric": res["main_metric"],
        "metric": res["metric"],
        "density": res["density"]["overall"],
        "union_density": res["density"].get("union_overall"),
        "trainable_percent": res.get("trainable_percent"),
        "train_time_s": res.get("train_time_s"),
    }


def _append_line(path: Path, line: str) -> None:
    """Append one JSON line. An append never tears the lines before it; a line torn by a crash is ended
    first so the new row starts on its own line (read_rows skips the torn one)."""
    torn = False
    if path.exists() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, 2)
            torn = f.read(1) != b"\n"
    with path.open("a", encoding="utf-8") as f:
        f.write(("\n" if torn else "") + line + "\n")


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ROW_KEYS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"| {'point':<28} | {'metric %':>8} | {'density %':>9} |", f"|{'-' * 30}|{'-' * 10}|{'-' * 11}|"]
    for r in rows:
        m = r.get("metric")
        m = 100 * m if isinstance(m, (int, float)) and not math.isnan(m) else float("nan")
        lines.append(f"| {r['point']:<28} | {m:8.2f} | {100 * r['density']:9.2f} |")
    return "\n".join(lines)


def sweep(args: SweepArgs) -> list[dict[str, Any]]:
    """Train every grid point (or suite job) not finished yet; returns the rows of all finished points in order.

    With ``workers`` > 1 or suite files, each point is a ``deft train`` process (log: ``POINT/job.log``): a
    failed one does not stop the others, and a :class:`RunError` at the end counts the failures and names their
    logs. Otherwise the points train one after the other in this process, and the first error stops the sweep.
    """
    from . import train as run

    if args.workers < 1:
        raise RunError(f"--workers {args.workers}: expected at least 1")
    points = suite_points(args) if args.suites else grid(args)
    _validate(points)
    out = Path(args.output)
    jsonl, csv_path = out / "sweep.jsonl", out / "sweep.csv"

    def done(p: SweepPoint) -> bool:
        return (Path(p.args.run.output) / "results.json").exists()

    print(f"deft sweep: {len(points)} points, {sum(map(done, points))} finished, in {out}")
    if args.dry_run:
        for p in points:
            print(
                f"  {'done' if done(p) else 'todo'}  {p.name}" + (f": {train_command(p.args)}" if args.suites else "")
            )
        return []
    out.mkdir(parents=True, exist_ok=True)
    base = {} if args.suites else {"base": flat(base_args(args))}
    write_json(
        out / "sweep_config.json",
        {"sweep": {k: v for k, v in flat(args).items() if k != "base"}, **base, "points": [p.name for p in points]},
    )
    logged = {r["point"] for r in read_rows(jsonl)}

    def add_row(p: SweepPoint, res: Mapping[str, Any]) -> None:
        _append_line(jsonl, json.dumps(_row(p, res)))
        logged.add(p.name)
        by_point = {r["point"]: r for r in read_rows(jsonl)}
        write_text(csv_path, _csv([by_point[q.name] for q in points if q.name in by_point]))

    def finished(p: SweepPoint) -> dict[str, Any]:
        return json.loads((Path(p.args.run.output) / "results.json").read_text(encoding="utf-8"))

    failed: list[tuple[SweepPoint, Path]] = []
    if args.suites or args.workers > 1:
        for p in points:
            if done(p) and p.name not in logged:
                add_row(p, finished(p))
        todo = [p for p in points if not done(p)]
        print(f"deft sweep: training {len(todo)} points, {args.workers} at a time; logs: POINT/job.log")
        for i, (p, rc, log, seconds) in enumerate(_train_processes(todo, args.workers), 1):
            if rc == 0 and done(p):
                add_row(p, finished(p))
                print(f"deft sweep: [{i}/{len(todo)}] {p.name} finished in {seconds:.0f} s")
            else:
                failed.append((p, log))
                print(
                    f"deft sweep: [{i}/{len(todo)}] {p.name} FAILED (exit code {rc}) after {seconds:.0f} s; log: {log}"
                )
    else:
        for i, p in enumerate(points, 1):
            if done(p):
                res = finished(p)
                if p.name in logged:
                    continue
                print(f"deft sweep: [{i}/{len(points)}] {p.name} finished earlier; adding its row")
            else:
                print(f"deft sweep: [{i}/{len(points)}] training {p.name}")
                res = run.train(p.args)
            add_row(p, res)
    by_point = {r["point"]: r for r in read_rows(jsonl)}
    rows = [by_point[p.name] for p in points if p.name in by_point]
    write_text(csv_path, _csv(rows))
    print(format_rows(rows))
    print(f"\nrows: {jsonl} (also {csv_path.name}); report: deft report {out} --output {out / 'report'}")
    if failed:
        logs = ", ".join(str(log) for _, log in failed[:5]) + (
            f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        )
        raise RunError(
            f"{len(failed)} of {len(points)} points failed; logs: {logs} (rerun the same command to retry "
            "them: finished points are skipped)"
        )
    return rows
