"""Turn activation sparsity into speed: zero-skipping MLP inference.

::

    deft.sparse.sparsify(model)                        # exact: same outputs, zero units skipped
    t = deft.sparse.calibrate_thresholds(model, batches, target_density=0.3)
    deft.sparse.sparsify(model, mode="threshold", threshold=t)   # TEAL-style magnitude sparsity
    deft.sparse.unsparsify(model)                      # the original modules back

The CUDA kernel (:mod:`deft.sparse.triton_gemv`) is imported only when a CUDA tensor meets it. The CPU
kernel of the per-token path (:mod:`deft.sparse.native`) is compiled on first use where a C++ compiler is
present; without one, torch's ops run.
"""

from __future__ import annotations

from ..core.threshold import (
    ThresholdError,
    apply_thresholds,
    check_thresholds,
    find_thresholds,
    load_thresholds,
)
from . import native
from .api import (
    calibrate_threshold_curve,
    calibrate_thresholds,
    sparse_modules,
    sparse_stats,
    sparsify,
    unsparsify,
)
from .modules import DEFAULT_MAX_DENSITY, SkipStats, SparseDown, SparseGatedMLP

__all__ = [
    "DEFAULT_MAX_DENSITY",
    "SkipStats",
    "SparseDown",
    "SparseGatedMLP",
    "ThresholdError",
    "apply_thresholds",
    "calibrate_threshold_curve",
    "calibrate_thresholds",
    "check_thresholds",
    "find_thresholds",
    "load_thresholds",
    "native",
    "sparse_modules",
    "sparse_stats",
    "sparsify",
    "unsparsify",
]
