"""GLUE tasks (sst2, mrpc, ...): sequence classification, the rows a run trains and is scored on, and the
model + tokenizer every GLUE recipe loads."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..compress.quantize import compression_load_kwargs
from ..data import GlueDataset, glue_metrics, glue_task, load_glue
from ..data.glue import find_local_file
from ..inference.activations import swap_activation
from ..models import resolve
from .base import TaskArgs, TaskSetup, load_tokenizer, loads_model, seeded_subset


@loads_model
def load_model_and_tokenizer(
    name: str, task: str, *, trust_remote_code: bool = False, activation: str | None = None, **load_kwargs: Any
):
    """Tokenizer and sequence-classification model for a GLUE ``task`` (pad token set for decoders).

    ``activation`` swaps the MLP activations (see :func:`deft.inference.activations.swap_activation`)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    spec = glue_task(task)
    path = resolve(name)
    tok = load_tokenizer(path, trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, num_labels=spec.num_labels)
    if spec.is_regression:
        config.problem_type = "regression"
    if config.pad_token_id is None:
        config.pad_token_id = tok.pad_token_id  # classification pools the last real token, found via the pad id
    model = AutoModelForSequenceClassification.from_pretrained(
        path, config=config, trust_remote_code=trust_remote_code, **load_kwargs
    )
    if activation:
        swap_activation(model, activation)
    return model, tok


# Where a local GLUE folder has only its dev file (some GLUE copies lack QNLI's train.tsv), the dev file is split once,
# with a fixed seed independent of --seed, so every run and seed trains and scores on the same rows.
GLUE_DEV_SPLIT_EVAL_FRACTION = 0.2
GLUE_DEV_SPLIT_SEED = 0


def _dev_only(args: TaskArgs, task: str) -> bool:
    if args.data_source not in ("auto", "local") or not args.data_dir:
        return False
    spec, root = glue_task(task), Path(args.data_dir)
    return find_local_file(spec, "train", root) is None and find_local_file(spec, "dev", root) is not None


def glue_data_label(args: TaskArgs, task: str = "sst2") -> str:
    if args.data_source == "builtin" or (args.data_source == "auto" and args.data_dir is None and task == "sst2"):
        return "builtin SST-2 sample (3,000 train rows, full dev)"
    if _dev_only(args, task):
        pct = round(100 * GLUE_DEV_SPLIT_EVAL_FRACTION)
        return (
            f"local GLUE dev file in {args.data_dir} split {100 - pct}/{pct} (seed {GLUE_DEV_SPLIT_SEED}): "
            "no train file, so scores are on a held-out part of dev, not comparable with published dev scores"
        )
    if args.data_dir:
        return f"local GLUE files in {args.data_dir}"
    return "Hugging Face hub (glue)"


def split_dev(
    dev: list, eval_fraction: float = GLUE_DEV_SPLIT_EVAL_FRACTION, seed: int = GLUE_DEV_SPLIT_SEED
) -> tuple[list, list]:
    """A seeded (train, eval) split of one labelled file, both parts kept in file order."""
    n_eval = round(eval_fraction * len(dev))
    held = set(random.Random(seed).sample(range(len(dev)), n_eval))
    return [e for i, e in enumerate(dev) if i not in held], [e for i, e in enumerate(dev) if i in held]


def glue_examples(args: TaskArgs, task: str) -> tuple[list, list]:
    """(training rows, evaluation rows) of ``task`` as ``args`` choose them: seeded subsets of train and dev,
    or, where a local folder has only a dev file, the two parts of its fixed split."""
    if _dev_only(args, task):
        train, dev = split_dev(load_glue(task, "dev", data_dir=args.data_dir, source=args.data_source))
    else:
        train = load_glue(task, "train", data_dir=args.data_dir, source=args.data_source)
        dev = load_glue(task, "dev", data_dir=args.data_dir, source=args.data_source)
    # eval subsets use seed 0 so every seed of a comparison is scored on the same rows
    return seeded_subset(train, args.max_train_samples, args.seed), seeded_subset(dev, args.max_eval_samples, 0)


def _glue_metrics(task: str, p: Any) -> dict[str, float]:
    preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
    return glue_metrics(task, preds, p.label_ids)


def setup(args: TaskArgs) -> TaskSetup:
    """GLUE: sequence classification, metrics from the eval logits."""
    from transformers import DataCollatorWithPadding

    spec = glue_task(args.task)
    # bitsandbytes quantizes while loading (GLUE models only); deft's own int codes are applied after loading
    model, tok = load_model_and_tokenizer(
        args.model, spec.name, trust_remote_code=args.trust_remote_code, **compression_load_kwargs(args)
    )
    train, dev = glue_examples(args, spec.name)
    pad_to = getattr(args, "pad_to_max_length", None)
    # the research code pads every row to a fixed length; with --include-padding those positions then
    # count in its density metric and loss, which is how its numbers must be reproduced
    max_len = args.max_length if pad_to is None else min(args.max_length, pad_to)
    collator = (
        DataCollatorWithPadding(tok)
        if pad_to is None
        else DataCollatorWithPadding(tok, padding="max_length", max_length=pad_to)
    )
    return TaskSetup(
        task=spec.name,
        task_type="SEQ_CLS",
        model=model,
        tokenizer_or_processor=tok,
        train_dataset=GlueDataset(train, tok, max_len),
        eval_dataset=GlueDataset(dev, tok, max_len),
        data_collator=collator,
        compute_metrics=partial(_glue_metrics, spec.name),
        evaluate_fn=None,
        main_metric=spec.main_metric,
        data_label=glue_data_label(args, spec.name),
        details={"family": "glue"},
    )


def glue_rows(args: Any, task: str, split: str, n: int | None, seed: int) -> list:
    """A seeded subset of ``n`` rows of one GLUE split, from ``args.data_dir`` / ``args.data_source``."""
    return seeded_subset(load_glue(task, split, data_dir=args.data_dir, source=args.data_source), n, seed)


def glue_loader(rows: list, tok: Any, max_length: int, batch_size: int, *, by_length: bool = False):
    """Padded, labelled batches of GLUE ``rows``, in order (a ``DataLoader``; iterate it more than once).
    ``by_length`` groups rows of similar length (a third less padding to run on SST-2 dev; metrics do not
    depend on the order, densities never count padding)."""
    from transformers import DataCollatorWithPadding

    ds = GlueDataset(rows, tok, max_length)
    data: torch.utils.data.Dataset = ds
    if by_length and len(ds):
        ids = ds.encodings["input_ids"]
        data = torch.utils.data.Subset(ds, sorted(range(len(ds)), key=lambda i: len(ids[i])))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tok))
