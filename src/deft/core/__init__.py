"""The core of deft: the activation probe, the density loss, the density report and the per-layer
thresholds (what ``deft.ActivationProbe``, ``deft.DensityLoss`` and ``deft.measure_density`` are).

:mod:`deft.core.probe` hooks the MLP activations, :mod:`deft.core.losses` turns them into the density loss,
:mod:`deft.core.report` counts them into a :class:`DensityReport`, :mod:`deft.core.threshold` holds the
per-layer thresholds (their schedule during training, and the ``thresholds.json`` files a run leaves).
"""

from __future__ import annotations

from .losses import DensityLoss, smooth_l0, tanh_count
from .probe import ActivationProbe, Site
from .report import DensityReport, LayerDensity, count_thresholded, density_change, measure_density
from .threshold import (
    THRESHOLDS_FILE,
    ThresholdError,
    ThresholdTracker,
    apply_thresholds,
    check_thresholds,
    down_site_names,
    find_thresholds,
    load_thresholds,
    read_thresholds,
    save_thresholds,
    scheduled_density,
)

__all__ = [
    "THRESHOLDS_FILE",
    "ActivationProbe",
    "DensityLoss",
    "DensityReport",
    "LayerDensity",
    "Site",
    "ThresholdError",
    "ThresholdTracker",
    "apply_thresholds",
    "check_thresholds",
    "count_thresholded",
    "density_change",
    "down_site_names",
    "find_thresholds",
    "load_thresholds",
    "measure_density",
    "read_thresholds",
    "save_thresholds",
    "scheduled_density",
    "smooth_l0",
    "tanh_count",
]
