"""CUDA decode kernel: sparse GEMV ``y = x[active] @ W2^T[active]`` for one token, fp16/bf16, in Triton.

Imported only by :class:`deft.sparse.SparseDown` when a CUDA tensor reaches it and triton is installed;
importing it on a CPU-only machine raises ImportError.

Design (the TEAL / Deja Vu kernel shape): ``W2^T`` is (K=in, N=out) row-major, so an active unit is a
contiguous row. The grid is (N / BLOCK_N, SPLIT_K): each program owns BLOCK_N outputs and a slice of K,
loads a block of ``x``, and loads the weight rows *masked by* ``|x| > threshold``; masked-off rows are
never fetched from memory, which is where the time goes for a memory-bound GEMV. Partial sums are
added into an fp32 buffer with atomics (split-K keeps enough programs in flight for one token).
Nothing depends on how many units are active, so there is no host sync and the op is CUDA-graph safe.

Registered with ``torch.library.custom_op`` so ``torch.compile`` treats it as one opaque op.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

BLOCK_N = 128
BLOCK_K = 32


@triton.jit
def _sparse_gemv_kernel(
    x_ptr,  # (K,) fp16/bf16
    w_ptr,  # (K, N) fp16/bf16, stride(1) == 1
    out_ptr,  # (N,) fp32, zero-initialised
    K,
    N,
    stride_wk,
    k_per_split,
    threshold,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < K
        x = tl.load(x_ptr + offs_k, mask=k_in, other=0.0).to(tl.float32)
        active = k_in & (tl.abs(x) > threshold)
        w = tl.load(
            w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :],
            mask=active[:, None] & n_in[None, :],
            other=0.0,
        )
        # inactive rows loaded as 0: in threshold mode their (non-zero) x contributes nothing, as intended
        acc += tl.sum(w.to(tl.float32) * x[:, None], axis=0)
    tl.atomic_add(out_ptr + offs_n, acc, mask=n_in)


@lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@torch.library.custom_op("deft::sparse_gemv", mutates_args=(), device_types="cuda")
def sparse_gemv(x: torch.Tensor, weight_t: torch.Tensor, threshold: float) -> torch.Tensor:
    """``sum_k [|x_k| > threshold] x_k W^T[k, :]`` for x (K,) and weight_t (K, N); returns (N,) in x's dtype."""
    if x.dim() != 1 or weight_t.dim() != 2 or x.shape[0] != weight_t.shape[0]:
        raise ValueError(f"sparse_gemv wants x (K,) and weight_t (K, N), got {tuple(x.shape)}, {tuple(weight_t.shape)}")
    x = x.contiguous()
    weight_t = weight_t if weight_t.stride(1) == 1 else weight_t.contiguous()
    K, N = weight_t.shape
    out = torch.zeros(N, device=x.device, dtype=torch.float32)
    n_blocks = triton.cdiv(N, BLOCK_N)
    k_blocks = triton.cdiv(K, BLOCK_K)
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    # ~4 programs per SM, but never a K slice smaller than one block
    split_k = max(1, min(k_blocks, triton.cdiv(4 * _sm_count(device), n_blocks)))
    k_per_split = triton.cdiv(k_blocks, split_k) * BLOCK_K
    split_k = triton.cdiv(K, k_per_split)
    _sparse_gemv_kernel[(n_blocks, split_k)](
        x, weight_t, out, K, N, weight_t.stride(0), k_per_split, float(threshold),
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return out.to(x.dtype)


@sparse_gemv.register_fake
def _(x: torch.Tensor, weight_t: torch.Tensor, threshold: float) -> torch.Tensor:
    return x.new_empty((weight_t.shape[1],))
