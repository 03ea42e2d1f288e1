"""Exact activation density over a whole evaluation set, and the paper's Density Change %."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .probe import ActivationProbe


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


@dataclass
class DensityReport:
    """Density of every MLP activation site, per group and overall (fractions in [0, 1]).

    ``groups`` maps ``"all"`` (decoder-only / encoder-only models) or ``"encoder"`` / ``"decoder"`` to the
    mean density of that group's layers; ``overall`` is the mean over all layers, as the paper reports.
    """

    layers: list[LayerDensity]
    threshold: float = 0.0
    include_padding: bool = False
    groups: dict[str, float] = field(default_factory=dict)
    overall: float = float("nan")

    def __post_init__(self) -> None:
        seen = [l for l in self.layers if l.entries > 0]
        if not self.groups:
            by: dict[str, list[float]] = {}
            for l in seen:
                by.setdefault(l.group, []).append(l.density)
            self.groups = {g: sum(v) / len(v) for g, v in sorted(by.items())}
        if seen and math.isnan(self.overall):
            self.overall = sum(l.density for l in seen) / len(seen)

    @classmethod
    def from_probe(cls, probe: ActivationProbe) -> "DensityReport":
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
        return cls(layers=layers, threshold=probe.threshold, include_padding=probe.include_padding)

    @property
    def union_overall(self) -> float:
        vals = [l.union_density for l in self.layers if l.entries > 0]
        return sum(vals) / len(vals) if vals else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall,
            "groups": dict(self.groups),
            "union_overall": self.union_overall,
            "threshold": self.threshold,
            "include_padding": self.include_padding,
            "layers": [asdict(l) for l in self.layers],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DensityReport":
        return cls(
            layers=[LayerDensity(**l) for l in d["layers"]],
            threshold=d.get("threshold", 0.0),
            include_padding=d.get("include_padding", False),
            groups=dict(d.get("groups", {})),
            overall=d.get("overall", float("nan")),
        )

    def table(self) -> str:
        """A fixed-width table for the terminal (densities in %)."""
        w = max([len(l.name) for l in self.layers] + [5])
        lines = [f"{'layer':<{w}}  {'group':<7}  {'density %':>9}  {'union %':>8}  {'tokens':>8}"]
        for l in self.layers:
            lines.append(
                f"{l.name:<{w}}  {l.group:<7}  {100 * l.density:>9.2f}  {100 * l.union_density:>8.2f}  {l.tokens:>8}"
            )
        for g, v in self.groups.items():
            lines.append(f"{'mean (' + g + ')':<{w}}  {'':<7}  {100 * v:>9.2f}")
        lines.append(f"{'overall':<{w}}  {'':<7}  {100 * self.overall:>9.2f}  {100 * self.union_overall:>8.2f}")
        return "\n".join(lines)


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def measure_density(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    threshold: float = 0.0,
    include_padding: bool = False,
    sites: Iterable[str] | None = None,
    point: str = "auto",
    probe: ActivationProbe | None = None,
) -> DensityReport:
    """Exact density of the MLP activations of ``model`` over ``batches`` (dicts of model inputs).

    Runs under ``torch.no_grad`` in eval mode (the model's mode is restored afterwards). Pass ``probe``
    to reuse an existing one (its counts are reset first).
    """
    probe = probe or ActivationProbe(
        model, sites=sites, point=point, threshold=threshold, include_padding=include_padding  # type: ignore[arg-type]
    )
    probe.reset()
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    attached_here = not probe._handles
    try:
        probe.attach()
        with torch.no_grad():
            for batch in batches:
                model(**_to_device(batch, device))
    finally:
        if attached_here:
            probe.detach()
        model.train(was_training)
    return DensityReport.from_probe(probe)


def density_change(peft: float | DensityReport, deft: float | DensityReport) -> float:
    """Density Change % = (density_PEFT - density_DEFT) / density_PEFT * 100 (positive = sparser)."""
    p = peft.overall if isinstance(peft, DensityReport) else float(peft)
    d = deft.overall if isinstance(deft, DensityReport) else float(deft)
    if not p > 0:
        raise ValueError(f"the PEFT density must be > 0 to compute a relative change, got {p}")
    return (p - d) / p * 100.0
