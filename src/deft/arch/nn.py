"""Small torch / transformers helpers the layers above share, each written once.

The transformers model inside its wrappers, its ``model_type``, the linear layer types (``nn.Linear`` and
transformers' ``Conv1D``), replacing a submodule by name, and running batches in eval mode. transformers is
imported only when a helper needs it: ``import deft`` stays free of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside peft / DDP wrappers (the one that owns ``config``); ``model`` itself
    when it is not wrapped."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
            if inner is model:
                break
            model = inner
        else:
            break
    return model


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """The output embeddings (LM head) of a transformers model; None for a module without them."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type`` (None for a module without a transformers config)."""
    return getattr(getattr(model, "config", None), "model_type", None)


@lru_cache(maxsize=1)
def conv1d_type() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` (GPT-2 style models: a Linear whose weight is stored (in, out)), or None."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it today
        return None
    return Conv1D


def linear_types() -> tuple[type[nn.Module], ...]:
    """The classes of a linear layer: ``nn.Linear`` and transformers' ``Conv1D``."""
    conv1d = conv1d_type()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def is_conv1d(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def module_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as a tensor (to the type checker, an attribute of an nn.Module is a Tensor or a Module)."""
    w = module.weight
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is a {type(w).__name__}, not a tensor")
    return w


def module_bias(module: nn.Module) -> torch.Tensor | None:
    """``module.bias`` as a tensor, None where the layer has none."""
    b = getattr(module, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as (out, in): Conv1D stores it transposed."""
    w = module_weight(module)
    return w.t() if is_conv1d(module) else w


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted, as ``named_modules`` gives it) by ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a module without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with every tensor moved to ``device`` (other values as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; the model's training mode comes back afterwards, also on errors."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def run_batches(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> None:
    """Run ``model`` on every batch (dicts of model inputs, moved to its device) in eval mode, without grad."""
    device = model_device(model)
    with eval_mode(model), torch.no_grad():
        for batch in batches:
            model(**to_device(batch, device))
