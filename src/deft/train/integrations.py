"""DEFT with TRL: ``deft.DeftSFTTrainer`` = :class:`deft.DensityMixin` + ``trl.SFTTrainer``.

TRL is an optional extra (``pip install 'deft-sparsity[trl]'``); importing this module without it raises
:class:`deft.errors.MissingExtraError`. Any other TRL trainer takes the mixin the same way::

    class DeftDPO(deft.DensityMixin, trl.DPOTrainer): ...
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from ..errors import MissingExtraError
from .trainer import DensityMixin


def require_trl() -> ModuleType:
    """The ``trl`` module, or a :class:`MissingExtraError` that says how to install it."""
    try:
        return importlib.import_module("trl")
    except ImportError as e:
        raise MissingExtraError(
            f"this needs TRL, which is not installed ({e}): pip install 'deft-sparsity[trl]'"
        ) from e


if TYPE_CHECKING:
    from trl import SFTTrainer as _SFTTrainer
else:
    _SFTTrainer = require_trl().SFTTrainer


class DeftSFTTrainer(DensityMixin, _SFTTrainer):
    """``trl.SFTTrainer`` + the density loss and metrics; extra keyword ``density`` (:class:`deft.DensityConfig`).

    The task loss is SFTTrainer's own (completion-only, packed, DFT, ...), ``alpha * density`` is added on
    top, normalised over the optimizer step: see :class:`deft.DensityMixin`.
    """
