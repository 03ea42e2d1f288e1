"""Training with the density loss: :class:`DensityConfig` (every density option, its default and its
help in one place: :mod:`deft.train.config`), :class:`DensityMixin` / :class:`DeftTrainer`
(:mod:`deft.train.trainer`), the callbacks of a run (:mod:`deft.train.callbacks`), :func:`density` for a
plain training loop (:mod:`deft.train.loop`) and TRL's trainers (:mod:`deft.train.integrations`, optional:
import it yourself).

The trainers import ``transformers.Trainer``: they are loaded on first use, so ``DensityConfig`` (the option
table of ``deft train``) costs nothing more than deft's core; ``import deft`` loads neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import DensityConfig

if TYPE_CHECKING:  # pragma: no cover
    from .loop import DensityTerm, density
    from .trainer import DeftTrainer, DensityMixin

_LAZY = {"DeftTrainer": "trainer", "DensityMixin": "trainer", "DensityTerm": "loop", "density": "loop"}

__all__ = ["DeftTrainer", "DensityConfig", "DensityMixin", "DensityTerm", "density"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
