"""ADA-DEFT block skipping: replace a (nearly) silent MLP block by its constant output.

If every activation of an MLP is zero, ``down(act(up(x)))`` is just the down-projection's bias (zero if
it has none), whatever ``x`` is. Such a block can be removed: its up/gate projections are replaced by
zero-width stand-ins and its down-projection by :class:`ConstantOutput`, so their weights are freed (a
real memory saving) and their matmuls are not run (a real runtime saving). For a block that is only
*nearly* silent the replacement is an approximation; :func:`choose_skips` picks the blocks to skip on
validation data under a bounded metric drop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..arch import full_match, mlp_spec, model_type, module_weight, set_submodule, unwrap_model
from ..core.report import DensityReport
from ..errors import ConfigError


class ZeroWidth(nn.Module):
    """Stands in for a skipped up/gate projection: returns a (..., 0) tensor, so no matmul runs."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        # transformers code sometimes reads `.weight.dtype` of these projections (T5 does)
        self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], 0)


class ConstantOutput(nn.Module):
    """Stands in for a skipped down-projection: returns its bias (or zeros) broadcast over the tokens."""

    def __init__(self, out_features: int, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features = out_features
        self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        if self.bias is None:
            return x.new_zeros(shape)
        return self.bias.to(x.dtype).expand(shape)


def _out_features(module: nn.Module) -> int:
    for attr in ("out_features", "nf"):  # nf: transformers Conv1D
        n = getattr(module, attr, None)
        if n is not None:
            return int(n)
    base = getattr(module, "base_layer", None)
    if base is not None:
        return _out_features(base)
    raise TypeError(f"cannot tell the output size of {type(module).__name__}")


def _weight(module: nn.Module) -> torch.Tensor:
    return module_weight(getattr(module, "base_layer", module))


def _bias(module: nn.Module) -> torch.Tensor | None:
    base = getattr(module, "base_layer", module)
    return getattr(base, "bias", None)


def _layer_key(name: str) -> str:
    """The part of a module name up to its layer index: 'encoder.layer.3' for '...layer.3.output.dense'."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    return name


@dataclass
class SkipResult:
    skipped: list[str] = field(default_factory=list)  # down-projection names of the skipped blocks
    freed_params: int = 0


def skip_mlp_blocks(
    model: nn.Module, report: DensityReport, threshold: float, *, layers: list[int] | None = None
) -> tuple[nn.Module, SkipResult]:
    """Skip every MLP block whose measured density is <= ``threshold`` (or the given layer indices).

    ``report`` must come from the same model (its layer order is the probe's site order). Returns the
    model (modified in place) and what was skipped; the skipped weights are released.
    """
    top = unwrap_model(model)
    spec = mlp_spec(model_type(top))
    named = dict(top.named_modules())
    downs = [n for n in named if full_match(spec.down, n)]
    if len(downs) != len(report.layers):
        raise ConfigError(
            f"the density report has {len(report.layers)} layers but the model has {len(downs)} MLP blocks: "
            "measure the report on this model"
        )
    chosen = (
        layers if layers is not None else [i for i, layer in enumerate(report.layers) if layer.density <= threshold]
    )
    result = SkipResult()
    for i in chosen:
        down = downs[i]
        key = _layer_key(down)
        dtype = _weight(named[down]).dtype
        for pattern in spec.up:
            for n in [n for n in named if full_match(pattern, n) and _layer_key(n) == key]:
                result.freed_params += sum(p.numel() for p in named[n].parameters())
                set_submodule(top, n, ZeroWidth(dtype))
        const = ConstantOutput(_out_features(named[down]), _bias(named[down]), dtype)
        result.freed_params += sum(p.numel() for p in named[down].parameters()) - sum(
            p.numel() for p in const.parameters()
        )
        set_submodule(top, down, const)
        result.skipped.append(down)
    return model, result


def choose_skips(
    model_factory: Callable[[], nn.Module],
    report: DensityReport,
    evaluate: Callable[[nn.Module], float],
    *,
    max_drop: float,
    baseline: float | None = None,
) -> dict[str, Any]:
    """Greedily skip blocks in order of increasing density while the metric drops by <= ``max_drop``.

    ``model_factory`` returns a fresh copy of the trained model (skipping is destructive); ``evaluate``
    returns the validation metric (higher is better, same units as ``max_drop``).
    """
    base = evaluate(model_factory()) if baseline is None else baseline
    order = sorted(range(len(report.layers)), key=lambda i: report.layers[i].density)
    kept: list[int] = []
    trace = []
    for i in order:
        trial = kept + [i]
        m, _ = skip_mlp_blocks(model_factory(), report, 0.0, layers=trial)
        score = evaluate(m)
        ok = base - score <= max_drop
        trace.append({"layer": i, "density": report.layers[i].density, "metric": score, "accepted": ok})
        if not ok:
            break  # denser blocks are unlikely to be cheaper to drop: stop at the first refusal
        kept = trial
    return {"baseline": base, "skip_layers": kept, "trace": trace}
