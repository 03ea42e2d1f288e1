"""ADA-DEFT: adaptive layer weights and MLP block skipping."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, TrainingArguments

import deft
from deft.inference.skip import ConstantOutput, ZeroWidth, choose_skips, skip_mlp_blocks
from deft.testing import tiny_config


def _silence_layer0(model_type: str):
    """A tiny ReLU model whose first MLP block outputs exact zeros for any input."""
    torch.manual_seed(0)
    kw = {"hidden_act": "relu"} if model_type != "t5" else {}
    model = AutoModel.from_config(tiny_config(model_type, **kw)).eval()
    with torch.no_grad():
        if model_type == "bert":
            lin = model.encoder.layer[0].intermediate.dense
            lin.weight.zero_()
            lin.bias.fill_(-1.0)  # relu(-1) = 0 for every unit and token
        elif model_type == "llama":
            model.layers[0].mlp.gate_proj.weight.zero_()  # relu(0) * up = 0
        elif model_type == "t5":
            model.encoder.block[0].layer[1].DenseReluDense.wi.weight.zero_()
    return model


def _inputs(model_type):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 6), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model_type == "t5":
        batch["decoder_input_ids"] = ids[:, :3]
    return batch


@pytest.mark.parametrize("model_type", ["bert", "llama", "t5"])
def test_silent_block_is_detected_skipped_and_output_unchanged(model_type):
    model = _silence_layer0(model_type)
    batch = _inputs(model_type)
    report = deft.measure_density(model, [batch])
    assert report.layers[0].density == 0.0
    assert all(layer.density > 0 for layer in report.layers[1:])
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    n_before = sum(p.numel() for p in model.parameters())

    model, info = skip_mlp_blocks(model, report, threshold=0.0)
    expected_down = {
        "bert": "encoder.layer.0.output.dense",
        "llama": "layers.0.mlp.down_proj",
        "t5": "encoder.block.0.layer.1.DenseReluDense.wo",
    }[model_type]
    assert info.skipped == [expected_down]
    downs = [m for m in model.modules() if isinstance(m, ConstantOutput)]
    assert len(downs) == 1 and any(isinstance(m, ZeroWidth) for m in model.modules())
    # the weights are really gone
    assert n_before - sum(p.numel() for p in model.parameters()) == info.freed_params > 0
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_skip_refuses_report_of_another_model():
    model = _silence_layer0("bert")
    other = AutoModel.from_config(tiny_config("bert", num_hidden_layers=3))
    report = deft.measure_density(other, [_inputs("bert")])
    with pytest.raises(ValueError, match="layers"):
        skip_mlp_blocks(model, report, 0.0)


def test_choose_skips_respects_max_drop():
    model = _silence_layer0("bert")
    report = deft.measure_density(model, [_inputs("bert")])
    calls = []

    def evaluate(m):
        skipped = sum(isinstance(x, ConstantOutput) for x in m.modules())
        calls.append(skipped)
        return 90.0 - (0.0 if skipped <= 1 else 5.0)  # the silent block is free, the live one costs 5 points

    out = choose_skips(lambda: _silence_layer0("bert"), report, evaluate, max_drop=0.5)
    assert out["skip_layers"] == [0]
    assert [t["accepted"] for t in out["trace"]] == [True, False]


def test_adaptive_weights_push_the_sparsest_layer(tmp_path):
    from deft.train.trainer import DeftTrainer, DensityConfig

    model = AutoModel.from_config(tiny_config("bert"))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = DeftTrainer(
        model,
        args,
        density=DensityConfig(alpha=1.0, target_density=None, adaptive=True, adaptive_gamma=2.0, adaptive_mix=1.0),
    )
    s0, s1 = trainer.probe.sites
    s0.nonzero, s0.entries = 20, 100  # layer 0 at 20 % density
    s1.nonzero, s1.entries = 90, 100  # layer 1 at 90 %
    trainer._update_adaptive_weights()
    w = trainer.density_loss.layer_weights
    # v = (1 - d + 1e-3)^2 -> weights 2 v_i / sum v, mean 1
    v0, v1 = (0.801) ** 2, (0.101) ** 2
    assert w == pytest.approx([2 * v0 / (v0 + v1), 2 * v1 / (v0 + v1)])
    assert sum(w) / 2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="adaptive_mix"):
        DensityConfig(adaptive_mix=1.5)
