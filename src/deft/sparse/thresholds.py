"""Per-layer thresholds as part of a trained artifact: find them, check them against a model, apply them.

A thresholded model zeroes every MLP down-projection input ``h`` with ``|h| <= t_layer`` (TEAL-style; what
``sparsify(mode="threshold")`` skips). ``deft train --target-density`` saves the thresholds it trained
under to ``RUN/adapter/thresholds.json`` (:func:`deft.core.threshold.save_thresholds`, the file format's one
reader being :func:`deft.core.threshold.read_thresholds`). Site names are those of :func:`calibrate_thresholds`,
module names relative to the transformers model, and they are the same on a bare model, a peft-wrapped
one (a LoRA layer keeps the name of the layer it adapts) and the model after ``merge_and_unload()``:
every helper here finds sites through :class:`deft.ActivationProbe` with ``point="down_input"``, the one
naming rule deft has.

::

    th = deft.sparse.load_thresholds("runs/t/adapter", model)   # checked against the model's sites
    with deft.sparse.apply_thresholds(model, th):               # sub-threshold inputs zeroed
        model(**batch)
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import DeftError
from ..core.probe import ActivationProbe
from ..core.threshold import THRESHOLDS_FILE, read_thresholds


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
