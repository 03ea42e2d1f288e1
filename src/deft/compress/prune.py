"""WANDA pruning (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"),
and keeping the pruned weights pruned while DEFT trains on top.

WANDA scores every weight by ``S_ij = |W_ij| * ||X_j||_2``, where ``||X_j||_2`` is the L2 norm of input
feature ``j`` over all calibration tokens, and removes the lowest-scoring weights *within each output row*
(not across the layer: the paper shows the per-output comparison matters for LLMs). No weight is updated,
so a pruned model is exactly ``W * mask``: the masks plus the original checkpoint reproduce it.

    report = wanda_prune(model, calib_batches, PruneConfig(sparsity=0.5))   # or nm="2:4"
    save_masks(report.masks, "out/prune_masks.safetensors")
    model = apply_method(model, MethodConfig("lora"), task_type="SEQ_CLS")
    keeper = keep_pruned(model, report.masks)       # base stays pruned through merges
    ... train with DeftTrainer ...
    merged = merge_lora_pruned(model, report.masks)  # LoRA merged, then re-pruned

About LoRA on a pruned base: during training the *base* weights stay sparse (they are frozen), but the
LoRA update ``B @ A`` is dense, so the adapted layer computes ``(W*m + BA) x``. Merging makes it dense
(``W*m + BA``), which is why :func:`merge_lora_pruned` re-applies the mask after merging: the merged model
is ``(W + BA) * m``, i.e. the part of the update that falls on pruned positions is dropped. Its outputs
therefore differ from the unmerged adapter model by ``(BA * (1-m)) x``; measure the merged model if that
is what you deploy. A plain ``peft_model.merge_and_unload()`` writes the dense sum into the base weights;
with :func:`keep_pruned` active, the next forward pass of each layer re-prunes it (so merged outputs and
``merge_lora_pruned`` agree), but the weights in memory stay dense until then: call
:func:`merge_lora_pruned` (or :func:`apply_masks`) before saving.

Calibration, as in the reference implementation, is sequential by default: the inputs of transformer
block ``k`` are collected with blocks ``0..k-1`` already pruned (one calibration pass per block).
Padding tokens are excluded from the norms via the batch's attention mask.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..arch import eval_mode, is_conv1d, model_device, module_weight, to_device, unwrap_model, weight_out_in
from ..errors import ConfigError, MissingFileError
from .linears import COMPRESS_TARGET_SHORTHANDS, linear_layers
from .quantize import QuantizedLinear

MASKS_NAME = "prune_masks.safetensors"


@dataclass
class PruneConfig:
    """How :func:`wanda_prune` prunes. Validated on construction (a bad value raises ``ValueError``)."""

    sparsity: float = field(
        default=0.5,
        metadata={
            "help": "fraction of the weights of each output row to zero, in [0, 1) (unstructured); "
            "ignored when nm is set (then it is 1 - N/M)"
        },
    )
    nm: str | None = field(
        default=None,
        metadata={
            "help": "N:M semi-structured sparsity, e.g. '2:4': in every group of M consecutive input "
            "weights of a row keep the N highest-scoring ones"
        },
    )
    targets: str = field(
        default="blocks",
        metadata={
            "help": "which linears: 'blocks' (every Linear/Conv1D inside the transformer layers), 'mlp', "
            "'attention', 'mlp+attention', 'all-linear', or a comma list of module names / dotted "
            "suffixes; embeddings and the task head are never pruned"
        },
    )
    calib_batches: int = field(default=8, metadata={"help": "calibration batches used (at most) for the norms"})
    sequential: bool = field(
        default=True,
        metadata={
            "help": "calibrate block k on the outputs of the already-pruned blocks 0..k-1 (reference "
            "WANDA); False = one pass on the dense model (faster)"
        },
    )

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise ConfigError(f"sparsity must be a number in [0, 1), got {s!r}")
        self.nm_pair()  # validates nm
        if not isinstance(self.targets, str) or not [t for t in self.targets.split(",") if t.strip()]:
            raise ConfigError(
                f"targets must be one of {', '.join(COMPRESS_TARGET_SHORTHANDS)} or a comma list, got {self.targets!r}"
            )
        c = self.calib_batches
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ConfigError(f"calib_batches must be an integer >= 1, got {c!r}")

    def nm_pair(self) -> tuple[int, int] | None:
        """``(N, M)`` of ``nm``, or None for unstructured pruning."""
        if self.nm is None:
            return None
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(self.nm))
        if not m or not 0 < int(m.group(1)) < int(m.group(2)):
            raise ConfigError(f"nm must look like 'N:M' with 0 < N < M (e.g. '2:4'), got {self.nm!r}")
        return int(m.group(1)), int(m.group(2))

    @property
    def effective_sparsity(self) -> float:
        nm = self.nm_pair()
        return 1.0 - nm[0] / nm[1] if nm else float(self.sparsity)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PruneReport:
    """What :func:`wanda_prune` did. ``masks`` (name -> bool keep-mask, shaped like the module's weight) is
    kept out of :meth:`to_dict`; save it with :func:`save_masks`."""

    config: PruneConfig
    layers: dict[str, float]  # per-layer fraction of exactly-zero weights after pruning
    overall: float  # over all pruned layers, weighted by size
    calib_batches: int
    calib_tokens: int  # non-padding tokens seen by the first block
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "method": "wanda",
            "effective_sparsity": self.config.effective_sparsity,
            "overall": self.overall,
            "layers": dict(self.layers),
            "calib_batches": self.calib_batches,
            "calib_tokens": self.calib_tokens,
        }


# ---------------------------------------------------------------------------------------------- targets
def _block_of(name: str) -> str:
    """The transformer block a layer belongs to (``bert.encoder.layer.3``), or the name itself."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return name


# ---------------------------------------------------------------------------------------------- WANDA
class _NormCollector:
    """Forward pre-hook accumulating sum_t x_tj^2 per input feature over the non-padding tokens."""

    def __init__(self) -> None:
        self.sq: torch.Tensor | None = None
        self.tokens = 0
        self.masks: list[torch.Tensor] = []  # the current batch's attention masks, set by wanda_prune

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if not torch.is_tensor(x):
            return
        x = x.detach()
        if x.dim() >= 3:
            for m in self.masks:
                # the mask applies only where the layer sees (batch, time, features) with the same B, T
                if tuple(m.shape) == tuple(x.shape[:2]):
                    x = x[m.to(x.device).bool()]
                    break
        x = x.reshape(-1, x.shape[-1]).float()
        sq = x.pow(2).sum(0)
        self.sq = sq if self.sq is None else self.sq + sq
        self.tokens += x.shape[0]


def wanda_scores(weight_oi: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` for a weight given as (out, in)."""
    return weight_oi.detach().abs().float() * input_norms.to(weight_oi.device).float().unsqueeze(0)


def wanda_mask(scores: torch.Tensor, cfg: PruneConfig) -> torch.Tensor:
    """Boolean keep-mask (out, in) from WANDA scores: per-row unstructured or N:M."""
    out_f, in_f = scores.shape
    nm = cfg.nm_pair()
    if nm is not None:
        n, m = nm
        if in_f % m:
            raise ConfigError(f"nm='{n}:{m}' needs in_features divisible by {m}, got a layer with {in_f}")
        groups = scores.reshape(out_f, in_f // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
        return keep.reshape(out_f, in_f)
    k = math.floor(in_f * cfg.sparsity + 1e-6)  # the epsilon keeps 0.29 * 100 at 29, not 28
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
    return keep


def _model_inputs(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    # labels would only make the model compute a loss we do not need
    return to_device({k: v for k, v in batch.items() if k != "labels"}, device)


@torch.no_grad()
def wanda_prune(model: nn.Module, batches: Iterable[Mapping[str, Any]], cfg: PruneConfig | None = None) -> PruneReport:
    """Prune ``model`` in place with WANDA on calibration ``batches`` (dicts of model inputs).

    Uses at most ``cfg.calib_batches`` batches. Returns a :class:`PruneReport` with per-layer sparsity and
    the keep-masks. Prune the bare model, before :func:`deft.methods.apply_method` and before quantizing.
    """
    cfg = cfg or PruneConfig()
    if unwrap_model(model) is not model:
        raise ConfigError("wanda_prune: prune the bare model before apply_method (got a peft model)")
    targets = linear_layers(model, cfg.targets)
    if not targets:
        raise ConfigError(f"targets={cfg.targets!r} selects no Linear/Conv1D layer of this model")
    quantized = [n for n, m in targets.items() if isinstance(m, QuantizedLinear)]
    if quantized:
        raise ConfigError(f"wanda_prune: {quantized[0]} is quantized; prune first, then quantize")
    calib = list(itertools.islice(batches, cfg.calib_batches))
    if not calib:
        raise ConfigError("wanda_prune needs at least one calibration batch")
    device = model_device(model)

    # groups of layers pruned together: one transformer block each (or everything at once)
    groups: dict[str, list[str]] = {}
    for name in targets:
        groups.setdefault(_block_of(name) if cfg.sequential else "all", []).append(name)

    masks: dict[str, torch.Tensor] = {}
    first_tokens = 0
    with eval_mode(model):  # no dropout in the calibration activations
        for names in groups.values():
            collectors = {n: _NormCollector() for n in names}
            handles = [targets[n].register_forward_pre_hook(collectors[n], with_kwargs=True) for n in names]
            try:
                for batch in calib:
                    inputs = _model_inputs(batch, device)
                    batch_masks = [
                        inputs[k]
                        for k in ("attention_mask", "decoder_attention_mask")
                        if torch.is_tensor(inputs.get(k))
                    ]
                    for c in collectors.values():
                        c.masks = batch_masks
                    model(**inputs)
            finally:
                for h in handles:
                    h.remove()
            for n in names:
                c, module = collectors[n], targets[n]
                if c.sq is None:
                    raise ConfigError(
                        f"wanda_prune: layer {n} received no calibration input (is it used by "
                        "the forward pass of these batches?)"
                    )
                first_tokens = first_tokens or c.tokens
                keep = wanda_mask(wanda_scores(weight_out_in(module), c.sq.sqrt()), cfg)
                if is_conv1d(module):
                    keep = keep.t()
                keep = keep.contiguous()
                w = module_weight(module)
                w.mul_(keep.to(w.dtype))
                masks[n] = keep.cpu()
    weights = {n: module_weight(m) for n, m in targets.items()}
    layers = {n: _zero_fraction(w) for n, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    overall = sum(layers[n] * w.numel() for n, w in weights.items()) / total
    return PruneReport(cfg, layers, overall, len(calib), first_tokens, masks)


def _zero_fraction(w: torch.Tensor) -> float:
    return float((w == 0).sum()) / w.numel() if w.numel() else 0.0


# ---------------------------------------------------------------------------------------------- masks
def _resolve(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, nn.Module]:
    layers = linear_layers(model, "all-linear")
    missing = [n for n in masks if n not in layers]
    if missing:
        raise ConfigError(
            f"{len(missing)} mask(s) match no layer of this model, e.g. {missing[0]!r}; were they "
            "saved on another architecture?"
        )
    for n, mask in masks.items():
        shape = tuple(_logical_weight_shape(layers[n]))
        if tuple(mask.shape) != shape:
            raise ConfigError(f"mask {n!r} has shape {tuple(mask.shape)}, the layer's weight is {shape}")
    return {n: layers[n] for n in masks}


def _logical_weight_shape(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, QuantizedLinear):  # codes are packed / padded: the logical shape is (out, in)
        return (module.out_features, module.in_features)
    return tuple(module_weight(module).shape)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero the weights outside ``masks`` (name -> bool keep-mask) in place; returns ``model``.

    Applying WANDA masks to the *original* dense model reproduces the pruned model exactly (WANDA never
    changes the kept weights). Quantized layers are checked instead (their codes are read-only here).
    """
    for n, module in _resolve(model, masks).items():
        w = module_weight(module)
        mask = masks[n].to(w.device)
        if isinstance(module, QuantizedLinear):
            if bool((module.dequantize()[~mask] != 0).any()):
                raise ConfigError(
                    f"{n} is quantized with non-zero weights at pruned positions: prune before quantizing"
                )
            continue
        w.mul_(mask.to(w.dtype))
    return model


class MaskKeeper:
    """Forward pre-hooks that re-apply the masks before each pruned layer runs. ``remove()`` detaches them."""

    def __init__(self, handles: list[Any], masks: dict[str, torch.Tensor]) -> None:
        self.handles = handles
        self.masks = masks

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _keep_hook(mask: torch.Tensor):
    cache: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        w = module_weight(module)
        m = cache.get("m")
        if m is None or m.device != w.device or m.dtype != w.dtype:
            m = cache["m"] = mask.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            w.data.mul_(m)  # .data: a frozen base weight, never part of the graph

    return hook


def keep_pruned(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> MaskKeeper:
    """Keep the base weights of ``model`` (bare or peft-wrapped) pruned to ``masks`` from now on.

    Applies the masks now and registers a forward pre-hook on every masked base layer that re-applies its
    mask (one elementwise multiply per call, small next to the matmul). Frozen base weights do not change
    while LoRA trains; the hooks exist for what does change them: peft merges (``merge_adapter``,
    ``merge_and_unload``) and methods that train base parameters. Quantized layers get no hook (their codes
    are frozen and cannot be merged into). Remove the hooks with ``keeper.remove()`` for deployment.
    """
    masks = {n: m.bool() for n, m in masks.items()}
    apply_masks(model, masks)
    handles = [
        module.register_forward_pre_hook(_keep_hook(masks[n]))
        for n, module in _resolve(model, masks).items()
        if not isinstance(module, QuantizedLinear)
    ]
    return MaskKeeper(handles, masks)


def merge_lora_pruned(peft_model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """``merge_and_unload()`` the LoRA adapters into the base, then re-apply ``masks``; returns the merged model.

    The merged delta is pruned too: the result is ``(W + BA) * mask``, so its outputs differ from the
    unmerged adapter model by ``(BA * (1 - mask)) x`` (see the module docstring). A quantized base cannot be
    merged into: :func:`deft.compress.quantize.dequantize_model` it first.
    """
    merge_and_unload = getattr(peft_model, "merge_and_unload", None)
    if not callable(merge_and_unload):
        raise ConfigError("merge_lora_pruned expects a peft model (with merge_and_unload)")
    if any(isinstance(m, QuantizedLinear) for m in peft_model.modules()):
        raise ConfigError("merge_lora_pruned: the base is quantized; dequantize_model() it before merging")
    merged = merge_and_unload()
    return apply_masks(merged, masks)


def save_masks(masks: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write masks (name -> bool keep-mask) to a safetensors file (no pickle); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: m.detach().bool().cpu().contiguous() for n, m in masks.items()}
    save_file(
        tensors, str(path), metadata={"format": "deft-prune-masks", **{k: str(v) for k, v in (metadata or {}).items()}}
    )
    return path


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Masks written by :func:`save_masks` (a folder means ``folder/prune_masks.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        path = path / MASKS_NAME
    if not path.is_file():
        raise MissingFileError(f"no prune masks at {path} (written by `deft prune` / save_masks)")
    return {n: t.bool() for n, t in load_file(str(path)).items()}


# ---------------------------------------------------------------------------------------------- sparsity
def weight_sparsity(model: nn.Module, targets: str = "blocks") -> dict[str, Any]:
    """Fraction of exactly-zero weights: ``{"overall": f, "layers": {name: f}, "zeros": z, "weights": n}``.

    Over the linears ``targets`` selects (default: inside the transformer blocks), on a bare, peft-wrapped or
    quantized model (a quantized layer counts its dequantized zeros). The overall fraction is weighted by
    layer size. LoRA matrices are not counted: they are the dense update, not the base.
    """
    layers: dict[str, float] = {}
    zeros = total = 0
    with torch.no_grad():
        for name, module in linear_layers(model, targets).items():
            w = module.dequantize() if isinstance(module, QuantizedLinear) else module_weight(module)
            z = int((w == 0).sum())
            layers[name] = z / w.numel()
            zeros += z
            total += w.numel()
    return {"overall": zeros / total if total else float("nan"), "layers": layers, "zeros": zeros, "weights": total}
