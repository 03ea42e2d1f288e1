"""Zero-skipping drop-in replacements for an MLP's down-projection (and, for gated MLPs, the whole MLP).

Why the down-projection: its input ``h`` (the activation output, or ``act(gate) * up`` for gated MLPs) is
the tensor whose zeros DEFT creates. A column of W2 that meets a zero of ``h`` contributes nothing, so it
never has to be read. Two ways to exploit that:

* **per-token** (decode, batch 1): every token reads only the W2 columns of its own non-zero units. On
  CPU this is deft's compiled kernel (:mod:`deft.sparse.native`: threshold, compaction and gather in one
  pass over each token) or, without a C++ compiler, one ``F.embedding_bag`` over the transposed weight
  ``W2^T`` (in, out): a fused gather + weighted sum of the active rows, with no per-call copy of the weight.
  On CUDA (fp16/bf16, one token) a Triton split-K kernel (:mod:`deft.sparse.triton_gemv`) does the same
  without a host sync.
* **union** (prefill / batched): units that are zero for *every* token of the batch are sliced out of W2
  and the rest is one dense GEMM. This only helps when whole units are dead across the batch.

Both return the dense result up to float reassociation (exact mode) or the dense result of the
magnitude-thresholded input (threshold mode, TEAL-style). Above ``max_density`` active units the dense
kernel is used instead, because gathering then costs more than it saves.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import conv1d_type, module_bias, module_weight, weight_out_in
from ..errors import ConfigError
from . import native as native_kernel

Regime = Literal["auto", "decode", "batched"]

# Active fraction above which the dense kernel is faster than the sparse one, measured with
# benchmarks/bench_mlp.py on a 2-core CPU (numbers in benchmarks/README.md) and kept a little below the
# break-even points: the per-token gather breaks even at ~40-50 % density; the union GEMM at ~80-90 % for
# prefill-sized batches (>= 512 tokens), but at only ~30 % for a few tokens, where copying the active
# W2 columns costs as much as the memory-bound GEMM itself. GPUs will differ: pass max_density there.
DEFAULT_MAX_DENSITY = {"per_token": 0.35, "union": 0.7, "union_few_tokens": 0.3}
FEW_TOKENS = 64
# CUDA, one token: the Triton op costs ~10 us of fixed work (three small kernels) before it saves any
# bytes. Measured on an H100 (benchmarks/README.md): SmolLM2's 1536x576 W2 (0.9 M weights, 4.9 us dense)
# never wins; LLaMA-7B's 11008x4096 W2 (45 M) wins below ~43 % density. Smaller weights stay on cuBLAS
# unless max_density is given explicitly. The density itself is not checked on CUDA (that needs a sync).
CUDA_MIN_WEIGHTS = 1 << 24  # 16.8 M weights: a 4096 x 4096 projection and up
# an integer dtype of the same width, to find non-zero floats by their bits (see SparseDown._per_token)
_SAME_SIZE_INT = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}


@dataclass
class SkipStats:
    """Work counted in (token, unit) pairs of the down-projection: ``skipped`` of them never touched W2."""

    calls: int = 0
    tokens: int = 0
    units_total: int = 0
    units_skipped: int = 0
    dense_calls: int = 0  # calls that fell back to the dense kernel (too many active units)

    @property
    def skip_fraction(self) -> float:
        return self.units_skipped / self.units_total if self.units_total else 0.0


@lru_cache(maxsize=1)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # the Triton op has no backward: gradients through the layer take the differentiable torch path
    needs_grad = torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and not needs_grad and _has_triton()


class SparseDown(nn.Module):
    """Wraps an ``nn.Linear`` or transformers ``Conv1D`` down-projection with a zero-skipping forward.

    The wrapped module's ``weight`` and ``bias`` Parameters are *shared* (registered here under the same
    names), so ``state_dict`` keys, parameter counts and optimiser state are unchanged. The original
    module is kept as the plain attribute ``base_layer`` rather than as a submodule: registering it would
    list every parameter twice and rename the state-dict keys. :func:`deft.sparse.unsparsify` puts it back.

    Args:
        base: the dense down-projection.
        threshold: units with ``|h| <= threshold`` are skipped; 0 skips exact zeros only (exact mode).
        regime: ``"decode"`` always gathers per token, ``"batched"`` always uses the union of the batch,
            ``"auto"`` gathers per token for a single token and uses the union otherwise; on CPU with the
            compiled kernel, a union too dense to slice is served per token instead of by the dense GEMM.
        max_density: active fraction above which the dense kernel runs instead (``None``: the measured
            defaults in :data:`DEFAULT_MAX_DENSITY`, and on CUDA the dense kernel for one token when the
            weight has fewer than :data:`CUDA_MIN_WEIGHTS` entries; 1.0 forces the sparse kernel).
        track_stats: count skipped work in :attr:`stats` (costs a host sync per call on GPU).
        native: on CPU (fp32/fp64, no autograd), run the per-token path through deft's fused C++ kernel
            (:mod:`deft.sparse.native`, compiled on first use when a C++ compiler is present; otherwise, or
            with ``DEFT_NATIVE=0``, the torch ops run). Same result up to float reassociation.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    base_layer: nn.Module  # a plain attribute, not a submodule (see above)

    def __init__(
        self,
        base: nn.Module,
        *,
        threshold: float = 0.0,
        regime: Regime = "auto",
        max_density: float | None = None,
        track_stats: bool = False,
        native: bool = True,
    ) -> None:
        super().__init__()
        conv1d = conv1d_type()
        if type(base) is nn.Linear:
            self.layout = "linear"  # weight (out, in)
            self.in_features, self.out_features = base.in_features, base.out_features
        elif conv1d is not None and type(base) is conv1d:
            self.layout = "conv1d"  # weight (in, out): already the transposed layout the gather wants
            self.out_features, self.in_features = weight_out_in(base).shape  # Conv1D's nf, nx
        else:
            raise TypeError(
                f"cannot sparsify a down-projection of type {type(base).__name__}: only nn.Linear and "
                "transformers Conv1D are supported (merge LoRA adapters with merge_and_unload() and "
                "dequantize the model first)"
            )
        if not threshold >= 0:
            raise ConfigError(f"threshold must be >= 0, got {threshold!r}")
        if regime not in ("auto", "decode", "batched"):
            raise ConfigError(f"regime must be 'auto', 'decode' or 'batched', got {regime!r}")
        if max_density is not None and not 0.0 <= max_density <= 1.0:
            raise ConfigError(f"max_density must be in [0, 1], got {max_density!r}")
        # the same Parameter objects under the same names: state dicts and optimisers see no change
        weight, bias = base.weight, getattr(base, "bias", None)
        if not isinstance(weight, nn.Parameter) or not (bias is None or isinstance(bias, nn.Parameter)):
            raise TypeError(f"{type(base).__name__}: weight and bias must be Parameters to be shared")
        self.register_parameter("weight", weight)
        self.register_parameter("bias", bias)
        object.__setattr__(self, "base_layer", base)
        self.threshold = float(threshold)
        self.regime: Regime = regime
        self.max_density = max_density
        self.track_stats = track_stats
        self.native = native
        self.stats = SkipStats()
        self._wt: torch.Tensor | None = None  # cached contiguous W2^T for nn.Linear (see _weight_t)
        self._wt_key: tuple | None = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, "
            f"threshold={self.threshold:g}, regime={self.regime}"
        )

    # ------------------------------------------------------------------ weights
    def _weight_t(self) -> torch.Tensor:
        """W2^T as a contiguous (in, out) tensor: active units are then contiguous rows.

        Conv1D already stores it that way. For nn.Linear this is a copy (the price of the per-token path:
        the down-projection's memory twice), rebuilt whenever the weight is modified in place, replaced,
        or moved, so it can never go stale.
        """
        w = self.weight
        if self.layout == "conv1d":
            return w if w.is_contiguous() else w.contiguous()
        if torch.is_grad_enabled() and w.requires_grad:
            return w.t().contiguous()  # training through the module: a differentiable copy, never cached
        key = (w.data_ptr(), w._version, w.device, w.dtype, tuple(w.shape))
        if self._wt is None or self._wt_key != key:
            self._wt = w.detach().t().contiguous()
            self._wt_key = key
        return self._wt

    def _native_ok(self, x: torch.Tensor) -> bool:
        return self.native and native_kernel.supports(x, self.weight)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "linear":
            return F.linear(x, self.weight, self.bias)
        # a Conv1D without a bias (as _union already allows): torch.addmm(None, ...) would raise
        return torch.mm(x, self.weight) if self.bias is None else torch.addmm(self.bias, x, self.weight)

    def _add_bias(self, out: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return out
        # in place on the kernel's fresh output saves an allocation (measurable next to a ~50 us GEMV)
        return out + self.bias if out.requires_grad else out.add_(self.bias)

    def _limit(self, path: str, tokens: int = 1) -> float:
        if self.max_density is not None:
            return self.max_density
        if path == "union" and tokens < FEW_TOKENS:
            return DEFAULT_MAX_DENSITY["union_few_tokens"]
        return DEFAULT_MAX_DENSITY[path]

    def _count(self, n: int, active_pairs: int, dense: bool) -> None:
        s = self.stats
        s.calls += 1
        s.tokens += n
        s.units_total += n * self.in_features
        s.units_skipped += 0 if dense else n * self.in_features - active_pairs
        s.dense_calls += int(dense)

    # ------------------------------------------------------------------ forward
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-1]
        x = h.reshape(-1, self.in_features)
        if x.dtype != self.weight.dtype:  # the gather kernels need one dtype (T5 casts the same way)
            x = x.to(self.weight.dtype)
        per_token = self.regime == "decode" or (self.regime == "auto" and x.shape[0] == 1)
        out = self._per_token(x) if per_token else self._union(x)
        return out.reshape(*lead, self.out_features)

    def _per_token(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n == 1 and x.is_cuda and self.max_density is None and self.weight.numel() < CUDA_MIN_WEIGHTS:
            if self.track_stats:
                self._count(1, int((x.abs() > self.threshold).sum()), dense=True)
            return self._dense(x if self.threshold == 0 else x * (x.abs() > self.threshold))
        if n == 1 and _use_triton(x, self.weight):
            from .triton_gemv import sparse_gemv  # only ever imported with CUDA + triton present

            out = sparse_gemv(x[0].contiguous(), self._weight_t(), self.threshold)[None]
            if self.track_stats:
                self._count(1, int((x.abs() > self.threshold).sum()), dense=False)
            return self._add_bias(out)
        if self._native_ok(x):
            # CPU: one fused pass per token (threshold, compaction, gather), ~2x faster than the torch ops
            # below on MiniLM's W2 (deft.sparse.native; numbers in benchmarks/README.md). A dense input
            # (GELU/SiLU in exact mode) is caught on a few tokens first: the kernel gives up only after
            # the limit's worth of gathers, which is slower than the GEMM it then runs anyway
            limit = self._limit("per_token")
            head = x[:16]
            dense_head = n > 16 and int((head.abs() > self.threshold).sum()) > limit * head.numel()
            found = (
                None
                if dense_head
                else native_kernel.gather(x, self._weight_t(), self.threshold, self.bias, int(limit * x.numel()))
            )
            if found is not None:
                if self.track_stats:
                    self._count(n, found[1], dense=False)
                return found[0]
            if self.track_stats:
                self._count(n, n * self.in_features, dense=True)
            return self._dense(F.hardshrink(x, self.threshold) if self.threshold > 0 else x)
        # flat indices are row-major, so each token's active units form one contiguous "bag"; index_select
        # and integer div/mod instead of 2-D nonzero + advanced indexing: the overhead is what decides
        # whether a 1-token GEMV can win at all (measured: ~4x less fixed cost)
        flat = x.reshape(-1)
        if self.threshold > 0:
            # threshold mode: hardshrink keeps x where |x| > t and writes +0.0 elsewhere in one pass, and
            # nonzero() of the result's bits (an int view: +0.0 is all-zero bits) is as fast as on a bool
            # mask. `|x| > t` then nonzero() of the mask costs one pass and a bool tensor more: measured on
            # MiniLM's W2 inputs (1,408 tokens x 1,536 units, 5 % kept), ~4.0 ms instead of ~5.0 ms, next
            # to a ~3.5 ms gather (benchmarks/bench_threshold.py, numbers in benchmarks/README.md)
            flat = F.hardshrink(flat, self.threshold)
            bits = _SAME_SIZE_INT.get(flat.dtype)
            nz = (flat if bits is None else flat.view(bits)).nonzero().squeeze(1)
        else:
            # exact mode: nonzero() of the values themselves (a `!= 0` mask first costs as much as the gather)
            nz = flat.nonzero().squeeze(1)
        nnz = nz.numel()
        if nnz > self._limit("per_token") * x.numel():
            if self.track_stats:
                self._count(n, nnz, dense=True)
            return self._dense(flat.view_as(x))  # already thresholded in threshold mode
        if n == 1:
            cols = nz
            offsets = torch.zeros(1, dtype=torch.long, device=x.device)
        else:
            rows = torch.div(nz, self.in_features, rounding_mode="floor")
            cols = nz - rows * self.in_features
            counts = torch.bincount(rows, minlength=n)
            offsets = counts.cumsum(0) - counts  # start of each token's bag
        out = F.embedding_bag(cols, self._weight_t(), offsets, mode="sum", per_sample_weights=flat.index_select(0, nz))
        if self.track_stats:
            self._count(n, nnz, dense=False)
        return self._add_bias(out)

    def _union(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        # a unit is needed when any token exceeds the threshold; amax is ~3x cheaper than (x != 0).any(0)
        needed = x.abs().amax(dim=0) > self.threshold if n else x.new_zeros(self.in_features, dtype=torch.bool)
        idx = needed.nonzero().squeeze(1)
        k = idx.numel()
        if k > self._limit("union", n) * self.in_features:
            if self.regime == "auto" and self._native_ok(x):
                # per-token sparsity (a model trained under thresholds: each token its own few units, the
                # union ~80-95 %) gains nothing from slicing, but the compiled per-token kernel beats the
                # dense GEMM at any batch size below the per-token limit (it falls back to dense above it)
                return self._per_token(x)
            if self.track_stats:
                self._count(n, n * k, dense=True)
            return self._dense(x * (x.abs() > self.threshold) if self.threshold > 0 else x)
        xs = x.index_select(1, idx)
        if self.threshold > 0:  # a needed unit can still be below the threshold for some tokens
            xs = xs * (xs.abs() > self.threshold)
        if self.track_stats:
            self._count(n, n * k, dense=False)
        if self.layout == "conv1d" or self._wt is not None:
            rows = self._weight_t().index_select(0, idx)  # (k, out), contiguous rows
            return torch.mm(xs, rows) if self.bias is None else torch.addmm(self.bias, xs, rows)
        return F.linear(xs, self.weight.index_select(1, idx), self.bias)


class SparseGatedMLP(nn.Module):
    """A LLaMA-style gated MLP, ``down(act(gate(x)) * up(x))``, that skips rows of W_up as well.

    The gate is computed first; a unit whose ``act(gate)`` is exactly zero makes ``h`` zero whatever
    ``up`` says, so its W_up row (a contiguous row of an nn.Linear weight) is never read and its W2
    column is skipped by the :class:`SparseDown` that follows. This only pays off for activations with
    true zeros (ReLU-fied models); for SiLU/GELU every unit is active and the dense path runs.

    The submodules keep their names (``gate_proj``, ``up_proj``, ``act_fn``, ``down_proj``) so probes and
    state dicts see the same model; the original MLP stays in the plain attribute ``base_layer``.
    Exact mode only: a magnitude threshold on ``h`` cannot be checked before ``up`` is known.
    """

    base_layer: nn.Module  # a plain attribute, not a submodule

    def __init__(self, mlp: nn.Module, down: SparseDown, *, max_density: float | None = None) -> None:
        super().__init__()
        if not eligible_gated_mlp(mlp):
            raise TypeError(f"{type(mlp).__name__} is not a gate_proj/up_proj/act_fn/down_proj MLP of nn.Linear")
        self.gate_proj = mlp.get_submodule("gate_proj")
        self.up_proj = mlp.get_submodule("up_proj")
        self.act_fn = mlp.get_submodule("act_fn")
        self.down_proj = down
        object.__setattr__(self, "base_layer", mlp)
        self.max_density = max_density

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xf = x.reshape(-1, x.shape[-1])
        g = self.act_fn(self.gate_proj(xf))  # through the modules, so activation hooks still fire
        if self.max_density is not None:
            limit = self.max_density
        else:
            limit = DEFAULT_MAX_DENSITY["union" if xf.shape[0] >= FEW_TOKENS else "union_few_tokens"]
        if xf.is_cuda or xf.shape[0] == 0:
            idx = g.new_zeros(0, dtype=torch.long)
        else:
            idx = (g.abs().amax(dim=0) > 0).nonzero().squeeze(1)  # units with act(gate) != 0 for any token
        # On CUDA the gather below needs a host sync per layer (nonzero) that costs more than the W_up
        # rows it saves at decode time; there only W2 is skipped (by the Triton kernel in down_proj).
        if xf.is_cuda or idx.numel() > limit * g.shape[-1]:
            h = g * self.up_proj(xf)
        else:
            up_bias = module_bias(self.up_proj)
            bias = None if up_bias is None else up_bias.index_select(0, idx)
            u = F.linear(xf, module_weight(self.up_proj).index_select(0, idx), bias)
            h = torch.zeros_like(g).index_copy_(1, idx, g.index_select(1, idx) * u)
        out = self.down_proj(h)
        return out.reshape(*lead, out.shape[-1])


def eligible_gated_mlp(mlp: nn.Module) -> bool:
    """True for a LLaMA-style MLP whose projections are plain nn.Linear (not adapter- or quant-wrapped)."""
    return (
        all(type(getattr(mlp, a, None)) is nn.Linear for a in ("gate_proj", "up_proj"))
        and isinstance(getattr(mlp, "act_fn", None), nn.Module)
        and isinstance(getattr(mlp, "down_proj", None), nn.Module)
    )
