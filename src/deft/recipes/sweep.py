"""Ablation sweeps: one :func:`deft.run.train` per point of a grid over alpha, eps, beta, method and seed.

Each point trains into ``OUTPUT/<point-name>/``. A point whose ``results.json`` exists is not trained
again, so an interrupted sweep is continued by running the same command (an interrupted *point* resumes
from its last checkpoint). Every finished point adds one line to ``OUTPUT/sweep.jsonl``, and
``OUTPUT/sweep.csv`` is rewritten atomically after each, so both can be watched while the sweep runs.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from ..analysis.report import read_rows
from ..fields import help_field as _h
from ..io import write_json, write_text
from .common import RunError
from .train import TrainArgs

GRID_AXES = {"methods": "method", "alphas": "alpha", "eps": "eps", "betas": "beta", "seeds": "seed"}
ROW_KEYS = ("point", "dir", "model", "task", "method", "alpha", "loss", "eps", "beta", "seed", "main_metric",
            "metric", "density", "union_density", "trainable_percent", "train_time_s")




@dataclass
class SweepArgs:
    """Arguments of ``deft sweep``: train every combination of the grid lists on top of one base config."""

    base: str | dict[str, Any] | TrainArgs | None = _h(
        "the TrainArgs of every run: a YAML/JSON file of `deft train` options (a mapping or TrainArgs in Python)",
        default=None)
    set: list[str] | None = _h("KEY=VALUE overrides of base options, e.g. model=minilm task=rte epochs=1",
                               default=None)
    alphas: list[float] | None = _h("density-loss weights to try (0 = the PEFT baseline)", default=None)
    eps: list[float] | None = _h("smooth-l0 eps values to try", default=None)
    betas: list[float] | None = _h("tanh slopes to try", default=None)
    methods: list[str] | None = _h("PEFT methods to try", default=None)
    seeds: list[int] | None = _h("seeds to try", default=None)
    output: str = _h("sweep folder: one sub-folder per point, sweep.jsonl, sweep.csv", default="runs/sweep")
    dry_run: bool = _h("only list the points (and which are finished)", default=False)


@dataclass(frozen=True)
class SweepPoint:
    name: str
    args: TrainArgs


def _convert(key: str, text: str) -> Any:
    """Parse VALUE of a ``--set KEY=VALUE`` with the TrainArgs field's type."""
    hints = typing.get_type_hints(TrainArgs)
    if key not in hints:
        known = ", ".join(f.name for f in fields(TrainArgs))
        raise RunError(f"--set {key}=...: unknown option {key!r}; known: {known}")
    tp = hints[key]
    opts = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    if text.lower() in ("none", "null") and type(None) in typing.get_args(tp):
        return None
    base = opts[0]
    try:
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if typing.get_origin(base) is list:
            elem = typing.get_args(base)[0]
            return [elem(x) for x in text.split(",") if x]
        return base(text)
    except ValueError:
        raise RunError(f"--set {key}={text}: expected a {getattr(base, '__name__', base)}") from None


def base_args(args: SweepArgs) -> TrainArgs:
    """The TrainArgs every point starts from: ``base`` (file, mapping or TrainArgs), then ``set``."""
    b = args.base
    if isinstance(b, TrainArgs):
        values = asdict(b)
    elif isinstance(b, Mapping):
        values = dict(b)
    elif isinstance(b, str):
        from .common import read_config as _read_config

        values = _read_config(b, TrainArgs, what="--base")
    elif b is None:
        values = {}
    else:
        raise RunError(f"base must be a file, a mapping or TrainArgs, got {type(b).__name__}")
    known = {f.name for f in fields(TrainArgs)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RunError(f"base config: unknown option(s) {', '.join(unknown)}")
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise RunError(f"--set {item!r}: expected KEY=VALUE")
        values[key.strip().replace("-", "_")] = _convert(key.strip().replace("-", "_"), text.strip())
    return TrainArgs(**values)


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
    for key, values in axes:
        if not values:
            raise RunError(f"--{key}s: the list is empty")
    out = Path(args.output)
    points, seen = [], set()
    for combo in itertools.product(*[v for _, v in axes]):
        values = dict(zip([k for k, _ in axes], combo))
        if values.get("alpha") == 0:
            # without the density loss its eps / beta change nothing: one PEFT baseline per method and seed
            values.pop("eps", None)
            values.pop("beta", None)
        name = point_name(values)
        if name in seen:
            continue  # the same value listed twice
        seen.add(name)
        kw = {**asdict(base), **values, "output": str(out / name), "resume": True, "overwrite": False}
        points.append(SweepPoint(name, TrainArgs(**kw)))
    return points


def _validate(points: list[SweepPoint]) -> None:
    """Fail on a bad grid value before the first (maybe hour-long) point trains, not at point 17."""
    from ..data import glue_task
    from .train import density_config as _density_config
    from .train import method_config as _method_config

    for p in points:
        try:
            glue_task(p.args.task)
            _density_config(p.args)
            _method_config(p.args)
        except ValueError as e:
            raise RunError(f"sweep point {p.name}: {e}") from None


def _row(point: SweepPoint, res: Mapping[str, Any]) -> dict[str, Any]:
    cfg = res["config"]
    return {
        "point": point.name, "dir": point.name, "model": cfg["model"], "task": res["task"],
        "method": cfg["method"], "alpha": cfg["alpha"], "loss": cfg["loss"], "eps": cfg["eps"],
        "beta": cfg["beta"], "seed": cfg["seed"], "main_metric": res["main_metric"], "metric": res["metric"],
        "density": res["density"]["overall"], "union_density": res["density"].get("union_overall"),
        "trainable_percent": res.get("trainable_percent"), "train_time_s": res.get("train_time_s"),
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
    """Train every grid point not finished yet; returns the rows of all finished points in grid order."""
    from . import train as run

    points = grid(args)
    _validate(points)
    out = Path(args.output)
    jsonl, csv_path = out / "sweep.jsonl", out / "sweep.csv"
    done = lambda p: (Path(p.args.output) / "results.json").exists()  # noqa: E731
    print(f"deft sweep: {len(points)} points, {sum(map(done, points))} finished, in {out}")
    if args.dry_run:
        for p in points:
            print(f"  {'done' if done(p) else 'todo'}  {p.name}")
        return []
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep_config.json", {"sweep": {k: v for k, v in asdict(args).items() if k != "base"},
                                            "base": asdict(base_args(args)), "points": [p.name for p in points]})
    logged = {r["point"] for r in read_rows(jsonl)}
    for i, p in enumerate(points, 1):
        if done(p):
            res = json.loads((Path(p.args.output) / "results.json").read_text(encoding="utf-8"))
            if p.name in logged:
                continue
            print(f"deft sweep: [{i}/{len(points)}] {p.name} finished earlier; adding its row")
        else:
            print(f"deft sweep: [{i}/{len(points)}] training {p.name}")
            res = run.train(p.args)
        _append_line(jsonl, json.dumps(_row(p, res)))
        logged.add(p.name)
        by_point = {r["point"]: r for r in read_rows(jsonl)}
        write_text(csv_path, _csv([by_point[q.name] for q in points if q.name in by_point]))
    by_point = {r["point"]: r for r in read_rows(jsonl)}
    rows = [by_point[p.name] for p in points if p.name in by_point]
    write_text(csv_path, _csv(rows))
    print(format_rows(rows))
    print(f"\nrows: {jsonl} (also {csv_path.name}); report: deft report {out} --output {out / 'report'}")
    return rows
