"""Swap the MLP activation of a pretrained model ("relufication"), e.g. GELU -> ReLU before PEFT.

A GELU or SiLU output is exactly zero only far below zero, so a GELU model is dense; replacing the
activation by ReLU and adapting with PEFT (Mirzadeh et al. 2023, "ReLU strikes back") makes half the
units exactly zero from the start, and the tanh surrogate of DEFT then applies as written for ReLU.
The modules are found by name through the architecture table, like the probe's sites.
"""

from __future__ import annotations

from torch import nn

from ..arch import full_match, mlp_spec, model_type, set_submodule, unwrap_model
from ..errors import ConfigError


def swap_activation(model: nn.Module, name: str) -> list[str]:
    """Replace every MLP activation module of ``model`` by transformers' ``name`` activation, in place.

    Returns the swapped module names. Raises ValueError for an unknown activation name or when the
    model has no activation module where the table says it should be.
    """
    from transformers.activations import ACT2CLS, get_activation

    if name not in ACT2CLS:
        raise ConfigError(f"--activation {name!r} is not a transformers activation; choose from {sorted(ACT2CLS)}")
    top = unwrap_model(model)
    kind = model_type(top)
    spec = mlp_spec(kind)
    found = [n for n, m in top.named_modules() if full_match(spec.act, n) and isinstance(m, nn.Module)]
    if not found:
        raise ConfigError(f"no MLP activation module matching {spec.act!r} in this {kind!r} model")
    for n in found:
        set_submodule(top, n, get_activation(name))
    return found
