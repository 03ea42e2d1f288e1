"""Training with the density loss: :class:`DensityConfig` (every density option, its default and its
help in one place), :class:`DensityMixin` / :class:`DeftTrainer` (:mod:`deft.train.trainer`), the callbacks
of a run (:mod:`deft.train.callbacks`), :func:`density` for a plain training loop (:mod:`deft.train.loop`)
and TRL's trainers (:mod:`deft.train.integrations`, optional: import it yourself).

Importing this package imports ``transformers.Trainer``; ``import deft`` does not.
"""

from __future__ import annotations

from .loop import DensityTerm, density
from .trainer import DeftTrainer, DensityConfig, DensityMixin

__all__ = ["DeftTrainer", "DensityConfig", "DensityMixin", "DensityTerm", "density"]
