"""8-bit and 4-bit weight quantization of the frozen base, so DEFT can train LoRA on a compressed model.

Two backends:

* ``bnb`` (CUDA only): bitsandbytes through transformers, applied at *load* time —
  ``from_pretrained(..., **load_kwargs(cfg))``. 4 bits is QLoRA's NF4 config
  (:func:`deft.methods.qlora_quantization_config`, train with ``method="qlora"``); 8 bits is
  ``BitsAndBytesConfig(load_in_8bit=True)``.
* ``deft`` (any device, the CPU path): :class:`QuantizedLinear`, implemented here. ``auto`` picks ``bnb``
  when a CUDA GPU and bitsandbytes are present, else ``deft``.

Why our own module for the CPU path (decision record):

* ``torch.ao.quantization.quantize_dynamic`` still runs in torch 2.13 but warns that it is deprecated and
  scheduled for removal (migrate to torchao); its ``DynamicQuantizedLinear`` is not an ``nn.Linear`` (peft's
  LoRA refuses to wrap it) and is an inference kernel, not meant for backpropagating into earlier LoRA layers.
* torchao (0.18) and optimum-quanto (0.2.7, last release 2025-03) would add a dependency whose versions are
  tied to torch's, for weight-only int8/int4 that is ~100 lines here. They were not installed or tried.
* A weight-only scheme is all LoRA needs: the base is frozen, so only ``y = x @ dequant(W)^T`` and the
  gradient w.r.t. ``x`` are ever computed.

:class:`QuantizedLinear` stores *real* integer codes (int8 per weight for 8 bits, two 4-bit codes packed per
byte for 4 bits) plus float scales, and dequantizes on the fly; its backward recomputes the dequantized
weight instead of keeping it, so training memory holds the codes only. Quantization is symmetric
(``q = round(w / s)``, ``s = absmax / (2^(b-1) - 1)``): per output channel for 8 bits, per group of
``group_size`` input weights for 4 bits (default 64, as QLoRA's block size). Symmetric quantization maps 0
to 0, so a WANDA-pruned layer stays exactly as sparse after quantizing (prune first, then quantize).

It subclasses ``nn.Linear`` (without allocating a float weight) so everything that selects linears — deft's
LoRA targets, peft's LoRA dispatch — keeps working unchanged: peft wraps it with its plain ``lora.Linear``.
Its ``weight`` is the int8 code tensor (a frozen ``nn.Parameter``, like bitsandbytes' ``Int8Params``).
Consequences, by design: peft's default ``merge_and_unload()`` fails loudly (int8 += float), and
``count_parameters`` counts 4-bit layers by their packed storage (half the logical weights). To merge LoRA
into a quantized base, :func:`dequantize_model` first. A model quantized here is a load-time transform:
save the float (or pruned) checkpoint and quantize after loading (it is deterministic).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import module_bias, set_submodule, unwrap_model, weight_out_in
from ..errors import DeftError
from .linears import linear_layers

BACKENDS: tuple[str, ...] = ("auto", "deft", "bnb")
DEFAULT_GROUP_SIZE_4BIT = 64


class QuantError(DeftError, ValueError):
    """A quantization backend cannot run here, or cannot be applied to this model."""


@dataclass
class QuantConfig:
    """Weight-only quantization of the frozen base. Validated on construction."""

    bits: int = field(default=8, metadata={"help": "bits per weight: 8 or 4"})
    group_size: int | None = field(
        default=None,
        metadata={
            "help": "input weights sharing one scale; None = per output channel for 8 bits, "
            f"{DEFAULT_GROUP_SIZE_4BIT} for 4 bits (must be even for 4 bits)"
        },
    )
    backend: str = field(
        default="auto",
        metadata={"help": "auto (bnb on CUDA with bitsandbytes, else deft), deft (any device) or bnb (CUDA)"},
    )
    targets: str = field(
        default="blocks",
        metadata={"help": "which linears (as PruneConfig.targets); embeddings and the task head stay float"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (4, 8):
            raise QuantError(f"bits must be 8 or 4, got {self.bits!r}")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 2):
            raise QuantError(f"group_size must be None or an integer >= 2, got {g!r}")
        if g is not None and self.bits == 4 and g % 2:
            raise QuantError(f"group_size must be even for 4 bits (two codes per byte), got {g!r}")
        if self.backend not in BACKENDS:
            raise QuantError(f"backend={self.backend!r} is not one of {', '.join(BACKENDS)}")

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        from ..methods import qlora_available

        return "bnb" if qlora_available() else "deft"

    def group_for(self, in_features: int) -> int:
        if self.group_size is not None:
            return self.group_size
        if self.bits == 8:
            return in_features  # one group = the whole row (per output channel)
        # narrow layers get one (even-sized) group per row rather than mostly padding
        return min(DEFAULT_GROUP_SIZE_4BIT, in_features + in_features % 2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- kernels
def quantize_weight(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-wise quantization of ``w`` (out, in) -> (int8 codes, scales (out, n_groups)).

    Rows are zero-padded to a multiple of ``group_size``; 4-bit codes are packed two per byte (low nibble
    first), stored as int8 so code that checks ``weight.dtype == torch.int8`` treats it as quantized.
    """
    out_f, in_f = w.shape
    n_groups = math.ceil(in_f / group_size)
    qmax = 2 ** (bits - 1) - 1
    g = F.pad(w.detach().float(), (0, n_groups * group_size - in_f)).reshape(out_f, n_groups, group_size)
    scales = g.abs().amax(dim=-1) / qmax
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group: codes 0, any scale
    codes = torch.round(g / scales.unsqueeze(-1)).clamp_(-qmax, qmax).to(torch.int8).reshape(out_f, -1)
    if bits == 4:
        u = (codes + 8).to(torch.uint8)  # [-7, 7] -> [1, 15]: one nibble each
        codes = (u[:, 0::2] | (u[:, 1::2] << 4)).view(torch.int8)
    return codes.contiguous(), scales.to(w.dtype if w.is_floating_point() else torch.float32)


def dequantize_weight(
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize_weight`: the (out, in) float weight the codes stand for."""
    dtype = dtype or scales.dtype
    out_f, n_groups = scales.shape
    if bits == 4:
        u = codes.view(torch.uint8)
        q = torch.stack((u & 0x0F, u >> 4), dim=-1).reshape(out_f, -1).to(torch.int8) - 8
    else:
        q = codes
    w = q.reshape(out_f, n_groups, group_size).to(dtype) * scales.to(dtype).unsqueeze(-1)
    return w.reshape(out_f, -1)[:, :in_features]


class _DequantMatmul(torch.autograd.Function):
    """``x @ W^T`` with ``W`` dequantized in forward and again in backward, so the float weight is never kept
    for backward (only the codes are): the memory point of a quantized base. No gradient for ``W``: frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantize(grad.dtype), None


class QuantizedLinear(nn.Linear):
    """A frozen linear layer holding int8 / packed int4 codes + scales (see the module docstring)."""

    scales: torch.Tensor  # a buffer

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = 8,
        group_size: int | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate the float weight we replace
        self.in_features, self.out_features = in_features, out_features
        self.bits = bits
        self.group_size = group_size or QuantConfig(bits=bits).group_for(in_features)
        n_groups = math.ceil(in_features / self.group_size)
        cols = n_groups * self.group_size // (2 if bits == 4 else 1)
        self.weight = nn.Parameter(
            torch.zeros(out_features, cols, dtype=torch.int8, device=device), requires_grad=False
        )
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_float(cls, module: nn.Module, bits: int, group_size: int | None = None) -> QuantizedLinear:
        """Quantize an ``nn.Linear`` or transformers ``Conv1D`` (weight (in, out))."""
        w = weight_out_in(module)
        out_f, in_f = w.shape
        group = group_size or QuantConfig(bits=bits).group_for(in_f)
        bias = module_bias(module)
        q = cls(in_f, out_f, bias is not None, bits=bits, group_size=group, device=w.device, dtype=w.dtype)
        codes, scales = quantize_weight(w, bits, group)
        with torch.no_grad():
            q.weight.data = codes
            q.scales.copy_(scales)
            if bias is not None and q.bias is not None:
                q.bias.copy_(bias.detach())
                q.bias.requires_grad_(bias.requires_grad)  # BitFit may train it
        return q

    @property
    def compute_dtype(self) -> torch.dtype:
        """The float dtype the layer computes in (``weight`` is int8). peft reads this attribute (as for
        bitsandbytes' Linear4bit) to give the LoRA matrices the model's dtype."""
        return self.scales.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_weight(self.weight, self.scales, self.bits, self.group_size, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantMatmul.apply(x, self)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def storage_bytes(self) -> int:
        """Bytes of the weight as stored: codes + scales (bias not included)."""
        return self.weight.numel() * self.weight.element_size() + self.scales.numel() * self.scales.element_size()

    def to_float(self) -> nn.Linear:
        """An ``nn.Linear`` holding the dequantized weight (for merging LoRA, exporting)."""
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.scales.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(self.dequantize())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.requires_grad_(False)
        return lin

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )


# ---------------------------------------------------------------------------------------------- models
@dataclass
class QuantReport:
    """What :func:`quantize_model` did: per-layer max |W - dequant(W)| and weight bytes before / after."""

    config: QuantConfig
    backend: str
    layers: dict[str, dict[str, float]]
    bytes_before: int
    bytes_after: int

    @property
    def compression(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    @property
    def max_abs_error(self) -> float:
        errs = [v["max_abs_error"] for v in self.layers.values()]
        return max(errs) if errs else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "backend": self.backend,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "compression": self.compression,
            "max_abs_error": self.max_abs_error,
            "layers": self.layers,
        }


def is_bnb_loaded(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def _require_bnb() -> None:
    from ..methods import qlora_available

    if not qlora_available():
        raise QuantError(
            "backend='bnb' needs a CUDA GPU and bitsandbytes (pip install bitsandbytes); "
            "on this machine use backend='deft' (or 'auto')"
        )


def load_kwargs(cfg: QuantConfig) -> dict[str, Any]:
    """Extra ``from_pretrained`` kwargs for ``cfg``: the bitsandbytes config for backend bnb, else ``{}``."""
    if cfg.resolved_backend() != "bnb":
        return {}
    _require_bnb()
    if cfg.bits == 4:
        from ..methods import qlora_quantization_config

        return {"quantization_config": qlora_quantization_config()}
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: QuantConfig | None = None) -> QuantReport:
    """Quantize the linears of ``model`` that ``cfg.targets`` selects, in place (bare model, before PEFT).

    backend deft: each target becomes a :class:`QuantizedLinear`. backend bnb: the model must already have
    been loaded with ``load_kwargs(cfg)`` (bitsandbytes quantizes while loading); this only reports it.
    """
    cfg = cfg or QuantConfig()
    backend = cfg.resolved_backend()
    if unwrap_model(model) is not model:
        raise QuantError("quantize_model: quantize the bare model before apply_method (got a peft model)")
    if backend == "bnb":
        _require_bnb()
        if not is_bnb_loaded(model):
            raise QuantError(
                "backend='bnb' quantizes while loading: from_pretrained(path, "
                "**deft.compress.quantize.load_kwargs(cfg)); use backend='deft' to quantize a loaded model"
            )
        return _bnb_report(model, cfg)
    targets = linear_layers(model, cfg.targets)
    if not targets:
        raise QuantError(f"targets={cfg.targets!r} selects no Linear/Conv1D layer of this model")
    layers: dict[str, dict[str, float]] = {}
    before = after = 0
    for name, module in targets.items():
        if isinstance(module, QuantizedLinear):
            raise QuantError(f"{name} is already quantized")
        q = QuantizedLinear.from_float(module, cfg.bits, cfg.group_size)
        w = weight_out_in(module)
        b0, b1 = w.numel() * w.element_size(), q.storage_bytes()
        layers[name] = {
            "max_abs_error": float((q.dequantize(torch.float32) - w.float()).abs().max()),
            "bytes_before": b0,
            "bytes_after": b1,
        }
        before, after = before + b0, after + b1
        set_submodule(model, name, q)
    return QuantReport(cfg, backend, layers, before, after)


def _bnb_report(model: nn.Module, cfg: QuantConfig) -> QuantReport:  # pragma: no cover - needs CUDA
    layers: dict[str, dict[str, float]] = {}
    before = after = 0
    for name, module in model.named_modules():
        if type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
            w = module.weight
            logical = module.in_features * module.out_features
            b1 = w.numel() * w.element_size()
            layers[name] = {"max_abs_error": float("nan"), "bytes_before": logical * 2, "bytes_after": b1}
            before, after = before + logical * 2, after + b1  # relative to the bf16 / fp16 checkpoint
    return QuantReport(cfg, "bnb", layers, before, after)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every :class:`QuantizedLinear` (also inside a peft model) by a float ``nn.Linear`` holding its
    dequantized weight, in place; returns ``model``. Then peft's merges work (and re-quantizing is possible)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            set_submodule(model, name, module.to_float())
    return model


# ---------------------------------------------------------------------------------------------- from run options
def quant_config(args: Any) -> QuantConfig | None:
    """The :class:`QuantConfig` of ``args.quantize`` / ``args.quant_backend`` / ``args.quant_group_size``."""
    bits = getattr(args, "quantize", None)
    if bits is None:
        return None
    return QuantConfig(
        bits=bits,
        backend=getattr(args, "quant_backend", "auto") or "auto",
        group_size=getattr(args, "quant_group_size", None),
    )


def compression_load_kwargs(args: Any) -> dict[str, Any]:
    """Extra ``from_pretrained`` kwargs (bitsandbytes quantizes while loading); ``{}`` for the deft backend."""
    cfg = quant_config(args)
    return load_kwargs(cfg) if cfg is not None else {}
