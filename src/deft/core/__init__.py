"""The core of deft: the activation probe, the density loss, the density report and the per-layer
thresholds (what ``deft.ActivationProbe``, ``deft.DensityLoss``, ``deft.measure_density`` are)."""
