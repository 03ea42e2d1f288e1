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
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ..errors import ConfigError, DeftError
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

    def __init__(
        self,
        probe: ActivationProbe,
        *,
        target: float,
        ramp: float = 0.6,
        schedule: Schedule = "cosine",
        momentum: float = 0.9,
        straight_through: bool = False,
    ) -> None:
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
        density = state.get("density", self.target)
        if not isinstance(density, (int, float)):
            raise ConfigError(f"threshold state: 'density' is {density!r}, not a number")
        self.thresholds = {k: float(v) for k, v in th.items()}
        self.density = float(density)
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


# ---------------------------------------------------------------------------------------------- artifacts
# (re-exported by deft.sparse: deft.sparse.load_thresholds, apply_thresholds, ...)
# Per-layer thresholds as part of a trained artifact: find them, check them against a model, apply them.
#
# A thresholded model zeroes every MLP down-projection input ``h`` with ``|h| <= t_layer`` (TEAL-style; what
# ``sparsify(mode="threshold")`` skips). ``deft train --target-density`` saves the thresholds it trained
# under to ``RUN/adapter/thresholds.json`` (:func:`save_thresholds`, the file format's one reader being
# :func:`read_thresholds`). Site names are those of :func:`deft.sparse.calibrate_thresholds`,
# module names relative to the transformers model, and they are the same on a bare model, a peft-wrapped
# one (a LoRA layer keeps the name of the layer it adapts) and the model after ``merge_and_unload()``:
# every helper here finds sites through :class:`deft.ActivationProbe` with ``point="down_input"``, the one
# naming rule deft has.
#
# ::
#
#     th = deft.sparse.load_thresholds("runs/t/adapter", model)   # checked against the model's sites
#     with deft.sparse.apply_thresholds(model, th):               # sub-threshold inputs zeroed
#         model(**batch)


class ThresholdError(DeftError, ValueError):
    """Thresholds deft cannot apply to a model (the message names the file and the site at fault)."""


def down_site_names(model: nn.Module, *, sites: Iterable[str] | None = None) -> list[str]:
    """The names thresholds are keyed by: the model's down-projection input sites, in model order."""
    return [s.name for s in ActivationProbe(model, sites=sites, point="down_input").sites]


def find_thresholds(path: str | os.PathLike) -> Path | None:
    """The thresholds file meant by ``path``: the file itself, ``DIR/thresholds.json`` (an adapter folder)
    or ``DIR/adapter/thresholds.json`` (a run folder); None when there is none."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (p / THRESHOLDS_FILE, p / "adapter" / THRESHOLDS_FILE):
        if candidate.is_file():
            return candidate
    return None


def check_thresholds(
    thresholds: Mapping[str, Any],
    model: nn.Module | None = None,
    *,
    source: str = "thresholds",
    sites: Iterable[str] | None = None,
) -> dict[str, float]:
    """``{site name: float}`` after checking every value is a finite number >= 0 and, given ``model``, that
    every name is one of its down-projection sites (sites left out are not thresholded)."""
    if not isinstance(thresholds, Mapping):
        raise ThresholdError(f"{source}: expected a mapping {{site name: threshold}}, got {type(thresholds).__name__}")
    out: dict[str, float] = {}
    for name, v in thresholds.items():
        # bool is an int subclass, and a JSON true is no magnitude
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        if not ok:
            raise ThresholdError(f"{source}: threshold of site {name!r} must be a finite number >= 0, got {v!r}")
        out[str(name)] = float(v)
    if model is not None:
        known = down_site_names(model, sites=sites)
        unknown = sorted(set(out) - set(known))
        if unknown:
            raise ThresholdError(
                f"{source}: unknown site(s) {', '.join(unknown)}: not MLP down-projections of this "
                f"{type(model).__name__}; its sites are: {', '.join(known)}"
            )
    return out


def load_thresholds(
    path: str | os.PathLike, model: nn.Module | None = None, *, sites: Iterable[str] | None = None
) -> dict[str, float]:
    """Read ``thresholds.json`` (the file, an adapter folder or a run folder: see :func:`find_thresholds`)
    and check it; given ``model``, every site it names must exist there. Any fault is one
    :class:`deft.DeftError` naming the file and the site."""
    found = find_thresholds(path)
    if found is None:
        raise ThresholdError(f"{path}: no {THRESHOLDS_FILE} there nor in its adapter/ folder")
    return check_thresholds(read_thresholds(found), model, source=str(found), sites=sites)


def apply_thresholds(
    model: nn.Module,
    thresholds: Mapping[str, Any],
    *,
    sites: Iterable[str] | None = None,
    include_padding: bool = False,
) -> ActivationProbe:
    """Zero every down-projection input with ``|h| <= thresholds[site]`` on each forward, until removed.

    Works on any model deft can probe, including an unmerged peft model (a LoRA layer's input is masked
    before both its base weight and its adapter see it, which is what the merged, thresholded layer
    computes), so it equals ``sparsify(mode="threshold")`` without needing a plain ``nn.Linear`` W2.
    Returns the attached masking probe: use it as a context manager or call ``detach()``. It also counts,
    after masking, the effective density (``DensityReport.from_probe``). Hooks registered on the same
    modules before this call see the raw input, later ones the masked input.
    """
    th = check_thresholds(thresholds, model, sites=sites)
    probe = ActivationProbe(model, sites=sites, point="down_input", threshold=th, include_padding=include_padding)
    probe.mask_below(th)
    return probe.attach()
