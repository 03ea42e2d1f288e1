"""Energy of a forward pass on a zero-skipping accelerator, from exact operation and zero counts.

The cost model follows the ASIC simulator of the Sponge examples (Shumailov et al., "Sponge Examples:
Energy-Latency Attacks on Neural Networks", EuroS&P 2021), reused by Cinà et al.'s sponge poisoning and
Lazzaro et al. 2023's energy-aware training: count multiply-accumulates and memory accesses, price each
with a 45 nm per-operation energy, and compare a dense accelerator with one that skips zeros.

Differences from that simulator (it multiplies *global* non-zero fractions into a global MAC count):

* Counts are exact and per layer: a MAC is skipped when its input-activation operand is exactly zero,
  so a Linear on ``N`` tokens with ``nnz`` non-zero inputs runs ``nnz * out_features`` MACs instead of
  ``N * in_features * out_features``.
* Weight fetches are skipped too: row ``i`` of ``W`` (``out_features`` words) is read for a call only if
  input channel ``i`` is non-zero for at least one token of that call (weights are reused across the
  tokens of a batch, so this is the per-batch "union" density the probe also reports).
* Only Linear / transformers Conv1D layers and the two attention matmuls (``QK^T`` and ``AV``) are priced.
  Embedding lookups, norms, activations, softmax, biases and residual additions are not (they are O(tokens
  * hidden), small next to the matmuls). Attention matmul operands (Q, K, softmax probabilities, V) are
  not observed and are priced dense; the score matrix is assumed to stay on chip (fused attention), and
  causal attention is priced as the full T_q x T_k product (a kernel that skips the masked half does ~half).
  Keys include prefix-tuning virtual tokens and cached positions; prompt-tuning tokens count as tokens.
* Each layer writes its own output: W1 writes the dense pre-activation and W2 reads the (sparse) activation.
  An accelerator that fuses the activation into W1 would write the sparse tensor instead; not modelled,
  so the savings reported for sparse MLP activations are, if anything, an underestimate.
* Padded positions are not counted unless ``include_padding=True`` (a runtime that packs sequences does
  not compute them), matching how :func:`deft.measure_density` counts.
* peft LoRA factors are priced unmerged, under the layer they adapt (merge them first for deployment
  numbers: ``model.merge_and_unload()``); deft's bottleneck adapters are priced under ``other``.
* With per-layer thresholds (``estimate_energy(..., thresholds={site: t})``, the model's
  ``thresholds.json``) the model runs thresholded, and a W2 input entry with ``|h| <= t_layer`` counts as
  skipped like a zero: the price of the *effective* density. The exact-zero count is kept beside it.

The default prices (45 nm, 32-bit float), from Horowitz, "Computing's energy problem (and what we can do
about it)", ISSCC 2014, as tabulated e.g. by Han et al. (EIE, ISCA 2016):

* MAC: 3.7 pJ = the fp32 *multiply* (3.7 pJ). The fp32 add costs another 0.9 pJ; the Sponge simulator
  charges 3.7 pJ per "computation" and so do we by default. Set ``mac_pj: 4.6`` to charge multiply + add.
* DRAM: 1950 pJ per 32-bit word access, the value the Sponge simulator uses for every memory access
  (reads and writes alike). Horowitz/Han list 640 pJ per 32-bit DRAM read; set ``dram_pj: 640`` for that.
* SRAM: 5 pJ per 32-bit word (Horowitz/Han: 32-bit read of an 8 KB SRAM). Used only for data placed in
  SRAM (``weights_in`` / ``activations_in``); by default, as in the Sponge simulator, weights and
  activations each cross DRAM once per layer call and on-chip buffers are free.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..arch import (
    MLP_SPECS,
    eval_mode,
    full_match,
    layer_group,
    linear_types,
    model_device,
    module_weight,
    to_device,
    unwrap_model,
)
from ..core.threshold import apply_thresholds, check_thresholds
from ..errors import ConfigError
from ..fields import help_field as _h
from ..io import read_mapping

OPS = ("mlp_down", "mlp_up", "attention_proj", "attention_matmul", "other")
OP_HELP = {
    "mlp_down": "W2, the MLP down-projection: its input is the MLP activation, the sparsity DEFT trains for",
    "mlp_up": "W1 (gate/up projections): input is the dense residual stream",
    "attention_proj": "Q/K/V/output projections of attention",
    "attention_matmul": "QK^T and AV (operands not observed: priced dense)",
    "other": "task head, pooler, bottleneck adapters, anything else linear",
}
MemoryLevel = Literal["dram", "sram"]


@dataclass
class EnergyConfig:
    """Prices of one accelerator (45 nm fp32 defaults; see the module docstring for the sources)."""

    mac_pj: float = _h("energy of one multiply-accumulate in pJ (3.7 = Horowitz fp32 multiply, as Sponge)", default=3.7)
    dram_pj: float = _h("energy of one DRAM word access in pJ (1950 as in the Sponge simulator)", default=1950.0)
    sram_pj: float = _h("energy of one SRAM word access in pJ (5 = Horowitz 32-bit read, 8 KB SRAM)", default=5.0)
    word_bits: int = _h("bits per word: the prices above are per word; used to report bytes", default=32)
    weights_in: MemoryLevel = _h("where weights are fetched from: dram or sram", default="dram")
    activations_in: MemoryLevel = _h("where layer inputs/outputs are read/written: dram or sram", default="dram")
    skip_zero_activations: bool = _h(
        "zero-skipping: a MAC with a zero input activation (and its weight fetch) is skipped", default=True
    )
    compress_activations: bool = _h(
        "activations are stored sparsely: only non-zeros are read/written (no index overhead, as Sponge assumes)",
        default=True,
    )
    skip_zero_weights: bool = _h("also skip zero weights (assumes their zeros spread uniformly)", default=False)
    name: str = _h("label of this hardware in reports", default="45nm fp32 (Horowitz 2014 / Sponge)")

    def __post_init__(self) -> None:
        for k in ("mac_pj", "dram_pj", "sram_pj"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"EnergyConfig.{k} must be a finite number >= 0, got {v!r}")
            setattr(self, k, float(v))
        if not isinstance(self.word_bits, int) or self.word_bits <= 0:
            raise ConfigError(f"EnergyConfig.word_bits must be a positive integer, got {self.word_bits!r}")
        for k in ("weights_in", "activations_in"):
            if getattr(self, k) not in ("dram", "sram"):
                raise ConfigError(f"EnergyConfig.{k} must be 'dram' or 'sram', got {getattr(self, k)!r}")

    def word_pj(self, level: str) -> float:
        return self.dram_pj if level == "dram" else self.sram_pj

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "EnergyConfig") -> EnergyConfig:
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        return cls(**dict(data))

    @classmethod
    def from_file(cls, path: str | Path) -> EnergyConfig:
        """Read a YAML (.yaml/.yml) or JSON file of the fields above; unknown keys are an error."""
        p = Path(path)
        data = read_mapping(p, "hardware config")
        return cls.from_dict(data, source=f"hardware config {p}")


# ---------------------------------------------------------------------------------------------- counts
@dataclass
class LayerEnergy:
    """Hardware-independent counts of one priced operation, summed over every call."""

    name: str
    op: str  # one of OPS
    kind: str = "linear"  # "linear" or "matmul"
    calls: int = 0
    rows: int = 0  # tokens (query tokens for matmuls) processed
    in_features: int = 0
    out_features: int = 0
    macs: int = 0  # dense MACs
    macs_nonzero: int = 0  # MACs whose activation operand is non-zero
    weight_words: int = 0  # weight fetches of a dense accelerator (whole W per call)
    weight_words_needed: int = 0  # weight rows whose input channel is non-zero for >= 1 token of the call
    weight_nonzero_fraction: float = 1.0
    act_in: int = 0  # input activation words read
    act_in_nonzero: int = 0
    act_out: int = 0  # output activation words written
    act_out_nonzero: int = 0
    observed: bool = True  # False: operands not seen (attention matmuls), zero fractions assumed 1
    threshold: float = 0.0  # input entries with |x| <= threshold count as skipped (0: exact zeros only)
    act_in_exact_nonzero: int | None = None  # with a threshold: input entries != 0 before thresholding

    @property
    def input_nonzero_fraction(self) -> float:
        return self.act_in_nonzero / self.act_in if self.act_in else float("nan")

    def energy(self, cfg: EnergyConfig, *, zero_skip: bool) -> dict[str, float]:
        """pJ per component (compute, weights, activations) on a dense or a zero-skipping accelerator."""
        macs, w_words = float(self.macs), float(self.weight_words)
        a_in, a_out = float(self.act_in), float(self.act_out)
        if zero_skip:
            if cfg.skip_zero_activations:
                macs, w_words = float(self.macs_nonzero), float(self.weight_words_needed)
            if cfg.skip_zero_weights:
                macs *= self.weight_nonzero_fraction
                w_words *= self.weight_nonzero_fraction
            if cfg.compress_activations:
                a_in, a_out = float(self.act_in_nonzero), float(self.act_out_nonzero)
        return {
            "compute": macs * cfg.mac_pj,
            "weights": w_words * cfg.word_pj(cfg.weights_in),
            "activations": (a_in + a_out) * cfg.word_pj(cfg.activations_in),
        }

    def total(self, cfg: EnergyConfig, *, zero_skip: bool) -> float:
        return sum(self.energy(cfg, zero_skip=zero_skip).values())


@dataclass
class EnergyReport:
    """Per-layer counts priced with ``config``; change the hardware with :meth:`reprice` (no rerun)."""

    layers: list[LayerEnergy]
    config: EnergyConfig = field(default_factory=EnergyConfig)
    examples: int = 0
    tokens: int = 0
    include_padding: bool = False
    thresholds: dict[str, float] | None = None  # per-layer W2 input thresholds the model ran with

    # -- totals (pJ)
    @property
    def dense_pj(self) -> float:
        return sum(layer.total(self.config, zero_skip=False) for layer in self.layers)

    @property
    def zero_skip_pj(self) -> float:
        return sum(layer.total(self.config, zero_skip=True) for layer in self.layers)

    @property
    def ratio(self) -> float:
        """zero-skip / dense energy (< 1: the sparsity saves energy; the Sponge papers' 'energy ratio')."""
        d = self.dense_pj
        return self.zero_skip_pj / d if d else float("nan")

    def by_op(self) -> dict[str, dict[str, float]]:
        """Per operation type: dense and zero-skip pJ, MACs, and the input non-zero fraction."""
        out: dict[str, dict[str, float]] = {}
        for op in OPS:
            ls = [layer for layer in self.layers if layer.op == op]
            if not ls:
                continue
            a_in = sum(layer.act_in for layer in ls)
            out[op] = {
                "dense_pj": sum(layer.total(self.config, zero_skip=False) for layer in ls),
                "zero_skip_pj": sum(layer.total(self.config, zero_skip=True) for layer in ls),
                "macs": float(sum(layer.macs for layer in ls)),
                "macs_nonzero": float(sum(layer.macs_nonzero for layer in ls)),
                "input_nonzero_fraction": sum(layer.act_in_nonzero for layer in ls) / a_in if a_in else float("nan"),
                "observed": all(layer.observed for layer in ls),
            }
        return out

    def by_component(self, *, zero_skip: bool) -> dict[str, float]:
        tot = {"compute": 0.0, "weights": 0.0, "activations": 0.0}
        for layer in self.layers:
            for k, v in layer.energy(self.config, zero_skip=zero_skip).items():
                tot[k] += v
        return tot

    def reprice(self, config: EnergyConfig) -> EnergyReport:
        return EnergyReport(self.layers, config, self.examples, self.tokens, self.include_padding, self.thresholds)

    def down_input_density(self) -> tuple[float, float] | None:
        """(effective, exact-zero) non-zero fraction of the MLP down-projection inputs, pooled over layers;
        None unless the model ran with per-layer thresholds."""
        ls = [
            layer
            for layer in self.layers
            if layer.op == "mlp_down" and layer.act_in_exact_nonzero is not None and layer.act_in
        ]
        if not self.thresholds or not ls:
            return None
        n = sum(layer.act_in for layer in ls)
        return sum(layer.act_in_nonzero for layer in ls) / n, sum(layer.act_in_exact_nonzero or 0 for layer in ls) / n

    # -- output
    def table(self, *, per_layer: bool = False) -> str:
        """Fixed-width tables: per operation type, then (optionally) per layer. Energies in µJ."""
        c = self.config
        per_ex = (
            f" ({self.dense_pj / self.examples / 1e6:.2f} -> {self.zero_skip_pj / self.examples / 1e6:.2f} "
            "µJ per example)"
            if self.examples
            else ""
        )
        lines = [
            f"Energy on a zero-skipping accelerator: {c.name}; {c.mac_pj:g} pJ/MAC, DRAM {c.dram_pj:g} pJ/word, "
            f"SRAM {c.sram_pj:g} pJ/word; weights in {c.weights_in}, activations in {c.activations_in}",
            f"{self.examples} examples"
            + (f", {self.tokens} tokens" if self.tokens else "")
            + (" (incl. padding)" if self.include_padding else ""),
            "",
            f"{'operation':<17} {'MACs dense':>12} {'MACs run':>12} {'input nz %':>10} {'dense µJ':>11} "
            f"{'0-skip µJ':>11} {'ratio':>6} {'share %':>7}",
        ]
        total_skip = self.zero_skip_pj
        for op, r in self.by_op().items():
            nz = f"{100 * r['input_nonzero_fraction']:10.2f}" if r["observed"] else f"{'n/a':>10}"
            lines.append(
                f"{op:<17} {r['macs']:12.4g} {r['macs_nonzero']:12.4g} {nz} {r['dense_pj'] / 1e6:11.3f} "
                f"{r['zero_skip_pj'] / 1e6:11.3f} {_div(r['zero_skip_pj'], r['dense_pj']):6.3f} "
                f"{100 * _div(r['zero_skip_pj'], total_skip):7.2f}"
            )
        lines.append(
            f"{'total':<17} {sum(layer.macs for layer in self.layers):12.4g} "
            f"{sum(layer.macs_nonzero for layer in self.layers):12.4g} "
            f"{'':>10} {self.dense_pj / 1e6:11.3f} {total_skip / 1e6:11.3f} {self.ratio:6.3f}"
        )
        lines += ["", f"energy ratio (zero-skip / dense): {self.ratio:.4f}{per_ex}"]
        dens = self.down_input_density()
        if dens is not None:
            lines.append(
                f"W2 inputs: effective density {100 * dens[0]:.2f} % (|h| > per-layer threshold, priced as "
                f"skipped), exact-zero density {100 * dens[1]:.2f} %"
            )
        lines += [f"  {op}: {OP_HELP[op]}" for op in self.by_op()]
        if per_layer:
            w = max([len(layer.name) for layer in self.layers] + [5])
            lines += ["", f"{'layer':<{w}} {'operation':<17} {'input nz %':>10} {'dense µJ':>11} {'0-skip µJ':>11}"]
            for layer in self.layers:
                nz = f"{100 * layer.input_nonzero_fraction:10.2f}" if layer.observed else f"{'n/a':>10}"
                lines.append(
                    f"{layer.name:<{w}} {layer.op:<17} {nz} {layer.total(c, zero_skip=False) / 1e6:11.4f} "
                    f"{layer.total(c, zero_skip=True) / 1e6:11.4f}"
                )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense_pj": self.dense_pj,
            "zero_skip_pj": self.zero_skip_pj,
            "ratio": self.ratio,
            "examples": self.examples,
            "tokens": self.tokens,
            "include_padding": self.include_padding,
            "thresholds": dict(self.thresholds) if self.thresholds is not None else None,
            "by_op": self.by_op(),
            "by_component": {
                "dense": self.by_component(zero_skip=False),
                "zero_skip": self.by_component(zero_skip=True),
            },
            "op_help": {op: OP_HELP[op] for op in OPS},
            "config": self.config.to_dict(),
            "layers": [
                {
                    **asdict(layer),
                    "dense_pj": layer.total(self.config, zero_skip=False),
                    "zero_skip_pj": layer.total(self.config, zero_skip=True),
                }
                for layer in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EnergyReport:
        names = {f.name for f in fields(LayerEnergy)}
        return cls(
            layers=[LayerEnergy(**{k: v for k, v in layer.items() if k in names}) for layer in d["layers"]],
            config=EnergyConfig.from_dict(d.get("config", {})),
            examples=d.get("examples", 0),
            tokens=d.get("tokens", 0),
            include_padding=d.get("include_padding", False),
            thresholds=dict(d["thresholds"]) if d.get("thresholds") is not None else None,
        )


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


# ---------------------------------------------------------------------------------------------- counting
# peft keeps the adapted layer as `.base_layer` and adds `.lora_A.<adapter>` / `.lora_B.<adapter>` beside it:
# the op type is the one of the layer they belong to.
_PEFT_SUFFIX = re.compile(r"\.(base_layer|lora_A\.[^.]+|lora_B\.[^.]+)$")
_Q_NAMES = ("query", "q_proj", "q", "q_lin", "Wq")
_FUSED_QKV = ("c_attn", "query_key_value", "qkv", "qkv_proj", "Wqkv")


def _owner(name: str) -> str:
    prev = None
    while prev != name:
        prev, name = name, _PEFT_SUFFIX.sub("", name)
    return name


def _features(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    w = module_weight(m)  # transformers Conv1D stores (in, out)
    return int(w.shape[0]), int(w.shape[1])


def _unwrap_layer(m: nn.Module) -> nn.Module:
    while hasattr(m, "base_layer") and isinstance(m.base_layer, nn.Module):
        m = m.base_layer
    return m


def _qk_width(attn: nn.Module, config: Any) -> int:
    """Width of Q (= heads * head_dim): each query head does one T_k-long dot product of that size."""
    children = dict(attn.named_children())
    for n in _Q_NAMES:
        if n in children:
            return _features(_unwrap_layer(children[n]))[1]
    for n in _FUSED_QKV:
        if n in children:
            return _features(_unwrap_layer(children[n]))[1] // 3
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"cannot tell the query width of attention module {type(attn).__name__}")


def _fit_mask(mask: torch.Tensor, t: int) -> torch.Tensor:
    # prefix tuning prepends virtual tokens to the mask only; prompt tuning to the inputs only (see probe.py)
    if mask.shape[1] > t:
        return mask[:, -t:]
    if mask.shape[1] < t:
        pad = torch.ones(mask.shape[0], t - mask.shape[1], dtype=mask.dtype, device=mask.device)
        return torch.cat([pad, mask], dim=1)
    return mask


def _cached_length(cache: Any, attn: nn.Module) -> int:
    """Key/value positions already in a transformers Cache for this layer (prefix tuning keeps its virtual
    tokens there), 0 when there is none."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder caches: the self-attention half
    try:
        return int(cache.get_seq_length(getattr(attn, "layer_idx", 0) or 0))
    except Exception:  # an exotic cache: price the current tokens only
        return 0


class _Counter:
    """Forward hooks that fill one :class:`LayerEnergy` per Linear / Conv1D and per attention matmul."""

    def __init__(self, model: nn.Module, include_padding: bool, thresholds: Mapping[str, float] | None = None) -> None:
        # the call we see is the one on `model`: peft's prefix tuning calls the backbone of a task model
        # directly, never the unwrapped task model's forward, so the depth and mask hooks go on `model`
        self.outer = model
        self.top = unwrap_model(model)
        self.config = getattr(self.top, "config", None)
        self.enc_dec = bool(getattr(self.config, "is_encoder_decoder", False))
        self.include_padding = include_padding
        self.spec = MLP_SPECS.get(getattr(self.config, "model_type", None) or "")
        self.masks: dict[str, torch.Tensor | None] = {}
        self.depth = 0
        self.examples = 0
        self.tokens = 0
        self.handles: list[Any] = []
        self.layers: dict[str, LayerEnergy] = {}
        # per-layer thresholds by site (owner) name; a LoRA factor or base_layer inherits its owner's
        self.thresholds = {k: float(v) for k, v in (thresholds or {}).items() if v > 0}
        self.exact_nonzero: dict[str, int] = {}
        linears = linear_types()
        named = list(self.top.named_modules())
        self.attn = [(n, m) for n, m in named if self._is_attention_core(m, linears)]
        # outermost only: an attention module wrapping another (BertAttention > BertSelfAttention) has no
        # direct linear children, but a custom one might; count each matmul once
        self.attn = [(n, m) for n, m in self.attn if not any(n.startswith(o + ".") for o, _ in self.attn if o != n)]
        self.linears = [(n, m) for n, m in named if isinstance(m, linears)]

    @staticmethod
    def _is_attention_core(m: nn.Module, linears: tuple) -> bool:
        if "attention" not in type(m).__name__.lower():
            return False
        kids = dict(m.named_children())
        return any(n in kids for n in _Q_NAMES + _FUSED_QKV) and any(
            isinstance(_unwrap_layer(k), linears) for k in kids.values()
        )

    def op_of(self, name: str) -> str:
        owner = _owner(name)
        if ".adapter." in f".{owner}.":
            return "other"  # deft bottleneck adapters sit on a projection's output, not its input
        if self.spec is not None:
            if full_match(self.spec.down, owner):
                return "mlp_down"
            if any(full_match(p, owner) for p in self.spec.up):
                return "mlp_up"
            if full_match(self.spec.attn_out, owner):
                return "attention_proj"
        if any(owner.startswith(a + ".") for a, _ in self.attn):
            return "attention_proj"
        return "other"

    # -- lifecycle
    def attach(self) -> None:
        # forward hooks run in registration order: the top model's post hook goes last, so that a plain
        # nn.Linear passed as the model still counts itself before the depth drops back to 0
        self.handles.append(self.outer.register_forward_pre_hook(self._top_pre, with_kwargs=True))
        attn, linears = dict(self.attn), dict(self.linears)
        for site in self.thresholds:
            # registered before the thresholds are applied: this pre-hook sees the raw input
            self.exact_nonzero[site] = 0
            self.handles.append(self.top.get_submodule(site).register_forward_pre_hook(self._exact_hook(site)))
        for name, m in self.top.named_modules():  # model order, so per-layer tables read top to bottom
            if name in attn:
                for part in ("QK^T", "AV"):
                    self.layers[f"{name}.{part}"] = LayerEnergy(
                        name=f"{name}.{part}", op="attention_matmul", kind="matmul", observed=False
                    )
                self.handles.append(m.register_forward_pre_hook(self._attn_hook(name, m), with_kwargs=True))
            if name in linears:
                self.layers[name] = LayerEnergy(name=name, op=self.op_of(name), kind="linear")
                self.handles.append(m.register_forward_hook(self._linear_hook(name)))
        self.handles.append(self.outer.register_forward_hook(self._top_post, always_call=True))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    # -- masks
    def _top_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.depth == 0:
            self.masks = {"encoder": kwargs.get("attention_mask"), "decoder": kwargs.get("decoder_attention_mask")}
            mask = self.masks["encoder"]
            if torch.is_tensor(mask) and mask.dim() == 2:
                self.examples += int(mask.shape[0])
                self.tokens += mask.numel() if self.include_padding else int(mask.sum())
            else:
                x = kwargs.get("input_ids", kwargs.get("inputs_embeds", kwargs.get("pixel_values")))
                if x is None and args and torch.is_tensor(args[0]):
                    x = args[0]
                if torch.is_tensor(x) and x.dim() >= 1:
                    self.examples += int(x.shape[0])
                    if "input_ids" in kwargs:
                        self.tokens += x.numel()
                    elif x.dim() >= 2 and "pixel_values" not in kwargs:
                        self.tokens += x.numel() // x.shape[-1]  # rows of features
        self.depth += 1

    def _top_post(self, *a: Any) -> None:
        self.depth = max(0, self.depth - 1)

    def _mask(self, name: str) -> torch.Tensor | None:
        if self.include_padding:
            return None
        m = self.masks.get("decoder" if layer_group(name, self.enc_dec) == "decoder" else "encoder")
        return m if torch.is_tensor(m) and m.dim() == 2 else None

    def _valid_rows(self, name: str, lead: tuple[int, ...]) -> torch.Tensor | None:
        """Boolean mask over the flattened leading dims of an activation, or None (all rows count)."""
        m = self._mask(name)
        if m is None:
            return None
        b, t = m.shape
        if len(lead) == 2 and lead[0] == b:
            return _fit_mask(m, lead[1]).reshape(-1).bool()
        if len(lead) == 1 and t > 1 and lead[0] == b * t:  # OPT flattens (batch, seq) before its MLP
            return m.reshape(-1).bool()
        return None  # e.g. the pooler / classifier on one vector per example

    # -- hooks
    def _exact_hook(self, site: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if self.depth == 0 or not args or not torch.is_tensor(args[0]):
                return
            x = args[0].detach()
            rows = self._valid_rows(site, tuple(x.shape[:-1]))
            x2 = x.reshape(-1, x.shape[-1])
            if rows is not None:
                x2 = x2[rows.to(x2.device)]
            self.exact_nonzero[site] += int((x2 != 0).sum())

        return hook

    def _linear_hook(self, name: str):
        rec = self.layers[name]
        owner = _owner(name)
        threshold = self.thresholds.get(owner, 0.0)
        rec.threshold = threshold

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.depth == 0 or not args or not torch.is_tensor(args[0]):
                return
            x = args[0].detach()
            y = output[0] if isinstance(output, tuple) else output
            in_f, out_f = _features(module)
            rows = self._valid_rows(name, tuple(x.shape[:-1]))
            x2 = x.reshape(-1, x.shape[-1])
            y2 = y.detach().reshape(-1, y.shape[-1])
            if rows is not None:
                x2, y2 = x2[rows.to(x2.device)], y2[rows.to(y2.device)]
            # a thresholded entry is skipped like a zero (the model runs masked, so this only restates it)
            nz = x2.abs() > threshold if threshold > 0 else x2 != 0
            nnz = int(nz.sum())
            n = x2.shape[0]
            rec.calls += 1
            rec.rows += n
            rec.in_features, rec.out_features = in_f, out_f
            rec.macs += n * in_f * out_f
            rec.macs_nonzero += nnz * out_f
            rec.weight_words += in_f * out_f
            rec.weight_words_needed += (int(nz.any(dim=0).sum()) if n else 0) * out_f
            rec.act_in += n * in_f
            rec.act_in_nonzero += nnz
            rec.act_out += n * out_f
            rec.act_out_nonzero += int((y2 != 0).sum())
            w = module_weight(module)
            rec.weight_nonzero_fraction = float((w != 0).sum()) / w.numel() if w.numel() else 1.0

        return hook

    def _attn_hook(self, name: str, module: nn.Module):
        qk, av = self.layers[f"{name}.QK^T"], self.layers[f"{name}.AV"]
        width = _qk_width(module, self.config)

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.depth == 0:
                return
            hs = kwargs.get("hidden_states", args[0] if args else None)
            if isinstance(hs, tuple):
                hs = hs[0]
            if not torch.is_tensor(hs) or hs.dim() != 3:
                return
            kv = kwargs.get("key_value_states")
            if kv is None:
                kv = kwargs.get("encoder_hidden_states")
            b, tq = hs.shape[:2]
            q_rows = self._valid_rows(name, (b, tq))
            q_len = q_rows.reshape(b, tq).sum(1) if q_rows is not None else torch.full((b,), tq)
            if torch.is_tensor(kv):
                tk = kv.shape[1]
                enc = self.masks.get("encoder")
                if not self.include_padding and isinstance(enc, torch.Tensor) and tuple(enc.shape) == (b, tk):
                    k_len = enc.sum(1)
                else:
                    k_len = torch.full((b,), tk)
            else:
                k_len = q_len
                mask = self._mask(name)
                cached = _cached_length(kwargs.get("past_key_values", kwargs.get("past_key_value")), mod)
                if mask is not None and mask.shape[0] == b and mask.shape[1] > tq:
                    k_len = mask.sum(1)  # the mask covers cached / virtual (prefix-tuning) positions too
                elif cached:
                    k_len = q_len + cached  # prefix tuning without a longer mask, or cached decoding
            q_len, k_len = q_len.to("cpu").long(), k_len.to("cpu").long()
            pairs = int((q_len * k_len).sum())
            nq, nk = int(q_len.sum()), int(k_len.sum())
            for rec, reads, writes in ((qk, (nq + nk) * width, 0), (av, nk * width, nq * width)):
                rec.calls += 1
                rec.rows += nq
                rec.in_features, rec.out_features = width, width
                rec.macs += pairs * width
                rec.macs_nonzero += pairs * width
                rec.act_in += reads
                rec.act_in_nonzero += reads
                rec.act_out += writes
                rec.act_out_nonzero += writes

        return hook


def estimate_energy(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    cfg: EnergyConfig | None = None,
    *,
    include_padding: bool = False,
    thresholds: Mapping[str, float] | None = None,
) -> EnergyReport:
    """Count MACs, zeros and memory traffic of ``model`` over ``batches`` (dicts of model inputs) and price them.

    Works on any ``nn.Module`` (plain modules get no attention matmuls and every layer is ``other``);
    transformers models of the types in :data:`deft.MLP_SPECS` get their MLP layers labelled. Runs
    under ``torch.no_grad`` in eval mode (the mode is restored). Batches may also be bare tensors.

    ``thresholds`` = ``{site name: t}`` (a model's ``thresholds.json``, names as
    :func:`deft.sparse.calibrate_thresholds` gives them): the model runs with every MLP down-projection
    input ``|h| <= t`` zeroed, and those entries are priced as skipped (the effective density); each
    such layer's exact-zero count is kept in ``act_in_exact_nonzero``.
    """
    cfg = cfg or EnergyConfig()
    masking = None
    if thresholds is not None:
        thresholds = check_thresholds(thresholds, model)
    counter = _Counter(model, include_padding, thresholds)
    device = model_device(model)
    with eval_mode(model):
        counter.attach()
        try:
            if thresholds:
                masking = apply_thresholds(model, thresholds, include_padding=include_padding)
            with torch.no_grad():
                for batch in batches:
                    if torch.is_tensor(batch):
                        model(batch.to(device))
                    else:
                        model(**to_device(batch, device))
        finally:
            if masking is not None:
                masking.detach()
            counter.detach()
    layers = [layer for layer in counter.layers.values() if layer.calls > 0]
    for layer in layers:
        owner = _owner(layer.name)
        if owner in counter.exact_nonzero:
            layer.act_in_exact_nonzero = counter.exact_nonzero[owner]
    return EnergyReport(
        layers=layers,
        config=cfg,
        examples=counter.examples,
        tokens=counter.tokens,
        include_padding=include_padding,
        thresholds=thresholds,
    )
