"""Exact activation density over a whole evaluation set, and the paper's Density Change %.

With per-layer thresholds (``measure_density(..., thresholds={site: t})``) the density measured is the
*effective* density: the share of MLP down-projection (W2) inputs with ``|h| > t_layer``, i.e. the W2 input
units a thresholded kernel still has to touch. The exact-zero density of the same pass is kept beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from torch import nn

from ..arch import run_batches
from ..errors import ConfigError
from .probe import ActivationProbe, Point
from .threshold import apply_thresholds, check_thresholds, down_site_names

T = TypeVar("T")


@dataclass
class LayerDensity:
    name: str
    group: str
    density: float  # fraction of counted entries with |x| > threshold
    union_density: float  # fraction of units non-zero for >= 1 token of a batch, averaged over batches
    tokens: int
    units: int
    nonzero: int
    entries: int
    # with per-layer thresholds: the share of entries that are exactly non-zero (before thresholding)
    exact_density: float | None = None


@dataclass
class DensityReport:
    """Density of every MLP activation site, per group and overall (fractions in [0, 1]).

    ``groups`` maps ``"all"`` (decoder-only / encoder-only models) or ``"encoder"`` / ``"decoder"`` to the
    mean density of that group's layers; ``overall`` is the mean over all layers, as the paper reports.
    ``thresholds`` holds the per-layer thresholds the densities were counted at (then ``overall`` is the
    effective density and ``exact_overall`` the exact-zero density of the same pass), None when every
    layer was counted at the scalar ``threshold``.
    """

    layers: list[LayerDensity]
    threshold: float = 0.0
    include_padding: bool = False
    groups: dict[str, float] = field(default_factory=dict)
    overall: float = float("nan")
    thresholds: dict[str, float] | None = None

    def __post_init__(self) -> None:
        seen = [layer for layer in self.layers if layer.entries > 0]
        if not self.groups:
            by: dict[str, list[float]] = {}
            for layer in seen:
                by.setdefault(layer.group, []).append(layer.density)
            self.groups = {g: sum(v) / len(v) for g, v in sorted(by.items())}
        if seen and math.isnan(self.overall):
            self.overall = sum(layer.density for layer in seen) / len(seen)

    @classmethod
    def from_probe(cls, probe: ActivationProbe) -> DensityReport:
        layers = [
            LayerDensity(
                name=s.name,
                group=s.group,
                density=s.density(),
                union_density=s.union_sum / s.union_batches if s.union_batches else float("nan"),
                tokens=s.tokens,
                units=s.units,
                nonzero=s.nonzero,
                entries=s.entries,
            )
            for s in probe.sites
        ]
        per_site = getattr(probe, "thresholds", None)
        return cls(
            layers=layers,
            threshold=probe.threshold,
            include_padding=probe.include_padding,
            thresholds=dict(per_site) if per_site else None,
        )

    @property
    def union_overall(self) -> float:
        vals = [layer.union_density for layer in self.layers if layer.entries > 0]
        return sum(vals) / len(vals) if vals else float("nan")

    @property
    def exact_overall(self) -> float | None:
        """Mean exact-zero density over the layers (None unless measured beside per-layer thresholds)."""
        vals = [layer.exact_density for layer in self.layers if layer.entries > 0 and layer.exact_density is not None]
        return sum(vals) / len(vals) if vals else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall,
            "groups": dict(self.groups),
            "union_overall": self.union_overall,
            "threshold": self.threshold,
            "include_padding": self.include_padding,
            "thresholds": dict(self.thresholds) if self.thresholds is not None else None,
            "exact_overall": self.exact_overall,
            "layers": [asdict(layer) for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DensityReport:
        return cls(
            layers=[LayerDensity(**layer) for layer in d["layers"]],
            threshold=d.get("threshold", 0.0),
            include_padding=d.get("include_padding", False),
            groups=dict(d.get("groups", {})),
            overall=d.get("overall", float("nan")),
            # results written before per-layer thresholds existed have no such key
            thresholds=dict(d["thresholds"]) if d.get("thresholds") is not None else None,
        )

    def table(self) -> str:
        """A fixed-width table for the terminal (densities in %)."""
        w = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{'layer':<{w}}  {'group':<7}  {'density %':>9}  {'union %':>8}  {'tokens':>8}"]
        exact_overall = self.exact_overall
        exact = exact_overall is not None
        if exact:  # thresholded: density is the effective one, the exact-zero one goes beside it
            lines[0] += f"  {'threshold':>9}  {'exact-0 %':>9}"
        for layer in self.layers:
            lines.append(
                f"{layer.name:<{w}}  {layer.group:<7}  {100 * layer.density:>9.2f}  "
                f"{100 * layer.union_density:>8.2f}  {layer.tokens:>8}"
            )
            if exact:
                t = (self.thresholds or {}).get(layer.name, self.threshold)
                ex = f"{100 * layer.exact_density:>9.2f}" if layer.exact_density is not None else f"{'':>9}"
                lines[-1] += f"  {t:>9.3g}  {ex}"
        for g, v in self.groups.items():
            lines.append(f"{'mean (' + g + ')':<{w}}  {'':<7}  {100 * v:>9.2f}")
        lines.append(f"{'overall':<{w}}  {'':<7}  {100 * self.overall:>9.2f}  {100 * self.union_overall:>8.2f}")
        if exact_overall is not None:
            lines[-1] += f"  {'':>8}  {'':>9}  {100 * exact_overall:>9.2f}"
            lines.append(
                f"effective density (|h| > per-layer threshold): {100 * self.overall:.2f} %; "
                f"exact-zero density: {100 * exact_overall:.2f} %"
            )
        return "\n".join(lines)


def measure_density(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    threshold: float | Mapping[str, float] = 0.0,
    include_padding: bool = False,
    sites: Iterable[str] | None = None,
    point: Point = "auto",
    probe: ActivationProbe | None = None,
    thresholds: Mapping[str, float] | None = None,
    mask: bool = True,
) -> DensityReport:
    """Exact density of the MLP activations of ``model`` over ``batches`` (dicts of model inputs).

    Runs under ``torch.no_grad`` in eval mode (the model's mode is restored afterwards). Pass ``probe``
    to reuse an existing one (its counts are reset first).

    ``thresholds`` (or ``threshold`` given as a mapping) = ``{site name: t}``, names as
    :func:`deft.sparse.calibrate_thresholds` gives them: the *effective* density at the down-projection
    inputs, ``|h| > t_layer``, with the exact-zero density of the same pass in ``exact_density`` /
    ``exact_overall``. With ``mask=True`` (default) the thresholds are also applied, every entry at or
    below its threshold zeroed, so each layer sees what the thresholded model gives it; ``mask=False``
    only counts.
    """
    if isinstance(threshold, Mapping):
        if thresholds is not None:
            raise ConfigError("measure_density: pass per-layer thresholds as threshold= or thresholds=, not both")
        thresholds, threshold = threshold, 0.0
    if thresholds is not None:
        if probe is not None:
            raise ConfigError("measure_density: probe= cannot be combined with per-layer thresholds")
        if point not in ("auto", "down_input"):
            raise ConfigError(f"measure_density: per-layer thresholds are counted at point='down_input', got {point!r}")

        return count_thresholded(
            model,
            thresholds,
            lambda: run_batches(model, batches),
            include_padding=include_padding,
            sites=sites,
            mask=mask,
        )[1]
    probe = probe or ActivationProbe(
        model,
        sites=sites,
        point=point,
        threshold=threshold,
        include_padding=include_padding,
    )
    probe.reset()
    attached_here = not probe.attached
    try:
        probe.attach()
        run_batches(model, batches)
    finally:
        if attached_here:
            probe.detach()
    return DensityReport.from_probe(probe)


def count_thresholded(
    model: nn.Module,
    thresholds: Mapping[str, float],
    run: Callable[[], T],
    *,
    include_padding: bool = False,
    sites: Iterable[str] | None = None,
    mask: bool = True,
) -> tuple[T, DensityReport]:
    """``(run(), report)``: call ``run`` (anything that runs ``model``, e.g. an evaluation loop) with the
    per-layer ``thresholds`` applied (``mask=True``: every down-projection input ``|h| <= t`` zeroed) and
    counted: the report's densities are effective, its ``exact_density`` the exact-zero ones of the same
    pass. One pass gives the task metric and the density it was reached at."""
    th = check_thresholds(thresholds, model, sites=sites)
    th = {s: th.get(s, 0.0) for s in down_site_names(model, sites=sites)}  # every site counted at its own threshold
    # attached first, so its hooks see each input before the masking probe zeroes part of it
    exact = ActivationProbe(model, sites=sites, point="down_input", include_padding=include_padding)
    exact.attach()
    try:
        if mask:
            effective = apply_thresholds(model, th, sites=sites, include_padding=include_padding)
        else:
            effective = ActivationProbe(
                model, sites=sites, point="down_input", threshold=th, include_padding=include_padding
            ).attach()
        try:
            effective.reset()
            result = run()
        finally:
            effective.detach()
    finally:
        exact.detach()
    report = DensityReport.from_probe(effective)
    for layer, site in zip(report.layers, exact.sites, strict=True):
        layer.exact_density = site.density()
    report.thresholds = th
    return result, report


def density_change(peft: float | DensityReport, deft: float | DensityReport) -> float:
    """Density Change % = (density_PEFT - density_DEFT) / density_PEFT * 100 (positive = sparser)."""
    p = peft.overall if isinstance(peft, DensityReport) else float(peft)
    d = deft.overall if isinstance(deft, DensityReport) else float(deft)
    if not p > 0:
        raise ConfigError(f"the PEFT density must be > 0 to compute a relative change, got {p}")
    return (p - d) / p * 100.0
