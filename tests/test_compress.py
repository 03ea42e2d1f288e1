"""WANDA pruning, weight quantization and DEFT training on top of them (tiny random models)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, TrainingArguments

from deft.compress.linears import linear_layers
from deft.compress.prune import (
    MASKS_NAME,
    PruneConfig,
    apply_masks,
    keep_pruned,
    load_masks,
    merge_lora_pruned,
    save_masks,
    wanda_mask,
    wanda_prune,
    weight_sparsity,
)
from deft.compress.quantize import (
    QuantConfig,
    QuantError,
    QuantizedLinear,
    dequantize_model,
    quantize_model,
)
from deft.core.report import measure_density
from deft.methods import MethodConfig, apply_method
from deft.recipes.compress import REPORT_NAME, PruneArgs, prepare_compressed_model, prune
from deft.testing import tiny_config
from deft.train.trainer import DeftTrainer, DensityConfig
from test_trainer import pad_features


# ---------------------------------------------------------------------------------------------- helpers
def tiny(model_type: str = "bert", seed: int = 0):
    torch.manual_seed(seed)
    drop = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) if model_type == "bert" else {}
    if model_type == "gpt2":
        drop = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    cfg = tiny_config(model_type, num_labels=2, **drop)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def batches(n: int = 3, batch: int = 4, seed: int = 0, length: int = 12):
    """Right-padded batches of random tokens with very different lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(3, length + 1, (batch,), generator=g)
        ids = torch.randint(3, 100, (batch, length), generator=g)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def toy_dataset(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(3, 100, (int(L),), generator=g).tolist(), "labels": i % 2}
        for i, L in enumerate(torch.randint(3, 14, (n,), generator=g))
    ]


collate = pad_features  # the toy-dataset collator shared with test_trainer


def train_steps(model, tmp_path, steps: int = 3, alpha: float = 1.0) -> DeftTrainer:
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    density = DensityConfig(alpha=alpha, eps=1e-3, target_density=None, alpha_warmup=0.0)  # the loss, from step 1
    trainer = DeftTrainer(model, args, density=density, train_dataset=toy_dataset(), data_collator=collate)
    trainer.train()
    return trainer


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in linear_layers(model).items()}


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


class OneLayer(nn.Module):
    """One Linear inside a 'block' (``layers.0``) that takes the calibration features directly."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(weight.shape[1], weight.shape[0], bias=False)])
        with torch.no_grad():
            self.layers[0].weight.copy_(weight)

    def forward(self, x, attention_mask=None):
        return self.layers[0](x)


# ---------------------------------------------------------------------------------------------- WANDA
def _hand_example():
    W = torch.tensor([[1.0, 4.0, 3.0, 1.0], [0.5, 2.0, -4.0, 3.0]])
    # two real tokens and one padding token that would change every decision if it were counted
    x = torch.tensor([[[3.0, 0.0, 1.0, 2.0], [4.0, 1.0, 0.0, 0.0], [0.0, 100.0, 100.0, 0.0]]])
    return W, {"x": x, "attention_mask": torch.tensor([[1, 1, 0]])}


def test_wanda_hand_example_unstructured():
    W, batch = _hand_example()
    # ||X_j|| over the two real tokens: sqrt(9+16), sqrt(0+1), sqrt(1+0), sqrt(4+0) = 5, 1, 1, 2
    # scores row 0: |1,4,3,1| * (5,1,1,2) = 5, 4, 3, 2 -> drop columns 3 and 2
    # scores row 1: |.5,2,-4,3| * (5,1,1,2) = 2.5, 2, 4, 6 -> drop columns 1 and 0
    # (magnitude alone would drop columns 0 and 3 of row 0: the activations decide here)
    model = OneLayer(W)
    report = wanda_prune(model, [batch], PruneConfig(sparsity=0.5))
    expected = torch.tensor([[1.0, 4.0, 0.0, 0.0], [0.0, 0.0, -4.0, 3.0]])
    assert torch.equal(model.layers[0].weight.detach(), expected)
    assert torch.equal(report.masks["layers.0"], expected != 0)
    assert report.layers == {"layers.0": 0.5} and report.overall == 0.5
    assert report.calib_tokens == 2  # the padding token was excluded


def test_wanda_hand_example_nm():
    W, batch = _hand_example()
    # 1:2 keeps the best of columns (0,1) and of (2,3): row 0 scores 5>4, 3>2; row 1 scores 2.5>2, 6>4
    model = OneLayer(W)
    wanda_prune(model, [batch], PruneConfig(nm="1:2"))
    assert torch.equal(model.layers[0].weight.detach(), torch.tensor([[1.0, 0.0, 3.0, 0.0], [0.5, 0.0, 0.0, 3.0]]))


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_wanda_unstructured_exact_per_row(sparsity):
    model = tiny("bert")
    report = wanda_prune(model, batches(), PruneConfig(sparsity=sparsity))
    layers = linear_layers(model)
    assert set(report.masks) == set(layers) and len(layers) == 12  # 6 linears x 2 layers; head/pooler untouched
    for name, module in layers.items():
        w = module.weight
        zeros_per_row = (w == 0).sum(dim=1)
        assert (zeros_per_row == math.floor(w.shape[1] * sparsity + 1e-6)).all(), name
        assert torch.equal(report.masks[name], w != 0)
    assert (model.classifier.weight != 0).all() and (model.bert.pooler.dense.weight != 0).all()
    assert abs(weight_sparsity(model)["overall"] - report.overall) < 1e-9


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
def test_wanda_2_4_pattern_every_group(model_type):
    model = tiny(model_type)
    report = wanda_prune(model, batches(), PruneConfig(nm="2:4"))
    for name, module in linear_layers(model).items():
        w = module.weight.t() if model_type == "gpt2" else module.weight  # (out, in)
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (groups == 2).all(), name
    assert abs(report.overall - 0.5) < 1e-9


def test_wanda_conv1d_matches_explicit_scores():
    """GPT-2's Conv1D stores (in, out): the per-output comparison must run over its columns."""
    model, dense = tiny("gpt2"), tiny("gpt2")
    calib = batches()
    captured: list[torch.Tensor] = []
    fc = dense.transformer.h[0].mlp.c_fc
    h = fc.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        for b in calib:
            dense(**b)
    h.remove()
    sq = sum((x[b["attention_mask"].bool()] ** 2).sum(0) for x, b in zip(captured, calib, strict=True))
    scores = fc.weight.detach().abs().t() * sq.sqrt()[None, :]  # (out, in)
    k = int(scores.shape[1] * 0.5)
    drop = scores.argsort(dim=1)[:, :k]
    expected = torch.ones_like(scores, dtype=torch.bool).scatter_(1, drop, False).t()  # back to (in, out)

    report = wanda_prune(model, calib, PruneConfig(sparsity=0.5, sequential=False))
    got = model.transformer.h[0].mlp.c_fc.weight != 0
    assert torch.equal(got, expected)
    assert torch.equal(report.masks["transformer.h.0.mlp.c_fc"], expected)
    assert ((~got).sum(dim=0) == k).all()  # exact per output column of the Conv1D weight


def test_sequential_calibration_sees_pruned_inputs():
    a, b = tiny("bert"), tiny("bert")
    wanda_prune(a, batches(), PruneConfig(sequential=True))
    wanda_prune(b, batches(), PruneConfig(sequential=False))
    first = "bert.encoder.layer.0.attention.self.query"
    later = "bert.encoder.layer.1.output.dense"
    la, lb = linear_layers(a), linear_layers(b)
    assert torch.equal(la[first].weight, lb[first].weight)  # block 0 sees the same (dense) inputs
    assert not torch.equal(la[later].weight != 0, lb[later].weight != 0)


# ---------------------------------------------------------------------------------------------- masks
def test_masks_survive_deft_training_and_merge(tmp_path):
    model = tiny("bert")
    masks = wanda_prune(model, batches(), PruneConfig(sparsity=0.5)).masks
    peft_model = apply_method(model, MethodConfig(method="lora", lora_r=2), task_type="SEQ_CLS")
    keep_pruned(peft_model, masks)
    before, lora_before = base_weights(peft_model), lora_weights(peft_model)
    assert set(before) == set(masks)

    trainer = train_steps(peft_model, tmp_path, steps=3, alpha=1.0)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    after = base_weights(peft_model)
    for n, m in masks.items():
        assert torch.equal(after[n], before[n]) and (after[n][~m] == 0).all(), n
    lora_after = lora_weights(peft_model)
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)

    deltas = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A"):
            deltas[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").detach()
    assert len(deltas) == len(masks) and any(d.abs().sum() > 0 for d in deltas.values())
    trainer.probe.detach()
    merged = merge_lora_pruned(peft_model, masks)
    layers = linear_layers(merged)
    for n, m in masks.items():
        w = layers[n].weight.detach()
        assert (w[~m] == 0).all(), n  # the merged delta is pruned too
        assert torch.allclose(w[m], (before[n] + deltas[n])[m], atol=1e-6), n
    assert weight_sparsity(merged)["overall"] == pytest.approx(0.5)


def test_plain_merge_is_repruned_by_keep_pruned():
    from peft import LoraConfig, get_peft_model

    model = tiny("bert")
    masks = wanda_prune(model, batches(), PruneConfig(sparsity=0.5)).masks
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=2, target_modules=["intermediate.dense", "output.dense"], init_lora_weights=False, task_type="SEQ_CLS"
        ),
    )
    keeper = keep_pruned(peft_model, masks)
    merged = peft_model.merge_and_unload()
    down = "bert.encoder.layer.0.output.dense"
    assert (linear_layers(merged)[down].weight[~masks[down]] != 0).any()  # a plain merge re-densifies...
    with torch.no_grad():
        merged(**batches(1)[0])
    for n, m in masks.items():
        assert (linear_layers(merged)[n].weight[~m] == 0).all(), n  # ...until the layer's next forward
    keeper.remove()


def test_save_load_masks_and_mismatch(tmp_path):
    model = tiny("bert")
    masks = wanda_prune(model, batches(), PruneConfig(nm="2:4")).masks
    path = save_masks(masks, tmp_path / MASKS_NAME, metadata={"nm": "2:4"})
    loaded = load_masks(tmp_path)  # a folder finds prune_masks.safetensors
    assert loaded.keys() == masks.keys() and all(torch.equal(loaded[k], masks[k]) for k in masks)
    fresh = tiny("bert")
    apply_masks(fresh, loaded)  # masks on the original weights == the pruned model
    assert all(
        torch.equal(a.weight, b.weight)
        for a, b in zip(linear_layers(fresh).values(), linear_layers(model).values(), strict=True)
    )
    with pytest.raises(ValueError, match="match no layer"):
        apply_masks(tiny("gpt2"), loaded)
    assert path.exists()


# ---------------------------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("bits,bound", [(8, 0.01), (4, 0.15)])
def test_quantized_linear_close_to_float(bits, bound):
    torch.manual_seed(0)
    lin = nn.Linear(96, 24)
    q = QuantizedLinear.from_float(lin, bits)
    x = torch.randn(10, 96)
    rel = ((q(x) - lin(x)).norm() / lin(x).norm()).item()
    assert rel < bound
    w = lin.weight.detach()
    err = (q.dequantize() - w).abs()
    # symmetric rounding: at most half a step, the step being absmax / qmax of the weight's group
    group = q.group_size
    absmax = torch.nn.functional.pad(w.abs(), (0, -96 % group)).reshape(24, -1, group).amax(-1)
    step = (absmax / (2 ** (bits - 1) - 1)).repeat_interleave(group, dim=1)[:, :96]
    assert (err <= step / 2 + 1e-7).all()


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
@pytest.mark.parametrize("bits,bound", [(8, 0.01), (4, 0.1)])
def test_quantized_model_forward_close(model_type, bits, bound):
    dense, quant = tiny(model_type), tiny(model_type)
    report = quantize_model(quant, QuantConfig(bits=bits, backend="deft"))
    assert len(report.layers) == (8 if model_type == "gpt2" else 12)
    assert all(isinstance(m, QuantizedLinear) for m in linear_layers(quant).values())
    assert report.bytes_after < report.bytes_before / (3 if bits == 8 else 6)
    assert report.max_abs_error < 0.1
    b = batches(1)[0]
    with torch.no_grad():
        ref, got = dense(**b).logits, quant(**b).logits
    assert ((got - ref).norm() / ref.norm()).item() < bound


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_and_density_train_on_quantized_base(bits, tmp_path):
    model = tiny("bert")
    quantize_model(model, QuantConfig(bits=bits, backend="deft"))
    codes = {n: (m.weight.clone(), m.scales.clone()) for n, m in linear_layers(model).items()}
    peft_model = apply_method(model, MethodConfig(method="lora", lora_r=2), task_type="SEQ_CLS")
    wrapped = [m for m in peft_model.modules() if hasattr(m, "lora_A")]
    assert wrapped and all(isinstance(m.get_base_layer(), QuantizedLinear) for m in wrapped)
    lora_before = lora_weights(peft_model)

    trainer = train_steps(peft_model, tmp_path, steps=3, alpha=1.0)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(math.isfinite(h["loss"]) and math.isfinite(h["density_loss"]) for h in logs)
    lora_after = lora_weights(peft_model)
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    for n, m in linear_layers(peft_model).items():
        assert (
            m.weight.dtype == torch.int8 and torch.equal(m.weight, codes[n][0]) and torch.equal(m.scales, codes[n][1])
        )
    trainer.probe.detach()
    report = measure_density(peft_model, batches(2))
    assert 0.0 < report.overall <= 1.0 and len(report.layers) == 2

    # a quantized base cannot be merged into silently: peft's merge fails, ours says what to do
    with pytest.raises(ValueError, match="dequantize"):
        merge_lora_pruned(peft_model, {})
    dequantize_model(peft_model)
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, QuantizedLinear) for m in merged.modules())


def test_prune_then_quantize_keeps_zeros():
    model = tiny("bert")
    masks = wanda_prune(model, batches(), PruneConfig(nm="2:4")).masks
    quantize_model(model, QuantConfig(bits=4, backend="deft"))
    for n, m in linear_layers(model).items():
        assert (m.dequantize()[~masks[n]] == 0).all(), n
    assert weight_sparsity(model)["overall"] >= 0.5
    keep_pruned(model, masks)  # verifies, registers nothing on frozen codes
    with pytest.raises(ValueError, match="prune first"):
        wanda_prune(model, batches(), PruneConfig())


def test_peft_merge_into_quantized_base_fails_loudly():
    model = tiny("bert")
    quantize_model(model, QuantConfig(bits=8, backend="deft"))
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["output.dense"], init_lora_weights=False))
    with pytest.raises(RuntimeError):
        peft_model.merge_and_unload()


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "kwargs,option",
    [
        (dict(sparsity=1.5), "sparsity"),
        (dict(sparsity=-0.1), "sparsity"),
        (dict(sparsity=True), "sparsity"),
        (dict(nm="3:2"), "nm"),
        (dict(nm="2-4"), "nm"),
        (dict(nm="0:4"), "nm"),
        (dict(calib_batches=0), "calib_batches"),
        (dict(targets=""), "targets"),
    ],
)
def test_bad_prune_options(kwargs, option):
    with pytest.raises(ValueError, match=option):
        PruneConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,option",
    [
        (dict(bits=3), "bits"),
        (dict(bits=True), "bits"),
        (dict(group_size=0), "group_size"),
        (dict(bits=4, group_size=33), "group_size"),
        (dict(backend="gpu"), "backend"),
    ],
)
def test_bad_quant_options(kwargs, option):
    with pytest.raises(ValueError, match=option):
        QuantConfig(**kwargs)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="nm"):
        wanda_mask(torch.rand(4, 6), PruneConfig(nm="2:4"))  # 6 inputs do not split into groups of 4
    with pytest.raises(ValueError, match="targets entry"):
        wanda_prune(tiny("bert"), batches(), PruneConfig(targets="no_such_layer"))
    peft_model = apply_method(tiny("bert"), MethodConfig(method="lora"), task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="bare model"):
        wanda_prune(peft_model, batches(), PruneConfig())
    with pytest.raises(QuantError, match="bare model"):
        quantize_model(peft_model, QuantConfig(backend="deft"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_bnb_backend_needs_cuda():
    assert QuantConfig(backend="auto").resolved_backend() == "deft"
    with pytest.raises(QuantError, match="CUDA"):
        quantize_model(tiny("bert"), QuantConfig(bits=4, backend="bnb"))


# ---------------------------------------------------------------------------------------------- CLI glue


def test_prune_command_and_train_wiring(tiny_model_dir, tmp_path):
    from deft.recipes.common import RunError
    from deft.tasks import load_model_and_tokenizer

    out = tmp_path / "prune"
    args = PruneArgs(
        model=str(tiny_model_dir),
        task="sst2",
        data_source="builtin",
        sparsity=0.5,
        calib_batches=2,
        calib_batch_size=8,
        max_length=32,
        output=str(out),
    )
    result = prune(args)
    assert (out / MASKS_NAME).exists() and (out / "model.safetensors").exists()
    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved["overall"] == pytest.approx(0.5) and saved["calib_batches"] == 2 and result["method"] == "wanda"
    with pytest.raises(RunError, match="overwrite"):
        prune(args)

    # the prune folder is a drop-in --model; --prune-dir on the original model gives the same weights
    pruned, _ = load_model_and_tokenizer(str(out), "sst2")
    original, _ = load_model_and_tokenizer(str(tiny_model_dir), "sst2")
    original, info = prepare_compressed_model(original, SimpleNamespace(prune_dir=str(out)))
    assert info["prune"]["layers"] == 12 and info["weight_sparsity"]["overall"] == pytest.approx(0.5)
    for (n, a), b in zip(linear_layers(pruned).items(), linear_layers(original).values(), strict=True):
        assert torch.equal(a.weight, b.weight), n

    quantized, info = prepare_compressed_model(pruned, SimpleNamespace(quantize=8, quant_backend="deft"))
    assert info["quant"]["backend"] == "deft" and info["quant"]["compression"] > 3
    assert info["weight_sparsity"]["overall"] >= 0.5
    assert prepare_compressed_model(tiny("bert"), SimpleNamespace())[1] == {}
