"""Differentiable counts of non-zero activations (the DEFT density loss).

Two surrogates of the indicator ``[x != 0]``:

* ``"l0"`` (smooth-l0): ``x^2 / (x^2 + eps)``. 0 at x = 0, close to 1 once ``|x| >> sqrt(eps)``. Works on
  any activation (GELU/SiLU outputs are rarely exactly zero, so this is the default).
* ``"tanh"``: ``tanh(beta * |x|)``, the paper's choice for ReLU outputs (there ``|x| = x``).

Two granularities:

* ``"token"``: the surrogate of every entry of ``O`` (valid tokens x units), averaged per layer, then
  averaged over layers. Decomposes over examples, so it is exact under gradient accumulation and DDP
  when the trainer passes the global token count (``num_tokens``).
* ``"feature_map"``: the paper's equation. ``s_l`` = mean of ``O_l`` over batch and (unpadded)
  sequence, one value per unit; loss = sum over layers and units of surrogate(``s_l``) divided by the
  total number of units ``n``. It is a function of the whole (micro-)batch, so it is defined per
  micro-batch under gradient accumulation, as in the paper's code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .probe import ActivationProbe

Kind = Literal["l0", "tanh"]
Granularity = Literal["token", "feature_map"]


def smooth_l0(x: torch.Tensor, eps: float) -> torch.Tensor:
    x2 = x * x
    return x2 / (x2 + eps)


def tanh_count(x: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.tanh(beta * x.abs())


@dataclass
class DensityLoss:
    """The density term of ``total = task_loss + alpha * density_loss``.

    Args:
        kind: ``"l0"`` (smooth-l0, default for GELU/SiLU) or ``"tanh"`` (for ReLU activations).
        eps: smooth-l0 sharpness; entries with ``|x|`` well above ``sqrt(eps)`` count as ~1.
        beta: tanh slope; entries with ``|x|`` well above ``1/beta`` count as ~1.
        granularity: ``"token"`` (per entry) or ``"feature_map"`` (the paper's batch feature map).
        layer_weights: optional per-site multipliers (a sequence or a tensor, possibly learnable), in
            the probe's site order; default 1 for every site.

    Use: ``probe.track(loss)``, run the model with grad enabled, then ``loss(probe)``.
    """

    kind: Kind = "l0"
    eps: float = 1e-7
    beta: float = 10.0
    granularity: Granularity = "token"
    layer_weights: Sequence[float] | torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("l0", "tanh"):
            raise ConfigError(f"kind must be 'l0' or 'tanh', got {self.kind!r}")
        if self.granularity not in ("token", "feature_map"):
            raise ConfigError(f"granularity must be 'token' or 'feature_map', got {self.granularity!r}")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ConfigError(f"eps must be a number > 0 (e.g. 1e-7), got {self.eps!r}")
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ConfigError(f"beta must be a number > 0 (e.g. 10), got {self.beta!r}")

    def surrogate(self, x: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """The differentiable count; with a ``threshold`` its reach is moved to that threshold.

        Under a masked forward (training with a target density) an entry only costs work when
        ``|x| > t``, so the surrogate should be steep around t rather than around ``sqrt(eps)``:
        smooth-l0 uses ``eps = t^2`` (half a count at ``|x| = t``) and tanh uses ``beta = 1 / t``.
        """
        if threshold is not None and threshold > 0:
            if self.kind == "l0":
                return smooth_l0(x, max(threshold * threshold, self.eps))
            return tanh_count(x, min(1.0 / threshold, self.beta))
        return smooth_l0(x, self.eps) if self.kind == "l0" else tanh_count(x, self.beta)

    # Called inside the probe's hook: turn a full activation into the few numbers the loss needs, so the
    # activation itself is not kept alive by the probe.
    def reduce(
        self, x: torch.Tensor, mask: torch.Tensor | None, threshold: float | None = None
    ) -> tuple[torch.Tensor, int]:
        # float32: eps=1e-7 underflows in fp16 and x^2 of small bf16 values loses all precision
        x = x.float()
        if self.granularity == "token":
            f = self.surrogate(x, threshold)
            if mask is not None:
                f = f * mask.unsqueeze(-1).to(f.dtype)
                n = int(mask.sum()) * x.shape[-1]
            else:
                n = x.numel()
            return f.sum(), n
        x3 = x.reshape(-1, x.shape[-1]) if mask is None else x[mask]
        return x3.sum(dim=0), x3.shape[0]

    def weight_vector(self, n_sites: int, device: torch.device) -> torch.Tensor:
        """The per-site multipliers as a tensor of ``n_sites`` values (ones without ``layer_weights``)."""
        if self.layer_weights is None:
            return torch.ones(n_sites, device=device)
        w = torch.as_tensor(self.layer_weights, dtype=torch.float32, device=device)
        if w.shape != (n_sites,):
            raise ConfigError(f"layer_weights has shape {tuple(w.shape)}, but the probe has {n_sites} sites")
        return w

    def per_layer(self, probe: ActivationProbe, *, num_tokens: int | float | None = None) -> list[torch.Tensor | None]:
        """The loss of each site (None where the site saw nothing), before layer weighting."""
        out: list[torch.Tensor | None] = []
        for site in probe.sites:
            if not site.partials:
                out.append(None)
                continue
            total = sum(p[0] for p in site.partials)
            count = sum(p[1] for p in site.partials)
            if self.granularity == "token":
                # num_tokens: the valid-token count of the whole optimizer step (all micro-batches, all
                # processes); dividing by it makes the sum of micro-batch losses the step's true mean
                denom = num_tokens * site.units if num_tokens is not None else count
                out.append(total / max(float(denom), 1.0))
            else:
                s = total / max(count, 1)
                out.append(self.surrogate(s).sum())
        return out

    def __call__(self, probe: ActivationProbe, *, num_tokens: int | float | None = None) -> torch.Tensor:
        """The density loss of what the probe recorded in the last forward pass."""
        per = self.per_layer(probe, num_tokens=num_tokens)
        seen = [(i, v) for i, v in enumerate(per) if v is not None]
        used = [i for i, _ in seen]
        if not seen:
            raise RuntimeError(
                "the probe recorded no activations with grad: bind this loss with probe.track(loss), "
                "keep the probe attached and run the model's forward with grad enabled first"
            )
        w = self.weight_vector(len(per), seen[0][1].device)
        vals = torch.stack([v * w[i] for i, v in seen])
        if self.granularity == "token":
            return vals.sum() / len(used)
        n_units = sum(probe.sites[i].units for i in used)
        return vals.sum() / n_units
