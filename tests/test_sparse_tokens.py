"""The per-token (gather) path of deft.sparse in threshold mode, on whole batches of tokens.

A model trained under per-layer thresholds (``deft train --target-density``) is sparse per token, not per
batch, so it is served with ``sparsify(mode="threshold", regime="decode")``: every token gathers the W2^T
rows of its own units with ``|h| > t``. These tests pin that this path equals the dense model on the
thresholded input, for every float dtype, with gradients, and on a padded batch of a real model family.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deft.sparse import (
    SparseDown,
    apply_thresholds,
    calibrate_thresholds,
    sparse_stats,
    sparsify,
)
from deft.testing import tiny_config


def _thresholded_dense(lin: nn.Linear, h: torch.Tensor, t: float) -> torch.Tensor:
    return F.linear(h * (h.abs() > t), lin.weight, lin.bias)


def _inputs(dtype: torch.dtype, t: float) -> torch.Tensor:
    """40 tokens x 64 units, mostly below ``t``, with the edge cases planted: entries exactly at +-t (dropped),
    -0.0 (dropped), large negatives (kept) and one token with nothing above t (an empty bag)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 64, generator=g) * t
    h[0, :4] = torch.tensor([t, -t, -0.0, -3 * t])
    h[1] = 0.5 * t
    return h.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("native", [True, False], ids=["compiled-kernel", "torch-ops"])
def test_per_token_threshold_path_equals_the_thresholded_dense_layer(dtype, native):
    torch.manual_seed(0)
    t = 0.7
    lin = nn.Linear(64, 24).to(dtype)
    h = _inputs(dtype, t)
    sparse = SparseDown(lin, threshold=t, regime="decode", max_density=1.0, track_stats=True, native=native)
    with torch.no_grad():
        out = sparse(h)
        ref = _thresholded_dense(lin, h, t)
    tol = {} if dtype in (torch.float32, torch.float64) else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(out[1], lin.bias.detach())  # no unit above t: the bias alone
    # the work skipped is exactly the entries with |h| <= t (planted ones included)
    kept = int((h.abs() > t).sum())
    assert sparse.stats.dense_calls == 0
    assert sparse.stats.units_skipped == h.numel() - kept


def test_per_token_threshold_path_keeps_the_dense_gradients():
    torch.manual_seed(0)
    t = 0.7
    lin = nn.Linear(64, 24)
    h = _inputs(torch.float32, t)
    h_sparse, h_dense = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    sparse = SparseDown(lin, threshold=t, regime="decode", max_density=1.0)
    g = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    (sparse(h_sparse) * g).sum().backward()
    grads_sparse = [h_sparse.grad, lin.weight.grad.clone(), lin.bias.grad.clone()]
    lin.zero_grad()
    (_thresholded_dense(lin, h_dense, t) * g).sum().backward()
    for a, b in zip(grads_sparse, [h_dense.grad, lin.weight.grad, lin.bias.grad], strict=True):
        torch.testing.assert_close(a, b)
    assert not h_sparse.grad[h.abs() <= t].any()  # a dropped unit gets no gradient, as in the dense mask


def test_per_token_dense_fallback_is_thresholded_too():
    torch.manual_seed(0)
    t = 0.7
    lin = nn.Linear(64, 24)
    h = _inputs(torch.float32, t)
    dense = SparseDown(lin, threshold=t, regime="decode", max_density=0.0, track_stats=True)  # always falls back
    with torch.no_grad():
        torch.testing.assert_close(dense(h), _thresholded_dense(lin, h, t))
    assert dense.stats.dense_calls == 1


def test_decode_regime_on_a_padded_batch_equals_the_masked_model():
    """A tiny BERT under calibrated per-layer thresholds: the gather path, with the default density cutoff,
    gives what apply_thresholds (the forward mask training uses) gives, on a batch with padding."""
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config("bert")).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (6, 12), generator=g)
    mask = torch.ones_like(ids)
    for i, n in enumerate((12, 9, 5, 12, 3, 7)):  # real padding: rows of different lengths
        mask[i, n:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    thresholds = calibrate_thresholds(model, [batch], 0.1)

    with torch.no_grad():
        dense = model(**batch).last_hidden_state
        with apply_thresholds(model, thresholds):
            ref = model(**batch).last_hidden_state
        sparsify(model, mode="threshold", threshold=thresholds, regime="decode", track_stats=True)
        out = model(**batch).last_hidden_state
    assert not torch.allclose(ref, dense, atol=1e-3)  # the thresholds matter
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    stats = sparse_stats(model)
    assert set(stats) == set(thresholds)
    # ~10 % of the units per token stay: the gather ran (no dense fallback) and skipped most of W2
    assert all(s.dense_calls == 0 and s.skip_fraction > 0.7 for s in stats.values())
