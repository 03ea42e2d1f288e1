"""``deft tune``: a multi-objective search over ``deft train`` options, task metric up and density down.

Every trial is an ordinary run folder, ``OUTPUT/trial-NNNN`` (``results.json`` + ``adapter/``), trained by
:func:`deft.recipes.train.train_with_setup` (what ``deft train`` runs) with the searched options set on
top of the command's own ``deft train`` options, so ``deft report`` and ``deft compare`` read the trials
like any other run. The study lives in an Optuna storage (default ``sqlite:///OUTPUT/study.db``; any
SQLAlchemy URL, e.g. PostgreSQL, lets processes on many machines share one study). At the end (and after
every trial) ``OUTPUT/pareto.json`` / ``pareto.csv`` hold the Pareto front and the answer to "the sparsest
trial within ``--max-drop`` points of the PEFT baseline"; ``pareto.png`` plots every trial and the front.

Decisions, and why:

* **Objectives**: the run's main metric (maximised) and its density (minimised). The density is the
  *effective* one wherever the run has it: a run trained with ``--target-density`` reports the density
  under its thresholds in ``density["overall"]``; an explicit ``effective`` field wins; otherwise the
  exact-zero density is used. ``density_kind`` in every row says which.
* **Sampler**: Optuna's multi-objective TPE (``TPESampler``; independent per parameter, Optuna's default
  for several objectives), not NSGA-II. A trial here is a fine-tuning run, so a study has tens of
  trials; NSGA-II only leaves random sampling after a whole generation (50 trials by default), while TPE
  models the front after a few random trials. Independent TPE also copes with the baseline trial, which
  sets no searched parameter (alpha 0 lies outside alpha's log range), and ``constant_liar`` keeps
  parallel workers from proposing the same point. The number of random start-up trials is a third of
  ``--trials`` (between 2 and 10).
* **Baseline**: ``--baseline RUN`` names a finished plain-PEFT run; without it the study enqueues one
  trial with the density loss off (alpha 0, no target density, no distillation) as its first trial. Two
  workers that start together may both enqueue it: the later one becomes an ordinary search trial.
* **Pruning** (``--prune``, on by default): Optuna's pruners do not support several objectives, so deft
  prunes by its own rule. At every evaluation before the last (``--eval-every``: half-way by default)
  the trial's metric is compared with the baseline's at the same share of training (the baseline's
  latest evaluation at or before it): a trial more than ``--prune-factor`` x ``--max-drop`` points below
  it is stopped. The question being answered is "how sparse within max-drop of the baseline": a run
  that far behind has rarely caught up by its end, and the factor (4 by default) leaves room for
  evaluation noise and for the density loss's warm-up. The steps pruning saved (planned minus run) are
  summed in ``pareto.json``.
* **Interrupted trials**: every running trial sends a heartbeat to the storage. A trial whose process
  died (its heartbeat older than two minutes) is marked FAIL by the next worker to start a trial, and a
  trial stopped by Ctrl-C is marked FAIL at once; either way the same parameters are enqueued again and
  the new trial *resumes the same run folder* from its last checkpoint (its ``resumes`` user attribute
  names the trial it continues). Trials that finished are never touched.
* **Failures**: an exception in training marks the trial FAIL with the message in its ``error`` user
  attribute; the study goes on.
* **``--trials N``** is the number of finished trials (complete, pruned or failed; an interrupted one
  counts once, through its re-run) the study should reach, counting earlier invocations and other
  workers, so rerunning the same command with a larger N adds the difference. Workers check it before
  every trial; two that start a trial at the same moment may overshoot it by one each.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import os
import shutil
import socket
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from ..errors import DeftError
from ..fields import build, flat, options
from ..fields import help_field as _h
from ..io import atomic_write, read_mapping, write_json, write_text
from .train import OptimArgs, RunArgs, TrainArgs

INSTALL_HINT = "pip install 'deft-sparsity[tune]'"
DIRECTIONS = ("maximize", "minimize")  # (metric, density)
NOT_TUNABLE = ("output", "resume", "overwrite", "quiet", "report_to", "sites")
SPEC_KEYS = ("low", "high", "log", "int", "step", "choices")
# baseline trial: the plain PEFT run, every density-related option off (as `deft compare` trains it)
BASELINE_OVERRIDES = {"alpha": 0.0, "target_density": None, "distill": 0.0}
HEARTBEAT_S = 30  # a running trial writes its heartbeat this often ...
GRACE_S = 120  # ... and counts as dead (process killed, machine lost) after this long without one


class TuneError(DeftError, ValueError):
    """``deft tune`` cannot run as asked (bad search space, storage, option or baseline)."""


@dataclass
class TuneRunArgs(RunArgs):
    output: str = _h(
        "study folder: trial-NNNN run folders, study.db (default storage), pareto.json/csv/png", default="runs/tune"
    )


@dataclass
class TuneOptimArgs(OptimArgs):
    eval_every: float | None = _h(
        "evaluate every this share of training; pruning decides at these evaluations", default=0.5
    )


@dataclass
class TuneArgs(TrainArgs):
    """Arguments of ``deft tune``: search ``deft train`` options for the best metric / density trade-off.
    Every ``deft train`` option sets what the searched ones do not; each trial trains into OUTPUT/trial-NNNN."""

    optim: TuneOptimArgs = field(default_factory=TuneOptimArgs)
    run: TuneRunArgs = field(default_factory=TuneRunArgs)
    space: str | None = _h(
        "YAML/JSON search space: OPTION: {low, high, log?, int?, step?} or {choices: [...]} "
        "(default: target_density, lr, density_ramp, straight_through)",
        default=None,
    )
    trials: int = _h("finished trials the study should reach, counting earlier runs and other workers", default=20)
    timeout: float | None = _h("start no new trial after this many seconds", default=None)
    storage: str | None = _h(
        "Optuna storage, any SQLAlchemy URL (e.g. postgresql://user:pw@host/db for many "
        "machines); default sqlite:///OUTPUT/study.db",
        default=None,
    )
    study_name: str = _h("study name inside the storage", default="deft-tune")
    max_drop: float = _h("the answer: sparsest trial within this many metric points of the PEFT baseline", default=0.5)
    baseline: str | None = _h(
        "a finished plain-PEFT run folder (default: the study trains one as its first trial)", default=None
    )
    prune: bool = _h(
        "stop trials whose metric at an evaluation before the last is more than prune-factor x "
        "max-drop points below the baseline's at the same share of training",
        default=True,
    )
    prune_factor: float = _h("pruning margin in units of --max-drop", default=4.0)
    sampler_seed: int | None = _h("seed of the sampler (one worker: reproducible proposals)", default=None)


# ---------------------------------------------------------------------------------------------- search space
@dataclass(frozen=True)
class Param:
    """One searched option: a numeric range (``low``..``high``, ``log``, ``int``, ``step``) or ``choices``."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    int: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.low is None or self.high is None:
            raise TuneError(f"{self.name}: a numeric search range needs low and high")
        if self.int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def to_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        out: dict[str, Any] = {"low": self.low, "high": self.high, "log": self.log, "int": self.int}
        if self.step is not None:
            out["step"] = self.step
        return out


def _is_number(v: Any) -> TypeGuard[int | float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_space(data: Mapping[str, Any], source: str = "--space") -> dict[str, Param]:
    """Check a search-space mapping (option name -> spec) against TrainArgs; one error per problem."""
    if not isinstance(data, Mapping) or not data:
        raise TuneError(
            f"{source}: defines no option to search; give OPTION: {{low: .., high: ..}} or OPTION: {{choices: [...]}}"
        )
    opts = options(TrainArgs)
    tunable = [name for name in opts if name not in NOT_TUNABLE]
    space: dict[str, Param] = {}
    for raw_name, spec in data.items():
        name = str(raw_name).replace("-", "_")
        where = f"{source}: {raw_name}"
        if name not in opts:
            close = difflib.get_close_matches(name, tunable, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise TuneError(f"{source}: unknown option {raw_name!r}{hint}; known: {', '.join(tunable)}")
        if name in NOT_TUNABLE:
            raise TuneError(f"{where}: cannot be searched (each trial sets it); searchable: {', '.join(tunable)}")
        if not isinstance(spec, Mapping):
            raise TuneError(f"{where}: expected {{low, high[, log, int, step]}} or {{choices: [...]}}, got {spec!r}")
        unknown = sorted(set(map(str, spec)) - set(SPEC_KEYS))
        if unknown:
            raise TuneError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(SPEC_KEYS)}")
        opt = opts[name]
        if opt.is_list:
            raise TuneError(f"{where}: list options cannot be searched")
        if "choices" in spec:
            space[name] = _choices(where, name, spec, opt.type, opt.optional)
        else:
            space[name] = _range(where, name, spec, opt.type)
    return space


def _choices(where: str, name: str, spec: Mapping[str, Any], base: Any, optional: bool) -> Param:
    extra = sorted(set(spec) - {"choices"})
    if extra:
        raise TuneError(f"{where}: choices cannot be combined with {', '.join(map(str, extra))}")
    choices = spec["choices"]
    if not isinstance(choices, (list, tuple)) or not choices:
        raise TuneError(f"{where}: choices must be a non-empty list, got {choices!r}")
    for c in choices:
        ok = (
            (c is None and optional)
            or (base is bool and isinstance(c, bool))
            or (base is str and isinstance(c, str))
            or (base is int and _is_number(c) and float(c).is_integer())
            or (base is float and _is_number(c))
        )
        if not ok:
            raise TuneError(
                f"{where}: choice {c!r} is not a valid {getattr(base, '__name__', base)}"
                + (" (or null)" if optional else "")
            )
    if len(set(map(repr, choices))) != len(choices):
        raise TuneError(f"{where}: choices list a value twice: {list(choices)!r}")
    return Param(name, choices=tuple(choices))


def _range(where: str, name: str, spec: Mapping[str, Any], base: Any) -> Param:
    if base not in (int, float):
        raise TuneError(f"{where}: a {getattr(base, '__name__', base)} option; give {{choices: [...]}}")
    if "low" not in spec or "high" not in spec:
        raise TuneError(f"{where}: needs both low and high (or choices)")
    low, high = spec["low"], spec["high"]
    if not (_is_number(low) and _is_number(high)):
        raise TuneError(f"{where}: low and high must be finite numbers, got {low!r} and {high!r}")
    if not low < high:
        raise TuneError(f"{where}: empty range: low {low!r} must be below high {high!r}")
    flags = {k: spec.get(k, False) for k in ("log", "int")}
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise TuneError(f"{where}: {k} must be true or false, got {v!r}")
    is_int = flags["int"] or base is int  # an int option (lora_r, ...) is searched over whole numbers
    if base is int and "int" in spec and not flags["int"]:
        raise TuneError(f"{where}: {name} takes whole numbers; drop int: false")
    if is_int and not (float(low).is_integer() and float(high).is_integer()):
        raise TuneError(f"{where}: an integer range needs whole-number low and high, got {low!r} and {high!r}")
    if flags["log"] and low <= 0:
        raise TuneError(f"{where}: a log range needs low > 0, got {low!r}")
    step = spec.get("step")
    if step is not None:
        if not (_is_number(step) and step > 0):
            raise TuneError(f"{where}: step must be a number > 0, got {step!r}")
        if flags["log"]:
            raise TuneError(f"{where}: step and log cannot be combined")
        if is_int and not float(step).is_integer():
            raise TuneError(f"{where}: an integer range needs a whole-number step, got {step!r}")
    return Param(name, low=low, high=high, log=flags["log"], int=is_int, step=step)


def default_space() -> dict[str, Param]:
    """The recommended recipe's knobs (training under thresholds, no density loss: the defaults of every deft
    command): target_density (log 0.01..0.3), lr (log 3e-4..3e-3), density_ramp (0.3..0.9) and
    straight_through. The paper's exact-zero DEFT is searched with ``--preset paper`` and a --space file, e.g.
    ``alpha: {low: 0.1, high: 10, log: true}``."""
    return {
        "target_density": Param("target_density", low=0.01, high=0.3, log=True),
        "lr": Param("lr", low=3e-4, high=3e-3, log=True),
        "density_ramp": Param("density_ramp", low=0.3, high=0.9),
        "straight_through": Param("straight_through", choices=(False, True)),
    }


def load_space(path: str | os.PathLike | None) -> dict[str, Param]:
    if path is None:
        return default_space()
    try:
        data = read_mapping(path, "--space")
    except (OSError, ValueError) as e:
        raise TuneError(str(e)) from None
    return parse_space(data, f"--space {path}")


# ---------------------------------------------------------------------------------------------- run results
def run_density(results: Mapping[str, Any]) -> tuple[float, str]:
    """(density, kind) a run is judged by: an explicit ``effective`` field (in ``density`` or at the top
    level) first; else ``density["overall"]``, which is effective when the run has thresholds (trained
    with --target-density, or counted under them) and the exact-zero density otherwise."""
    density = results.get("density") or {}
    for holder in (density, results):
        eff = holder.get("effective") if isinstance(holder, Mapping) else None
        if isinstance(eff, Mapping):
            eff = eff.get("overall", eff.get("density"))
        if _is_number(eff):
            return float(eff), "effective"
    kind = "effective" if density.get("thresholds") or results.get("thresholds") else "exact"
    return float(density["overall"]), kind


def eval_curve(results: Mapping[str, Any]) -> list[list[float]]:
    """``[[share of training, metric], ...]`` of a finished run's evaluations (its final metric at 1.0)."""
    key = f"eval_{results.get('main_metric')}"
    history = results.get("log_history") or []
    steps = [h["step"] for h in history if isinstance(h.get("step"), (int, float))]
    last = max(steps, default=0)
    curve = {
        round(h["step"] / last, 9): float(h[key])
        for h in history
        if last and _is_number(h.get(key)) and isinstance(h.get("step"), (int, float))
    }
    if _is_number(results.get("metric")):
        curve[1.0] = float(results["metric"])
    return [[f, m] for f, m in sorted(curve.items())]


def prune_floor(curve: Sequence[Sequence[float]] | None, fraction: float, margin: float) -> float | None:
    """The metric below which a trial ``fraction`` of the way through training is pruned: the baseline's
    latest evaluation at or before that share of training, minus ``margin``; None (do not prune) when
    the baseline has no evaluation that early or is not known yet."""
    seen = [m for f, m in (curve or []) if f <= fraction + 1e-9]
    return seen[-1] - margin if seen else None


# ---------------------------------------------------------------------------------------------- answers
def pareto_front(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows (with ``metric`` and ``density``) no other row beats on both (higher metric, lower density),
    sorted by density; rows equal on both are all kept."""
    ok = [r for r in rows if _is_number(r.get("metric")) and _is_number(r.get("density"))]
    front = [
        r
        for r in ok
        if not any(
            s["metric"] >= r["metric"]
            and s["density"] <= r["density"]
            and (s["metric"] > r["metric"] or s["density"] < r["density"])
            for s in ok
        )
    ]
    return sorted(front, key=lambda r: (r["density"], -r["metric"], r.get("number", 0)))


def pick_answer(
    rows: Sequence[Mapping[str, Any]], reference: float, max_drop_points: float
) -> Mapping[str, Any] | None:
    """The sparsest row whose metric (a fraction) is within ``max_drop_points`` of ``reference``; among
    rows at that density the best metric, then the lowest trial number. None when no row is within."""
    from ..analysis.tradeoff import lowest_density_within

    ok = [r for r in rows if _is_number(r.get("metric")) and _is_number(r.get("density"))]
    hit = lowest_density_within([(r["density"], r["metric"]) for r in ok], reference, max_drop_points / 100.0)
    if hit is None:
        return None
    d, m = hit
    same = [r for r in ok if r["density"] == d and r["metric"] == m]
    return min(same, key=lambda r: (r.get("number") is None, r.get("number") or 0))


# ---------------------------------------------------------------------------------------------- optuna
def _optuna():
    try:
        import optuna
    except ImportError:
        raise TuneError(f"Optuna is not installed: {INSTALL_HINT}") from None
    return optuna


def _safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 -- not even a URL: show it as given (no password to hide then)
        return url


def open_storage(url: str):
    """An Optuna RDB storage with heartbeats; a URL that cannot be opened is one TuneError."""
    optuna = _optuna()
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # several workers on one SQLite file wait for each other's writes instead of failing at once
        engine_kwargs["connect_args"] = {"timeout": 60}
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=_requeue,
                )
        except Exception as e:  # noqa: BLE001 -- SQLAlchemy's ArgumentError / OperationalError, a missing driver
            # workers started together race to create the tables of a new database: the loser retries
            if attempt < 2 and any(w in str(e) for w in ("already exists", "locked", "UNIQUE constraint")):
                time.sleep(1 + attempt)
                continue
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            hint = " (install the database driver, e.g. psycopg2 for PostgreSQL)" if isinstance(e, ImportError) else ""
            raise TuneError(
                f"--storage {_safe_url(url)}: cannot be opened: {type(e).__name__}: {msg[:200]}{hint}"
            ) from None
    raise AssertionError("unreachable")


def _requeue(study: Any, failed: Any) -> None:
    """Enqueue an interrupted trial (a Trial or FrozenTrial) again: same parameters, same run folder
    (resumed from its checkpoint)."""
    role = failed.user_attrs.get("role", "search")
    study.enqueue_trial(
        dict(failed.params) if role == "search" else {},
        user_attrs={
            "role": role,
            "resumes": failed.number,
            "run_name": failed.user_attrs.get("run_name", f"trial-{failed.number:04d}"),
        },
    )


def _counted(trials: Sequence[Any]) -> int:
    """Finished trials towards --trials: an interrupted trial counts once, through its re-run."""
    from optuna.trial import TrialState

    resumed = {t.user_attrs.get("resumes") for t in trials}
    return sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and t.number not in resumed)
        for t in trials
    )


def _running(trials: Sequence[Any]) -> int:
    from optuna.trial import TrialState

    return sum(t.state == TrialState.RUNNING for t in trials)


def _main_metric(task: str) -> str | None:
    """The key the Trainer's evaluations carry the main metric under (None: the metric is computed
    after training, by generation, so there is nothing to prune on)."""
    from ..data import glue_task

    try:
        return glue_task(task).main_metric
    except DeftError:
        return "accuracy" if task.lower() == "image" else None


def _prune_callback(trial: Any, key: str, curve: Sequence[Sequence[float]] | None, margin: float | None):
    """A TrainerCallback recording each evaluation's metric on the trial and, with ``margin``, raising
    TrialPruned at an evaluation before the last when the metric is below :func:`prune_floor`."""
    import optuna
    from transformers import TrainerCallback

    class _Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            trial.set_user_attr("steps_planned", int(state.max_steps))
            return control

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            value = (metrics or {}).get(f"eval_{key}")
            if not _is_number(value) or not state.max_steps:
                return control
            evals = list(trial.user_attrs.get("evals", [])) + [[int(state.global_step), float(value)]]
            trial.set_user_attr("evals", evals)
            fraction = state.global_step / state.max_steps
            floor = prune_floor(curve, fraction, margin) if margin is not None else None
            if fraction < 1 and floor is not None and margin is not None and value < floor:
                trial.set_user_attr("steps_run", int(state.global_step))
                raise optuna.TrialPruned(
                    f"{key} {100 * value:.2f} % at step {state.global_step}/{state.max_steps} "
                    f"is below the baseline's {100 * (floor + margin):.2f} % minus "
                    f"{100 * margin:.2f} points"
                )
            return control

    return _Watch()


# ---------------------------------------------------------------------------------------------- the study
class _Tuner:
    def __init__(
        self, args: TuneArgs, space: dict[str, Param], baseline: dict[str, Any] | None, storage_url: str
    ) -> None:
        self.args = args
        self.storage_url = storage_url
        self.space = space
        self.out = Path(args.run.output)
        # the deft train options every trial starts from (flat names, as the search space names them)
        self.base = {k: v for k, v in flat(args).items() if k in options(TrainArgs)}
        self.external_baseline = baseline
        self.key = _main_metric(args.data.task)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    # -------------------------------------------------------------------- baseline
    def baseline(self, study: Any) -> dict[str, Any] | None:
        """{metric, density, curve, ...} of --baseline, else of the study's finished baseline trial."""
        if self.external_baseline is not None:
            return self.external_baseline
        from optuna.trial import TrialState

        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("role") == "baseline":
                return {
                    "trial": t.number,
                    "run_dir": t.user_attrs.get("run_dir"),
                    "metric": t.values[0],
                    "density": t.values[1],
                    "density_kind": t.user_attrs.get("density_kind"),
                    "curve": t.user_attrs.get("curve"),
                }
        return None

    def _other_baseline(self, study: Any, number: int) -> bool:
        """An earlier baseline trial that is waiting, running or done (so this one is a duplicate)."""
        from optuna.trial import TrialState

        return any(
            t.user_attrs.get("role") == "baseline" and t.number < number and t.state != TrialState.FAIL
            for t in study.get_trials(deepcopy=False)
        )

    # -------------------------------------------------------------------- one trial
    def objective(self, trial: Any) -> tuple[float, float]:
        import optuna

        from .train import train_with_setup

        role = trial.user_attrs.get("role", "search")
        if role == "baseline" and (
            self.external_baseline is not None or self._other_baseline(trial.study, trial.number)
        ):
            role = "search"  # a second worker enqueued the baseline too: search instead of training it twice
        if role == "baseline":
            overrides = {k: v for k, v in BASELINE_OVERRIDES.items() if k in self.base}
        else:
            overrides = {name: p.suggest(trial) for name, p in self.space.items()}
        run_name = trial.user_attrs.get("run_name") or f"trial-{trial.number:04d}"
        run_dir = self.out / run_name
        for k, v in {
            "role": role,
            "run_name": run_name,
            "run_dir": str(run_dir.resolve()),
            "worker": self.worker,
            "overrides": overrides,
        }.items():
            trial.set_user_attr(k, v)
        resumed = trial.user_attrs.get("resumes")
        print(
            f"deft tune: trial {trial.number} ({role}{f', resumes trial {resumed}' if resumed is not None else ''})"
            f" -> {run_dir}: "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in overrides.items())
        )
        try:
            if resumed is not None and (run_dir / "results.json").exists():
                # the interrupted process finished training but not the bookkeeping: keep its run
                res = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
            else:
                targs = build(
                    TrainArgs,
                    {
                        **self.base,
                        **overrides,
                        "output": str(run_dir),
                        "overwrite": False,
                        "resume": (run_dir / "checkpoints").is_dir(),
                    },
                )
                callbacks = []
                if self.key is not None:
                    # the baseline as it stands when the trial starts (another worker may still be training it)
                    base = self.baseline(trial.study) if self.args.prune and role == "search" else None
                    curve = base.get("curve") if base else None
                    margin = self.args.prune_factor * self.args.max_drop / 100.0 if curve else None
                    callbacks.append(_prune_callback(trial, self.key, curve, margin))
                res = train_with_setup(targs, callbacks=callbacks)
        except optuna.TrialPruned:
            # a pruned trial is never resumed: its checkpoints would only hold disk
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted (Ctrl-C); enqueued again, resumes from its checkpoint")
            _requeue(trial.study, trial)
            raise
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
            raise
        metric = res.get("metric")
        if not _is_number(metric):
            trial.set_user_attr("error", f"results.json has no {res.get('main_metric')} value")
            raise TuneError(f"{run_dir}: results.json has no {res.get('main_metric')} value")
        density, kind = run_density(res)
        steps = max(
            (h["step"] for h in res.get("log_history", []) if isinstance(h.get("step"), (int, float))), default=None
        )
        attrs = {
            "metric": float(metric),
            "density": density,
            "density_kind": kind,
            "main_metric": res.get("main_metric"),
            "curve": eval_curve(res),
        }
        if steps is not None:
            attrs.update(steps_run=int(steps), steps_planned=int(steps))
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        return float(metric), density

    # -------------------------------------------------------------------- outputs
    def rows(self, study: Any) -> list[dict[str, Any]]:
        rows = []
        for t in study.get_trials(deepcopy=False):
            u = t.user_attrs
            params = dict(u.get("overrides") or t.params)
            rows.append(
                {
                    "number": t.number,
                    "state": t.state.name,
                    "role": u.get("role", "search"),
                    "metric": t.values[0] if t.values else None,
                    "density": t.values[1] if t.values else None,
                    "density_kind": u.get("density_kind"),
                    "params": params,
                    "run_dir": u.get("run_dir"),
                    "worker": u.get("worker"),
                    "error": u.get("error"),
                    "resumes": u.get("resumes"),
                    "steps_planned": u.get("steps_planned"),
                    "steps_run": u.get("steps_run"),
                }
            )
        return rows

    def summary(self, study: Any) -> dict[str, Any]:
        rows = self.rows(study)
        complete = [r for r in rows if r["state"] == "COMPLETE"]
        front = pareto_front(complete)
        base = self.baseline(study)
        answer = None
        if base is not None:
            candidates = list(complete)
            if self.external_baseline is not None:  # the baseline itself answers when no trial is close enough
                candidates.append(
                    {
                        "number": None,
                        "role": "baseline",
                        "metric": base["metric"],
                        "density": base["density"],
                        "density_kind": base.get("density_kind"),
                        "params": {},
                        "run_dir": base.get("run_dir"),
                    }
                )
            answer = pick_answer(candidates, base["metric"], self.args.max_drop)
        pruned = [r for r in rows if r["state"] == "PRUNED"]
        saved = sum(
            max(0, (r["steps_planned"] or 0) - (r["steps_run"] or 0))
            for r in pruned
            if r["steps_planned"] is not None and r["steps_run"] is not None
        )
        states = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
        return {
            "study": study.study_name,
            "storage": _safe_url(self.storage_url),
            "objectives": [
                {"name": self.key or "metric", "direction": "maximize"},
                {"name": "density", "direction": "minimize"},
            ],
            "sampler": type(study.sampler).__name__,
            "space": {k: p.to_dict() for k, p in self.space.items()},
            "max_drop_points": self.args.max_drop,
            "baseline": {k: v for k, v in (base or {}).items() if k != "curve"} or None,
            "answer": answer,
            "front": front,
            "trials": {s.lower(): n for s, n in states.items()},
            "pruning": {
                "enabled": self.args.prune,
                "factor": self.args.prune_factor,
                "margin_points": self.args.prune_factor * self.args.max_drop,
                "pruned_trials": len(pruned),
                "steps_saved": saved,
            },
            "all_trials": rows,
        }

    def write(self, study: Any, plot: bool = False) -> dict[str, Any]:
        s = self.summary(study)
        write_json(self.out / "pareto.json", s)
        names = sorted({k for r in s["front"] for k in r["params"]})
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["trial", "role", "metric", "density", "density_kind", *names, "run_dir"])
        for r in s["front"]:
            w.writerow(
                [
                    r["number"],
                    r["role"],
                    r["metric"],
                    r["density"],
                    r["density_kind"],
                    *[r["params"].get(k, "") for k in names],
                    r["run_dir"],
                ]
            )
        write_text(self.out / "pareto.csv", buf.getvalue())
        if plot:
            pareto_plot(s, self.out / "pareto.png")
        return s


def pareto_plot(summary: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """Metric vs density of every finished trial (grey), the front (highlighted, as a step line), the
    baseline's max-drop floor and the chosen trial (star); None when no trial finished."""
    from ..analysis.plots import pyplot

    rows = [r for r in summary["all_trials"] if r["state"] == "COMPLETE"]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter(
        [100 * r["density"] for r in rows],
        [100 * r["metric"] for r in rows],
        color="0.65",
        s=22,
        label=f"trials ({len(rows)})",
        zorder=2,
    )
    front = summary["front"]
    ax.step([100 * r["density"] for r in front], [100 * r["metric"] for r in front], where="post", color="C0", zorder=3)
    ax.scatter(
        [100 * r["density"] for r in front],
        [100 * r["metric"] for r in front],
        color="C0",
        s=34,
        label="Pareto front",
        zorder=4,
    )
    base = summary.get("baseline")
    if base:
        ax.axhline(
            100 * base["metric"] - summary["max_drop_points"],
            color="C3",
            ls="--",
            lw=1,
            label=f"baseline - {summary['max_drop_points']:g} points",
        )
    ans = summary.get("answer")
    if ans:
        ax.scatter(
            [100 * ans["density"]],
            [100 * ans["metric"]],
            marker="*",
            s=220,
            color="C1",
            edgecolor="k",
            label=f"chosen (trial {ans['number']})" if ans.get("number") is not None else "chosen (baseline)",
            zorder=5,
        )
    metric = summary["objectives"][0]["name"]
    kinds = {r.get("density_kind") for r in rows}
    ax.set_xlabel(f"{'effective ' if kinds == {'effective'} else ''}MLP activation density (%)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"deft tune {summary['study']}: {metric} vs density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    out = atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return out


def _read_baseline(path: str, task: str) -> dict[str, Any]:
    run_dir = Path(path)
    f = run_dir / "results.json"
    if not f.exists():
        raise TuneError(f"--baseline {run_dir}: no results.json; pass a finished `deft train` run folder")
    try:
        res = json.loads(f.read_text(encoding="utf-8"))
        metric = res["metric"]
        density, kind = run_density(res)
    except (ValueError, KeyError, TypeError) as e:
        raise TuneError(f"--baseline {f}: not a deft results.json ({type(e).__name__}: {e})") from None
    if not _is_number(metric):
        raise TuneError(f"--baseline {f}: has no metric value")
    from ..data import glue_task

    def canon(t: str) -> str:
        try:
            return glue_task(t).name
        except DeftError:
            return t.lower()

    if canon(res.get("task", task)) != canon(task):
        raise TuneError(f"--baseline {run_dir}: trained on task {res.get('task')!r}, the study tunes {task!r}")
    alpha = (res.get("config") or {}).get("alpha")
    if alpha:
        print(f"deft tune: note: --baseline {run_dir} was trained with alpha={alpha:g}, not as plain PEFT")
    return {
        "run_dir": str(run_dir.resolve()),
        "metric": float(metric),
        "density": density,
        "density_kind": kind,
        "curve": eval_curve(res),
    }


def _validate(args: TuneArgs) -> None:
    if not (isinstance(args.trials, int) and args.trials >= 1):
        raise TuneError(f"--trials must be a whole number >= 1, got {args.trials!r}")
    if args.timeout is not None and not (_is_number(args.timeout) and args.timeout > 0):
        raise TuneError(f"--timeout must be a number of seconds > 0, got {args.timeout!r}")
    if not (_is_number(args.max_drop) and args.max_drop >= 0):
        raise TuneError(f"--max-drop must be a number of points >= 0, got {args.max_drop!r}")
    if not (_is_number(args.prune_factor) and args.prune_factor > 0):
        raise TuneError(f"--prune-factor must be > 0, got {args.prune_factor!r}")
    if not args.study_name:
        raise TuneError("--study-name must not be empty")


def _check_study(study: Any, args: TuneArgs, space: dict[str, Param], url: str) -> None:
    """A study found in the storage must be the same search: same objectives, task and space."""
    where = f"study {args.study_name!r} in {_safe_url(url)}"
    if [d.name.lower() for d in study.directions] != list(DIRECTIONS):
        raise TuneError(
            f"{where} is not a deft tune study (objectives {[d.name for d in study.directions]}); "
            "pass another --study-name"
        )
    mine = {"task": args.data.task, "space": {k: p.to_dict() for k, p in space.items()}}
    theirs = study.user_attrs.get("deft")
    if theirs is None:
        study.set_user_attr("deft", mine)
    elif theirs != json.loads(json.dumps(mine)):
        diff = [k for k in mine if json.loads(json.dumps(mine[k])) != theirs.get(k)]
        raise TuneError(
            f"{where} was started with another {' and '.join(diff)} ({theirs}); rerun with the same "
            "--task / --space or pass another --study-name"
        )


def tune(args: TuneArgs) -> dict[str, Any]:
    """Run (or continue, or join) the study until it has ``args.trials`` finished trials; writes and
    returns pareto.json's content."""
    _validate(args)  # the density and PEFT options were checked when args was made
    space = load_space(args.space)
    baseline = _read_baseline(args.baseline, args.data.task) if args.baseline else None
    optuna = _optuna()
    out = Path(args.run.output)
    out.mkdir(parents=True, exist_ok=True)
    url = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    storage = open_storage(url)
    tuner = _Tuner(args, space, baseline, url)
    sampler = optuna.samplers.TPESampler(
        seed=args.sampler_seed, n_startup_trials=max(2, min(10, args.trials // 3)), constant_liar=True
    )
    study = optuna.create_study(
        storage=storage, study_name=args.study_name, directions=list(DIRECTIONS), sampler=sampler, load_if_exists=True
    )
    _check_study(study, args, space, url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # before counting: a trial whose worker died must not count as running (it is failed and enqueued
        # again here; study.optimize repeats this before every trial)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    if baseline is None and not any(t.user_attrs.get("role") == "baseline" for t in trials):
        study.enqueue_trial({}, user_attrs={"role": "baseline"})
    done = _counted(trials)
    print(
        f"deft tune: study {args.study_name!r} in {_safe_url(url)}: {done} of {args.trials} trials finished"
        f"{f', {_running(trials)} running elsewhere' if _running(trials) else ''}"
    )

    def enough(study: Any, _trial: Any = None) -> bool:
        ts = study.get_trials(deepcopy=False)
        return _counted(ts) + _running(ts) >= args.trials

    def after_trial(study: Any, trial: Any) -> None:
        tuner.write(study)
        if enough(study):
            study.stop()

    if not enough(study):
        try:
            study.optimize(
                tuner.objective, timeout=args.timeout, catch=(Exception,), callbacks=[after_trial], gc_after_trial=True
            )
        except KeyboardInterrupt:
            print(
                "deft tune: interrupted; the stopped trial is enqueued again and resumes from its checkpoint "
                "when the same command runs again",
                flush=True,
            )
            tuner.write(study)
            raise
    elif _running(trials):
        print(
            f"deft tune: nothing to start; {_running(trials)} trial(s) still RUNNING count towards --trials. "
            f"A trial whose worker died is re-run by the next worker once its heartbeat is {GRACE_S} s old."
        )
    summary = tuner.write(study, plot=True)
    _print_summary(summary, out)
    return summary


def _print_summary(s: Mapping[str, Any], out: Path) -> None:
    metric = s["objectives"][0]["name"]
    t = s["trials"]
    print(
        f"\ndeft tune: {t['complete']} complete, {t['pruned']} pruned ({s['pruning']['steps_saved']} steps saved), "
        f"{t['fail']} failed" + (f", {t['running']} still running elsewhere" if t["running"] else "")
    )
    if s["front"]:
        print(f"Pareto front ({metric} up, density down):")
        print(f"| {'trial':>5} | {metric + ' %':>12} | {'density %':>9} | parameters")
        for r in s["front"]:
            params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
            print(f"| {r['number']:>5} | {100 * r['metric']:>12.2f} | {100 * r['density']:>9.2f} | {params}")
    base, ans = s["baseline"], s["answer"]
    if base is None:
        print("no finished PEFT baseline yet: no answer to the max-drop question")
    elif ans is None:
        print(
            f"no trial within {s['max_drop_points']:g} points of the PEFT baseline ({metric} "
            f"{100 * base['metric']:.2f} %)"
        )
    else:
        who = f"trial {ans['number']}" if ans.get("number") is not None else "the baseline itself"
        print(
            f"sparsest within {s['max_drop_points']:g} points of the PEFT baseline "
            f"({metric} {100 * base['metric']:.2f} %): "
            f"{who}, {ans['density_kind'] or ''} density {100 * ans['density']:.2f} %, {metric} "
            f"{100 * ans['metric']:.2f} % -> {ans['run_dir']}"
        )
    print(f"front: {out / 'pareto.json'} (also pareto.csv, pareto.png); report: deft report {out}")
