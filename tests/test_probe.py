"""Probe, density metric and density losses against independent expectations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoModel

import deft
from deft.arch.specs import MLP_SPECS, full_match, is_gated
from deft.testing import TINY_CONFIGS, tiny_config

ENC_DEC = {"t5", "mt5", "bart"}


def _tiny_model(model_type: str):
    torch.manual_seed(0)
    cfg = tiny_config(model_type)
    return AutoModel.from_config(cfg).eval(), cfg


def _batch(model_type: str, cfg, pad_extra: int = 0):
    g = torch.Generator().manual_seed(1)
    if model_type == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    ids = torch.randint(3, 100, (2, 7 + pad_extra), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # second sentence is shorter: padded positions must not count
    mask[0, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if cfg.is_encoder_decoder:
        batch["decoder_input_ids"] = ids[:, :5]
    return batch


def _independent_density(model, model_type, cfg, batch, threshold):
    """Capture the full activations with plain hooks and count by hand (no deft code involved)."""
    spec = MLP_SPECS[model_type]
    down = is_gated(spec, cfg)
    pattern = spec.down if down else spec.act
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if full_match(pattern, name):
            if down:
                handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: captured.__setitem__(n, a[0])))
            else:
                handles.append(mod.register_forward_hook(lambda m, a, o, n=name: captured.__setitem__(n, o)))
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    out = {}
    for name, x in captured.items():
        # decoder stacks of encoder-decoder models get no decoder_attention_mask here: all positions count
        is_dec = cfg.is_encoder_decoder and name.split(".")[0] == "decoder"
        m = None if is_dec else batch.get("attention_mask")
        units = x.shape[-1]
        x = x.reshape(-1, units)
        if m is not None:
            x = x[m.reshape(-1).bool()]
        out[name] = int((x.abs() > threshold).sum()) / x.numel()
    return out


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_every_family_one_site_per_mlp_and_exact_counts(model_type, threshold):
    model, cfg = _tiny_model(model_type)
    probe = deft.ActivationProbe(model, threshold=threshold)
    groups = [s.group for s in probe.sites]
    if model_type in ENC_DEC:
        assert groups == ["encoder", "encoder", "decoder", "decoder"]
    else:
        assert groups == ["all", "all"]
    assert len({id(s.module) for s in probe.sites}) == len(probe.sites)

    batch = _batch(model_type, cfg)
    report = deft.measure_density(model, [batch], threshold=threshold)
    expected = _independent_density(model, model_type, cfg, batch, threshold)
    assert [layer.name for layer in report.layers] == list(expected)
    for layer in report.layers:
        assert 0.0 <= layer.density <= 1.0
        assert layer.density == pytest.approx(expected[layer.name], abs=1e-12), layer.name
    if model_type != "vit":
        assert report.layers[0].tokens == 7 + 4  # 11 real tokens in the encoder/only stack
    assert set(report.groups) == ({"encoder", "decoder"} if model_type in ENC_DEC else {"all"})


def test_relu_families_are_really_sparse_and_gelu_dense():
    # the counts must see real zeros: ReLU (OPT, T5 v1.0) gives about half zeros, GELU none
    for mt, lo, hi in [("opt", 0.2, 0.8), ("t5", 0.2, 0.8), ("bert", 0.999, 1.0)]:
        model, cfg = _tiny_model(mt)
        r = deft.measure_density(model, [_batch(mt, cfg)])
        assert lo <= r.overall <= hi, (mt, r.overall)


@pytest.mark.parametrize("model_type", ["bert", "llama", "t5"])
def test_extra_padding_does_not_change_density(model_type):
    model, cfg = _tiny_model(model_type)
    b1 = _batch(model_type, cfg)
    b2 = _batch(model_type, cfg, pad_extra=5)
    b2["input_ids"][:, :7] = b1["input_ids"]
    if cfg.is_encoder_decoder:
        b2["decoder_input_ids"] = b1["decoder_input_ids"]
    r1 = deft.measure_density(model, [b1], threshold=0.05)
    r2 = deft.measure_density(model, [b2], threshold=0.05)
    assert r1.overall == pytest.approx(r2.overall, abs=1e-6)
    assert [layer.tokens for layer in r1.layers] == [layer.tokens for layer in r2.layers]
    # counting the padding (the research code's behaviour) sees more tokens and other numbers
    r3 = deft.measure_density(model, [b2], threshold=0.05, include_padding=True)
    assert r3.layers[0].tokens == 2 * 12


def test_union_density_by_hand():
    model = nn.Sequential(nn.Identity())
    x = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], [[0.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])
    probe = deft.ActivationProbe(model, sites=["0"])
    with probe, torch.no_grad():
        probe.set_mask(torch.tensor([[1, 1], [1, 0]]))  # last token (the 5.0) is padding
        model(x)
    s = probe.sites[0]
    assert (s.nonzero, s.entries, s.tokens) == (2, 9, 3)
    assert s.union_sum == pytest.approx(2 / 3)  # units 0 and 1 fire somewhere, unit 2 only on padding
    report = deft.DensityReport.from_probe(probe)
    assert report.overall == pytest.approx(2 / 9)
    assert report.layers[0].union_density == pytest.approx(2 / 3)


# ---------------------------------------------------------------- losses by hand
X = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])  # one sequence, two tokens, two units


def _loss_on(x, loss, mask=None, sites=("0",), model=None):
    model = model or nn.Sequential(nn.Identity())
    x = x.clone().requires_grad_(True)
    probe = deft.ActivationProbe(model, sites=list(sites)).track(loss)
    with probe:
        probe.set_mask(mask)
        model(x)
    return loss(probe), x


def test_token_l0_by_hand():
    val, _ = _loss_on(X, deft.DensityLoss(kind="l0", eps=1.0))
    # f(1) = 1/2, f(0) = 0, f(.5) = .25/1.25 = .2 ; mean over 4 entries
    assert val.item() == pytest.approx((0.5 + 0.2) / 4)


def test_token_tanh_by_hand():
    val, _ = _loss_on(X, deft.DensityLoss(kind="tanh", beta=2.0))
    assert val.item() == pytest.approx((math.tanh(2.0) + math.tanh(1.0)) / 4)


def test_feature_map_l0_by_hand():
    val, _ = _loss_on(X, deft.DensityLoss(kind="l0", eps=1.0, granularity="feature_map"))
    # s = mean over tokens = [0.75, 0]; f(.75) = .5625 / 1.5625 = .36 ; divided by n = 2 units
    assert val.item() == pytest.approx(0.36 / 2)


def test_mask_excludes_padding_from_loss():
    val, x = _loss_on(X, deft.DensityLoss(kind="l0", eps=1.0), mask=torch.tensor([[1, 0]]))
    assert val.item() == pytest.approx(0.5 / 2)
    val.backward()
    assert torch.all(x.grad[0, 1] == 0)  # the padded token gets no gradient


def test_layers_are_averaged_and_weighted():
    model = nn.Sequential(nn.Identity(), nn.ReLU())
    x = torch.tensor([[[1.0, -1.0]]])
    # site 0 sees [1, -1] -> mean f = 0.5 ; site 1 sees [1, 0] -> 0.25
    val, _ = _loss_on(x, deft.DensityLoss(eps=1.0), sites=("0", "1"), model=model)
    assert val.item() == pytest.approx((0.5 + 0.25) / 2)
    val, _ = _loss_on(x, deft.DensityLoss(eps=1.0, layer_weights=[0.0, 2.0]), sites=("0", "1"), model=model)
    assert val.item() == pytest.approx((0.0 + 0.5) / 2)
    # feature map: s0 = [1, -1] -> f sum = 1 ; s1 = [1, 0] -> .5 ; n = 4 units in all
    val, _ = _loss_on(x, deft.DensityLoss(eps=1.0, granularity="feature_map"), sites=("0", "1"), model=model)
    assert val.item() == pytest.approx(1.5 / 4)


def test_loss_partials_are_reduced_not_full_activations():
    model, cfg = _tiny_model("bert")
    for gran, shape in [("token", ()), ("feature_map", (64,))]:
        loss = deft.DensityLoss(granularity=gran)
        probe = deft.ActivationProbe(model).track(loss)
        with probe:
            model(**_batch("bert", cfg))
        assert all(tuple(p[0].shape) == shape for s in probe.sites for p in s.partials)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"eps": 0}, "eps"),
        ({"eps": -1e-7}, "eps"),
        ({"beta": 0}, "beta"),
        ({"kind": "l1"}, "kind"),
        ({"granularity": "sentence"}, "granularity"),
    ],
)
def test_loss_validation(kwargs, word):
    with pytest.raises(ValueError, match=word):
        deft.DensityLoss(**kwargs)


def test_threshold_validation():
    model, _ = _tiny_model("bert")
    with pytest.raises(ValueError, match="threshold"):
        deft.ActivationProbe(model, threshold=-0.1)


def test_unknown_model_type_says_what_to_do():
    model = nn.Sequential(nn.Linear(2, 2))
    model.config = type("Cfg", (), {"model_type": "mystery"})()
    with pytest.raises(deft.UnsupportedModelError) as e:
        deft.ActivationProbe(model)
    msg = str(e.value)
    assert "mystery" in msg and "llama" in msg and "sites=" in msg
    with pytest.raises(ValueError, match="matched no module"):
        deft.ActivationProbe(model, sites=["*.mlp.act_fn"])


def test_gradient_reaches_lora_not_frozen_weights():
    from peft import LoraConfig, get_peft_model

    model, cfg = _tiny_model("bert")
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["intermediate.dense"], init_lora_weights=False))
    model.train()
    loss = deft.DensityLoss(eps=1e-3)
    probe = deft.ActivationProbe(model).track(loss)
    with probe:
        model(**_batch("bert", cfg))
        loss(probe).backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in frozen)


@pytest.mark.parametrize("granularity", ["token", "feature_map"])
def test_gradient_checkpointing_same_loss_and_grad(granularity):
    from peft import LoraConfig, get_peft_model

    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        cfg = tiny_config("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = AutoModel.from_config(cfg)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["intermediate.dense"], init_lora_weights=False))
        model.train()
        loss = deft.DensityLoss(eps=1e-3, granularity=granularity)
        probe = deft.ActivationProbe(model).track(loss)
        with probe:
            out = model(**_batch("bert", cfg))
            val = loss(probe) + 0.0 * out.last_hidden_state.sum()
            val.backward()
        grads = [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad]
        results.append((val.item(), grads, [s.tokens for s in probe.sites]))
    (v0, g0, t0), (v1, g1, t1) = results
    assert v0 == pytest.approx(v1, rel=1e-6)
    assert t0 == t1  # recomputation in backward was not counted twice
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_report_json_roundtrip_and_table():
    model, cfg = _tiny_model("t5")
    r = deft.measure_density(model, [_batch("t5", cfg)])
    d = json.loads(json.dumps(r.to_dict()))
    r2 = deft.DensityReport.from_dict(d)
    assert r2.overall == pytest.approx(r.overall) and r2.groups == pytest.approx(r.groups)
    assert "encoder" in r.table() and "overall" in r.table()


def test_measure_density_restores_mode_and_detaches():
    model, cfg = _tiny_model("bert")
    model.train()
    deft.measure_density(model, [_batch("bert", cfg)])
    assert model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_density_change_formula():
    assert deft.density_change(0.8, 0.2) == pytest.approx(75.0)
    assert deft.density_change(0.5, 0.6) == pytest.approx(-20.0)
    with pytest.raises(ValueError):
        deft.density_change(0.0, 0.1)


def test_real_minilm_offline():
    from transformers import AutoTokenizer

    from deft.models import minilm_path

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    probe = deft.ActivationProbe(model)
    assert len(probe.sites) == 6
    assert {type(s.module).__name__ for s in probe.sites} == {"GELUActivation"}
    batch = tok(["a gripping, funny film", "dull"], padding=True, return_tensors="pt")
    r = deft.measure_density(model, [dict(batch)], threshold=0.01)
    assert 0.3 < r.overall < 1.0
    assert r.layers[0].tokens == int(batch["attention_mask"].sum())


def test_prefix_tuning_classification_is_recorded():
    # peft's prefix tuning for classification calls model.bert directly, never the task model's forward
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    cfg = tiny_config("bert", num_labels=2)
    model = get_peft_model(
        AutoModelForSequenceClassification.from_config(cfg),
        PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
    )
    batch = _batch("bert", cfg)
    report = deft.measure_density(model, [batch], threshold=0.05)
    assert report.layers[0].tokens == 11  # the 3 virtual tokens have no MLP activations; padding excluded
    assert 0 < report.overall <= 1
    loss = deft.DensityLoss(eps=1e-3)
    probe = deft.ActivationProbe(model).track(loss)
    model.train()
    with probe:
        model(**batch)
        loss(probe).backward()
    prefix = [p for n, p in model.named_parameters() if p.requires_grad and "prompt_encoder" in n]
    assert prefix and prefix[0].grad is not None and prefix[0].grad.abs().sum() > 0
