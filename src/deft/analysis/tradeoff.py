"""Accuracy / density trade-off curves: the iso-accuracy answer ("how sparse, at no more than X points lost").

A curve is a collection of ``(density, metric)`` points in any order, e.g. one per target density of a
thresholded model, or a single point for a trained run. Both numbers are taken as given: pass metrics and
``max_drop`` in the same units (fractions and fractions, or points and points). Pure functions, no torch,
so ``deft compare`` and ``deft tune`` answer the question the same way.

Rules, in one place:

* A point is *within* ``max_drop`` of ``reference`` when ``metric >= reference - max_drop`` (a tiny
  tolerance absorbs float noise, so a drop of exactly ``max_drop`` counts as within).
* Several points at the same density (re-runs, tied targets) count as the best of them: one would deploy
  the better configuration at that cost.
* Points whose density or metric is NaN / None are ignored.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Any

from ..errors import ConfigError

Point = Sequence[float]  # (density, metric)
_TOL = 1e-9


def mean_std(xs: Iterable[Any]) -> tuple[float, float]:
    """(mean, sample std) of the numbers in ``xs``; None, NaN and non-numbers are left out. (nan, nan)
    without any number; std 0 for a single one."""
    vals = [float(x) for x in xs if isinstance(x, (int, float)) and not math.isnan(x)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _clean(points: Iterable[Point]) -> list[tuple[float, float]]:
    """Finite points sorted by density, one per density (the best metric there)."""
    best: dict[float, float] = {}
    for p in points:
        d, m = p[0], p[1]
        if d is None or m is None or not (math.isfinite(d) and math.isfinite(m)):
            continue
        d, m = float(d), float(m)
        best[d] = max(m, best.get(d, -math.inf))
    return sorted(best.items())


def lowest_density_within(points: Iterable[Point], reference: float, max_drop: float) -> tuple[float, float] | None:
    """``(density, metric)`` of the lowest-density point whose metric is within ``max_drop`` of
    ``reference``; None when no point is."""
    if not max_drop >= 0:
        raise ConfigError(f"max_drop must be >= 0, got {max_drop!r}")
    floor = reference - max_drop - _TOL * max(1.0, abs(reference))
    for d, m in _clean(points):
        if m >= floor:
            return d, m
    return None


def metric_at_density(points: Iterable[Point], density: float | None) -> float | None:
    """The curve's metric at ``density``, linearly interpolated between the neighbouring points; None when
    ``density`` is None or outside the curve's density range (no extrapolation)."""
    if density is None or not math.isfinite(density):
        return None
    pts = _clean(points)
    if not pts or not pts[0][0] - _TOL <= density <= pts[-1][0] + _TOL:
        return None
    for (d0, m0), (d1, m1) in pairwise(pts):
        if d0 <= density <= d1:
            return m0 + (m1 - m0) * (density - d0) / (d1 - d0)
    # a single point, or density within the tolerance of an end
    return min(pts, key=lambda p: abs(p[0] - density))[1]


def iso_accuracy(
    curves: Mapping[str, Iterable[Point]],
    reference: float,
    max_drop: float,
    *,
    matched_kind: str | None = None,
) -> dict[str, Any]:
    """For every curve, the lowest density within ``max_drop`` of ``reference`` and the metric there.

    ``matched_kind`` names the curve whose iso-accuracy density all others are also read at (e.g. the
    training-free "PEFT + thresholds" baseline): each kind then also gets ``metric_at_matched_density``,
    its metric interpolated at that density (None outside its curve, or when the matched kind has no
    point within ``max_drop``).

    Returns ``{"reference", "max_drop", "matched_kind", "matched_density", "kinds": {kind: {"density",
    "metric", "metric_at_matched_density", "points"}}}``; density and metric are None when no point of the
    kind is within ``max_drop``.
    """
    curves = {k: list(v) for k, v in curves.items()}
    if matched_kind is not None and matched_kind not in curves:
        raise ConfigError(f"matched_kind {matched_kind!r} is not one of the curves: {sorted(curves)}")
    answers = {k: lowest_density_within(pts, reference, max_drop) for k, pts in curves.items()}
    best = answers[matched_kind] if matched_kind is not None else None
    matched = best[0] if best else None
    kinds = {}
    for k, pts in curves.items():
        a = answers[k]
        kinds[k] = {
            "density": a[0] if a else None,
            "metric": a[1] if a else None,
            "metric_at_matched_density": metric_at_density(pts, matched),
            "points": len(_clean(pts)),
        }
    return {
        "reference": reference,
        "max_drop": max_drop,
        "matched_kind": matched_kind,
        "matched_density": matched,
        "kinds": kinds,
    }
