"""Trainer callbacks: every log line of a run in a CSV you can open in a spreadsheet.

TensorBoard needs nothing from deft: ``TrainingArguments(report_to=["tensorboard"])`` (with the
``tensorboard`` package installed) already receives everything :class:`deft.DeftTrainer` logs, i.e.
``task_loss``, ``density_loss``, ``alpha``, ``train_density`` and, at evaluation, ``eval_density``,
``eval_density_<group>`` and ``eval_density_layer_<i>``. transformers 5 writes the event files under
``TrainingArguments.output_dir/runs/`` (for ``deft train`` that is ``RUN/checkpoints/runs``; the
``TENSORBOARD_LOGGING_DIR`` environment variable moves them): ``tensorboard --logdir RUN/checkpoints/runs``.
:class:`DensityCSVCallback` writes the same dicts to a CSV without any extra dependency.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..io import write_json, write_text


class DensityCSVCallback(TrainerCallback):
    """Append every ``on_log`` dict (training and evaluation lines, per-layer densities included) to a CSV.

    Columns are ``step``, ``epoch`` and then every key in the order it first appeared; a key that shows up
    later (evaluation metrics after the first training lines) adds a column, so the whole file is
    rewritten, atomically, on every log: a crash never leaves a half-written CSV. Missing values are empty.

    On a resumed run, lines logged after the checkpoint being resumed from are dropped, because the
    Trainer logs those steps again.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.columns: list[str] = ["step", "epoch"]
        self.rows: list[dict[str, Any]] = []
        self._loaded = False

    def _load(self, keep_until_step: int | None) -> None:
        self._loaded = True
        if not self.path.exists():
            return
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for c in reader.fieldnames or []:
                if c not in self.columns:
                    self.columns.append(c)
            for row in reader:
                try:
                    step = int(float(row.get("step") or 0))
                except ValueError:
                    step = 0
                if keep_until_step is None or step <= keep_until_step:
                    self.rows.append({k: v for k, v in row.items() if v not in ("", None)})

    def on_train_begin(self, args, state, control, **kwargs):
        # the Trainer restored `state` from the checkpoint before this call: its step is where we resume
        if not self._loaded:
            self._load(state.global_step)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return control
        if not self._loaded:
            self._load(None)
        row: dict[str, Any] = {"step": state.global_step, "epoch": logs.get("epoch", state.epoch)}
        for k, v in logs.items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                row[k] = v
            if k not in self.columns:
                self.columns.append(k)
        self.rows.append(row)
        self._write()
        return control

    def _write(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in self.columns})
        write_text(self.path, buf.getvalue())


# ---------------------------------------------------------------------------------------------- console
class RunProgressCallback(TrainerCallback):
    """One progress bar per training run (main process only), whose postfix shows the latest task loss,
    training density and evaluation metrics.

    It replaces transformers' console output, which opens a second bar for every evaluation and prints a
    dict per logging step: those numbers are all in ``train_log.csv`` and ``results.json`` already.
    """

    _HIDDEN = ("density_layer", "runtime", "per_second", "union_density")

    def __init__(self) -> None:
        self.bar: Any = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            # a resumed run starts the bar where its checkpoint left off
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return control
        if "task_loss" in logs or "loss" in logs:
            self.postfix["loss"] = f"{logs.get('task_loss', logs.get('loss')):.4g}"
        if "train_density" in logs:
            self.postfix["density"] = f"{logs['train_density']:.4g}"
        for k, v in logs.items():
            if (
                k.startswith("eval_")
                and k != "eval_loss"
                and isinstance(v, (int, float))
                and not any(h in k for h in self._HIDDEN)
            ):
                self.postfix[k] = f"{v:.4g}"
        self.bar.set_postfix(self.postfix, refresh=True)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        return control


def use_run_progress(trainer: Any, *, quiet: bool = False) -> None:
    """deft's console on ``trainer``: one :class:`RunProgressCallback` bar (nothing when ``quiet``) instead
    of transformers' bars and printed log dicts; transformers' own output stays when deft is verbose."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..console import is_verbose

    if is_verbose():
        return
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # what transformers prints with instead when disable_tqdm=True
    if not quiet:
        trainer.add_callback(RunProgressCallback())


# ---------------------------------------------------------------------------------------------- resume
TRAIN_TIME_FILE = "deft_train_time.json"


class TrainTimeCallback(TrainerCallback):
    """Training time that survives interruptions: every checkpoint folder gets ``deft_train_time.json``
    with the seconds of training that led to it, earlier segments included; a run resumed from that
    checkpoint starts its count there (``before``), so results.json's ``train_time_s`` is the whole run's.
    It also gives the checkpoint's files the user's umask (safetensors writes its weights 0600)."""

    def __init__(self, before: float = 0.0) -> None:
        self.before = before
        self.start: float | None = None

    def elapsed(self) -> float:
        return self.before + (time.time() - self.start if self.start is not None else 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            write_json(folder / TRAIN_TIME_FILE, {"train_time_s": self.elapsed(), "global_step": state.global_step})
            from ..io import apply_umask_tree

            apply_umask_tree(folder)  # the weights safetensors wrote 0600 follow the user's umask like the rest
        return control


def checkpoint_progress(checkpoint: str | os.PathLike) -> tuple[float, int | None, int | None]:
    """(training seconds before ``checkpoint``, its step, the run's total steps), read from the folder;
    0.0 / None where a file is missing or unreadable (a checkpoint written before deft kept the time)."""
    folder = Path(checkpoint)
    try:
        before = float(json.loads((folder / TRAIN_TIME_FILE).read_text())["train_time_s"])
    except (OSError, ValueError, KeyError, TypeError):
        before = 0.0
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        step, total = state.get("global_step"), state.get("max_steps")
    except (OSError, ValueError, AttributeError):
        step = total = None
    return before, step, total
