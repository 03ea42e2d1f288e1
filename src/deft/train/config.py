""":class:`DensityConfig`: every density option, its default and its help text in one place.

``deft train`` / ``deft compare`` / ``deft tune`` nest it (``TrainArgs.density``), so each field here is
also a flag (``--alpha``, ``--target-density``; ``kind`` is ``--loss``) whose default and help are these.
It lives apart from the trainers so that reading the option table (``deft --help``) does not import
``transformers.Trainer``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..core.losses import DensityLoss
from ..core.threshold import scheduled_density
from ..errors import ConfigError


@dataclass
class DensityConfig:
    """How DEFT sparsifies. The defaults are the recommended recipe: train under thresholds (``target_density``
    0.05, straight-through gradients), no density loss. ``alpha=0, target_density=None`` is plain PEFT (the
    density is still measured); the paper's exact-zero DEFT is ``alpha=3, target_density=None`` (``deft train
    --preset paper``)."""

    # issue 16: at equal effective density, training under thresholds beats the exact-zero density loss, and the
    # loss adds nothing on top of the thresholds; so the loss is off and the thresholds on by default
    alpha: float = field(default=0.0, metadata={"help": "weight of the density loss (0 = no loss)"})
    kind: Literal["l0", "tanh"] = field(
        default="l0",
        metadata={
            "help": "density surrogate: smooth-l0 x^2/(x^2+eps) (GELU/SiLU) or tanh(beta*|x|) (ReLU)",
            "option": "loss",  # the CLI's and results.json's name for it since before this class held it
        },
    )
    eps: float = field(default=1e-7, metadata={"help": "smooth-l0 eps"})
    beta: float = field(default=10.0, metadata={"help": "tanh slope"})
    granularity: Literal["token", "feature_map"] = field(
        default="token", metadata={"help": "per-token loss (per entry), or the paper's batch feature map"}
    )
    include_padding: bool = field(
        default=False, metadata={"help": "count padded positions in loss and metric (research-code behaviour)"}
    )
    threshold: float = field(
        default=0.0, metadata={"help": "density metric: an activation counts as non-zero when |x| > threshold"}
    )
    point: Literal["auto", "activation", "down_input"] = field(
        default="auto",
        metadata={"help": "hook the activation output or the down-projection input (auto: the latter for gated MLPs)"},
    )
    sites: list[str] | None = field(
        default=None, metadata={"help": "module-name globs of the activations, for model types deft does not know"}
    )
    alpha_warmup: float = field(
        default=0.5,
        metadata={"help": "fraction of training over which alpha ramps linearly from 0 (the task is learnt first)"},
    )
    adaptive: bool = field(
        default=False,
        metadata={"help": "ADA-DEFT: per-layer weights that push the sparsest layers hardest (docs/ada-deft.md)"},
    )
    adaptive_gamma: float = field(default=2.0, metadata={"help": "ADA-DEFT: sharpness of the layer weights"})
    adaptive_mix: float = field(
        default=0.5, metadata={"help": "ADA-DEFT: share of the adaptive part (0 = uniform weights, 1 = fully adaptive)"}
    )
    adaptive_every: int = field(default=10, metadata={"help": "ADA-DEFT: update the weights every N optimizer steps"})
    target_density: float | None = field(
        default=0.05,
        metadata={
            "help": "train under thresholds: mask |h| <= t_layer at every MLP down-projection (W2) input, t_layer "
            "lowered so this share of units stays active (0 or none: off, no masking); the run's adapter then "
            "holds thresholds.json (see deft.core.threshold)"
        },
    )
    density_ramp: float = field(
        default=0.6, metadata={"help": "target-density mode: share of training over which the density goes 1 -> target"}
    )
    density_schedule: Literal["cosine", "linear"] = field(
        default="cosine", metadata={"help": "target-density mode: shape of that ramp"}
    )
    threshold_momentum: float = field(
        default=0.9, metadata={"help": "target-density mode: moving-average factor of the per-layer thresholds"}
    )
    straight_through: bool = field(
        default=True, metadata={"help": "target-density mode: pass gradients through masked units (else they get 0)"}
    )
    distill: float = field(
        default=0.0, metadata={"help": "weight of a KL term to the same model's dense (unmasked) outputs (0 = off)"}
    )
    distill_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of that KL term"})

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        if not 0.0 <= self.alpha_warmup <= 1.0:
            raise ConfigError(f"alpha_warmup must be in [0, 1], got {self.alpha_warmup!r}")
        if not 0.0 <= self.adaptive_mix <= 1.0:
            raise ConfigError(f"adaptive_mix must be in [0, 1], got {self.adaptive_mix!r}")
        if self.adaptive_gamma <= 0 or self.adaptive_every < 1:
            raise ConfigError("adaptive_gamma must be > 0 and adaptive_every >= 1")
        if self.adaptive and not self.alpha > 0:
            # the adaptive layer weights scale the density loss: without one they would silently do nothing
            raise ConfigError("adaptive (ADA-DEFT) weights the density loss per layer: it needs alpha > 0")
        if self.target_density == 0 and not isinstance(self.target_density, bool):
            # "no thresholds" as a number, so that a flag or a search space can switch the default off
            self.target_density = None
        if self.target_density is not None:
            if not (isinstance(self.target_density, (int, float)) and 0.0 < self.target_density <= 1.0):
                raise ConfigError(
                    f"target_density must be in (0, 1], or 0 / None for no thresholds; got {self.target_density!r}"
                )
            if self.point == "activation":
                raise ConfigError("target_density masks the W2 input: use point='auto' or 'down_input'")
            scheduled_density(0.0, self.target_density, self.density_ramp, self.density_schedule)
            if not 0.0 <= self.density_ramp <= 1.0:
                raise ConfigError(f"density_ramp must be in [0, 1], got {self.density_ramp!r}")
            if not 0.0 <= self.threshold_momentum < 1.0:
                raise ConfigError(f"threshold_momentum must be in [0, 1), got {self.threshold_momentum!r}")
        if not (self.distill >= 0 and math.isfinite(self.distill)) or not self.distill_temperature > 0:
            raise ConfigError(
                f"distill must be >= 0 and distill_temperature > 0, got {self.distill!r}, {self.distill_temperature!r}"
            )
        self.make_loss()  # validates kind / eps / beta / granularity

    def make_loss(self) -> DensityLoss:
        return DensityLoss(kind=self.kind, eps=self.eps, beta=self.beta, granularity=self.granularity)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
