"""deft.sparse.native: the compiled CPU kernel of the per-token path (threshold + compaction + gather).

Its result must be the dense layer on the hard-thresholded input (``|h| <= t`` dropped, NaN kept), for
every shape the kernel splits differently (tails of its 4-row unrolling, one token, thread blocks), and
SparseDown must give the same outputs and counts with and without it. Tests that need the compiled
kernel skip where no C++ compiler is installed; the fallback tests run everywhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deft.sparse import SparseDown, native, sparse_modules, sparsify
from deft.testing import tiny_config

needs_kernel = pytest.mark.skipif(native.library() is None, reason="no C++ compiler: the torch path runs instead")


def _reference(h: torch.Tensor, wt: torch.Tensor, t: float, bias: torch.Tensor | None) -> torch.Tensor:
    # independent of F.hardshrink: the mask written out, then a plain matmul
    kept = torch.where(h.abs() <= t, torch.zeros_like(h), h)
    out = kept @ wt
    return out if bias is None else out + bias


def _planted(n: int, din: int, t: float, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(n * 1000 + din)
    h = (torch.randn(n, din, generator=g) * t).to(dtype)
    h[0, :4] = torch.tensor([t, -t, -0.0, -3 * t], dtype=dtype)  # at +-t: dropped; -3t: kept
    if n > 1:
        h[1] = 0.5 * t  # nothing above t: the output row is the bias alone
    return h


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "din", "dout"), [(1, 7, 3), (2, 64, 24), (40, 65, 17), (300, 96, 40)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernel_equals_the_dense_layer_on_the_thresholded_input(dtype, n, din, dout, with_bias):
    t = 0.7
    h = _planted(n, din, t, dtype)
    wt = torch.randn(din, dout, dtype=dtype)
    bias = torch.randn(dout, dtype=dtype) if with_bias else None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # n = 300 is split over two threads
        out, nnz = native.gather(h, wt, t, bias, max_nnz=h.numel())
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out, _reference(h, wt, t, bias))
    assert nnz == int((h.abs() > t).sum())
    if n > 1:
        torch.testing.assert_close(out[1], bias if with_bias else torch.zeros(dout, dtype=dtype))


@needs_kernel
def test_kernel_exact_mode_and_nan():
    h = torch.tensor([[0.0, -0.0, 2.0, 0.0, float("nan"), 0.0, -1.0, 0.0]])
    wt = torch.arange(16, dtype=torch.float32).reshape(8, 2)
    out, nnz = native.gather(h, wt, 0.0, None, max_nnz=8)
    assert nnz == 3  # 2.0, NaN, -1.0: zeros of either sign skipped, NaN kept as the dense layer keeps it
    assert torch.isnan(out).all()
    out, nnz = native.gather(h[:, :4], wt[:4], 0.0, None, max_nnz=8)
    assert nnz == 1 and out.tolist() == [[2.0 * 4, 2.0 * 5]]


@needs_kernel
def test_kernel_gives_up_past_max_nnz_and_sparse_down_runs_the_dense_layer():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8)
    h = torch.randn(10, 32)
    t = 0.1
    kept = int((h.abs() > t).sum())
    assert native.gather(h, lin.weight.detach().t(), t, lin.bias, max_nnz=kept - 1) is None
    assert native.gather(h, lin.weight.detach().t(), t, lin.bias, max_nnz=kept)[1] == kept
    sparse = SparseDown(lin, threshold=t, regime="decode", max_density=0.5, track_stats=True)  # ~92 % kept
    with torch.no_grad():
        out = sparse(h)
    torch.testing.assert_close(out, _reference(h, lin.weight.detach().t(), t, lin.bias.detach()))
    assert sparse.stats.dense_calls == 1 and sparse.stats.units_skipped == 0


@needs_kernel
def test_sparse_down_with_and_without_the_kernel_agree():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    h = _planted(50, 96, 0.9, torch.float32).reshape(5, 10, 96)
    outs, stats = [], []
    for use in (True, False):
        sparse = SparseDown(lin, threshold=0.9, regime="decode", track_stats=True, native=use)
        with torch.no_grad():
            outs.append(sparse(h))
        stats.append(sparse.stats)
    torch.testing.assert_close(outs[0], outs[1])
    assert outs[0].shape == (5, 10, 40)
    assert stats[0] == stats[1] and stats[0].units_skipped > 0


@needs_kernel
def test_auto_regime_serves_per_token_sparsity_with_the_kernel_and_dense_input_densely():
    torch.manual_seed(0)
    lin = nn.Linear(200, 30)
    # 64 tokens, each with its own 6 units above t: union ~85 % (too dense to slice), per token 3 %
    h = torch.randn(64, 200) * 0.1
    for i in range(64):
        h[i, torch.randperm(200)[:6]] = 2.0
    t = 1.0
    assert (h.abs() > t).any(0).float().mean() > 0.7
    sparse = SparseDown(lin, threshold=t, track_stats=True)  # regime="auto"
    with torch.no_grad():
        out = sparse(h)
    torch.testing.assert_close(out, _reference(h, lin.weight.detach().t(), t, lin.bias.detach()))
    assert sparse.stats.dense_calls == 0 and sparse.stats.units_skipped == h.numel() - 64 * 6
    # without the kernel, auto keeps its union rule: too dense to slice, so the dense GEMM
    torch_path = SparseDown(lin, threshold=t, track_stats=True, native=False)
    with torch.no_grad():
        torch.testing.assert_close(torch_path(h), out)
    assert torch_path.stats.dense_calls == 1
    # a dense input (every unit above t for every token): caught on the first tokens, the dense GEMM runs
    dense_in = torch.full((64, 200), 2.0)
    with torch.no_grad():
        torch.testing.assert_close(sparse(dense_in), lin(dense_in))
    assert sparse.stats.dense_calls == 1


@needs_kernel
def test_conv1d_layout_through_the_kernel():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(5, 12)  # weight (12, 5): already W2^T
    nn.init.normal_(conv.bias)
    h = _planted(9, 12, 0.6, torch.float32)
    sparse = SparseDown(conv, threshold=0.6, regime="decode", max_density=1.0)
    with torch.no_grad():
        torch.testing.assert_close(sparse(h), _reference(h, conv.weight, 0.6, conv.bias))


@needs_kernel
def test_gradients_take_the_torch_path():
    lin = nn.Linear(16, 4)
    h = torch.randn(3, 16, requires_grad=True)
    assert not native.supports(h, lin.weight)  # autograd needs the differentiable ops
    with torch.no_grad():
        assert native.supports(h, lin.weight)
    assert not native.supports(h.detach().half(), lin.weight.detach().half())  # fp16: torch path


@needs_kernel
def test_sparsified_tiny_bert_matches_with_and_without_the_kernel():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert")).eval()
    ids = torch.randint(5, 100, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    logits = []
    for use in (True, False):
        sparsify(model, mode="threshold", threshold=0.05, regime="decode", native=use)
        assert all(m.native is use for m in sparse_modules(model).values())
        with torch.no_grad():
            logits.append(model(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(logits[0], logits[1])


def test_disabled_or_without_compiler_there_is_no_kernel_and_the_torch_path_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFT_KERNEL_CACHE", str(tmp_path))
    lin = nn.Linear(16, 4)
    h = torch.randn(6, 16)
    try:
        native.library.cache_clear()
        monkeypatch.setenv("DEFT_NATIVE", "0")
        assert native.library() is None
        native.library.cache_clear()
        monkeypatch.setenv("DEFT_NATIVE", "1")
        monkeypatch.setattr(native, "_compiler", lambda: None)
        assert native.library() is None
        with torch.no_grad():
            assert not native.supports(h, lin.weight)
            out = SparseDown(lin, threshold=0.5, regime="decode")(h)
        torch.testing.assert_close(out, F.linear(F.hardshrink(h, 0.5), lin.weight, lin.bias))
        assert list(tmp_path.iterdir()) == []  # nothing was built
    finally:
        native.library.cache_clear()


@needs_kernel
def test_the_kernel_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFT_KERNEL_CACHE", str(tmp_path / "kernels"))
    try:
        native.library.cache_clear()
        assert native.library() is not None
        built = list((tmp_path / "kernels").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"  # no temporary files left behind
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        assert native.library() is not None
        assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        native.library.cache_clear()
