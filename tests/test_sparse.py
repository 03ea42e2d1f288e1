"""Zero-skipping MLP inference (deft.sparse) against the dense model and hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import deft
from deft.arch.specs import MLP_SPECS, full_match
from deft.sparse import (
    SparseDown,
    SparseGatedMLP,
    calibrate_thresholds,
    sparse_modules,
    sparse_stats,
    sparsify,
    unsparsify,
)
from deft.testing import TINY_CONFIGS, tiny_config

TOL = dict(atol=1e-5, rtol=1e-5)


def _model(model_type: str, cls=AutoModel, **overrides):
    torch.manual_seed(0)
    cfg = tiny_config(model_type, **overrides)
    return cls.from_config(cfg).eval(), cfg


def _batch(model_type: str, cfg, seed: int = 1, batch: int = 2, seq: int = 7):
    g = torch.Generator().manual_seed(seed)
    if model_type == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(3, 100, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if cfg.is_encoder_decoder:
        out["decoder_input_ids"] = ids[:, :5]
    return out


def _hidden(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _n_down(model, model_type) -> int:
    return sum(full_match(MLP_SPECS[model_type].down, n) for n, _ in model.named_modules())


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("regime", ["batched", "decode", "decode-torch"])
def test_exact_mode_matches_dense_on_every_family(model_type, regime):
    model, cfg = _model(model_type)
    batch = _batch(model_type, cfg)
    n_down = _n_down(model, model_type)
    keys = list(model.state_dict())
    ref = _hidden(model, batch)
    # max_density=1.0: always take the sparse kernel, even where (GELU, SiLU) nothing is zero;
    # "decode-torch": the per-token path through torch's ops instead of the compiled CPU kernel
    sparsify(model, regime=regime.removesuffix("-torch"), max_density=1.0, native=not regime.endswith("-torch"))
    assert len(sparse_modules(model)) == n_down
    assert list(model.state_dict()) == keys  # same names, same parameters
    torch.testing.assert_close(_hidden(model, batch), ref, **TOL)


def _relu_bert_with_dead_units():
    model, cfg = _model("bert", hidden_act="relu")
    with torch.no_grad():  # push half the units' pre-activations far below zero: dead for every token
        for layer in model.encoder.layer:
            layer.intermediate.dense.bias[::2] -= 100.0
    return model, cfg


@pytest.mark.parametrize("regime", ["batched", "decode"])
def test_relu_bert_really_skips_and_still_matches(regime):
    model, cfg = _relu_bert_with_dead_units()
    batch = _batch("bert", cfg)
    ref = _hidden(model, batch)
    sparsify(model, regime=regime, max_density=1.0, track_stats=True)  # no dense fallback at ~50 % union
    out = _hidden(model, batch)
    torch.testing.assert_close(out, ref, **TOL)
    stats = sparse_stats(model)
    assert len(stats) == 2
    for s in stats.values():
        assert s.calls == 1 and s.dense_calls == 0
        assert s.units_skipped > 0
        # at least the dead half is skipped; per token ReLU zeros about half of the rest too
        assert s.skip_fraction >= 0.5 if regime == "batched" else s.skip_fraction > 0.6


def test_relu_bert_default_cutoff_falls_back_to_dense_when_nothing_to_skip():
    model, cfg = _model("bert")  # GELU: no exact zeros, every batch is dense
    batch = _batch("bert", cfg)
    ref = _hidden(model, batch)
    sparsify(model, track_stats=True)
    torch.testing.assert_close(_hidden(model, batch), ref, **TOL)
    assert all(s.dense_calls == s.calls == 1 for s in sparse_stats(model).values())


@pytest.mark.parametrize("model_type", ["llama", "gemma"])
def test_gated_mlp_skips_up_rows_prefill_and_cached_decode(model_type):
    model, cfg = _model(model_type, AutoModelForCausalLM, hidden_act="relu", hidden_activation="relu")
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(3))

    def run():
        # prefill 5 tokens, then 3 decode steps of one token through the KV cache (the per-token path)
        with torch.no_grad():
            out = model(input_ids=ids[:, :5], use_cache=True)
            logits, past, nxt = [out.logits], out.past_key_values, ids[:, 5:6]
            for _ in range(3):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                logits.append(out.logits)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return logits

    ref = run()
    sparsify(model, max_density=1.0, track_stats=True)
    mlps = [m for m in model.modules() if isinstance(m, SparseGatedMLP)]
    assert len(mlps) == 2 and all(isinstance(m.down_proj, SparseDown) for m in mlps)
    for got, want in zip(run(), ref, strict=True):
        torch.testing.assert_close(got, want, **TOL)
    assert all(s.units_skipped > 0 for s in sparse_stats(model).values())


# ---------------------------------------------------------------------------------------------- Conv1D
@pytest.mark.parametrize("regime", ["batched", "decode"])
def test_conv1d_matches_and_uses_transposed_layout(regime):
    torch.manual_seed(0)
    conv = Conv1D(5, 12)  # nf=5 outputs, nx=12 inputs: weight is (12, 5)
    nn.init.normal_(conv.bias)
    h = torch.randn(2, 3, 12)
    h[..., [0, 4, 7]] = 0.0
    h[0, 1, 9] = 0.0
    sparse = SparseDown(conv, regime=regime, max_density=1.0, track_stats=True)
    assert sparse.layout == "conv1d" and sparse.weight is conv.weight
    torch.testing.assert_close(sparse(h), conv(h), **TOL)
    assert sparse.stats.units_skipped == (3 * 6 if regime == "batched" else 3 * 6 + 1)


# ---------------------------------------------------------------------------------------------- threshold
@pytest.mark.parametrize("regime", ["batched", "decode"])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_threshold_mode_zeroes_exactly_the_small_units(regime, layout):
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.25, 2.0], [0.0, 1.0, -2.0, 1.0]])  # (out=3, in=4)
    b = torch.tensor([0.1, 0.2, 0.3])
    if layout == "linear":
        base = nn.Linear(4, 3)
        base.weight.data, base.bias.data = w.clone(), b.clone()
    else:
        base = Conv1D(3, 4)
        base.weight.data, base.bias.data = w.t().contiguous(), b.clone()
    h = torch.tensor([[0.05, -0.5, 0.2, -0.1], [0.3, 0.01, -0.1, 0.0]])
    # threshold 0.1: |h| <= 0.1 is dropped; token 0 keeps units 1, 2; token 1 keeps unit 0 only
    expected = torch.stack(
        [
            w[:, 1] * -0.5 + w[:, 2] * 0.2 + b,
            w[:, 0] * 0.3 + b,
        ]
    )
    sparse = SparseDown(base, threshold=0.1, regime=regime, max_density=1.0)
    torch.testing.assert_close(sparse(h), expected)
    torch.testing.assert_close(sparse(h[:1]), expected[:1])  # one token: the decode gather in auto too
    dense = SparseDown(base, threshold=0.1, regime=regime, max_density=0.0)  # dense fallback, same answer
    torch.testing.assert_close(dense(h), expected)


def test_threshold_mode_on_a_model_equals_zeroing_hooks():
    model, cfg = _model("bert")
    batch = _batch("bert", cfg)
    names = list(sparse_modules(sparsify(model)))
    unsparsify(model)
    thresholds = {names[0]: 0.05, names[1]: 0.1}

    def zero_small(t):
        return lambda mod, args: (args[0] * (args[0].abs() > t),)

    handles = [model.get_submodule(n).register_forward_pre_hook(zero_small(t)) for n, t in thresholds.items()]
    ref = _hidden(model, batch)
    for h in handles:
        h.remove()
    assert not torch.allclose(ref, _hidden(model, batch))  # the thresholds do change the output
    for regime in ("batched", "decode"):
        sparsify(model, mode="threshold", threshold=thresholds, regime=regime, max_density=1.0)
        torch.testing.assert_close(_hidden(model, batch), ref, **TOL)


@pytest.mark.parametrize("model_type", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("target", [0.3, 0.6])
def test_calibrate_thresholds_reaches_target_density(model_type, target):
    model, cfg = _model(model_type)
    calib = [_batch(model_type, cfg, seed=s, batch=8, seq=16) for s in range(4)]
    held_out = [_batch(model_type, cfg, seed=100 + s, batch=8, seq=16) for s in range(4)]
    thresholds = calibrate_thresholds(model, calib, target)
    assert set(thresholds) == set(sparse_modules(sparsify(model)))
    unsparsify(model)
    for name, t in thresholds.items():
        assert t > 0
        for batches, tol in ((calib, 0.001), (held_out, 0.02)):
            report = deft.measure_density(model, batches, point="down_input", threshold=t)
            (layer,) = [rec for rec in report.layers if rec.name == name]
            assert abs(layer.density - target) <= tol, (name, batches is calib, layer.density)


# ---------------------------------------------------------------------------------------------- lifecycle
def test_unsparsify_restores_the_very_same_modules():
    model, cfg = _model("llama", hidden_act="relu")
    before = {n: m for n, m in model.named_modules()}
    params = {n: p for n, p in model.named_parameters()}
    batch = _batch("llama", cfg)
    ref = _hidden(model, batch)
    sparsify(model)
    sparsify(model, mode="threshold", threshold=0.01)  # re-configuring undoes the previous call first
    assert sparse_modules(model)
    unsparsify(model)
    after = dict(model.named_modules())
    assert after.keys() == before.keys()
    assert all(after[n] is m for n, m in before.items())
    assert all(p is params[n] for n, p in model.named_parameters())
    assert not any(isinstance(m, (SparseDown, SparseGatedMLP)) for m in model.modules())
    assert torch.equal(_hidden(model, batch), ref)


def test_probe_still_finds_the_down_input_of_a_sparsified_model():
    model, cfg = _model("gpt2")
    batch = _batch("gpt2", cfg)
    dense = deft.measure_density(model, [batch], point="down_input", threshold=0.05)
    sparsify(model)
    probe = deft.ActivationProbe(model, point="down_input")
    assert all(isinstance(s.module, SparseDown) for s in probe.sites)
    sparse = deft.measure_density(model, [batch], point="down_input", threshold=0.05)
    assert [layer.density for layer in sparse.layers] == [layer.density for layer in dense.layers]


def test_transposed_weight_cache_follows_in_place_updates():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    sparse = SparseDown(lin, regime="decode", max_density=1.0)
    h = torch.randn(1, 8)
    torch.testing.assert_close(sparse(h), lin(h))
    with torch.no_grad():
        lin.weight.mul_(2.0)
    torch.testing.assert_close(sparse(h), lin(h))


def test_bad_arguments_are_refused():
    model, _ = _model("bert")
    with pytest.raises(ValueError, match="mode='threshold'"):
        sparsify(model, threshold=0.1)
    with pytest.raises(KeyError, match="names no sparsified layer"):
        sparsify(model, mode="threshold", threshold={"encoder.layer.9.output.dense": 0.1})
    with pytest.raises(ValueError, match="regime"):
        sparsify(model, regime="prefill")
    with pytest.raises(TypeError, match="merge LoRA"):
        SparseDown(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="target_density"):
        calibrate_thresholds(model, [], 0.0)
    assert not sparse_modules(model)  # a refused call leaves the model as it was


# ---------------------------------------------------------------------------------------------- all projections
# block linears of each tiny family (2 layers), counted by hand: BERT 2 x (q, k, v, o, up, down); T5
# encoder 2 x (q, k, v, o, wi, wo) + decoder 2 x (self q, k, v, o + cross q, k, v, o + wi, wo)
ALL_LINEARS = {"bert": 12, "gpt2": 8, "llama": 14, "opt": 12, "distilbert": 12, "t5": 32}


@pytest.mark.parametrize("model_type", sorted(ALL_LINEARS))
def test_all_projections_exact_mode_matches_dense(model_type):
    model, cfg = _model(model_type)
    batch = _batch(model_type, cfg)
    ref = _hidden(model, batch)
    sparsify(model, targets="all", regime="batched", max_density=1.0)
    assert len(sparse_modules(model)) == ALL_LINEARS[model_type]
    torch.testing.assert_close(_hidden(model, batch), ref, **TOL)
    unsparsify(model)
    assert not sparse_modules(model)


@pytest.mark.parametrize("target", [0.2, 0.5])
def test_all_projections_thresholds_reach_target_on_every_input(target):
    # independent count: plain pre-hooks on the original layers see the same inputs the calibration saw
    model, cfg = _model("llama")
    batches = [_batch("llama", cfg, seed=s, batch=4, seq=9) for s in (1, 2)]
    thresholds = calibrate_thresholds(model, batches, target, targets="all")
    assert len(thresholds) == ALL_LINEARS["llama"] and all(t > 0 for t in thresholds.values())
    counts = {n: [0, 0] for n in thresholds}
    hooks = []
    for n in thresholds:

        def fn(_m, args, n=n):
            counts[n][0] += int((args[0].abs() > thresholds[n]).sum())
            counts[n][1] += args[0].numel()

        hooks.append(model.get_submodule(n).register_forward_pre_hook(fn))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    for n, (above, total) in counts.items():
        assert above / total == pytest.approx(target, abs=0.02), n
    # the thresholded model equals zeroing those inputs by hand
    zeroing = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, t=thresholds[n]: (args[0] * (args[0].abs() > t),)
        )
        for n in thresholds
    ]
    want = _hidden(model, batches[0])
    for h in zeroing:
        h.remove()
    sparsify(model, mode="threshold", threshold=thresholds, targets="all", regime="decode", max_density=1.0)
    torch.testing.assert_close(_hidden(model, batches[0]), want, **TOL)


def test_all_projections_bad_targets_and_threshold_names():
    model, _ = _model("bert")
    with pytest.raises(ValueError, match="targets must be 'down' or 'all'"):
        sparsify(model, targets="mlp")
    with pytest.raises(KeyError, match="threshold names no sparsified layer"):
        sparsify(model, mode="threshold", threshold={"pooler.dense": 0.1}, targets="all")
    assert not sparse_modules(model)


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton sparse GEMV)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_triton_sparse_gemv_matches_masked_dense(dtype, threshold):
    pytest.importorskip("triton")
    from deft.sparse.triton_gemv import sparse_gemv

    torch.manual_seed(0)
    lin = nn.Linear(1536, 576).cuda().to(dtype).requires_grad_(False)  # inference: the Triton path
    h = torch.randn(1, 1536, device="cuda", dtype=dtype)
    h[:, torch.rand(1536, device="cuda") < 0.7] = 0.0
    masked = h * (h.abs() > threshold)
    want = lin(masked).float()
    got = sparse_gemv(h[0], lin.weight.t().contiguous(), threshold).float() + lin.bias.float()
    torch.testing.assert_close(got[None], want, atol=2e-2, rtol=2e-2)
    sparse = SparseDown(lin, threshold=threshold, max_density=1.0)
    torch.testing.assert_close(sparse(h).float(), want, atol=2e-2, rtol=2e-2)
    with torch.no_grad():  # inference op: no autograd formula
        wt = lin.weight.t().contiguous()
        compiled = torch.compile(lambda x: sparse_gemv(x, wt, threshold), fullgraph=True)
        torch.testing.assert_close(compiled(h[0]).float() + lin.bias.float(), want[0], atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton sparse GEMV)")
@pytest.mark.parametrize("density", [0.0, 0.03, 0.3, 1.0])
def test_triton_sparse_gemv_7b_shape_and_cuda_graph(density):
    # relative error against a float64 reference, all outputs written (poisoned output never survives),
    # and the same result replayed from a CUDA graph (no host sync inside the op)
    pytest.importorskip("triton")
    from deft.sparse.triton_gemv import sparse_gemv

    torch.manual_seed(1)
    wt = torch.randn(11008, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(11008, device="cuda", dtype=torch.bfloat16)
    x[torch.rand(11008, device="cuda") >= density] = 0.0
    ref = x.double() @ wt.double()
    out = sparse_gemv(x, wt, 0.0)
    assert torch.isfinite(out).all()
    rel = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    assert rel < 1e-2 if density > 0 else out.abs().max().item() == 0.0
    static_x, g = x.clone(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = sparse_gemv(static_x, wt, 0.0)
    static_x.copy_(torch.where(x != 0, torch.randn_like(x), x))  # new values, same pattern
    g.replay()
    torch.testing.assert_close(static_out.double(), static_x.double() @ wt.double(), atol=0.5, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_down_on_cuda_keeps_gradients():
    # with gradients needed the module avoids the (backward-less) Triton op and stays differentiable
    lin = nn.Linear(64, 32).cuda().to(torch.bfloat16)
    sparse = SparseDown(lin, max_density=1.0)
    h = torch.relu(torch.randn(1, 64, device="cuda", dtype=torch.bfloat16))
    sparse(h).float().sum().backward()
    ref = h.float().sum(0)  # d(sum(W h + b))/dW[o, i] = h[i]
    torch.testing.assert_close(lin.weight.grad.float(), ref.expand(32, 64), atol=1e-2, rtol=1e-2)


def test_calibration_subsample_stays_uniform_past_its_cap():
    # values seen early and late must be equally likely to survive the cap (else late batches dominate)
    from deft.sparse.api import _Subsample

    s = _Subsample(cap=500, gen=torch.Generator().manual_seed(0))
    for _ in range(4):
        s.add(torch.zeros(1000))
    s.add(torch.ones(1000))
    kept = torch.cat(s.parts)
    assert kept.numel() <= 500
    assert kept.mean().item() == pytest.approx(0.2, abs=0.06)  # 1,000 of 5,000 values were ones
