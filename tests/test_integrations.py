"""DensityMixin on TRL's SFTTrainer, and the plain-loop helper deft.density(), against losses computed by hand."""

from __future__ import annotations

import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import deft
from deft.core.losses import smooth_l0
from deft.train.trainer import DeftTrainer, DensityConfig, DensityMixin

from conftest import sgd_step_kwargs

WORDS = (
    "<pad> <eos> <unk> review : a gripping funny film dull boring sentiment positive negative great bad plot "
    "and acting the was long but kind of sweet"
).split()
ROWS = [  # very different lengths, so micro-batches hold very different token counts
    ("review : a gripping funny film sentiment :", " positive"),
    ("review : dull sentiment :", " negative"),
    ("review : a boring plot and bad acting , the film was long sentiment :", " negative"),
    ("review : long but kind of sweet sentiment :", " positive"),
]
EPS = 1e-4  # the tiny model's W2 inputs are ~1e-2: with this eps the density gradient is far from negligible


def loss_only(alpha: float) -> DensityConfig:
    """The density loss at full weight from the first step, no thresholds: what these tests compare."""
    return DensityConfig(alpha=alpha, eps=EPS, target_density=None, alpha_warmup=0.0)


# float32 sums in a different order (one batch vs two micro-batches): ~4e-6 apart on updates of up to ~1
CLOSE = dict(rtol=1e-4, atol=1e-5)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_lora_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    model = LlamaForCausalLM(cfg)
    # init_lora_weights=False: B is not zero, so both LoRA factors get a gradient in the first step
    return get_peft_model(
        model,
        LoraConfig(
            r=2,
            target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    )


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def by_hand(model, batch, alpha):
    """Gradient of (causal-LM loss over the labelled tokens + alpha * mean smooth-l0 of every W2 input)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    w2_inputs = []

    def grab(mlp, args):
        # recompute the W2 input from the MLP input: independent of which module the probe hooks
        x = args[0]
        w2_inputs.append(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))

    hooks = [m.register_forward_pre_hook(grab) for n, m in model.named_modules() if n.endswith("mlp")]
    try:
        logits = model(**inputs).logits
    finally:
        for h in hooks:
            h.remove()
    labels = batch["labels"][:, 1:]
    task = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
    )
    dens = torch.stack([smooth_l0(h.float(), EPS)[mask].mean() for h in w2_inputs]).mean()
    (task + alpha * dens).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, float(dens.detach())


# --------------------------------------------------------------------------- TRL SFTTrainer + DensityMixin
def sft_step(tmp_path, *, per_device, ga, alpha, name="", accepts_loss_kwargs=None, compute_loss_func=None, **cfg):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    class MySFT(DensityMixin, trl.SFTTrainer):
        pass

    model = tiny_lora_llama()
    before = trainable(model)
    args = trl.SFTConfig(
        bf16=False,
        gradient_checkpointing=False,
        **sgd_step_kwargs(tmp_path / f"sft{name}-b{per_device}-ga{ga}-a{alpha}", per_device, ga, max_grad_norm=0.0),
        **cfg,
    )
    ds = Dataset.from_list([{"prompt": p, "completion": c} for p, c in ROWS])
    trainer = MySFT(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tiny_tokenizer(),
        density=loss_only(alpha),
        compute_loss_func=compute_loss_func,
    )
    if accepts_loss_kwargs is not None:
        trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
    trainer.train()
    delta = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    return delta, trainer


def token_mean_ce(outputs, labels, num_items_in_batch=None):
    """A user's compute_loss_func: next-token cross entropy over the labelled tokens of the step."""
    logits, labels = outputs.logits[:, :-1].float(), labels[:, 1:]
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total / (num_items_in_batch if num_items_in_batch is not None else labels.ne(-100).sum())


@pytest.mark.parametrize("loss_func", [None, token_mean_ce], ids=["trl-loss", "compute_loss_func"])
def test_sft_step_equals_task_plus_alpha_density_by_hand(tmp_path, loss_func):
    # with a compute_loss_func TRL runs a second, no-grad forward for its metrics after the loss forward:
    # the density term must still be the loss forward's
    alpha = 3.0
    delta, trainer = sft_step(
        tmp_path, per_device=4, ga=1, alpha=alpha, compute_loss_func=loss_func, name=str(loss_func is None)
    )
    # TRL's own tokenisation and completion-only labels, our own loss
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    assert (batch["labels"] == -100).sum() > batch["attention_mask"].eq(0).sum()  # prompts are masked out
    grads, dens = by_hand(tiny_lora_llama(), batch, alpha)
    assert alpha * dens > 0.05  # the density term is a real part of the step
    for n, g in grads.items():
        torch.testing.assert_close(delta[n], -g, **CLOSE, msg=n)
    log = next(h for h in trainer.state.log_history if "task_loss" in h)
    assert log["density_loss"] == pytest.approx(dens, rel=1e-4)
    assert log["loss"] == pytest.approx(log["task_loss"] + alpha * dens, rel=1e-4)
    # TRL's compute_loss still ran: its own metrics are logged
    assert "mean_token_accuracy" in log and "entropy" in log
    assert 0 < log["train_density"] <= 1


@pytest.mark.parametrize("accepts_loss_kwargs", [None, False])
def test_sft_same_step_for_ga1_and_ga2(tmp_path, accepts_loss_kwargs):
    # None: TRL normalises by the step's token count (num_items_in_batch); False: TRL returns a
    # micro-batch mean and Trainer divides it by GA, so only the density term is step-exact there
    steps = {}
    for per_device, ga in [(4, 1), (2, 2)]:
        for alpha in (0.0, 3.0):
            steps[ga, alpha], _ = sft_step(
                tmp_path,
                per_device=per_device,
                ga=ga,
                alpha=alpha,
                name=str(accepts_loss_kwargs),
                accepts_loss_kwargs=accepts_loss_kwargs,
            )
    dens = {ga: {n: steps[ga, 3.0][n] - steps[ga, 0.0][n] for n in steps[ga, 0.0]} for ga in (1, 2)}
    assert max(float(v.abs().max()) for v in dens[1].values()) > 1e-3
    for n in dens[1]:
        torch.testing.assert_close(dens[1][n], dens[2][n], **CLOSE, msg=n)
        if accepts_loss_kwargs is None:
            torch.testing.assert_close(steps[1, 3.0][n], steps[2, 3.0][n], **CLOSE, msg=n)


def test_sft_padding_free_counts_the_same_tokens_as_padded(tmp_path):
    # padding-free batches carry no attention_mask: every position of the one packed row is a real token,
    # so the step (task and density) is the padded step
    padded, _ = sft_step(tmp_path, per_device=4, ga=1, alpha=3.0, name="pad")
    packed, trainer = sft_step(tmp_path, per_device=4, ga=1, alpha=3.0, name="free", padding_free=True, max_length=None)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    for n in padded:
        torch.testing.assert_close(packed[n], padded[n], **CLOSE, msg=n)


def test_mixin_rejects_distill_on_a_parent_loss(tmp_path):
    class Plain(DensityMixin, Trainer):
        pass

    with pytest.raises(deft.ConfigError, match="distill"):
        Plain(
            tiny_lora_llama(),
            TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
            density=DensityConfig(distill=1.0),
        )


def test_deft_sft_trainer_without_trl_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # makes `import trl` fail
    monkeypatch.delitem(sys.modules, "deft.train.integrations", raising=False)
    with pytest.raises(deft.DeftError, match=r"pip install 'deft-sparsity\[trl\]'"):
        deft.DeftSFTTrainer  # noqa: B018


def test_deft_sft_trainer_is_the_mixin_on_sfttrainer():
    trl = pytest.importorskip("trl")
    assert issubclass(deft.DeftSFTTrainer, DensityMixin) and issubclass(deft.DeftSFTTrainer, trl.SFTTrainer)


# --------------------------------------------------------------------------- plain loop: deft.density()
def causal_batch(rows=ROWS):
    tok = tiny_tokenizer()
    batch = tok([p + c for p, c in rows], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def test_plain_loop_gradient_equals_deft_trainer(tmp_path):
    alpha = 3.0
    batch = causal_batch()
    rows = [{k: v[i] for k, v in batch.items()} for i in range(len(ROWS))]
    model = tiny_lora_llama()
    before = trainable(model)
    DeftTrainer(
        model,
        TrainingArguments(remove_unused_columns=False, **sgd_step_kwargs(tmp_path, len(rows), max_grad_norm=0.0)),
        density=loss_only(alpha),
        train_dataset=rows,
        data_collator=lambda f: {k: torch.stack([x[k] for x in f]) for k in f[0]},
    ).train()
    step = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}

    model = tiny_lora_llama()
    with deft.density(model, loss_only(alpha)) as d:
        out = model(**batch)
        (out.loss + d.loss()).backward()
    assert max(float(v.abs().max()) for v in step.values()) > 1e-3
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(step[n], -p.grad, **CLOSE, msg=n)
    # and both equal the loss written out by hand
    grads, _ = by_hand(tiny_lora_llama(), batch, alpha)
    for n, g in grads.items():
        torch.testing.assert_close(step[n], -g, **CLOSE, msg=n)


def test_plain_loop_num_tokens_makes_accumulation_exact():
    batch = causal_batch()
    alpha = 3.0
    model = tiny_lora_llama()
    with deft.density(model, alpha=alpha, eps=EPS) as d:
        model(**batch)
        whole = d.loss()
        whole.backward()
        # the density alone: parameters after the last W2 input (the last down_proj's LoRA) get no gradient
        full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert full
        model.zero_grad()
        n_tokens = int(batch["attention_mask"].sum())
        parts = []
        for sl in (slice(0, 1), slice(1, 4)):  # a short and a long micro-batch
            model(**{k: v[sl] for k, v in batch.items()})
            part = d.loss(num_tokens=n_tokens)
            part.backward()
            parts.append(float(part.detach()))
    assert sum(parts) == pytest.approx(float(whole.detach()), rel=1e-5)
    for n, g in full.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=1e-4, atol=1e-7, msg=n)


def test_plain_loop_report_equals_measure_density():
    batch = causal_batch()
    model = tiny_lora_llama()
    model.eval()
    with deft.density(model, alpha=0.0, threshold=0.01) as d:
        with torch.no_grad():
            model(**batch)
        assert float(d.loss()) == 0.0  # alpha 0: the loss is off, the counting is not
    expected = deft.measure_density(model, [batch], threshold=0.01)
    assert d.report().overall == pytest.approx(expected.overall)
    assert 0 < expected.overall < 1
    assert not d.probe._handles  # the with-block removed its hooks


def test_plain_loop_errors():
    model = tiny_lora_llama()
    with deft.density(model, alpha=1.0) as d:
        with torch.no_grad():
            model(**causal_batch())
        with pytest.raises(deft.DeftError, match="no forward pass with grad"):
            d.loss()
    with pytest.raises(deft.ConfigError, match="target_density needs a trainer"):
        deft.density(model, target_density=0.5)
    with pytest.raises(deft.ConfigError, match="no field"):
        deft.density(model, alpah=1.0)
    with pytest.raises(deft.ConfigError, match="alpha"):
        d.alpha = -1


# --------------------------------------------------------------------------- benchmarks/trl_sft.py
def test_trl_sft_benchmark_smoke(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    import importlib.util
    import json
    from pathlib import Path

    model_dir = tmp_path / "tiny-llama"
    tiny_lora_llama().get_base_model().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    script = Path(__file__).parent.parent / "benchmarks" / "trl_sft.py"
    # the script imports its helper by bare name (`from _common import ...`), as `python benchmarks/trl_sft.py`
    # finds it beside itself
    monkeypatch.syspath_prepend(str(script.parent))
    spec = importlib.util.spec_from_file_location("trl_sft_bench", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(
        [
            "--model",
            str(model_dir),
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--train-rows",
            "8",
            "--eval-rows",
            "8",
            "--calib-rows",
            "8",
            "--densities",
            "0.5",
            "--output",
            str(tmp_path / "run"),
        ]
    )
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["eval"]["rows"] == 8 and 0 <= res["eval"]["accuracy"] <= 1
    # SwiGLU: silu(g) * u is essentially never exactly zero, so the exact-zero density says ~100 %...
    assert res["eval"]["density"]["overall"] > 0.99
    # ...and the meaningful number is the effective density at calibrated thresholds
    (row,) = res["thresholded"]
    assert row["target_density"] == 0.5 and 0.2 < row["effective_density"] < 0.8
    assert row["exact_density"] > 0.99 and 0 <= row["accuracy"] <= 1
    assert any("task_loss" in h for h in res["train"]["log_history"])
    assert res["machine"]["device"] == "cpu" and res["machine"]["cpu_count"]  # the shared record
