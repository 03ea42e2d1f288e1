"""Matplotlib figures (Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..core.report import DensityReport
from ..io import atomic_write


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layerwise_density(
    runs: Mapping[str, Sequence[DensityReport] | DensityReport], path: str | os.PathLike, title: str = ""
) -> Path:
    """Per-layer density (%) of each labelled run, as in the paper's Fig. 2; several reports = mean ± std."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(runs))
    names: list[str] = []
    for k, (label, reps) in enumerate(runs.items()):
        reps = [reps] if isinstance(reps, DensityReport) else list(reps)
        arr = np.array([[100 * layer.density for layer in r.layers] for r in reps])
        names = [layer.name for layer in reps[0].layers]
        x = np.arange(arr.shape[1]) + (k - (len(runs) - 1) / 2) * width
        ax.bar(x, arr.mean(0), width, yerr=arr.std(0) if len(reps) > 1 else None, label=label, capsize=2)
    groups = [n.split(".")[0] if "coder" in n.split(".")[0] else "" for n in names]
    ax.set_xticks(range(len(names)), [f"{g[:3]}{i}" if g else str(i) for i, g in enumerate(groups)])
    ax.set_xlabel("MLP layer")
    ax.set_ylabel("activation density (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title or "Layerwise activation density")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)  # outside: bars reach 100 %
    fig.tight_layout()
    suffix = Path(path).suffix or ".png"
    out = atomic_write(path, lambda p: fig.savefig(p, format=suffix.lstrip("."), dpi=120))
    plt.close(fig)
    return out
