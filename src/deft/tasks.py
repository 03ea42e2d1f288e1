"""The task layer: what ``deft train`` needs to know about each task family, behind one ``TaskSetup``.

``setup_task(args)`` builds, for ``args.task``:

* GLUE (sst2, mrpc, ...): sequence classification, metrics from the eval logits (as before).
* ``squad``: SQuAD v1.1 question answering, in the form the model family can do: extractive span
  prediction for encoders (BERT, RoBERTa, ...), generation for seq2seq (T5, BART) and decoder-only
  (Llama, GPT-2, SmolLM2) models.
* ``image``: image classification from ``DIR/{train,val}/CLASS/*.png``.
* ``lm-instruct``: SST-2 as instruction-style generation for decoder-only models.

Every family keeps the DeftTrainer flow: the Trainer's evaluation pass is teacher-forced (labels in
the batch), so it measures eval_loss and eval_density the same way for all. Metrics that need
generation come from ``evaluate_fn`` after it, which runs with the density probe detached so that
decoding steps never count as eval activations.
"""
from __future__ import annotations

import functools
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from .data import (
    EXTRACTIVE_META_KEYS,
    GLUE_TASKS,
    DataError,
    QAExample,
    generative_pairs,
    glue_task,
    load_squad,
    split_squad,
)
from .errors import ConfigError

SQUAD_EVAL_FRACTION = 0.2
SQUAD_SPLIT_SEED = 0  # fixed, not --seed: runs with different seeds must be scored on the same questions
ANSWER_MAX_TOKENS = 32  # longest generation target kept (SQuAD answers are a few words)
QA_NEW_TOKENS = 16
OTHER_TASKS = ("squad", "image", "lm-instruct")  # besides the GLUE names
# Encoders whose config would also map to a *ForCausalLM class (BertLMHeadModel, ...): for QA they are span models.
ENCODER_TYPES = frozenset({
    "albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "ernie", "mobilebert",
    "modernbert", "mpnet", "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl",
})


class TaskArgs(Protocol):
    """The fields of :class:`deft.run.TrainArgs` a task reads."""

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


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            start = width - len(r) if left else 0
            out[i, start: start + len(r)] = torch.as_tensor(r, dtype=torch.long)
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
                batch[key] = _pad(values, fill)
            else:
                batch[key] = torch.tensor(values)
        if self.decoder_mask and "labels" in batch:
            batch["decoder_attention_mask"] = batch["labels"].ne(-100).long()
        return batch


def seeded_subset(items: list, n: int | None, seed: int) -> list:
    """``n`` items drawn with ``seed``, kept in their original order (all of them when n is None or large)."""
    if n is None or n >= len(items):
        return items
    idx = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in idx]


# ---------------------------------------------------------------------------------------------- dispatch
def _loads_model(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` (first argument: a model name, or args with ``.model``) inside :func:`deft.models.loading`:
    quiet, and a model transformers cannot load is reported in one line naming it."""

    @functools.wraps(fn)
    def wrapper(first: Any, *a: Any, **kw: Any) -> Any:
        from .models import loading

        with loading(str(getattr(first, "model", first))):
            return fn(first, *a, **kw)

    return wrapper


@_loads_model
def setup_task(args: TaskArgs) -> TaskSetup:
    """The model, data, collator and metrics of ``args.task`` (set the seed first: heads are random)."""
    task = args.task.lower()
    pad_to = getattr(args, "pad_to_max_length", None)
    if pad_to is not None:
        if task.replace("-", "").replace("_", "") not in GLUE_TASKS:
            raise ConfigError(f"--pad-to-max-length is for GLUE tasks (the research code's setting), not {args.task!r}")
        if not (isinstance(pad_to, int) and pad_to > 0):
            raise ConfigError(f"--pad-to-max-length must be a whole number > 0, got {pad_to!r}")
    if task == "squad":
        return _squad_setup(args)
    if task == "image":
        return _image_setup(args)
    if task in ("lm-instruct", "lm_instruct"):
        return _lm_instruct_setup(args)
    if task.replace("-", "").replace("_", "") in GLUE_TASKS:
        return _glue_setup(args)
    raise DataError(f"unknown task {args.task!r}: not a GLUE task ({', '.join(GLUE_TASKS)}) "
                    f"nor {', '.join(OTHER_TASKS[:-1])} or {OTHER_TASKS[-1]}")


def _tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # decoder-only models ship no pad token; padded positions are masked (and -100 in labels) anyway
        tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------------------------------------- GLUE
@_loads_model
def load_model_and_tokenizer(name: str, task: str, *, trust_remote_code: bool = False, activation: str | None = None,
                             **load_kwargs: Any):
    """Tokenizer and sequence-classification model for a GLUE ``task`` (pad token set for decoders).

    ``activation`` swaps the MLP activations (see :func:`deft.inference.activations.swap_activation`)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .models import resolve

    spec = glue_task(task)
    path = resolve(name)
    tok = _tokenizer(path, trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, num_labels=spec.num_labels)
    if spec.is_regression:
        config.problem_type = "regression"
    if config.pad_token_id is None:
        config.pad_token_id = tok.pad_token_id  # classification pools the last real token, found via the pad id
    model = AutoModelForSequenceClassification.from_pretrained(
        path, config=config, trust_remote_code=trust_remote_code, **load_kwargs
    )
    if activation:
        from .inference.activations import swap_activation

        swap_activation(model, activation)
    return model, tok


# Where a local GLUE folder has only its dev file (some GLUE copies lack QNLI's train.tsv), the dev file is split once,
# with a fixed seed independent of --seed, so every run and seed trains and scores on the same rows.
GLUE_DEV_SPLIT_EVAL_FRACTION = 0.2
GLUE_DEV_SPLIT_SEED = 0


def _dev_only(args: TaskArgs, task: str) -> bool:
    if args.data_source not in ("auto", "local") or not args.data_dir:
        return False
    from .data.glue import find_local_file

    spec, root = glue_task(task), Path(args.data_dir)
    return find_local_file(spec, "train", root) is None and find_local_file(spec, "dev", root) is not None


def glue_data_label(args: TaskArgs, task: str = "sst2") -> str:
    if args.data_source == "builtin" or (args.data_source == "auto" and args.data_dir is None and task == "sst2"):
        return "builtin SST-2 sample (3,000 train rows, full dev)"
    if _dev_only(args, task):
        pct = round(100 * GLUE_DEV_SPLIT_EVAL_FRACTION)
        return (f"local GLUE dev file in {args.data_dir} split {100 - pct}/{pct} (seed {GLUE_DEV_SPLIT_SEED}): "
                "no train file, so scores are on a held-out part of dev, not comparable with published dev scores")
    if args.data_dir:
        return f"local GLUE files in {args.data_dir}"
    return "Hugging Face hub (glue)"


def split_dev(dev: list, eval_fraction: float = GLUE_DEV_SPLIT_EVAL_FRACTION, seed: int = GLUE_DEV_SPLIT_SEED
              ) -> tuple[list, list]:
    """A seeded (train, eval) split of one labelled file, both parts kept in file order."""
    n_eval = round(eval_fraction * len(dev))
    held = set(random.Random(seed).sample(range(len(dev)), n_eval))
    return [e for i, e in enumerate(dev) if i not in held], [e for i, e in enumerate(dev) if i in held]


def _glue_examples(args: TaskArgs, task: str) -> tuple[list, list]:
    from .data import load_glue

    if _dev_only(args, task):
        train, dev = split_dev(load_glue(task, "dev", data_dir=args.data_dir, source=args.data_source))
    else:
        train = load_glue(task, "train", data_dir=args.data_dir, source=args.data_source)
        dev = load_glue(task, "dev", data_dir=args.data_dir, source=args.data_source)
    # eval subsets use seed 0 so every seed of a comparison is scored on the same rows
    return seeded_subset(train, args.max_train_samples, args.seed), seeded_subset(dev, args.max_eval_samples, 0)


def _glue_metrics(task: str, p: Any) -> dict[str, float]:
    from .data import glue_metrics

    preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
    return glue_metrics(task, preds, p.label_ids)


def _glue_setup(args: TaskArgs) -> TaskSetup:
    from transformers import DataCollatorWithPadding

    from .data import GlueDataset

    spec = glue_task(args.task)
    from .compress.quantize import compression_load_kwargs

    # bitsandbytes quantizes while loading (GLUE models only); deft's own int codes are applied after loading
    model, tok = load_model_and_tokenizer(args.model, spec.name, trust_remote_code=args.trust_remote_code,
                                          **compression_load_kwargs(args))
    train, dev = _glue_examples(args, spec.name)
    pad_to = getattr(args, "pad_to_max_length", None)
    # the research code pads every row to a fixed length; with --include-padding those positions then
    # count in its density metric and loss, which is how its numbers must be reproduced
    max_len = args.max_length if pad_to is None else min(args.max_length, pad_to)
    collator = (DataCollatorWithPadding(tok) if pad_to is None
                else DataCollatorWithPadding(tok, padding="max_length", max_length=pad_to))
    return TaskSetup(
        task=spec.name, task_type="SEQ_CLS", model=model, tokenizer_or_processor=tok,
        train_dataset=GlueDataset(train, tok, max_len), eval_dataset=GlueDataset(dev, tok, max_len),
        data_collator=collator, compute_metrics=partial(_glue_metrics, spec.name),
        evaluate_fn=None, main_metric=spec.main_metric, data_label=glue_data_label(args, spec.name),
        details={"family": "glue"},
    )


# ---------------------------------------------------------------------------------------------- SQuAD data
def load_squad_data(data_dir: str | None) -> tuple[list[QAExample], list[QAExample], str]:
    """(train, eval, data label) from a folder with dev-v1.1.json and, optionally, train-v1.1.json.

    Without the official train file the dev file is split by article (seeded, fixed): the label says
    so, since scores on that split are not comparable with published SQuAD dev numbers.
    """
    if not data_dir:
        raise DataError("--task squad needs --data-dir DIR holding dev-v1.1.json (and train-v1.1.json if you have it)")
    root = Path(data_dir)
    dev_file, train_file = root / "dev-v1.1.json", root / "train-v1.1.json"
    if not dev_file.is_file():
        raise DataError(f"{dev_file}: no such file; --data-dir must hold SQuAD v1.1's dev-v1.1.json")
    if train_file.is_file():
        train, dev = load_squad(train_file), load_squad(dev_file)
        return train, dev, f"SQuAD v1.1 official train-v1.1.json / dev-v1.1.json from {root}"
    train, dev = split_squad(load_squad(dev_file), SQUAD_EVAL_FRACTION, seed=SQUAD_SPLIT_SEED)
    n_art = (len({e.title for e in train}), len({e.title for e in dev}))
    pct = round(100 * SQUAD_EVAL_FRACTION)
    label = (f"SQuAD v1.1 dev-v1.1.json split by article (seed {SQUAD_SPLIT_SEED}): {100 - pct}% train / {pct}% "
             f"eval — a split of one file ({n_art[0]} / {n_art[1]} articles, {len(train)} / {len(dev)} questions, "
             f"from {root}); not comparable with official SQuAD dev scores")
    return train, dev, label


def qa_mode(config: Any) -> str:
    """How a model does SQuAD: "extractive" (span head), "seq2seq" or "causal" (generation)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if model_type in ENCODER_TYPES:
        return "extractive"
    # checked before the QA table: Llama, GPT-2, ... also have *ForQuestionAnswering heads, but they are LMs
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    if model_type in MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES:
        return "extractive"
    raise DataError(f"model_type {model_type!r} has neither a question-answering nor a language-model head "
                    "in transformers; --task squad cannot use it")


def squad_scores(predictions: dict[str, str], examples: Sequence[QAExample]) -> dict[str, float]:
    """F1 / EM as fractions (the main metric, comparable in scale to GLUE accuracy) and in percent."""
    from .data import squad_metrics

    pct = squad_metrics(predictions, examples)
    return {"f1": pct["f1"] / 100, "exact_match": pct["exact_match"] / 100,
            "f1_percent": pct["f1"], "exact_match_percent": pct["exact_match"]}


def _squad_setup(args: TaskArgs) -> TaskSetup:
    from transformers import AutoConfig

    from .models import resolve

    train_ex, eval_ex, label = load_squad_data(args.data_dir)
    train_ex = seeded_subset(train_ex, args.max_train_samples, args.seed)
    eval_ex = seeded_subset(eval_ex, args.max_eval_samples, 0)
    path = resolve(args.model)
    config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    mode = qa_mode(config)
    build = {"extractive": _extractive_qa, "seq2seq": _seq2seq_qa, "causal": _causal_qa}[mode]
    setup = build(args, path, train_ex, eval_ex)
    setup.data_label = label
    setup.details.update(family="squad", qa_mode=mode, train_questions=len(train_ex), eval_questions=len(eval_ex))
    return setup


# ---- extractive --------------------------------------------------------------------------------------
def _extractive_metrics(features: list[dict[str, Any]], examples: list[QAExample], p: Any) -> dict[str, float]:
    from .data import postprocess_extractive

    start, end = p.predictions[:2]  # (start_logits, end_logits), batch-padded with -100 past each row's end
    return squad_scores(postprocess_extractive(features, start, end), examples)


def _extractive_qa(args: TaskArgs, path: str, train_ex: list[QAExample], eval_ex: list[QAExample]) -> TaskSetup:
    from transformers import AutoModelForQuestionAnswering

    from .data import prepare_extractive_eval, prepare_extractive_train

    tok = _tokenizer(path, args.trust_remote_code)
    model = AutoModelForQuestionAnswering.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    stride = max(1, args.max_length // 4)  # window overlap; the usual 128 of 384
    train = prepare_extractive_train(train_ex, tok, args.max_length, stride)
    features = prepare_extractive_eval(eval_ex, tok, args.max_length, stride)
    # The eval features also carry span labels (same windows, same order): the Trainer then reports an
    # eval loss and hands the start/end logits to compute_metrics in one teacher-forced pass.
    for feat, lab in zip(features, prepare_extractive_train(eval_ex, tok, args.max_length, stride), strict=True):
        assert feat["input_ids"] == lab["input_ids"]
        feat["start_positions"], feat["end_positions"] = lab["start_positions"], lab["end_positions"]
    return TaskSetup(
        task="squad", task_type="QUESTION_ANS", model=model, tokenizer_or_processor=tok,
        train_dataset=FeatureDataset(train), eval_dataset=FeatureDataset(features),
        data_collator=PadCollator(tok.pad_token_id, drop=EXTRACTIVE_META_KEYS),
        compute_metrics=partial(_extractive_metrics, features, eval_ex), evaluate_fn=None,
        main_metric="f1", data_label="", details={"stride": stride},
    )


# ---- generation (seq2seq and decoder-only) -------------------------------------------------------------
@dataclass
class _Prompted:
    """One generation example: the prompt the model continues and the reference(s) it is scored on."""

    prompt_ids: list[int]
    target_ids: list[int]
    key: str  # question id / row index


def _teacher_forced(items: Sequence[_Prompted], max_length: int, causal: bool) -> FeatureDataset:
    feats = []
    for it in items:
        if causal:  # prompt + answer in one sequence; only the answer is learned
            ids = (it.prompt_ids + it.target_ids)[:max_length]
            labels = ([-100] * len(it.prompt_ids) + it.target_ids)[:max_length]
            feats.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        else:
            feats.append({"input_ids": it.prompt_ids, "attention_mask": [1] * len(it.prompt_ids),
                          "labels": it.target_ids})
    return FeatureDataset(feats)


def greedy_generate(trainer: Any, tok: Any, prompts: Sequence[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts`` (first line, stripped) with the trainer's current model.

    The density probe is detached meanwhile: decoding steps are not part of the measured eval pass,
    and the training counts must not see them either.
    """
    model = trainer.model
    decoder_only = not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    device = next(model.parameters()).device
    probe = getattr(trainer, "probe", None)
    was_training = model.training
    model.eval()
    if probe is not None:
        probe.detach()
    texts: list[str] = []
    try:
        bs = max(1, trainer.args.per_device_eval_batch_size)
        for i in range(0, len(prompts), bs):
            chunk = prompts[i: i + bs]
            # decoder-only models continue the last position, so prompts are padded on the left
            ids = _pad(chunk, tok.pad_token_id, left=decoder_only)
            mask = _pad([[1] * len(p) for p in chunk], 0, left=decoder_only)
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)
            out = out.cpu()
            if decoder_only and out.shape[1] >= ids.shape[1] and torch.equal(out[:, : ids.shape[1]], ids):
                out = out[:, ids.shape[1]:]  # most models echo the prompt; some peft paths return only new tokens
            for row in tok.batch_decode(out, skip_special_tokens=True):
                texts.append(row.strip().split("\n")[0].strip())
    finally:
        if probe is not None:
            probe.attach()
        model.train(was_training)
    return texts


def _seq2seq_qa(args: TaskArgs, path: str, train_ex: list[QAExample], eval_ex: list[QAExample]) -> TaskSetup:
    from transformers import AutoModelForSeq2SeqLM

    tok = _tokenizer(path, args.trust_remote_code)
    model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=args.trust_remote_code)

    def items(examples: list[QAExample]) -> list[_Prompted]:
        pairs = generative_pairs(examples, style="t5")  # "question: ... context: ...": truncation cuts the context
        src = tok([s for s, _ in pairs], truncation=True, max_length=args.max_length)["input_ids"]
        tgt = tok(text_target=[t for _, t in pairs], truncation=True, max_length=ANSWER_MAX_TOKENS)["input_ids"]
        return [_Prompted(s, t, e.id) for s, t, e in zip(src, tgt, examples)]

    eval_items = items(eval_ex)

    def evaluate(trainer: Any) -> dict[str, float]:
        answers = greedy_generate(trainer, tok, [it.prompt_ids for it in eval_items], QA_NEW_TOKENS)
        return squad_scores({it.key: a for it, a in zip(eval_items, answers)}, eval_ex)

    return TaskSetup(
        task="squad", task_type="SEQ_2_SEQ_LM", model=model, tokenizer_or_processor=tok,
        train_dataset=_teacher_forced(items(train_ex), args.max_length, causal=False),
        eval_dataset=_teacher_forced(eval_items, args.max_length, causal=False),
        data_collator=PadCollator(tok.pad_token_id, decoder_mask=True), compute_metrics=None,
        evaluate_fn=evaluate, main_metric="f1", data_label="", details={"prompt_format": "t5"},
    )


class CausalPrompter:
    """Prompt and target token ids for a decoder-only model, with the chat template when it has one.

    Plain format: ``PROMPT`` + `` answer`` + eos. Chat format: the prompt is the user turn with the
    assistant header appended; the answer (no leading space) + eos closes the assistant turn.
    A too long prompt loses the end of its ``text`` (the context / review), never the instruction,
    question or the final "Answer:" the model continues from.
    """

    def __init__(self, tok: Any, max_length: int) -> None:
        self.tok = tok
        self.max_length = max_length
        self.chat = bool(getattr(tok, "chat_template", None))

    @property
    def format(self) -> str:
        return "chat" if self.chat else "plain"

    def _encode_prompt(self, prompt: str) -> list[int]:
        if self.chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
            return self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok(prompt)["input_ids"]

    def target(self, answer: str) -> list[int]:
        ids = self.tok(answer if self.chat else " " + answer, add_special_tokens=False)["input_ids"]
        return ids[:ANSWER_MAX_TOKENS] + [self.tok.eos_token_id]

    def prompt(self, build: Callable[[str], str], text: str, target_len: int) -> list[int]:
        ids = self._encode_prompt(build(text))
        room = self.max_length - target_len
        if len(ids) <= room:
            return ids
        keep = room - len(self._encode_prompt(build(""))) - 2  # 2: tokens may merge differently at the cut
        if keep < 1:
            raise DataError(f"--max-length {self.max_length} leaves no room for the text after the prompt template")
        return self._encode_prompt(build(self._cut(text, keep)))

    def _cut(self, text: str, n_tokens: int) -> str:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=self.tok.is_fast)
        if n_tokens >= len(enc["input_ids"]):
            return text  # the template itself is too long: nothing to gain here, the caller truncates
        if self.tok.is_fast:
            return text[: enc["offset_mapping"][n_tokens - 1][1]]
        return self.tok.decode(enc["input_ids"][:n_tokens])


def _causal_model(path: str, tok: Any, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model


def _causal_qa(args: TaskArgs, path: str, train_ex: list[QAExample], eval_ex: list[QAExample]) -> TaskSetup:
    tok = _tokenizer(path, args.trust_remote_code)
    model = _causal_model(path, tok, args.trust_remote_code)
    prompter = CausalPrompter(tok, args.max_length)

    def items(examples: list[QAExample]) -> list[_Prompted]:
        out = []
        for e in examples:
            target = prompter.target(e.answers[0])
            build = partial(_qa_prompt, e)
            out.append(_Prompted(prompter.prompt(build, e.context, len(target)), target, e.id))
        return out

    eval_items = items(eval_ex)

    def evaluate(trainer: Any) -> dict[str, float]:
        answers = greedy_generate(trainer, tok, [it.prompt_ids for it in eval_items], QA_NEW_TOKENS)
        return squad_scores({it.key: a for it, a in zip(eval_items, answers)}, eval_ex)

    return TaskSetup(
        task="squad", task_type="CAUSAL_LM", model=model, tokenizer_or_processor=tok,
        train_dataset=_teacher_forced(items(train_ex), args.max_length, causal=True),
        eval_dataset=_teacher_forced(eval_items, args.max_length, causal=True),
        data_collator=PadCollator(tok.pad_token_id), compute_metrics=None, evaluate_fn=evaluate,
        main_metric="f1", data_label="", details={"prompt_format": prompter.format},
    )


def _qa_prompt(example: QAExample, context: str) -> str:
    # the data module's instruction format ("...\n\nContext: ...\nQuestion: ...\nAnswer:"), with a cut context
    return generative_pairs([replace(example, context=context)], style="chat")[0][0]


# ---------------------------------------------------------------------------------------------- lm-instruct
SENTIMENT_WORDS = ("negative", "positive")  # SST-2 label ids 0 / 1


def _review_prompt(sentence: str) -> str:
    # the instruction lets an instruct model answer in the label words before any training
    return f"Is this movie review positive or negative? Answer with one word.\n\nReview: {sentence}\nSentiment:"


def sentiment_accuracy(generated: Sequence[str], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy of the first label word in each generation ("The review is positive" counts as positive),
    and how often a generation contained a label word at all."""
    found = [[w for w in re.findall(r"[a-z]+", g.lower()) if w in SENTIMENT_WORDS] for g in generated]
    words = [f[0] if f else "" for f in found]
    correct = sum(w == SENTIMENT_WORDS[y] for w, y in zip(words, labels))
    valid = sum(w in SENTIMENT_WORDS for w in words)
    n = max(len(labels), 1)
    return {"accuracy": correct / n, "valid_answer_rate": valid / n}


def _lm_instruct_setup(args: TaskArgs) -> TaskSetup:
    from transformers import AutoConfig

    from .models import resolve

    path = resolve(args.model)
    config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    if qa_mode(config) != "causal":
        raise DataError(f"--task lm-instruct trains a decoder-only LM; {args.model} is a "
                        f"{config.model_type} model (use --task sst2 for classification)")
    tok = _tokenizer(path, args.trust_remote_code)
    model = _causal_model(path, tok, args.trust_remote_code)
    prompter = CausalPrompter(tok, args.max_length)
    train, dev = _glue_examples(args, "sst2")

    def items(rows: list) -> list[_Prompted]:
        out = []
        for r in rows:
            target = prompter.target(SENTIMENT_WORDS[int(r.label)])
            out.append(_Prompted(prompter.prompt(_review_prompt, r.text_a, len(target)), target, str(r.line)))
        return out

    eval_items = items(dev)

    def evaluate(trainer: Any) -> dict[str, float]:
        said = greedy_generate(trainer, tok, [it.prompt_ids for it in eval_items], max_new_tokens=8)
        return sentiment_accuracy(said, [int(r.label) for r in dev])

    return TaskSetup(
        task="lm-instruct", task_type="CAUSAL_LM", model=model, tokenizer_or_processor=tok,
        train_dataset=_teacher_forced(items(train), args.max_length, causal=True),
        eval_dataset=_teacher_forced(eval_items, args.max_length, causal=True),
        data_collator=PadCollator(tok.pad_token_id), compute_metrics=None, evaluate_fn=evaluate,
        main_metric="accuracy", data_label=f"{glue_data_label(args, 'sst2')}, as generation: "
        "'...Review: TEXT\\nSentiment:' -> 'positive' / 'negative'",
        details={"family": "lm-instruct", "prompt_format": prompter.format},
    )


# ---------------------------------------------------------------------------------------------- images
def _image_processor(path: str, config: Any, trust_remote_code: bool):
    from transformers import AutoImageProcessor

    from .data import vit_image_processor

    try:
        # the PIL backend: torchvision is not usable in deft's environments
        return AutoImageProcessor.from_pretrained(path, backend="pil", trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        # a checkpoint without preprocessor_config.json (e.g. a config-only or tiny test model)
        return vit_image_processor(int(getattr(config, "image_size", 224)))


def _accuracy(p: Any) -> dict[str, float]:
    import numpy as np
    from sklearn.metrics import accuracy_score

    logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
    return {"accuracy": float(accuracy_score(np.asarray(p.label_ids).reshape(-1), np.argmax(logits, axis=-1)))}


def _image_setup(args: TaskArgs) -> TaskSetup:
    from torch.utils.data import Subset
    from transformers import AutoConfig, AutoModelForImageClassification, default_data_collator

    from .data import ImageFolderDataset
    from .models import resolve

    if not args.data_dir:
        raise DataError("--task image needs --data-dir DIR with DIR/train/CLASS/*.png and DIR/val/CLASS/*.png")
    root, path = Path(args.data_dir), resolve(args.model)
    config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    processor = _image_processor(path, config, args.trust_remote_code)
    train, val = ImageFolderDataset(root / "train", processor), ImageFolderDataset(root / "val", processor)
    if train.classes != val.classes:
        raise DataError(f"{root}/train and {root}/val have different class folders: {train.classes} vs {val.classes}")
    config.num_labels = len(train.classes)
    config.id2label = dict(enumerate(train.classes))
    config.label2id = dict(train.class_to_idx)
    # ignore_mismatched_sizes: a pretrained head (e.g. ImageNet's 1000 classes) is replaced by a fresh one
    model = AutoModelForImageClassification.from_pretrained(
        path, config=config, ignore_mismatched_sizes=True, trust_remote_code=args.trust_remote_code
    )

    def subset(ds: ImageFolderDataset, n: int | None, seed: int) -> Dataset:
        idx = seeded_subset(list(range(len(ds))), n, seed)
        return ds if len(idx) == len(ds) else Subset(ds, idx)

    return TaskSetup(
        task="image", task_type="IMAGE_CLS", model=model, tokenizer_or_processor=processor,
        train_dataset=subset(train, args.max_train_samples, args.seed),
        eval_dataset=subset(val, args.max_eval_samples, 0),
        data_collator=default_data_collator, compute_metrics=_accuracy, evaluate_fn=None, main_metric="accuracy",
        data_label=f"image folders {root}/train and {root}/val ({len(train.classes)} classes: "
        f"{', '.join(train.classes)})",
        details={"family": "image", "classes": train.classes},
    )


# ---------------------------------------------------------------------------------------------- training
def train_with_setup(args: Any, setup: TaskSetup | None = None, callbacks: Sequence[Any] | None = None
                     ) -> dict[str, Any]:
    """``deft train`` for any task: PEFT + density loss, checkpoints / resume, results.json, plot, adapter.

    ``args`` is a :class:`deft.run.TrainArgs`. ``setup`` defaults to ``setup_task(args)``, built after
    the seed is set (pass one only to reuse a prepared task, e.g. in tests). ``callbacks`` are extra
    ``TrainerCallback`` s for the trainer (``deft tune`` watches the evaluations through one to prune).
    """
    from transformers import TrainingArguments, set_seed

    from . import run  # lazily: run.train calls into this module
    from .io import write_json
    from .methods import apply_method, count_parameters, save_trainable
    from .analysis.plots import layerwise_density
    from .train.trainer import DeftTrainer

    out = Path(args.output)
    ckpt_dir = out / "checkpoints"
    last = run._last_checkpoint(ckpt_dir)
    if (out / "results.json").exists() and not args.overwrite:
        raise run.RunError(f"{out} already holds a finished run (results.json); pass --overwrite or another --output")
    if last and not (args.resume or args.overwrite):
        raise run.RunError(f"{out} holds an interrupted run ({last}); pass --resume to continue it or --overwrite")
    # under torchrun / accelerate launch every process runs this function; only the first one talks and writes
    main_process = int(os.environ.get("RANK", "0")) == 0
    if args.resume and not last and main_process:
        print(f"deft: no checkpoint in {ckpt_dir}; starting from scratch")
    from .train.callbacks import TrainTimeCallback, checkpoint_progress, use_run_progress

    time_before = 0.0  # seconds of training in the segments before an interruption (train_time_s adds them)
    if args.resume and last:
        time_before, step, total = checkpoint_progress(last)
        if main_process:
            print(f"deft: resuming from {Path(last).name}" + (f" (step {step} of {total})" if step is not None else ""))
    density_cfg = run._density_config(args)  # validate everything before loading anything heavy
    eval_every = getattr(args, "eval_every", None)
    if eval_every is not None and not 0 < eval_every < 1:
        raise ConfigError(f"--eval-every is a share of training, 0 < x < 1; got {eval_every!r}")
    method_cfg = run._method_config(args)

    from .train.callbacks import DensityCSVCallback
    from .cli_compress import prepare_compressed_model

    set_seed(args.seed)
    setup = setup or setup_task(args)
    if getattr(args, "activation", None):
        from .inference.activations import swap_activation

        swap_activation(setup.model, args.activation)
    model, compression = prepare_compressed_model(setup.model, args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_method(model, method_cfg, task_type=setup.task_type)
    params = count_parameters(model)

    targs = TrainingArguments(
        output_dir=str(ckpt_dir),
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        warmup_steps=args.warmup_ratio,  # a float < 1 is a fraction of the steps in transformers 5
        weight_decay=args.weight_decay,
        lr_scheduler_type="linear",
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.grad_accum,
        # a float eval_steps < 1 is a share of the training steps in transformers
        eval_strategy="steps" if args.eval_every else "epoch",
        eval_steps=args.eval_every or None,
        save_strategy="epoch",
        save_total_limit=1,
        logging_steps=args.logging_steps,
        report_to=list(getattr(args, "report_to", [])),
        seed=args.seed,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        # under torchrun / accelerate launch on CPU-only machines NCCL is absent: use gloo
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else None,
        disable_tqdm=args.quiet,
        dataloader_num_workers=0,
    )
    trainer = DeftTrainer(
        model,
        targs,
        density=density_cfg,
        train_dataset=setup.train_dataset,
        eval_dataset=setup.eval_dataset,
        data_collator=setup.data_collator,
        compute_metrics=setup.compute_metrics,
        callbacks=[TrainTimeCallback(time_before), DensityCSVCallback(out / "train_log.csv"), *(callbacks or ())],
    )
    use_run_progress(trainer, quiet=args.quiet)
    t0 = time.time()
    trainer.train(resume_from_checkpoint=last if (args.resume and last) else None)
    train_time = time_before + time.time() - t0
    evals = [h for h in trainer.state.log_history if "eval_density" in h]
    if evals and evals[-1].get("step") == trainer.state.global_step and trainer.last_density_report is not None:
        metrics = dict(evals[-1])  # the end-of-epoch evaluation already measured the final model
    else:
        metrics = trainer.evaluate()
    report = trainer.last_density_report
    assert report is not None
    if setup.evaluate_fn is not None:
        extra = {f"eval_{k}": float(v) for k, v in setup.evaluate_fn(trainer).items()}
        trainer.log(extra)  # into log_history (and the console) next to the teacher-forced eval
        metrics.update(extra)

    main_process = trainer.is_world_process_zero()  # the other processes of a multi-process run write nothing
    if main_process:
        save_trainable(trainer.model, out / "adapter", method_cfg, task_type=setup.task_type)
    thresholds = trainer.final_thresholds()
    if thresholds is not None and main_process:
        # part of the model: sparsify(mode="threshold", threshold=<this>) serves it as it was evaluated
        from .core.threshold import save_thresholds

        save_thresholds(out / "adapter", thresholds)
    if main_process:
        layerwise_density({f"{args.method} alpha={args.alpha:g}": report}, out / "layerwise_density.png",
                          title=f"{args.model} / {setup.task}")
    results = {
        "config": asdict(args),
        "task": setup.task,
        "task_type": setup.task_type,
        "main_metric": setup.main_metric,
        "metric": metrics.get(f"eval_{setup.main_metric}"),
        "metrics": {k[5:]: v for k, v in metrics.items() if k.startswith("eval_") and "density_layer" not in k},
        "density": report.to_dict(),
        # the per-layer thresholds the model was trained and evaluated under (the density above is then
        # the effective density: entries at or below them were zeroed), None without --target-density
        "thresholds": thresholds,
        "trainable_params": params.trainable,
        "total_params": params.total,
        "trainable_percent": params.percent,
        "train_examples": len(setup.train_dataset),
        "eval_examples": len(setup.eval_dataset),
        "data": setup.data_label,
        "task_details": setup.details,
        "compression": compression,
        "train_time_s": round(train_time, 1),
        "log_history": trainer.state.log_history,
        "versions": run._versions(),
    }
    if main_process:
        write_json(out / "results.json", results)
    trainer.probe.detach()
    return results
