"""Training under the sparsity a model is served with: per-layer thresholds and their schedule.

A sparse kernel (``deft.sparsify(mode="threshold")``, TEAL) or zero-skipping hardware skips every W2
input unit with ``|h| <= t_layer``. Thresholding a model only after training (the training-free
baseline) changes its function without giving it a chance to adapt. With ``DensityConfig(
target_density=D)`` the trainer instead masks ``|h| <= t_layer`` in the forward pass of every training
step, so the adapter learns to solve the task with only the kept units:

* ``t_layer`` is the ``1 - d`` quantile of ``|h|`` over the valid tokens of the current training batch,
  smoothed by an exponential moving average (one batch is a noisy estimate; the EMA also keeps the
  threshold still between steps, which gradient checkpointing needs).
* ``d`` is lowered from 1 to ``D`` over the first ``ramp`` share of training along a half cosine
  (ProSparse raises its L1 factor progressively for the same reason: a sudden cut of most units destroys
  what the pretrained model knows before the adapter can compensate; CATS and TEAL set the threshold
  from the activation distribution, as here). Past the ramp the model trains at ``D``.
* Masked entries get zero gradient by default (the exact gradient of ``h * [|h| > t]`` at fixed t);
  ``straight_through=True`` passes gradients through the mask instead.
* The thresholds the model ends with are what it was evaluated with: they are saved beside the adapter
  (``thresholds.json``, names as :func:`deft.sparse.calibrate_thresholds` gives them) and
  ``deft.sparse.sparsify(model, mode="threshold", threshold=<that dict>)`` applies them unchanged.

A density loss (``alpha > 0``) can be added on top: its surrogate then has its reach at the threshold
(:meth:`deft.DensityLoss.surrogate`), so it pushes entries below ``t`` rather than toward exact zero.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal, Mapping

from ..errors import ConfigError
from ..io import write_json
from .probe import ActivationProbe

Schedule = Literal["cosine", "linear"]

THRESHOLDS_FILE = "thresholds.json"


def scheduled_density(progress: float, target: float, ramp: float, schedule: Schedule = "cosine") -> float:
    """Density to train at after ``progress`` (0..1) of training: 1 at the start, ``target`` from ``ramp`` on."""
    if ramp <= 0 or progress >= ramp:
        return target
    x = max(progress, 0.0) / ramp
    if schedule == "cosine":
        w = 0.5 * (1.0 + math.cos(math.pi * x))  # 1 -> 0, flat at both ends
    elif schedule == "linear":
        w = 1.0 - x
    else:
        raise ConfigError(f"density schedule must be 'cosine' or 'linear', got {schedule!r}")
    return target + (1.0 - target) * w


class ThresholdTracker:
    """Per-site masking thresholds of a probe, updated from training batches and applied to the forward.

    Call :meth:`step` before every training forward: it folds the quantiles the previous forward
    measured into the moving average, applies the new thresholds, and sets the density the coming
    forward measures its quantiles at. Between two calls the thresholds do not move, so a backward pass
    that recomputes the forward (gradient checkpointing) masks exactly as the forward did. Evaluation
    uses the thresholds of the last step unchanged.
    """

    def __init__(self, probe: ActivationProbe, *, target: float, ramp: float = 0.6, schedule: Schedule = "cosine",
                 momentum: float = 0.9, straight_through: bool = False) -> None:
        if not 0.0 < target <= 1.0:
            raise ConfigError(f"target_density must be in (0, 1], got {target!r}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"threshold_momentum must be in [0, 1), got {momentum!r}")
        if not 0.0 <= ramp <= 1.0:
            raise ConfigError(f"density_ramp must be in [0, 1], got {ramp!r}")
        scheduled_density(0.0, target, ramp, schedule)  # validates the schedule name
        self.probe = probe
        self.target = float(target)
        self.ramp = float(ramp)
        self.schedule = schedule
        self.momentum = float(momentum)
        self.straight_through = straight_through
        self.thresholds: dict[str, float] = {s.name: 0.0 for s in probe.sites}
        self.density = 1.0
        probe.mask_below(self.thresholds, straight_through=straight_through)

    def pending(self) -> dict[str, float]:
        """Quantiles measured by the last training forward and not folded in yet."""
        return {s.name: s.batch_quantile for s in self.probe.sites if s.batch_quantile is not None}

    def step(self, progress: float, pending: Mapping[str, float] | None = None) -> None:
        """Fold ``pending`` (default: :meth:`pending`) into the thresholds, then train at ``progress``'s density."""
        for name, q in (self.pending() if pending is None else pending).items():
            old = self.thresholds[name]
            # the first quantile replaces the initial 0 outright; after that, a moving average
            self.thresholds[name] = q if old == 0.0 else self.momentum * old + (1.0 - self.momentum) * q
        for s in self.probe.sites:
            s.batch_quantile = None
        self.probe.mask_below(self.thresholds, straight_through=self.straight_through)
        self.density = scheduled_density(progress, self.target, self.ramp, self.schedule)
        self.probe.target = self.density

    def state_dict(self) -> dict[str, object]:
        return {"thresholds": dict(self.thresholds), "density": self.density}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        th = state.get("thresholds")
        if not isinstance(th, Mapping):
            raise ConfigError("threshold state has no 'thresholds' mapping")
        self.thresholds = {k: float(v) for k, v in th.items()}
        self.density = float(state.get("density", self.target))  # type: ignore[arg-type]
        self.probe.mask_below(self.thresholds, straight_through=self.straight_through)


def save_thresholds(folder: str | Path, thresholds: Mapping[str, float]) -> Path:
    """``folder/thresholds.json``: ``{site name: threshold}`` (read back with :func:`read_thresholds`)."""
    return write_json(Path(folder) / THRESHOLDS_FILE, dict(thresholds))


def read_thresholds(path: str | Path) -> dict[str, float]:
    """A ``thresholds.json`` (or a folder holding one), checked: a mapping of site names to finite values >= 0."""
    p = Path(path)
    if p.is_dir():
        p = p / THRESHOLDS_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such thresholds file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{p}: expected a non-empty mapping {{site name: threshold}}")
    out: dict[str, float] = {}
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{p}: threshold of {k} must be a finite number >= 0, got {v!r}")
        out[str(k)] = float(v)
    return out
