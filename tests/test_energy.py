"""Energy model: hand-computed prices, monotonicity in sparsity, labelled ops on real model types."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn
from transformers import AutoModel, BertConfig

import deft
from deft.analysis.energy import EnergyConfig, EnergyReport, LayerEnergy, estimate_energy
from deft.testing import tiny_config


def _ones_linear() -> nn.Linear:
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.zero_()
    return lin


def test_single_linear_by_hand():
    # x = [1, 0, 2, 0] through W = ones(3, 4): y = [3, 3, 3]
    r = estimate_energy(_ones_linear(), [torch.tensor([[1.0, 0.0, 2.0, 0.0]])])
    (layer,) = r.layers
    assert (layer.macs, layer.macs_nonzero) == (12, 6)  # 4*3 dense; 2 non-zero inputs * 3 outputs
    assert (layer.weight_words, layer.weight_words_needed) == (12, 6)  # columns 1 and 3 of W are never fetched
    assert (layer.act_in, layer.act_in_nonzero, layer.act_out, layer.act_out_nonzero) == (4, 2, 3, 3)
    # dense: 12 MACs * 3.7 + 12 weight words * 1950 + (4 in + 3 out) words * 1950
    assert r.dense_pj == pytest.approx(12 * 3.7 + 12 * 1950 + 7 * 1950)  # 37094.4 pJ
    # zero-skip: 6 MACs, 6 weight words, 2 non-zero inputs read, 3 non-zero outputs written
    assert r.zero_skip_pj == pytest.approx(6 * 3.7 + 6 * 1950 + 5 * 1950)  # 21472.2 pJ
    assert r.ratio == pytest.approx(21472.2 / 37094.4)
    assert r.layers[0].op == "other" and r.examples == 1


def test_weight_fetch_uses_the_union_over_tokens():
    # two tokens: inputs 0 and 2 are non-zero in at least one token, so W columns 0 and 2 are fetched once
    x = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    r = estimate_energy(_ones_linear(), [x])
    (layer,) = r.layers
    assert (layer.macs, layer.macs_nonzero, layer.weight_words_needed, layer.act_in_nonzero, layer.act_out_nonzero) == (
        24,
        9,
        6,
        3,
        6,
    )
    assert r.zero_skip_pj == pytest.approx(9 * 3.7 + 6 * 1950 + (3 + 6) * 1950)
    assert r.dense_pj == pytest.approx(24 * 3.7 + 12 * 1950 + (8 + 6) * 1950)


def test_config_prices_and_file(tmp_path):
    r = estimate_energy(_ones_linear(), [torch.tensor([[1.0, 0.0, 2.0, 0.0]])])
    cfg = EnergyConfig(mac_pj=4.6, activations_in="sram")  # fp32 mult + add; activations in an 8 KB SRAM
    assert r.reprice(cfg).dense_pj == pytest.approx(12 * 4.6 + 12 * 1950 + 7 * 5.0)
    off = EnergyConfig(skip_zero_activations=False, compress_activations=False)
    assert r.reprice(off).ratio == pytest.approx(1.0)

    good = tmp_path / "hw.yaml"
    good.write_text("mac_pj: 4.6\ndram_pj: 640\nweights_in: sram\n")
    c = EnergyConfig.from_file(good)
    assert (c.mac_pj, c.dram_pj, c.weights_in, c.sram_pj) == (4.6, 640.0, "sram", 5.0)
    (tmp_path / "hw.json").write_text(json.dumps({"dram_pj": 640.0}))
    assert EnergyConfig.from_file(tmp_path / "hw.json").dram_pj == 640.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("mac_pj: 4.6\ndram_cost: 640\n")
    with pytest.raises(ValueError, match="unknown key 'dram_cost'"):
        EnergyConfig.from_file(bad)
    with pytest.raises(ValueError, match="weights_in"):
        EnergyConfig(weights_in="hbm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mac_pj"):
        EnergyConfig(mac_pj=-1.0)


def test_sparser_activations_never_cost_more():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].bias.fill_(-0.3)  # with a negative bias, a smaller input leaves more ReLU outputs at exactly 0
    x = torch.randn(16, 8)
    reports = [estimate_energy(model, [scale * x]) for scale in (2.0, 1.0, 0.5, 0.1)]
    zeros = [1 - r.layers[1].input_nonzero_fraction for r in reports]
    assert zeros == sorted(zeros) and zeros[-1] > zeros[0]  # more zeros at the W2 input as the input shrinks
    skip = [r.zero_skip_pj for r in reports]
    assert all(a >= b for a, b in itertools.pairwise(skip)) and skip[-1] < skip[0]
    assert len({round(r.dense_pj, 6) for r in reports}) == 1  # a dense accelerator does not care

    # zeroing more input entries of any layer never raises the cost either
    lin = nn.Linear(8, 5)
    x = torch.randn(6, 8)
    prev = estimate_energy(lin, [x]).zero_skip_pj
    for i in range(8):
        x = x.clone()
        x[:, i] = 0
        now = estimate_energy(lin, [x]).zero_skip_pj
        assert now <= prev
        prev = now


def _bert_relu():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_act="relu",
    )
    return AutoModel.from_config(cfg).eval()


def test_tiny_bert_end_to_end_matches_probe_and_hand_counts():
    model = _bert_relu()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # lengths 7 and 4: 11 real tokens
    batch = {"input_ids": ids, "attention_mask": mask}
    r = estimate_energy(model, [batch])
    assert (r.examples, r.tokens) == (2, 11)
    ops = r.by_op()
    assert set(ops) == {"mlp_down", "mlp_up", "attention_proj", "attention_matmul", "other"}

    # W2 input = the MLP activation: same exact counts as the density probe
    dens = deft.measure_density(model, [batch])
    downs = [layer for layer in r.layers if layer.op == "mlp_down"]
    assert [layer.act_in_nonzero for layer in downs] == [layer.nonzero for layer in dens.layers]
    assert [layer.act_in for layer in downs] == [layer.entries for layer in dens.layers]
    assert ops["mlp_down"]["input_nonzero_fraction"] < 0.9  # ReLU: real zeros
    assert ops["mlp_up"]["input_nonzero_fraction"] == 1.0

    # MACs by hand: MLP 11 tokens * 32 * 64 per projection per layer; QK^T and AV (7^2 + 4^2) * 32 each
    assert ops["mlp_up"]["macs"] == 2 * 11 * 32 * 64
    assert ops["attention_proj"]["macs"] == 2 * 4 * 11 * 32 * 32  # query, key, value, output
    assert ops["attention_matmul"]["macs"] == 2 * 2 * (7 * 7 + 4 * 4) * 32
    assert ops["other"]["macs"] == 2 * 32 * 32  # the pooler, on one vector per example
    assert 0 < r.ratio < 1 and ops["mlp_down"]["zero_skip_pj"] < ops["mlp_down"]["dense_pj"]

    text = r.table(per_layer=True)
    assert "mlp_down" in text and "DEFT" in text and "encoder.layer.1.output.dense" in text
    back = EnergyReport.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.zero_skip_pj == pytest.approx(r.zero_skip_pj) and back.ratio == pytest.approx(r.ratio)

    # padding is counted only when asked: same energy as the batch without its padded positions
    r_pad = estimate_energy(model, [batch], include_padding=True)
    assert r_pad.dense_pj > r.dense_pj and r_pad.tokens == 14


def test_lora_and_conv1d_are_labelled_by_the_layer_they_belong_to():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_bert_relu(), LoraConfig(r=2, target_modules=["dense"]))
    ids = torch.randint(3, 100, (2, 5))
    r = estimate_energy(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    ops = {layer.name: layer.op for layer in r.layers}
    assert ops["encoder.layer.0.output.dense.base_layer"] == "mlp_down"
    assert ops["encoder.layer.0.output.dense.lora_A.default"] == "mlp_down"  # sees the same sparse input
    assert ops["encoder.layer.0.intermediate.dense.lora_B.default"] == "mlp_up"
    assert ops["encoder.layer.0.attention.output.dense.base_layer"] == "attention_proj"

    torch.manual_seed(0)
    gpt2 = AutoModel.from_config(tiny_config("gpt2")).eval()
    r = estimate_energy(gpt2, [{"input_ids": torch.randint(3, 100, (1, 6))}])
    ops = {layer.name: layer.op for layer in r.layers}
    assert ops["h.0.mlp.c_proj"] == "mlp_down" and ops["h.0.attn.c_proj"] == "attention_proj"
    assert ops["h.0.attn.c_attn"] == "attention_proj" and ops["h.0.attn.QK^T"] == "attention_matmul"
    qk = next(layer for layer in r.layers if layer.name == "h.0.attn.QK^T")
    assert qk.macs == 6 * 6 * 32  # c_attn's width / 3 = heads * head_dim = 32


@pytest.mark.parametrize("method, pairs", [("prefix", 7 * 11 + 4 * 8), ("prompt", 11 * 11 + 8 * 8)])
def test_virtual_tokens_are_priced(method, pairs):
    """Prefix tuning adds 4 keys per query; prompt tuning 4 tokens per example (lengths 7 and 4 here)."""
    from transformers import AutoModelForSequenceClassification

    from deft.methods import MethodConfig, apply_method

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(_bert_relu().config)
    model = apply_method(base, MethodConfig(method=method, num_virtual_tokens=4), task_type="SEQ_CLS")
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    r = estimate_energy(model, [{"input_ids": ids, "attention_mask": mask}])
    assert (r.examples, r.tokens) == (2, 11)  # real tokens; virtual ones are computed but not counted here
    assert r.by_op()["attention_matmul"]["macs"] == 2 * 2 * pairs * 32  # 2 layers x (QK^T, AV) x pairs x width


def test_energy_layer_defaults_roundtrip():
    layer = LayerEnergy(name="x", op="other", macs=10, macs_nonzero=5, act_in=4, act_in_nonzero=2)
    d = EnergyReport([layer]).to_dict()
    assert d["layers"][0]["dense_pj"] == pytest.approx(10 * 3.7 + 4 * 1950)
    assert EnergyReport.from_dict(d).layers[0] == layer
