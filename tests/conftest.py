"""Shared fixtures: a tiny BERT saved with the real MiniLM tokenizer, and a tiny SST-2 folder.

Tests on real data sets (the full GLUE TSVs, SQuAD v1.1) read them from ``DEFT_TEST_DATA``: a folder with
``glue/TASK/{train,dev}.tsv`` (the GLUE download script's layout) and ``squad/dev-v1.1.json``. It
defaults to ``../shared/data`` beside the checkout; a test whose file is absent is skipped, saying so.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import pytest
import torch

TEST_DATA = Path(os.environ.get("DEFT_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def need_test_data(path: str | Path) -> Path:
    """``TEST_DATA / path`` (an absolute ``path`` is taken as is), or skip the test saying how to enable it."""
    full = TEST_DATA / path
    if not full.exists():
        pytest.skip(
            f"{full} not present: set DEFT_TEST_DATA=/path/to/data (GLUE TSVs in glue/TASK/{{train,dev}}.tsv, "
            "SQuAD in squad/dev-v1.1.json) to run this test"
        )
    return full


def one_error_line(capsys, command: str) -> str:
    """The one line ``deft COMMAND`` printed on stderr for a user error (no traceback), checked as such."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"deft {command}: error: ") and lines[0].count("error:") == 1, err
    assert "Traceback" not in err
    return lines[0]


def sst2_folder(root: Path, train: str, dev: str = "sentence\tlabel\nok\t1\n") -> Path:
    """A GLUE folder for ``--data-dir``: ``root/SST-2/{train,dev}.tsv`` holding these texts (e.g. a bad row)."""
    (root / "SST-2").mkdir(parents=True)
    (root / "SST-2" / "train.tsv").write_text(train)
    (root / "SST-2" / "dev.tsv").write_text(dev)
    return root


def sgd_step_kwargs(output_dir, per_device: int, ga: int = 1, **kw) -> dict:
    """TrainingArguments (or TRL's SFTConfig) options of one plain SGD step at lr 1: the parameter change is
    -gradient (exactly so with ``max_grad_norm=0.0``, which turns clipping off)."""
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=ga,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
        **kw,
    )


def tiny_run_flags(model_dir, glue: Path, out: Path, *extra: str) -> list[str]:
    """The options of a seconds-long `deft train` / `compare` run on the tiny model and the small SST-2 folder."""
    # lr 1e-2 and eps 1e-3: the density term moves the tiny model within its few steps
    return [
        "--model", str(model_dir), "--task", "sst2", "--data-dir", str(glue), "--output", str(out),
        "--epochs", "1", "--batch-size", "16", "--lr", "1e-2", "--eps", "1e-3", *extra,
    ]  # fmt: skip


def _save_tiny_bert(d: Path, **overrides) -> Path:
    from transformers import AutoModel, AutoTokenizer, BertConfig

    from deft.models import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **overrides,
    )
    AutoModel.from_config(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Tiny random GELU BERT (2 layers, hidden 32) + the real MiniLM tokenizer, saved like a checkpoint."""
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_relu_model_dir(tmp_path_factory) -> Path:
    """The same with ReLU: exact zeros to count, so densities and energy ratios are not all 1."""
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny-relu-bert"), hidden_act="relu")


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    """A GLUE folder with 48 train / 32 dev SST-2 rows taken from the shipped sample."""
    d = tmp_path_factory.mktemp("glue") / "SST-2"
    d.mkdir()
    builtin = files("deft.data") / "builtin"
    for split, n in (("train", 48), ("dev", 32)):
        lines = (builtin / f"sst2_{split}.tsv").read_text(encoding="utf-8").splitlines()
        (d / f"{split}.tsv").write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")
    return d.parent
