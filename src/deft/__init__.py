"""deft: density-efficient fine-tuning.

PEFT (LoRA, adapters, prefix/prompt tuning, IA3, BitFit) plus a density loss that makes the MLP
activations of a transformer sparse, and the tools to measure that sparsity.

Core API::

    probe = deft.ActivationProbe(model)              # hooks every MLP activation
    report = deft.measure_density(model, batches)    # exact density over an eval set
    loss = deft.DensityLoss(kind="l0", eps=1e-7)     # differentiable count of non-zeros
    deft.density_change(peft_report, deft_report)    # the paper's Density Change %
"""

from __future__ import annotations

from . import models  # noqa: F401  (deft.models.minilm_path() etc.)
from .arch import MLP_SPECS, SUPPORTED_MODEL_TYPES, UnsupportedModelError
from .core import ActivationProbe, DensityLoss, DensityReport, LayerDensity, density_change, measure_density
from .errors import ConfigError, DeftError
from .version import __version__  # noqa: F401  (deft.__version__)

__all__ = [
    "ActivationProbe",
    "ConfigError",
    "DeftError",
    "DensityLoss",
    "DensityReport",
    "LayerDensity",
    "MLP_SPECS",
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedModelError",
    "density_change",
    "measure_density",
]


def __getattr__(name: str):
    # Training pieces pull in transformers.Trainer and peft: import them only when asked for.
    if name in ("DeftTrainer", "DensityConfig", "DensityMixin", "density", "DensityTerm"):
        from . import train

        return getattr(train, name)
    if name == "DeftSFTTrainer":  # needs the optional trl: a DeftError naming the extra when it is missing
        from .train import integrations

        return integrations.DeftSFTTrainer
    if name in ("sparsify", "unsparsify", "calibrate_thresholds"):
        from . import sparse

        return getattr(sparse, name)
    if name in ("estimate_energy", "EnergyConfig", "EnergyReport"):
        from .analysis import energy

        return getattr(energy, name)
    raise AttributeError(f"module 'deft' has no attribute {name!r}")
