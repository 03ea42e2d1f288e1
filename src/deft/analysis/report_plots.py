"""Report figures (matplotlib Agg): accuracy/density trade-off, metric vs effective density of a comparison,
density during training, energy breakdown.

Every function writes the figure twice, ``<stem>.png`` (embedded in the HTML report) and ``<stem>.svg``
(for papers), and returns both paths.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write
from .energy import OPS, EnergyReport
from .plots import pyplot
from .tradeoff import mean_std

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
MARKERS = ("o", "s", "^", "D", "v", "P")
LINESTYLES = ("-", "--", "-.", ":")
OP_COLORS = {
    "mlp_down": "#d62728",
    "mlp_up": "#ff9896",
    "attention_proj": "#1f77b4",
    "attention_matmul": "#aec7e8",
    "other": "#c7c7c7",
}


def _save(fig, stem: str | os.PathLike) -> tuple[Path, Path]:
    stem = Path(stem)
    stem = stem.with_suffix("") if stem.suffix in (".png", ".svg") else stem
    png = atomic_write(stem.with_suffix(".png"), lambda p: fig.savefig(p, format="png", dpi=110))
    svg = atomic_write(stem.with_suffix(".svg"), lambda p: fig.savefig(p, format="svg"))
    pyplot().close(fig)
    return png, svg


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (density, metric) that no other point beats: lower-or-equal density *and*
    higher-or-equal metric, strictly better in one. Sorted by density."""
    front = []
    for i, (d, m) in enumerate(points):
        if any(math.isnan(v) for v in (d, m)):
            continue
        dominated = any(
            (d2 <= d and m2 >= m and (d2 < d or m2 > m))
            for j, (d2, m2) in enumerate(points)
            if j != i and not any(math.isnan(v) for v in (d2, m2))
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def tradeoff(
    series: Mapping[str, Sequence[Mapping[str, Any]]],
    stem: str | os.PathLike,
    *,
    metric_name: str = "metric",
    title: str = "",
) -> tuple[Path, Path]:
    """Metric (%) vs density (%), one marker per setting, labelled with its alpha; the Pareto front over all
    points is drawn as a dashed step line with ringed markers.

    ``series``: label -> list of dicts with ``alpha``, ``density``, ``metric`` (fractions) and optionally
    ``density_std`` / ``metric_std`` (drawn as error bars).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    every: list[tuple[float, float]] = []
    every_x = [100 * p["density"] for pts in series.values() for p in pts]
    every_y = [100 * _num(p.get("metric")) for pts in series.values() for p in pts]
    # labels of points closer than 3 % of the axis span are merged ("α=1, 5"): alphas that all reach
    # density ~0 would otherwise print on top of each other
    tol_x = 0.03 * (_span(every_x) or 1.0)
    tol_y = 0.03 * (_span(every_y) or 1.0)
    for k, (label, pts) in enumerate(series.items()):
        pts = sorted(pts, key=lambda p: p.get("alpha", 0.0))
        xs = [100 * p["density"] for p in pts]
        ys = [100 * _num(p.get("metric")) for p in pts]
        ax.errorbar(
            xs,
            ys,
            xerr=[100 * _num(p.get("density_std"), 0.0) for p in pts],
            yerr=[100 * _num(p.get("metric_std"), 0.0) for p in pts],
            fmt="o-",
            lw=1,
            ms=6,
            color=COLORS[k % len(COLORS)],
            label=label,
            capsize=2,
            alpha=0.9,
        )
        clusters: list[tuple[float, float, list[str]]] = []
        for p, x, y in zip(pts, xs, ys, strict=True):
            if "alpha" not in p or math.isnan(y):
                continue
            near = next((c for c in clusters if abs(c[0] - x) <= tol_x and abs(c[1] - y) <= tol_y), None)
            if near is None:
                clusters.append((x, y, [f"{p['alpha']:g}"]))
            else:
                near[2].append(f"{p['alpha']:g}")
        for x, y, alphas in clusters:
            ax.annotate(
                "α=" + ", ".join(alphas),
                (x, y),
                textcoords="offset points",
                xytext=(6, 6 + 11 * k),
                fontsize=8,
                color="#333333",
            )
        every += list(zip(xs, ys, strict=True))
    front = pareto_front(every)
    if front:
        fx, fy = [every[i][0] for i in front], [every[i][1] for i in front]
        ax.step(fx, fy, where="post", ls="--", color="black", lw=1, label="Pareto front")
        ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="black", lw=1.2, zorder=3)
    ax.set_xlabel("MLP activation density (%)  ← sparser")
    ax.set_ylabel(f"{metric_name} (%)")
    ax.set_title(title or f"{metric_name} vs activation density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, stem)


def iso_accuracy_plot(compare: Mapping[str, Any], stem: str | os.PathLike, *, title: str = "") -> tuple[Path, Path]:
    """Metric (%) vs *effective* density (%) of a ``deft compare`` folder (its compare.json as a dict).

    Each threshold curve (the training-free "PEFT + thresholds" baseline, and any other) is a line of
    mean ± std over seeds; each trained run kind is its seeds (small markers) and their mean ± std (a large
    one). The dense PEFT mean is a solid horizontal line and the iso-accuracy window (``max_drop``
    points below it) is shaded: a setting inside the band at a lower density is the better model. The
    density axis is logarithmic, since the interesting range runs from ~2 % to 100 %.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    iso = compare.get("iso_accuracy", {})
    ref = _num(iso.get("reference"))
    drop = _num(iso.get("max_drop_points"), 0.5)
    if not math.isnan(ref):
        ax.axhspan(100 * ref - drop, 100 * ref, color="#7f7f7f", alpha=0.15, lw=0)
        ref_label = f"dense {iso.get('reference_kind', 'PEFT')} (band: within {drop:g} points)"
        ax.axhline(100 * ref, color="black", lw=1.0, label=ref_label)
    k = 0
    for label, curve in compare.get("threshold_curves", {}).items():
        pts = sorted(curve.get("points", []), key=lambda p: _num(p.get("density_mean")))
        ax.errorbar(
            [100 * _num(p.get("density_mean")) for p in pts],
            [100 * _num(p.get("metric_mean")) for p in pts],
            yerr=[100 * _num(p.get("metric_std"), 0.0) for p in pts],
            fmt=MARKERS[k % len(MARKERS)] + LINESTYLES[k % len(LINESTYLES)],
            color=COLORS[k % len(COLORS)],
            lw=1.2,
            ms=5,
            capsize=2,
            label=label,
        )
        k += 1
    for label, runs in compare.get("runs", {}).items():
        xs = [100 * _num(r.get("density")) for r in runs]
        ys = [100 * _num(r.get("metric")) for r in runs]
        if not xs:
            continue
        color = COLORS[k % len(COLORS)]
        ax.scatter(xs, ys, s=14, color=color, alpha=0.5)
        n = len(xs)
        (mx, _), (my, sy) = mean_std(xs), mean_std(ys)
        ax.errorbar([mx], [my], yerr=[sy], fmt=MARKERS[k % len(MARKERS)], ms=9, color=color, capsize=3)
        ax.plot([], [], MARKERS[k % len(MARKERS)], ms=9, color=color, label=f"{label} ({n} seed{'s' * (n > 1)})")
        k += 1
    ax.set_xscale("log")
    ax.set_xlabel("effective density of the MLP down-projection input (%)  ← sparser")
    ax.set_ylabel(f"{compare.get('summary', {}).get('main_metric', 'metric')} (%)")
    ax.set_title(title or "Metric vs effective density")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, stem)


def density_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]], stem: str | os.PathLike, *, title: str = ""
) -> tuple[Path, Path]:
    """Running train density (%) against the optimizer step, one line per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for k, (label, pts) in enumerate(curves.items()):
        if not pts:
            continue
        xs, ys = zip(*sorted(pts), strict=True)
        # line style and marker vary too, so curves that coincide (two alphas that both reach 0) stay visible
        ax.plot(
            xs,
            [100 * y for y in ys],
            marker=MARKERS[k % len(MARKERS)] if len(xs) < 15 else None,
            ms=4 + 2 * (k % 3),
            lw=1.4,
            ls=LINESTYLES[k % len(LINESTYLES)],
            color=COLORS[k % len(COLORS)],
            label=label,
            alpha=0.85,
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train activation density (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title or "Activation density during training")
    ax.grid(alpha=0.3)
    if len(curves) <= 12:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, stem)


def energy_breakdown(
    reports: Mapping[str, EnergyReport | Mapping[str, Any]], stem: str | os.PathLike, *, title: str = ""
) -> tuple[Path, Path]:
    """Dense and zero-skip energy per example (µJ) of each labelled run, stacked by operation type.

    ``reports``: label -> :meth:`deft.analysis.energy.EnergyReport.to_dict` (or the report itself).
    """
    import numpy as np

    plt = pyplot()
    dicts = {k: (r.to_dict() if hasattr(r, "to_dict") else r) for k, r in reports.items()}
    labels = list(dicts)
    fig, ax = plt.subplots(figsize=(min(9.0, max(5.5, 1.3 * len(labels) + 3.0)), 3.8))
    x = np.arange(len(labels))
    width = 0.38
    for j, (kind, key, hatch) in enumerate((("dense", "dense_pj", ""), ("zero-skip", "zero_skip_pj", "//"))):
        bottom = np.zeros(len(labels))
        for op in OPS:
            vals = np.array(
                [d["by_op"].get(op, {}).get(key, 0.0) / max(1, d.get("examples") or 1) / 1e6 for d in dicts.values()]
            )
            if not vals.any():
                continue
            ax.bar(
                x + (j - 0.5) * width,
                vals,
                width,
                bottom=bottom,
                color=OP_COLORS[op],
                hatch=hatch,
                edgecolor="white",
                lw=0.5,
                label=op if j == 0 else None,
            )
            bottom += vals
        for xi, b, d in zip(x, bottom, dicts.values(), strict=True):
            text = kind if j == 0 else f"{kind}\n×{d['ratio']:.3f}"
            ax.text(xi + (j - 0.5) * width, b, text, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(
        x, labels, fontsize=8, rotation=15 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center"
    )
    ax.set_ylabel("energy per example (µJ)")
    ax.set_title(title or "Energy: dense vs zero-skipping accelerator (hatched)")
    ax.margins(y=0.18)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _save(fig, stem)


def _span(vals: Sequence[float]) -> float:
    vals = [v for v in vals if not math.isnan(v)]
    return max(vals) - min(vals) if vals else 0.0


def _num(v: Any, default: float = float("nan")) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None else default
