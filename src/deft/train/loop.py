"""DEFT in a training loop of your own: :func:`density`.

::

    with deft.density(model, alpha=1.0) as d:
        for batch in loader:
            out = model(**batch)
            loss = out.loss + d.loss()        # alpha * density of the forward just run
            loss.backward()
            opt.step()
            opt.zero_grad()
    print(d.report().table())                 # density over every forward run inside the ``with``

It is the probe and loss :class:`deft.DeftTrainer` uses (:class:`deft.ActivationProbe` +
:class:`deft.DensityLoss`), without a trainer around them: ``d.loss()`` is the same density term
DeftTrainer adds for a gradient-accumulation step of one micro-batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from ..core.probe import ActivationProbe
from ..core.report import DensityReport
from ..errors import ConfigError, DeftError
from .config import DensityConfig

# Options that need a trainer: a step count (alpha_warmup, adaptive's update period), per-step threshold
# updates (target_density) or a second, teacher forward (distill). Their "off" values:
_TRAINER_ONLY: dict[str, Any] = {"alpha_warmup": 0.0, "adaptive": False, "target_density": None, "distill": 0.0}


def _trainer_free(config: DensityConfig) -> DensityConfig:
    """``config`` with the trainer-only options it leaves at DensityConfig's defaults turned off: the defaults
    are the trainers' recipe (thresholds, alpha warm-up), which a plain loop cannot run. An option set to any
    other value is the caller's request: DensityTerm refuses it, naming it."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    off = {k: v for k, v in _TRAINER_ONLY.items() if getattr(config, k) == defaults[k] != v}
    return dataclasses.replace(config, **off) if off else config


class DensityLossError(DeftError, RuntimeError):
    """``loss()`` was asked for before a forward pass with grad recorded anything."""


class DensityTerm:
    """The density term of a plain training loop; see :func:`density`.

    Attributes: ``alpha`` (settable, e.g. for a warm-up of your own: ``d.alpha = cfg.alpha * min(1, step
    / warmup)``), ``probe`` (the :class:`deft.ActivationProbe`), ``config``.
    """

    def __init__(self, model: nn.Module, config: DensityConfig) -> None:
        config = _trainer_free(config)
        for name, off in _TRAINER_ONLY.items():
            if getattr(config, name) != off:
                hint = " (set d.alpha yourself as training goes on)" if name == "alpha_warmup" else ""
                raise ConfigError(
                    f"DensityConfig.{name} needs a trainer (deft.DeftTrainer / deft.DensityMixin); "
                    f"deft.density() does not apply it{hint}"
                )
        self.config = config
        self.model = model
        self.loss_fn = config.make_loss()
        self.probe = ActivationProbe(
            model,
            sites=config.sites,
            point=config.point,
            threshold=config.threshold,
            include_padding=config.include_padding,
        )
        self.alpha = config.alpha
        self.probe.attach()

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 and math.isfinite(value)
        ):
            raise ConfigError(f"alpha must be a finite number >= 0, got {value!r}")
        self._alpha = float(value)
        # alpha = 0: nothing needs the loss partials, so their cost is skipped (the counting goes on)
        self.probe.track(self.loss_fn if self._alpha > 0 else None)

    def loss(self, *, num_tokens: int | float | None = None) -> torch.Tensor:
        """``alpha * density loss`` of the last forward pass run with grad (a 0-dim tensor).

        Token granularity averages over that forward's real tokens. Under gradient accumulation pass
        ``num_tokens``, the real-token count of the whole optimizer step (the sum of ``attention_mask``
        over its micro-batches; decoder-only and encoder-only models): the micro-batch terms then add up
        to the step's mean, as in DeftTrainer. ``feature_map`` granularity is per micro-batch by
        definition and ignores it.
        """
        if self._alpha == 0:
            device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
            return torch.zeros((), device=device)
        if not any(s.partials for s in self.probe.sites):
            raise DensityLossError(
                "deft.density: loss() found no forward pass with grad to take the density of; "
                "run the model with grad enabled, inside the with-block, first"
            )
        return self._alpha * self.loss_fn(self.probe, num_tokens=num_tokens)

    def report(self) -> DensityReport:
        """Exact density over every forward pass since the start (or :meth:`reset`), train and eval alike."""
        return DensityReport.from_probe(self.probe)

    def reset(self) -> None:
        """Forget the counts (e.g. before an evaluation pass whose density you want alone)."""
        self.probe.reset()

    def close(self) -> None:
        """Remove the hooks; :meth:`report` keeps working."""
        self.probe.detach()
        self.probe.track(None)

    def __enter__(self) -> DensityTerm:
        self.probe.attach()
        if self._alpha > 0:
            self.probe.track(self.loss_fn)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DensityTerm(alpha={self._alpha}, kind={self.config.kind!r}, sites={len(self.probe.sites)})"


def density(model: nn.Module, config: DensityConfig | None = None, **overrides: Any) -> DensityTerm:
    """Hook ``model``'s MLP activations and give the density term of a plain training loop.

    ``config`` is a :class:`deft.DensityConfig` (default: its defaults); keyword ``overrides`` change
    single fields, e.g. ``deft.density(model, alpha=2.0, eps=1e-6)``. The options only a trainer can apply
    (``target_density``, ``alpha_warmup``, ``adaptive``, ``distill``) are off here where the config leaves them
    at their defaults (the trainers' recipe), and an error where it sets them. The hooks are attached at once
    and removed when the ``with`` block (or :meth:`DensityTerm.close`) ends.
    """
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(DensityConfig)})
    if unknown:
        raise ConfigError(f"deft.density: DensityConfig has no field(s) {', '.join(unknown)}")
    if config is None:
        config = DensityConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    if not isinstance(config, DensityConfig):
        raise ConfigError(f"deft.density: config must be a deft.DensityConfig, got {type(config).__name__}")
    return DensityTerm(model, config)
