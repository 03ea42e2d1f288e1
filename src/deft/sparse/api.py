"""sparsify / unsparsify / calibrate_thresholds: put the zero-skipping modules into a model and take them out.

Modules are found through the architecture table (:data:`deft.arch.MLP_SPECS`): every module whose
name matches the family's ``down`` pattern is wrapped in a :class:`SparseDown` under the same name, so
``deft.ActivationProbe(point="down_input")`` and ``state_dict`` keep working. Site names (the keys of a
per-layer threshold dict) are the module names relative to the transformers model, as the probe uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from ..arch import (
    eval_mode,
    full_match,
    in_block,
    is_gated,
    linear_types,
    mlp_spec,
    model_type,
    set_submodule,
    to_device,
    unwrap_model,
)
from ..core.probe import ActivationProbe, Site
from ..core.report import measure_density
from ..errors import ConfigError, UnknownNameError
from .modules import Regime, SkipStats, SparseDown, SparseGatedMLP, eligible_gated_mlp

Mode = Literal["exact", "threshold"]
Targets = Literal["down", "all"]


def _down_sites(top: nn.Module) -> list[tuple[str, nn.Module]]:
    spec = mlp_spec(model_type(top))
    found = [(n, m) for n, m in top.named_modules() if full_match(spec.down, n)]
    if not found:
        raise ConfigError(
            f"found no MLP down-projection in this {model_type(top)!r} model "
            f"({type(top).__name__}) with pattern {spec.down!r}"
        )
    return found


def _all_sites(top: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every nn.Linear / Conv1D inside a transformer block: attention q/k/v/o and the whole MLP."""
    kinds = linear_types()
    found = [(n, m) for n, m in top.named_modules() if type(m) in kinds and in_block(n)]
    if not found:
        raise ConfigError(f"found no linear layer inside numbered transformer blocks of this {type(top).__name__}")
    return found


def _sites(top: nn.Module, targets: str) -> list[tuple[str, nn.Module]]:
    if targets == "down":
        return _down_sites(top)
    if targets == "all":
        return _all_sites(top)
    raise ConfigError(f"targets must be 'down' or 'all', got {targets!r}")


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def sparse_modules(model: nn.Module) -> dict[str, SparseDown]:
    """Every :class:`SparseDown` in ``model`` by site name (empty when the model is not sparsified)."""
    top = unwrap_model(model)
    return {n: m for n, m in top.named_modules() if isinstance(m, SparseDown)}


def sparse_stats(model: nn.Module) -> dict[str, SkipStats]:
    """Skip counters per site (only counted for models sparsified with ``track_stats=True``)."""
    return {n: m.stats for n, m in sparse_modules(model).items()}


def sparsify(
    model: nn.Module,
    *,
    mode: Mode = "exact",
    threshold: float | Mapping[str, float] = 0.0,
    regime: Regime = "auto",
    max_density: float | None = None,
    gate_skip: bool = True,
    track_stats: bool = False,
    targets: Targets = "down",
    native: bool = True,
) -> nn.Module:
    """Swap every MLP down-projection of ``model`` for a zero-skipping :class:`SparseDown`, in place.

    Args:
        mode: ``"exact"`` skips units that are exactly zero: same output as the dense model up to float
            reassociation. ``"threshold"`` also skips units with ``|h| <= threshold`` (TEAL-style
            magnitude sparsity; the output changes). See :func:`calibrate_thresholds`.
        threshold: one value for every layer, or ``{site name: value}`` (sites left out stay exact).
        regime: ``"decode"`` gathers the active W2 columns per token, ``"batched"`` slices out units that
            are zero for the whole batch and runs one GEMM, ``"auto"`` picks per call (1 token -> decode;
            on CPU with the compiled kernel, also a batch whose union is too dense to slice: the
            per-token sparsity of a model trained under thresholds).
        max_density: active fraction above which the dense kernel is used (``None``: measured defaults).
        gate_skip: in exact mode, also replace LLaMA-style gated MLPs by :class:`SparseGatedMLP`, which
            skips the W_up rows of units whose gate activation is zero.
        track_stats: count skipped work per layer, read with :func:`sparse_stats` (host sync on GPU).
        targets: ``"down"`` (the MLP down-projections, whose input DEFT sparsifies) or ``"all"``: every
            linear layer inside the transformer blocks (attention q/k/v/o, MLP up/gate/down) skips the
            weight rows of its inactive inputs, TEAL's setting. In threshold mode each needs its own
            threshold (``calibrate_thresholds(..., targets="all")``); ``gate_skip`` does not apply.
        native: run the per-token path on CPU through deft's compiled kernel when a C++ compiler is present
            (:mod:`deft.sparse.native`); False keeps torch's ops (``DEFT_NATIVE=0`` does so everywhere).

    Returns the same model object. Calling it again re-configures (it undoes the previous call first).
    Forward hooks registered on the original down-projections do not carry over.
    """
    if mode not in ("exact", "threshold"):
        raise ConfigError(f"mode must be 'exact' or 'threshold', got {mode!r}")
    if targets not in ("down", "all"):
        raise ConfigError(f"targets must be 'down' or 'all', got {targets!r}")
    top = unwrap_model(model)
    unsparsify(model)
    sites = _sites(top, targets)
    names = [n for n, _ in sites]
    if mode == "exact":
        if (isinstance(threshold, Mapping) and any(threshold.values())) or (
            not isinstance(threshold, Mapping) and threshold != 0
        ):
            raise ConfigError("mode='exact' skips exact zeros only; use mode='threshold' for a non-zero threshold")
        per_site = dict.fromkeys(names, 0.0)
    elif isinstance(threshold, Mapping):
        unknown = sorted(set(threshold) - set(names))
        if unknown:
            raise UnknownNameError(
                f"threshold names no sparsified layer ({targets=}): {unknown}; the sites are: {names}"
            )
        per_site = {n: float(threshold.get(n, 0.0)) for n in names}
    else:
        per_site = dict.fromkeys(names, float(threshold))

    config = getattr(top, "config", None)
    gated = is_gated(mlp_spec(model_type(top)), config)
    for name, module in sites:
        sparse = SparseDown(
            module,
            threshold=per_site[name],
            regime=regime,
            max_density=max_density,
            track_stats=track_stats,
            native=native,
        )
        parent_name, child = _split(name)
        parent = top.get_submodule(parent_name)
        if (
            mode == "exact"
            and gate_skip
            and targets == "down"
            and gated
            and child == "down_proj"
            and eligible_gated_mlp(parent)
        ):
            set_submodule(top, parent_name, SparseGatedMLP(parent, sparse, max_density=max_density))
        else:
            set_submodule(top, name, sparse)
    return model


def unsparsify(model: nn.Module) -> nn.Module:
    """Put the original modules back (the very same objects, holding the current parameters), in place."""
    top = unwrap_model(model)
    # collect first: replacing while iterating named_modules would skip entries
    found = [(n, m) for n, m in top.named_modules() if isinstance(m, (SparseGatedMLP, SparseDown))]
    for name, module in found:
        parent_name, child = _split(name)
        try:
            parent = top.get_submodule(parent_name)
        except AttributeError:
            continue  # a SparseDown inside a SparseGatedMLP replaced earlier in this loop
        if getattr(parent, child, None) is not module:
            continue
        base = module.base_layer
        if isinstance(module, SparseGatedMLP):
            for attr in ("gate_proj", "up_proj", "act_fn"):
                setattr(base, attr, getattr(module, attr))
            down = module.down_proj
            _restore_params(down)
        else:
            _restore_params(module)
        setattr(parent, child, base)
    return model


def _restore_params(sparse: SparseDown) -> None:
    # the wrapper's Parameters are the ones users may have replaced (load_state_dict(assign=True), .to())
    base = sparse.base_layer
    base.weight = sparse.weight
    base.register_parameter("bias", sparse.bias)  # what `base.bias = ...` does, also for None


class _Subsample:
    """A uniform random subsample of every value added to it, at most ``cap`` values (bounded memory)."""

    def __init__(self, cap: int, gen: torch.Generator) -> None:
        self.cap = cap
        self.gen = gen
        self.parts: list[torch.Tensor] = []
        self.keep_every = 1  # each new value is kept with p = 1 / keep_every

    def add(self, v: torch.Tensor) -> None:
        if self.keep_every > 1:
            v = v[torch.rand(v.numel(), generator=self.gen) < 1.0 / self.keep_every]
        self.parts.append(v)
        # past the cap, halve what is stored and the keep rate: every value seen stays equally likely
        while sum(t.numel() for t in self.parts) > self.cap:
            self.parts[:] = [torch.cat([t[torch.rand(t.numel(), generator=self.gen) < 0.5] for t in self.parts])]
            self.keep_every *= 2


class _ValueProbe(ActivationProbe):
    """A down-input probe that also keeps (a random subsample of) the |h| values it counts."""

    def __init__(self, model: nn.Module, *, include_padding: bool, max_values: int, seed: int) -> None:
        super().__init__(model, point="down_input", include_padding=include_padding)
        gen = torch.Generator().manual_seed(seed)
        self.values: dict[str, _Subsample] = {s.name: _Subsample(max_values, gen) for s in self.sites}

    def reset(self) -> None:
        super().reset()
        for v in getattr(self, "values", {}).values():
            v.parts.clear()

    def _count(self, site: Site, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        super()._count(site, x, mask)
        v = x.abs() if mask is None else x.abs()[mask]
        self.values[site.name].add(v.reshape(-1).float().cpu())


def calibrate_thresholds(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    target_density: float,
    *,
    include_padding: bool = False,
    max_values: int = 1 << 24,
    seed: int = 0,
    targets: Targets = "down",
) -> dict[str, float]:
    """Per-layer thresholds that leave ``target_density`` of the down-projection inputs above them.

    Runs ``model`` over ``batches`` (dicts of model inputs; padding excluded via ``attention_mask``) and
    takes, for every site, the ``1 - target_density`` quantile of ``|h|``. Pass the result to
    ``sparsify(model, mode="threshold", threshold=...)``. Works on a dense or sparsified model (the probe
    sees the raw input of the down-projection). When a layer already has more exact zeros than
    ``1 - target_density`` its threshold is 0 and its density stays below the target.
    """
    return calibrate_threshold_curve(
        model,
        batches,
        [target_density],
        include_padding=include_padding,
        max_values=max_values,
        seed=seed,
        targets=targets,
    )[target_density]


def calibrate_threshold_curve(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    target_densities: Iterable[float],
    *,
    include_padding: bool = False,
    max_values: int = 1 << 24,
    seed: int = 0,
    targets: Targets = "down",
) -> dict[float, dict[str, float]]:
    """:func:`calibrate_thresholds` for several target densities from one pass over ``batches``.

    Returns ``{target density: {site name: threshold}}``; each entry equals what
    ``calibrate_thresholds(model, batches, target)`` returns (same values sample, same quantile).
    """
    wanted = list(target_densities)
    for target_density in wanted:
        if not 0.0 < target_density <= 1.0:
            raise ConfigError(f"target_density must be in (0, 1], got {target_density!r}")
    if targets == "all":
        values = _input_values(model, batches, include_padding=include_padding, max_values=max_values, seed=seed)
    elif targets == "down":
        probe = _ValueProbe(model, include_padding=include_padding, max_values=max_values, seed=seed)
        measure_density(model, batches, probe=probe)
        values = probe.values
    else:
        raise ConfigError(f"targets must be 'down' or 'all', got {targets!r}")
    out: dict[float, dict[str, float]] = {d: {} for d in wanted}
    for name, sample in values.items():
        v = torch.cat(sample.parts) if sample.parts else torch.empty(0)
        if v.numel() == 0:
            raise ConfigError(f"no calibration values reached {name}: were the batches empty?")
        for target_density in wanted:
            k = round((1.0 - target_density) * v.numel())  # this many values must be <= the threshold
            out[target_density][name] = float(torch.kthvalue(v, k).values) if k > 0 else 0.0
    return out


def _input_values(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], *, include_padding: bool, max_values: int, seed: int
) -> dict[str, _Subsample]:
    """|input| of every block linear layer (targets="all"), padded positions left out via attention_mask.

    A layer whose input has one row per token of the batch is masked with the batch's attention mask;
    other inputs (a decoder fed decoder_input_ids, say) keep every row.
    """
    top = unwrap_model(model)
    sites = _all_sites(top)
    gen = torch.Generator().manual_seed(seed)
    values = {n: _Subsample(max_values, gen) for n, _ in sites}
    mask: list[torch.Tensor | None] = [None]

    def hook(name: str):
        def fn(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1]).abs().float()
            m = mask[0]
            if m is not None and not include_padding and m.numel() == rows.shape[0]:
                rows = rows[m.reshape(-1).bool().to(rows.device)]
            values[name].add(rows.reshape(-1).cpu())

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in sites]
    try:
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                mask[0] = batch.get("attention_mask")
                model(**to_device(batch, next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return values
