"""ActivationProbe: forward hooks on every MLP activation site of a model.

A probe does two jobs at once, both inside the hook so no full activation tensor is kept alive twice:

* **Counting** (always, on a detached view): per site, how many entries have ``|x| > threshold`` among
  the valid (non-padding) tokens, how many entries were seen, and the per-batch "union" of units that
  fired for at least one token. These exact counts feed :func:`deft.measure_density` and the running
  train density.
* **Loss partials** (only when a :class:`deft.DensityLoss` is bound with :meth:`track` and grad is
  enabled): the small reduced tensors that loss needs, e.g. the per-layer sum of the surrogate, with
  their autograd graph. The loss itself is assembled later from those partials.
* **Masking** (only after :meth:`mask_below`): entries with ``|x| <= t_site`` are set to zero in the
  forward pass itself, so the model is trained and evaluated under the sparsity it is served with
  (:mod:`deft.core.threshold`). The loss sees the values before masking (else a masked entry would get no
  gradient from it), the counts see them after (the *effective* density).

Hooks only record while the hooked top model's ``forward`` is running. That makes the probe safe
under non-reentrant gradient checkpointing: the layer recomputation during backward calls the hooks
again, outside the top-level forward, and is ignored.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ..arch import UnsupportedModelError, full_match, is_gated, layer_group, mlp_spec, unwrap_model
from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .losses import DensityLoss

Point = Literal["auto", "activation", "down_input"]


@dataclass
class Site:
    """One hooked module and what has been counted at it since the last :meth:`ActivationProbe.reset`."""

    name: str
    module: nn.Module
    group: str
    index: int  # position among all sites, in model order
    capture: Literal["output", "input"]
    # exact counts (python ints / floats: never part of the graph)
    nonzero: int = 0
    entries: int = 0
    tokens: int = 0
    units: int = 0
    union_sum: float = 0.0  # sum over batches of the fraction of units active for >= 1 token
    union_batches: int = 0
    partials: list[Any] = field(default_factory=list)
    threshold: float = 0.0  # counting threshold of this site: |x| > threshold is "non-zero"
    # masking (ActivationProbe.mask_below): entries with |x| <= mask_threshold are zeroed in the forward
    mask_threshold: float | None = None
    batch_quantile: float | None = None  # the last training batch's quantile (see ActivationProbe.target)

    def density(self) -> float:
        return self.nonzero / self.entries if self.entries else float("nan")


class ActivationProbe:
    """Hooks the MLP activation of every layer of a Hugging Face model.

    Args:
        model: any transformers model (bare, with a task head, peft-wrapped or DDP-wrapped).
        sites: optional module-name globs (``fnmatch`` against ``model.named_modules()``), e.g.
            ``["*.mlp.act_fn"]``, for model types that are not in :data:`deft.arch.MLP_SPECS`.
        point: ``"activation"`` hooks the activation module's output ``O = f(X W1)``;
            ``"down_input"`` hooks the input of the down-projection (for gated MLPs that is
            ``f(X Wg) * (X Wu)``, what a zero-skipping W2 sees). ``"auto"``: down-projection input
            for gated MLPs, activation output otherwise.
        threshold: an entry counts as non-zero when ``|x| > threshold`` (0 = exactly non-zero); a mapping
            ``{site name: threshold}`` sets one per site (sites left out count exact non-zeros), e.g.
            the per-layer thresholds of :func:`deft.sparse.calibrate_thresholds` (with
            ``point="down_input"``, whose site names they use): the *effective* density.
        include_padding: count padded positions too (what the paper's research code did).

    Use as a context manager (hooks live inside the ``with``) or call :meth:`attach` / :meth:`detach`.
    The attention mask is read from the model call's ``attention_mask`` (and ``decoder_attention_mask``
    for decoder sites of encoder-decoder models); :meth:`set_mask` overrides it for the next call.

    Example::

        probe = deft.ActivationProbe(model)
        with probe, torch.no_grad():
            model(**batch)
        print(probe.densities())  # {site name: fraction of non-zero entries}
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sites: Iterable[str] | None = None,
        point: Point = "auto",
        threshold: float | Mapping[str, float] = 0.0,
        include_padding: bool = False,
    ) -> None:
        per_site = dict(threshold) if isinstance(threshold, Mapping) else None
        checks: Mapping[str, object] = per_site or {"threshold": threshold}
        for name, v in checks.items():
            if not _valid_threshold(v):
                raise ConfigError(
                    f"threshold{'' if per_site is None else f' of {name}'} must be a number >= 0, got {v!r}"
                )
        if point not in ("auto", "activation", "down_input"):
            raise ConfigError(f"point must be 'auto', 'activation' or 'down_input', got {point!r}")
        self.model = model
        self.top = unwrap_model(model)
        # the scalar threshold (0 when per-site thresholds are given); per-site ones live on the sites
        self.threshold = 0.0 if isinstance(threshold, Mapping) else float(threshold)
        self.include_padding = bool(include_padding)
        self.point = point
        self.sites: list[Site] = self._find_sites(list(sites) if sites is not None else None)
        for s in self.sites:
            s.threshold = self.threshold
        if per_site is not None:
            self._check_names(per_site, "threshold")
            for s in self.sites:
                s.threshold = float(per_site.get(s.name, 0.0))
        self.target: float | None = None  # training: density whose batch quantile each site records
        self._loss: DensityLoss | None = None
        self._handles: list[Any] = []
        self._depth = 0  # >0 while the top model's forward runs
        self._masks: dict[str, torch.Tensor | None] = {}
        self._manual_mask: dict[str, torch.Tensor | None] | None = None

    # ------------------------------------------------------------------ site discovery
    def _find_sites(self, patterns: list[str] | None) -> list[Site]:
        config = getattr(self.top, "config", None)
        enc_dec = bool(getattr(config, "is_encoder_decoder", False))
        named = list(self.top.named_modules())
        if patterns is not None:
            if not patterns:
                raise ConfigError("sites=[] selects nothing; pass module-name globs or None")
            capture: Literal["output", "input"] = "input" if self.point == "down_input" else "output"
            chosen = [(n, m) for n, m in named if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
            if not chosen:
                raise ConfigError(
                    f"sites={patterns!r} matched no module of {type(self.top).__name__}; "
                    "module names look like: " + ", ".join(n for n, _ in named[1:8]) + ", ..."
                )
        else:
            model_type = getattr(config, "model_type", None)
            spec = mlp_spec(model_type)
            gated = is_gated(spec, config)
            use_down = self.point == "down_input" or (self.point == "auto" and gated)
            pattern, capture = (spec.down, "input") if use_down else (spec.act, "output")
            chosen = [(n, m) for n, m in named if full_match(pattern, n)]
            if not chosen:
                raise UnsupportedModelError(
                    f"found no MLP {'down-projection' if use_down else 'activation'} module in this "
                    f"{model_type!r} model ({type(self.top).__name__}) with pattern {pattern!r}; "
                    "this transformers version may name it differently: pass sites=[...] globs"
                )
        return [
            Site(name=n, module=m, group=layer_group(n, enc_dec), index=i, capture=capture)
            for i, (n, m) in enumerate(chosen)
        ]

    @property
    def groups(self) -> list[str]:
        return sorted({s.group for s in self.sites})

    @property
    def thresholds(self) -> dict[str, float] | None:
        """Per-site counting thresholds, or None when every site counts at the scalar ``threshold``."""
        per = {s.name: s.threshold for s in self.sites}
        return per if any(v != self.threshold for v in per.values()) else None

    def _check_names(self, names: Iterable[str], what: str) -> None:
        unknown = sorted(set(names) - {s.name for s in self.sites})
        if unknown:
            raise ConfigError(
                f"{what} names site(s) this {type(self.top).__name__} does not have: {', '.join(unknown)}; "
                f"its sites ({'down-projection inputs' if self.sites[0].capture == 'input' else 'activations'}) "
                f"are: {', '.join(s.name for s in self.sites)}"
            )

    def mask_below(self, thresholds: Mapping[str, float] | None, *, straight_through: bool = False) -> None:
        """Zero every entry with ``|x| <= thresholds[site]`` in the forward pass (None: stop masking).

        Sites left out of the mapping are not masked. The gradient of a masked entry is 0 (the true
        gradient of ``x * [|x| > t]`` for a fixed t), or 1 with ``straight_through=True`` (the
        straight-through estimator: a masked unit still learns where it would help the task).
        """
        if thresholds is None:
            for s in self.sites:
                s.mask_threshold = None
            return
        self._check_names(thresholds, "mask_below")
        for name, v in thresholds.items():
            if not _valid_threshold(v):
                raise ConfigError(f"mask threshold of {name} must be a number >= 0, got {v!r}")
        for s in self.sites:
            t = thresholds.get(s.name)
            s.mask_threshold = None if t is None else float(t)
        self._straight_through = bool(straight_through)

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> ActivationProbe:
        if self._handles:
            return self
        # Both the model as given and the transformers model inside it mark "a forward is running": peft's
        # prefix tuning for classification calls the backbone directly and never the task model's forward,
        # and peft's generate() calls the inner model without the wrapper's forward.
        tops = [self.model] if self.model is self.top else [self.model, self.top]
        for top in tops:
            self._handles.append(top.register_forward_pre_hook(self._top_pre, with_kwargs=True))
            self._handles.append(top.register_forward_hook(self._top_post, always_call=True))
        for site in self.sites:
            if site.capture == "output":
                h = site.module.register_forward_hook(self._make_hook(site, use_input=False))
            else:
                h = site.module.register_forward_pre_hook(self._make_hook(site, use_input=True))
            self._handles.append(h)
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._depth = 0

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place (between :meth:`attach` and :meth:`detach`)."""
        return bool(self._handles)

    def __enter__(self) -> ActivationProbe:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget all counts and loss partials."""
        for s in self.sites:
            s.nonzero = s.entries = s.tokens = s.units = s.union_batches = 0
            s.union_sum = 0.0
            s.partials.clear()

    def track(self, loss: DensityLoss | None) -> ActivationProbe:
        """Bind a density loss: from now on hooks keep the partials it needs (when grad is enabled)."""
        self._loss = loss
        return self

    def set_mask(self, attention_mask: torch.Tensor | None, decoder_attention_mask: torch.Tensor | None = None):
        """Use these masks (1 = real token) instead of the ones passed to the model, until cleared with None."""
        if attention_mask is None and decoder_attention_mask is None:
            self._manual_mask = None
        else:
            self._manual_mask = {"encoder": attention_mask, "decoder": decoder_attention_mask}

    # ------------------------------------------------------------------ hooks
    def _top_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._depth == 0:
            # each top-level forward with grad produces its own loss partials; a no-grad forward records
            # none and keeps the last ones (trainers such as TRL's SFTTrainer run an extra no-grad forward
            # for their metrics between the loss forward and the density loss that reads them)
            if torch.is_grad_enabled():
                for s in self.sites:
                    s.partials.clear()
            if self._manual_mask is not None:
                self._masks = dict(self._manual_mask)
            else:
                self._masks = {
                    "encoder": kwargs.get("attention_mask"),
                    "decoder": kwargs.get("decoder_attention_mask"),
                }
        self._depth += 1

    def _top_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._depth = max(0, self._depth - 1)

    def _mask_for(self, site: Site, x: torch.Tensor) -> torch.Tensor | None:
        """Boolean mask of valid tokens shaped like ``x.shape[:-1]``, or None for "all valid"."""
        if self.include_padding or x.dim() not in (2, 3):
            return None
        mask = self._masks.get("decoder" if site.group == "decoder" else "encoder")
        if mask is None:
            return None
        if mask.dim() != 2:
            raise ValueError(f"attention mask must be (batch, seq), got shape {tuple(mask.shape)} at {site.name}")
        b = mask.shape[0]
        if x.dim() == 3 and x.shape[0] == b:
            t = x.shape[1]
        elif x.dim() == 2 and x.shape[0] % b == 0:
            t = x.shape[0] // b  # OPT flattens (batch, seq) before its MLP
        else:
            raise ValueError(
                f"attention mask of shape {tuple(mask.shape)} does not fit the activations at "
                f"{site.name} of shape {tuple(x.shape)}"
            )
        if mask.shape[1] > t:
            # prefix tuning prepends virtual tokens to the mask, and cached decoding feeds only the newest
            # tokens: in both cases the activations belong to the last t positions of the mask
            mask = mask[:, -t:]
        elif mask.shape[1] < t:
            # prompt tuning prepends virtual tokens to the *inputs* only: they are real positions
            pad = torch.ones(b, t - mask.shape[1], dtype=mask.dtype, device=mask.device)
            mask = torch.cat([pad, mask], dim=1)
        return mask.to(device=x.device).bool().reshape(x.shape[:-1])

    def _make_hook(self, site: Site, use_input: bool):
        # a forward (pre-)hook: None keeps the module's input / output, anything else replaces it
        def hook(module: nn.Module, *args: Any) -> Any:
            x = args[0][0] if use_input else args[1]
            if isinstance(x, tuple):
                x = x[0]
            if not torch.is_tensor(x):
                return
            # outside the top model's forward this is a gradient-checkpoint recomputation (or a direct
            # submodule call): nothing is recorded, but the loss ops still run, because non-reentrant
            # checkpointing demands that recomputation saves exactly the tensors the forward saved
            recording = self._depth > 0
            mask = self._mask_for(site, x)
            if recording and self.target is not None and module.training:
                site.batch_quantile = _batch_quantile(x.detach(), mask, self.target)
            if self._loss is not None and torch.is_grad_enabled() and x.requires_grad:
                # before masking: a masked entry still feels the loss (pushing it further below the
                # threshold makes the masked forward closer to the dense one)
                partial = self._loss.reduce(x, mask, threshold=site.mask_threshold)
                if recording:
                    site.partials.append(partial)
            new = None
            if site.mask_threshold is not None:
                keep = x.abs() > site.mask_threshold
                if getattr(self, "_straight_through", False):
                    new = x + (x * keep - x).detach()  # forward: masked; backward: identity
                else:
                    new = x * keep
                x = new
            if recording:
                self._count(site, x.detach(), mask)
            if new is None:
                return None
            if use_input:
                return (new, *args[0][1:])
            out = args[1]
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return hook

    def _count(self, site: Site, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        units = x.shape[-1]
        active = x.abs() > site.threshold
        if mask is not None:
            active = active & mask.unsqueeze(-1)
            n_tok = int(mask.sum())
        else:
            n_tok = x.numel() // units
        site.nonzero += int(active.sum())
        site.entries += n_tok * units
        site.tokens += n_tok
        site.units = units
        if n_tok:
            # union over every token of the batch: a unit that never fires in the batch is one a batched
            # zero-skipping kernel can slice out of W2
            site.union_sum += float(active.reshape(-1, units).any(dim=0).float().mean())
            site.union_batches += 1

    # ------------------------------------------------------------------ results
    def densities(self) -> dict[str, float]:
        """Per-site fraction of counted entries with ``|x| > threshold``."""
        return {s.name: s.density() for s in self.sites}

    def partials(self) -> list[list[Any]]:
        return [s.partials for s in self.sites]

    def thresholds_in_use(self) -> dict[str, float]:
        """The masking thresholds now applied, by site (sites not masked left out)."""
        return {s.name: s.mask_threshold for s in self.sites if s.mask_threshold is not None}

    def __repr__(self) -> str:
        return (
            f"ActivationProbe({type(self.top).__name__}, {len(self.sites)} sites, "
            f"capture={self.sites[0].capture if self.sites else None}, threshold={self.threshold}, "
            f"include_padding={self.include_padding}, attached={self.attached})"
        )


def _valid_threshold(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and v == v and v != float("inf")


# The per-batch quantile is an estimate anyway: measured on MiniLM / SST-2 batches of 8, the 95th percentile
# of |h| moves 3-7 % from batch to batch, while a 16,384-value strided sample is off by 2.5 % (unbiased;
# the threshold's moving average then smooths both). A full kthvalue over every valid entry of every
# layer at every step cost ~6 % of a training step (benchmarks/bench_train_step.py); the sample, ~2 %.
_QUANTILE_SAMPLE = 1 << 14


def _batch_quantile(x: torch.Tensor, mask: torch.Tensor | None, density: float) -> float:
    """The |x| value with a ``density`` share of the valid entries above it (estimated from a sample)."""
    units = x.shape[-1]
    rows = x.reshape(-1, units)
    valid = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)  # valid token rows
    n = rows.numel() if valid is None else valid.numel() * units
    if n == 0:
        return 0.0
    if n > _QUANTILE_SAMPLE:
        # a strided sample of the valid entries, gathered directly: no abs / copy of the whole tensor first.
        # A stride coprime with the row length visits every unit, not every k-th one
        step = -(-n // _QUANTILE_SAMPLE)
        while math.gcd(step, units) != 1:
            step += 1
        pos = torch.arange(0, n, step, device=x.device)
        r = torch.div(pos, units, rounding_mode="floor")
        v = rows[r if valid is None else valid[r], pos - r * units]
    else:
        v = (rows if valid is None else rows.index_select(0, valid)).reshape(-1)
    v = v.abs().float()
    k = round((1.0 - density) * v.numel())
    return float(torch.kthvalue(v, k).values) if k > 0 else 0.0
