"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), implemented in deft.

An adapter is inserted by *wrapping* an existing projection in place: the wrapper takes over the wrapped
module's attribute name on its parent and keeps the original as ``base_layer`` (peft's convention). So a
name pattern anchored at the end (``layer\\.\\d+\\.output\\.dense$``) still finds exactly one module per layer,
and a hook on it still sees the projection's input: the activation probe is unaffected by the adapter.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..arch import MLPSpec, full_match, set_submodule
from .config import MethodError
from .targets import is_linear, linear_out_features


class BottleneckAdapter(nn.Module):
    """``up(act(down(h)))``: hidden -> bottleneck -> hidden, with ``up`` zero-initialised.

    Zero ``up`` makes the adapter output exactly 0 at initialisation, so the adapted model starts as the
    base model (and its activation density starts where the PEFT baseline's does).
    """

    def __init__(self, hidden: int, bottleneck: int, non_linearity: str = "relu") -> None:
        super().__init__()
        if hidden < 1 or bottleneck < 1:
            raise MethodError(f"adapter sizes must be >= 1, got hidden={hidden}, bottleneck={bottleneck}")
        self.down = nn.Linear(hidden, bottleneck)
        self.act = ACT2FN[non_linearity]
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(hidden_states)))


class AdapterWrapper(nn.Module):
    """``y = base_layer(x); return y + adapter(y)`` under the wrapped module's own name."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        return y + self.adapter(y)

    def __getattr__(self, name: str):
        # Model code sometimes reads the projection's attributes (T5 checks `self.wo.weight.dtype`);
        # forward those to the wrapped layer like peft's tuner layers do.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapter"):
                raise
            return getattr(self.base_layer, name)


def insert_adapters(
    model: nn.Module,
    spec: MLPSpec,
    *,
    adapter_type: str,
    reduction_factor: int,
    non_linearity: str,
) -> list[str]:
    """Wrap the MLP down-projections (and, for Houlsby, the attention output projections) with adapters.

    Returns the names of the wrapped modules. Adapters are created on the wrapped layer's device and dtype.
    """
    patterns = [spec.down] + ([spec.attn_out] if adapter_type == "houlsby" else [])
    targets = [
        (n, m)
        for n, m in model.named_modules()
        if any(full_match(p, n) for p in patterns) and not isinstance(m, AdapterWrapper)
    ]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not targets:
        raise MethodError(f"method='adapter' found no module matching {patterns} in model_type {model_type!r}")
    for name, module in targets:
        if not is_linear(module):
            raise MethodError(
                f"method='adapter' expects a Linear at {name!r} (model_type {model_type!r}), "
                f"found {type(module).__name__}"
            )
        hidden = linear_out_features(module)
        adapter = BottleneckAdapter(hidden, max(1, hidden // reduction_factor), non_linearity)
        # a quantized base stores int codes in .weight: the adapter must use its compute dtype
        adapter.to(device=module.weight.device, dtype=getattr(module, "compute_dtype", module.weight.dtype))
        set_submodule(model, name, AdapterWrapper(module, adapter))
    return [n for n, _ in targets]
