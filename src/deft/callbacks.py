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
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .io import write_text


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
