"""DeftTrainer: one optimizer step is the same whatever the gradient accumulation / process count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, TrainingArguments

import deft
from deft.testing import tiny_config
from deft.train.trainer import DeftTrainer, DensityConfig

from conftest import sgd_step_kwargs

HERE = Path(__file__).parent


def pad_features(features):
    """Right-pad token-id lists with 0 (mask 0): the collator of the toy datasets."""
    n = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), n, dtype=torch.long)
    mask = torch.zeros(len(features), n, dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if "labels" in features[0]:
        out["labels"] = torch.tensor([f["labels"] for f in features])
    return out


def sgd_step_args(output_dir, per_device: int, ga: int = 1, **kw) -> TrainingArguments:
    """One plain SGD step at lr 1: the parameter change is exactly -gradient."""
    return TrainingArguments(**sgd_step_kwargs(output_dir, per_device, ga, remove_unused_columns=False, **kw))


def toy_dataset(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # very different lengths so micro-batches hold very different token counts
    lengths = [3, 12, 5, 9, 4, 14, 6, 2][:n]
    return [
        {"input_ids": torch.randint(3, 100, (L,), generator=g).tolist(), "labels": i % 2} for i, L in enumerate(lengths)
    ]


def tiny_lora_bert(seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    model = AutoModelForSequenceClassification.from_config(cfg)
    return get_peft_model(
        model,
        LoraConfig(
            r=2, target_modules=["intermediate.dense", "output.dense"], init_lora_weights=False, task_type="SEQ_CLS"
        ),
    )


def one_step(tmp_path, *, batch, ga, alpha, granularity="token"):
    model = tiny_lora_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = sgd_step_args(tmp_path / f"b{batch}-ga{ga}-a{alpha}", batch, ga)
    trainer = DeftTrainer(
        model,
        args,
        # the density loss from the first step, without thresholds: what the normalisation is checked on
        density=DensityConfig(alpha=alpha, eps=1e-2, granularity=granularity, target_density=None, alpha_warmup=0),
        train_dataset=toy_dataset(),
        data_collator=pad_features,
    )
    trainer.train()
    return {n: (p.detach() - before[n]) for n, p in model.named_parameters() if p.requires_grad}, trainer


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_same_step_for_ga1_and_ga2(tmp_path, alpha):
    d1, _ = one_step(tmp_path, batch=8, ga=1, alpha=alpha)
    d2, _ = one_step(tmp_path, batch=4, ga=2, alpha=alpha)
    d4, _ = one_step(tmp_path, batch=2, ga=4, alpha=alpha)
    assert any(v.abs().sum() > 0 for v in d1.values())
    for n in d1:
        torch.testing.assert_close(d1[n], d2[n], rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(d1[n], d4[n], rtol=1e-4, atol=1e-6, msg=n)


def test_density_term_alone_is_ga_invariant(tmp_path):
    # isolate the density term: (alpha=1 step) - (alpha=0 step) is -lr * alpha * d(density)/dtheta
    dens = {}
    for batch, ga in [(8, 1), (4, 2)]:
        with_d, _ = one_step(tmp_path, batch=batch, ga=ga, alpha=1.0)
        without, _ = one_step(tmp_path, batch=batch, ga=ga, alpha=0.0)
        dens[ga] = {n: with_d[n] - without[n] for n in with_d}
    assert any(v.abs().sum() > 0 for v in dens[1].values())
    for n in dens[1]:
        torch.testing.assert_close(dens[1][n], dens[2][n], rtol=1e-4, atol=1e-7, msg=n)


def test_logs_and_eval_density(tmp_path):
    _, trainer = one_step(tmp_path, batch=4, ga=1, alpha=1.0)
    logs = [h for h in trainer.state.log_history if "task_loss" in h]
    assert logs and "density_loss" in logs[0] and 0 <= logs[0]["train_density"] <= 1
    metrics = trainer.evaluate(eval_dataset=toy_dataset())
    assert 0 <= metrics["eval_density"] <= 1
    assert "eval_density_layer_0" in metrics and "eval_density_layer_1" in metrics
    # eval density equals an independent measurement of the same model on the same data
    batches = [pad_features(toy_dataset()[i : i + 8]) for i in range(0, 8, 8)]
    report = deft.measure_density(trainer.model, batches)
    assert metrics["eval_density"] == pytest.approx(report.overall)


def test_density_config_validation():
    with pytest.raises(ValueError, match="alpha"):
        DensityConfig(alpha=-1)
    with pytest.raises(ValueError, match="eps"):
        DensityConfig(eps=0)
    with pytest.raises(ValueError, match="alpha_warmup"):
        DensityConfig(alpha_warmup=2)


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    """2 gloo processes x batch 4 take the same step as 1 process x batch 8."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    worker = str(HERE / "ddp_worker.py")
    single, ddp = tmp_path / "single" / "out.json", tmp_path / "ddp" / "out.json"
    single.parent.mkdir()
    ddp.parent.mkdir()
    subprocess.run([sys.executable, worker, str(single), "8"], check=True, env=env, timeout=300, capture_output=True)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            worker,
            str(ddp),
            "4",
        ],
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(ddp.read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert any(abs(x) > 0 for v in a["delta"].values() for x in v)
    for name in a["delta"]:
        torch.testing.assert_close(
            torch.tensor(a["delta"][name]), torch.tensor(b["delta"][name]), rtol=1e-4, atol=1e-6, msg=name
        )
