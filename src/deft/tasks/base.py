"""What every task family shares: the arguments a task reads (:class:`TaskArgs`), what it builds
(:class:`TaskSetup`), datasets of pre-tokenized features and their collator, seeded subsets, and loading
a tokenizer or model quietly."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from ..models import loading


class TaskArgs(Protocol):
    """The options a task reads, as flat attributes: the option names of ``deft train`` (the recipe passes
    ``SimpleNamespace(**deft.fields.flat(train_args))``, so the task layer never sees the recipe's groups).
    A GLUE task also reads ``pad_to_max_length`` and the loading options ``quantize`` / ``quant_backend`` /
    ``quant_group_size`` where the object has them."""

    model: str
    task: str
    data_dir: str | None
    data_source: str
    max_train_samples: int | None
    max_eval_samples: int | None
    max_length: int
    seed: int
    trust_remote_code: bool


@dataclass
class TaskSetup:
    """Everything task-specific a training run needs; the rest of ``deft train`` is shared."""

    task: str  # canonical name written to results.json ("sst2", "squad", "image", "lm-instruct")
    task_type: str  # for apply_method: SEQ_CLS, QUESTION_ANS, SEQ_2_SEQ_LM, CAUSAL_LM, IMAGE_CLS
    model: Any
    tokenizer_or_processor: Any
    train_dataset: Dataset
    eval_dataset: Dataset
    data_collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    compute_metrics: Callable[[Any], dict[str, float]] | None  # Trainer hook, from eval logits
    evaluate_fn: Callable[[Any], dict[str, float]] | None  # (trainer) -> metrics needing generation
    main_metric: str  # key of metrics (without "eval_"), a value in [0, 1] for every family
    data_label: str  # plain sentence: where train and eval data came from
    details: dict[str, Any] = field(default_factory=dict)  # family, QA mode, prompt format, question counts


class FeatureDataset(Dataset):
    """Pre-tokenized features (dicts of lists / ints); the collator turns batches into tensors."""

    def __init__(self, features: Sequence[dict[str, Any]]) -> None:
        self.features = list(features)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]


def pad_rows(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """Token lists padded with ``value`` to the longest (on the left for ``left``), as one (rows, width) tensor."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            start = width - len(r) if left else 0
            out[i, start : start + len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


class PadCollator:
    """Pads token lists to the batch's longest row and stacks scalar fields.

    Keys in ``drop`` (e.g. :data:`EXTRACTIVE_META_KEYS`: ids, offsets, context text) exist for
    post-processing only and never reach the model. ``decoder_mask`` adds ``decoder_attention_mask``
    = "this target position is real" for seq2seq models, so the decoder's padded positions count in
    neither the attention nor the density.
    """

    def __init__(self, pad_token_id: int, drop: Sequence[str] = (), decoder_mask: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.drop = frozenset(drop)
        self.decoder_mask = decoder_mask

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for key in features[0]:
            if key in self.drop:
                continue
            values = [f[key] for f in features]
            if isinstance(values[0], (list, tuple)):
                fill = {"input_ids": self.pad_token_id, "labels": -100}.get(key, 0)
                batch[key] = pad_rows(values, fill)
            else:
                batch[key] = torch.tensor(values)
        if self.decoder_mask and "labels" in batch:
            batch["decoder_attention_mask"] = batch["labels"].ne(-100).long()
        return batch


def drop_labels(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A batch without its ``labels`` (model inputs only: measuring and calibrating need no loss)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def seeded_subset(items: list, n: int | None, seed: int) -> list:
    """``n`` items drawn with ``seed``, kept in their original order (all of them when n is None or large)."""
    if n is None or n >= len(items):
        return items
    idx = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in idx]


def loads_model(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` (first argument: a model name, or args with ``.model``) inside :func:`deft.models.loading`:
    quiet, and a model transformers cannot load is reported in one line naming it."""

    @functools.wraps(fn)
    def wrapper(first: Any, *a: Any, **kw: Any) -> Any:
        with loading(str(getattr(first, "model", first))):
            return fn(first, *a, **kw)

    return wrapper


def load_tokenizer(path: str, trust_remote_code: bool):
    """The tokenizer at ``path``, with the eos token as pad token where it has none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # decoder-only models ship no pad token; padded positions are masked (and -100 in labels) anyway
        tok.pad_token = tok.eos_token
    return tok
