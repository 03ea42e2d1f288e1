"""deft.methods on tiny random-init models: one training step per method x family, counts, adapters, I/O."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import warnings

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

from deft.arch.specs import MLP_SPECS, full_match
from deft.methods import (
    METHODS,
    AdapterWrapper,
    BottleneckAdapter,
    MethodConfig,
    MethodError,
    apply_method,
    count_parameters,
    load_trainable,
    pooler_module_name,
    qlora_available,
    qlora_quantization_config,
    resolve_targets,
    save_trainable,
)
from deft.testing import tiny_config

NVT = 4  # virtual tokens for prefix / prompt

# ---------------------------------------------------------------- tiny models and batches


def build(family: str, task: str):
    torch.manual_seed(0)
    if task == "SEQ_CLS":
        extra = {"pad_token_id": 0} if family in ("llama", "t5") else {}
        return AutoModelForSequenceClassification.from_config(tiny_config(family, num_labels=2, **extra))
    if task == "CAUSAL_LM":
        return AutoModelForCausalLM.from_config(tiny_config(family))
    if task == "SEQ_2_SEQ_LM":
        return AutoModelForSeq2SeqLM.from_config(tiny_config(family, decoder_start_token_id=0, pad_token_id=0))
    if task == "IMAGE_CLS":
        return AutoModelForImageClassification.from_config(tiny_config(family, num_labels=2))
    raise ValueError(task)


def batch(task: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1])
    if task == "IMAGE_CLS":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g), "labels": labels}
    ids = torch.randint(3, 100, (2, 8), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "SEQ_CLS":
        out["labels"] = labels
    elif task == "CAUSAL_LM":
        out["labels"] = ids.clone()
    else:
        out["labels"] = torch.randint(3, 100, (2, 5), generator=g)
    return out


def method_config(method: str) -> MethodConfig:
    if method.startswith("adapter-"):
        return MethodConfig(method="adapter", adapter_type=method.split("-")[1])
    # no bias training: the hand-counted LoRA parameters below are its A and B matrices only
    return MethodConfig(method=method, num_virtual_tokens=NVT, lora_bias="none")


# ---------------------------------------------------------------- independent parameter arithmetic

# Linears "mlp+attention" LoRA must adapt, written out per family (not derived from deft's table).
LORA_TARGETS = {
    "bert": r".*layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)",
    "llama": r".*layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
    "t5": r".*block\.\d+\.layer\.\d+\.((SelfAttention|EncDecAttention)\.[qkvo]|DenseReluDense\.(wi|wo))",
    "vit": r".*layers\.\d+\.(attention\.[qkvo]_proj|mlp\.fc[12])",
}
IA3_KV = {"bert": r".*attention\.self\.(key|value)", "llama": r".*self_attn\.[kv]_proj"}
IA3_FF = {"bert": r".*layer\.\d+\.(intermediate|output)\.dense", "llama": r".*mlp\.(gate|up|down)_proj"}
ADAPTER_SITES = {  # (down-projection, attention output) leaf patterns
    "bert": (r".*layer\.\d+\.output\.dense", r".*attention\.output\.dense"),
    "llama": (r".*mlp\.down_proj", r".*self_attn\.o_proj"),
    "t5": (r".*DenseReluDense\.wo", r".*layer\.0\.SelfAttention\.o"),
    "vit": (r".*mlp\.fc2", r".*attention\.o_proj"),
    "gpt2": (r".*mlp\.c_proj", r".*attn\.c_proj"),
}
HEADS = {"SEQ_CLS": {"bert": "classifier", "llama": "score"}, "IMAGE_CLS": {"vit": "classifier"}}


def _linears(base, pattern):
    return [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n)]


def expected_counts(base, family: str, task: str, method: str) -> tuple[int, int]:
    """(trainable, total) computed by hand from the base model's shapes."""
    head = HEADS.get(task, {}).get(family)
    head_params = sum(p.numel() for p in base.get_submodule(head).parameters()) if head else 0
    base_total = sum(p.numel() for p in base.parameters())
    hidden, layers = base.config.hidden_size, base.config.num_hidden_layers
    peft_head_copy = head_params  # peft trains a copy of the head and keeps the frozen original
    if method == "lora":
        added = sum(8 * (m.in_features + m.out_features) for m in _linears(base, LORA_TARGETS[family]))
    elif method == "ia3":
        added = sum(m.out_features for m in _linears(base, IA3_KV[family]))
        added += sum(m.in_features for m in _linears(base, IA3_FF[family]))
    elif method == "prompt":
        added = NVT * hidden
    elif method == "prefix":
        added = NVT * layers * 2 * hidden
    elif method == "bitfit":
        head_weights = sum(p.numel() for n, p in base.get_submodule(head).named_parameters() if "bias" not in n)
        biases = sum(p.numel() for n, p in base.named_parameters() if n.endswith("bias"))
        return biases + head_weights, base_total
    else:
        down, attn = ADAPTER_SITES[family]
        sites = _linears(base, down) + (_linears(base, attn) if method == "adapter-houlsby" else [])
        added = 0
        for m in sites:
            h = m.out_features
            b = max(1, h // 16)
            added += h * b + b + b * h + h
        peft_head_copy = 0
    return added + head_params, base_total + added + peft_head_copy


# ---------------------------------------------------------------- one training step per method x family

ALL = ("lora", "prefix", "prompt", "ia3", "bitfit", "adapter-pfeiffer", "adapter-houlsby")
LLAMA = ("lora", "prompt", "ia3", "adapter-pfeiffer", "adapter-houlsby")
CASES = (
    [("bert", "SEQ_CLS", m) for m in ALL]
    + [("llama", "SEQ_CLS", m) for m in LLAMA]
    + [("llama", "CAUSAL_LM", m) for m in (*LLAMA, "prefix")]
    + [("t5", "SEQ_2_SEQ_LM", m) for m in ("lora", "adapter-pfeiffer", "adapter-houlsby")]
    + [("vit", "IMAGE_CLS", m) for m in ("lora", "adapter-pfeiffer")]
)


def _head_is_trainable(model, head: str) -> bool:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    # peft: <...>.classifier.modules_to_save.default.weight; deft methods: classifier.weight
    return any(re.search(rf"(^|\.){head}\.(modules_to_save\.default\.)?(weight|bias)$", n) for n in names)


@pytest.mark.parametrize("family,task,method", CASES, ids=[f"{f}-{t}-{m}" for f, t, m in CASES])
def test_one_step(family, task, method):
    base = build(family, task)
    want_trainable, want_total = expected_counts(base, family, task, method)
    model = apply_method(base, method_config(method), task_type=task)
    model.train()

    counts = count_parameters(model)
    assert (counts.trainable, counts.total) == (want_trainable, want_total)
    assert 0 < counts.percent < 100
    assert counts.percent == pytest.approx(100 * want_trainable / want_total)
    head = HEADS.get(task, {}).get(family)
    if head:
        assert _head_is_trainable(model, head)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # all parameters go to the optimizer: a frozen one changes only if it wrongly received a gradient
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(**batch(task)).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()

    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], before) for n, before in frozen.items())
    assert any(not torch.equal(params[n], before) for n, before in trained.items())


# ---------------------------------------------------------------- adapters


@pytest.mark.parametrize("adapter_type", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize(
    "family,task",
    [("bert", "SEQ_CLS"), ("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("vit", "IMAGE_CLS"), ("gpt2", "CAUSAL_LM")],
)
def test_adapter_starts_as_base_and_keeps_names(family, task, adapter_type):
    base = build(family, task).eval()
    model = apply_method(copy.deepcopy(base), MethodConfig(method="adapter", adapter_type=adapter_type), task_type=task)
    model.eval()
    spec = MLP_SPECS[family]

    # hooks by name still find one module per layer, and the down-projection sees the same input
    seen: dict[str, list[torch.Tensor]] = {"base": [], "adapted": []}
    for key, m in (("base", base), ("adapted", model)):
        downs = [mod for n, mod in m.named_modules() if full_match(spec.down, n)]
        attns = [mod for n, mod in m.named_modules() if full_match(spec.attn_out, n)]
        assert len(downs) == (4 if family == "t5" else 2)  # t5: 2 encoder + 2 decoder blocks
        assert len(attns) == (4 if family == "t5" else 2)
        if key == "adapted":
            assert all(isinstance(d, AdapterWrapper) for d in downs)
            assert all(isinstance(a, AdapterWrapper) == (adapter_type == "houlsby") for a in attns)
        for d in downs:
            d.register_forward_pre_hook(lambda _m, args, k=key: seen[k].append(args[0].detach().clone()))

    inputs = {k: v for k, v in batch(task).items() if k != "labels"}
    if task == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :3]
    with torch.no_grad():
        out_base, out_adapted = base(**inputs).logits, model(**inputs).logits
    assert torch.equal(out_base, out_adapted)  # zero-initialised `up`: exactly the base model
    assert len(seen["base"]) == len(seen["adapted"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(seen["base"], seen["adapted"], strict=True))


def test_bottleneck_adapter_sizes():
    adapter = BottleneckAdapter(32, 2, "gelu")
    assert adapter.down.out_features == 2 and adapter.up.out_features == 32
    assert torch.count_nonzero(adapter(torch.randn(3, 32))) == 0
    model = apply_method(
        build("bert", "SEQ_CLS"), MethodConfig(method="adapter", adapter_reduction_factor=64), task_type="SEQ_CLS"
    )
    wrapped = [m for m in model.modules() if isinstance(m, AdapterWrapper)]
    assert wrapped and all(w.adapter.down.out_features == 1 for w in wrapped)  # 32 // 64 -> at least 1
    assert wrapped[0].weight is wrapped[0].base_layer.weight  # model code reading `.weight` still works


# ---------------------------------------------------------------- LoRA targets


def _lora_modules(model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}


def test_lora_default_targets_bert_mlp_and_attention_not_head():
    model = apply_method(build("bert", "SEQ_CLS"), MethodConfig(method="lora"), task_type="SEQ_CLS")
    targets = _lora_modules(model)
    layer = "bert.encoder.layer.0."
    assert {
        layer + s
        for s in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    } <= targets
    assert len(targets) == 12
    assert not any("classifier" in t or "pooler" in t for t in targets)
    # the saved config stays short: one regex with generalised layer indices
    assert isinstance(model.peft_config["default"].target_modules, str)


@pytest.mark.parametrize(
    "targets,count,must,must_not",
    [
        ("mlp", 4, "layer.1.intermediate.dense", "query"),
        ("attention", 8, "layer.1.attention.self.value", "intermediate"),
        ("all-linear", 13, "pooler.dense", "classifier"),
        ("query,value", 4, "layer.0.attention.self.query", "key"),
        ("classifier,query", 2, "layer.0.attention.self.query", "classifier"),
    ],
)
def test_target_shorthands(targets, count, must, must_not):
    base = build("bert", "SEQ_CLS")
    names = resolve_targets(base, MethodConfig(target_modules=targets).target_names(), exclude=["classifier"])
    assert len(names) == count
    assert any(n.endswith(must) for n in names)
    assert not any(must_not in n for n in names)


def test_unknown_target_is_clear():
    with pytest.raises(MethodError, match="'nope'.*bert"):
        apply_method(build("bert", "SEQ_CLS"), MethodConfig(target_modules="nope"), task_type="SEQ_CLS")


# ---------------------------------------------------------------- save / load


ROUND_TRIPS = [("bert", "SEQ_CLS", m) for m in ALL] + [
    ("llama", "CAUSAL_LM", "lora"),
    ("llama", "SEQ_CLS", "prompt"),
    ("vit", "IMAGE_CLS", "adapter-pfeiffer"),
    ("t5", "SEQ_2_SEQ_LM", "adapter-houlsby"),
]


@pytest.mark.parametrize("family,task,method", ROUND_TRIPS, ids=[f"{f}-{t}-{m}" for f, t, m in ROUND_TRIPS])
def test_save_load_round_trip(tmp_path, family, task, method):
    cfg = method_config(method)
    model = apply_method(build(family, task), cfg, task_type=task)
    with torch.no_grad():  # move every trainable weight off its init so the round trip is meaningful
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save_trainable(model, tmp_path, cfg, task_type=task)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    record = json.loads((tmp_path / "deft_method.json").read_text())
    assert record["model_type"] == family and record["method"] == cfg.to_dict()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind

    loaded = load_trainable(build(family, task), tmp_path, task_type=task)
    inputs = {k: v for k, v in batch(task).items() if k != "labels"}
    if task == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :3]
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    assert count_parameters(loaded).trainable == count_parameters(model).trainable


def test_load_errors_name_the_path(tmp_path):
    cfg = MethodConfig(method="bitfit")
    save_trainable(apply_method(build("bert", "SEQ_CLS"), cfg, task_type="SEQ_CLS"), tmp_path, cfg)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(MethodError, match=re.escape(str(weights))):
        load_trainable(build("bert", "SEQ_CLS"), tmp_path, task_type="SEQ_CLS")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(weights))):
        load_trainable(build("bert", "SEQ_CLS"), tmp_path, task_type="SEQ_CLS")
    with pytest.raises(FileNotFoundError, match="deft_method.json"):
        load_trainable(build("bert", "SEQ_CLS"), tmp_path / "nowhere", task_type="SEQ_CLS")
    (tmp_path / "deft_method.json").write_text("{broken")
    with pytest.raises(MethodError, match="deft_method.json"):
        load_trainable(build("bert", "SEQ_CLS"), tmp_path, task_type="SEQ_CLS")


# ---------------------------------------------------------------- errors


@pytest.mark.skipif(qlora_available(), reason="this machine can run qlora")
def test_qlora_without_cuda_is_clear():
    msg = "qlora needs a CUDA GPU and bitsandbytes (pip install bitsandbytes); on this machine use --method lora"
    with pytest.raises(MethodError, match=re.escape(msg)):
        apply_method(build("bert", "SEQ_CLS"), MethodConfig(method="qlora"), task_type="SEQ_CLS")
    with pytest.raises(MethodError, match=re.escape(msg)):
        qlora_quantization_config()


@pytest.mark.parametrize(
    "family,task,method",
    [
        ("vit", "IMAGE_CLS", "prompt"),
        ("vit", "IMAGE_CLS", "prefix"),
        ("distilbert", "SEQ_CLS", "prefix"),  # DistilBERT takes no past_key_values
        ("bart", "SEQ_CLS", "prompt"),  # BART's classifier needs input_ids to find <eos>
        ("llama", "CAUSAL_LM", "bitfit"),  # no biases at all
        ("t5", "SEQ_CLS", "bitfit"),  # only the head has biases: BitFit would silently become linear probing
    ],
)
def test_unsupported_combinations_raise_method_error(family, task, method):
    with pytest.raises(MethodError, match=rf"method='{method}'.*model_type='{family}'"):
        apply_method(build(family, task), MethodConfig(method=method), task_type=task)


@pytest.mark.parametrize(
    "option,value",
    [
        ("method", "foo"),
        ("method", "full"),
        ("lora_r", 0),
        ("lora_alpha", 0),
        ("lora_dropout", 1.0),
        ("num_virtual_tokens", 0),
        ("adapter_type", "parallel"),
        ("adapter_reduction_factor", 0),
        ("adapter_non_linearity", "nope"),
        ("target_modules", " , "),
        ("train_pooler", "yes"),
    ],
)
def test_bad_options_name_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        MethodConfig(**{option: value})


def test_config_round_trip_and_task_type():
    cfg = MethodConfig(method="adapter", adapter_type="houlsby", target_modules=["query", "value"])
    assert cfg.target_modules == "query,value"
    assert MethodConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="lora_rank"):
        MethodConfig.from_dict({"lora_rank": 4})
    with pytest.raises(ValueError, match="task_type"):
        apply_method(build("bert", "SEQ_CLS"), cfg, task_type="CLASSIFY")
    assert "qlora" in METHODS and "full" not in METHODS


# ---------------------------------------------------------------- the BERT pooler


POOLERS = [  # (family, task, full name of the pooler the classifier reads, or None)
    ("bert", "SEQ_CLS", "bert.pooler"),
    ("roberta", "SEQ_CLS", None),  # RobertaForSequenceClassification has no pooler: its head has the dense layer
    ("llama", "SEQ_CLS", None),
]


@pytest.mark.parametrize("family,task,expected", POOLERS, ids=[f"{f}-{t}" for f, t, _ in POOLERS])
def test_pooler_module_name(family, task, expected):
    assert pooler_module_name(build(family, task), task) == expected


@pytest.mark.parametrize("method", ["lora", "adapter-pfeiffer", "prompt"])
def test_train_pooler_trains_it_fully_and_round_trips(tmp_path, method):
    cfg = dataclasses.replace(method_config(method), train_pooler=True)
    base = build("bert", "SEQ_CLS")
    n_pooler = sum(p.numel() for p in base.bert.pooler.parameters())
    with pytest.warns(UserWarning, match="pooler"):
        frozen = count_parameters(apply_method(build("bert", "SEQ_CLS"), method_config(method), task_type="SEQ_CLS"))
    model = apply_method(base, cfg, task_type="SEQ_CLS")
    pooler = [(n, p) for n, p in model.named_parameters() if ".pooler." in n]
    # trained fully (peft keeps a trainable copy and a frozen original), and LoRA does not wrap it
    assert sum(p.numel() for _, p in pooler if p.requires_grad) == n_pooler
    assert not any("lora_" in n for n, _ in pooler)
    assert count_parameters(model).trainable == frozen.trainable + n_pooler
    loss = model(**batch("SEQ_CLS")).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in pooler if p.requires_grad)

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save_trainable(model, tmp_path, cfg, task_type="SEQ_CLS")
    loaded = load_trainable(build("bert", "SEQ_CLS"), tmp_path, task_type="SEQ_CLS")
    inputs = {k: v for k, v in batch("SEQ_CLS").items() if k != "labels"}
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_frozen_untrained_pooler_warns_and_a_trained_one_does_not(tmp_path):
    with pytest.warns(UserWarning, match=r"bert\.pooler .*--train-pooler"):
        frozen = apply_method(build("bert", "SEQ_CLS"), MethodConfig("lora"), task_type="SEQ_CLS")
    save_trainable(frozen, tmp_path, MethodConfig("lora"), task_type="SEQ_CLS")
    model = build("bert", "SEQ_CLS")
    with torch.no_grad():
        model.bert.pooler.dense.bias.fill_(0.01)  # what any pretrained pooler looks like
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        apply_method(model, MethodConfig("lora"), task_type="SEQ_CLS")
        apply_method(build("bert", "SEQ_CLS"), MethodConfig("lora", train_pooler=True), task_type="SEQ_CLS")
        load_trainable(build("bert", "SEQ_CLS"), tmp_path, task_type="SEQ_CLS")  # reloading a run: no advice
    assert not [w for w in seen if "pooler" in str(w.message)]
