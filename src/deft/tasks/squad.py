"""``squad``: SQuAD v1.1 question answering, extractive span prediction for encoders (BERT, RoBERTa, ...),
generation for seq2seq (T5, BART) and decoder-only (Llama, GPT-2, SmolLM2) models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from ..data import (
    EXTRACTIVE_META_KEYS,
    DataError,
    QAExample,
    generative_pairs,
    load_squad,
    postprocess_extractive,
    prepare_extractive_eval,
    prepare_extractive_train,
    split_squad,
    squad_metrics,
)
from ..models import resolve
from .base import FeatureDataset, PadCollator, TaskArgs, TaskSetup, load_tokenizer, seeded_subset
from .generation import ANSWER_MAX_TOKENS, CausalPrompter, Prompted, causal_model, greedy_generate, teacher_forced

SQUAD_EVAL_FRACTION = 0.2
SQUAD_SPLIT_SEED = 0  # fixed, not --seed: runs with different seeds must be scored on the same questions
QA_NEW_TOKENS = 16
# Encoders whose config would also map to a *ForCausalLM class (BertLMHeadModel, ...): for QA they are span models.
ENCODER_TYPES = frozenset(
    {
        "albert",
        "bert",
        "camembert",
        "deberta",
        "deberta-v2",
        "distilbert",
        "electra",
        "ernie",
        "mobilebert",
        "modernbert",
        "mpnet",
        "roberta",
        "roberta-prelayernorm",
        "xlm-roberta",
        "xlm-roberta-xl",
    }
)


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
    label = (
        f"SQuAD v1.1 dev-v1.1.json split by article (seed {SQUAD_SPLIT_SEED}): {100 - pct}% train / {pct}% "
        f"eval — a split of one file ({n_art[0]} / {n_art[1]} articles, {len(train)} / {len(dev)} questions, "
        f"from {root}); not comparable with official SQuAD dev scores"
    )
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
    raise DataError(
        f"model_type {model_type!r} has neither a question-answering nor a language-model head "
        "in transformers; --task squad cannot use it"
    )


def squad_scores(predictions: dict[str, str], examples: Sequence[QAExample]) -> dict[str, float]:
    """F1 / EM as fractions (the main metric, comparable in scale to GLUE accuracy) and in percent."""
    pct = squad_metrics(predictions, examples)
    return {
        "f1": pct["f1"] / 100,
        "exact_match": pct["exact_match"] / 100,
        "f1_percent": pct["f1"],
        "exact_match_percent": pct["exact_match"],
    }


def setup(args: TaskArgs) -> TaskSetup:
    """SQuAD v1.1 in the form the model family can do: spans (encoders) or generation (seq2seq, decoder-only)."""
    from transformers import AutoConfig

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
    start, end = p.predictions[:2]  # (start_logits, end_logits), batch-padded with -100 past each row's end
    return squad_scores(postprocess_extractive(features, start, end), examples)


def _extractive_qa(args: TaskArgs, path: str, train_ex: list[QAExample], eval_ex: list[QAExample]) -> TaskSetup:
    from transformers import AutoModelForQuestionAnswering

    tok = load_tokenizer(path, args.trust_remote_code)
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
        task="squad",
        task_type="QUESTION_ANS",
        model=model,
        tokenizer_or_processor=tok,
        train_dataset=FeatureDataset(train),
        eval_dataset=FeatureDataset(features),
        data_collator=PadCollator(tok.pad_token_id, drop=EXTRACTIVE_META_KEYS),
        compute_metrics=partial(_extractive_metrics, features, eval_ex),
        evaluate_fn=None,
        main_metric="f1",
        data_label="",
        details={"stride": stride},
    )


def _seq2seq_qa(args: TaskArgs, path: str, train_ex: list[QAExample], eval_ex: list[QAExample]) -> TaskSetup:
    from transformers import AutoModelForSeq2SeqLM

    tok = load_tokenizer(path, args.trust_remote_code)
    model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=args.trust_remote_code)

    def items(examples: list[QAExample]) -> list[Prompted]:
        pairs = generative_pairs(examples, style="t5")  # "question: ... context: ...": truncation cuts the context
        src = tok([s for s, _ in pairs], truncation=True, max_length=args.max_length)["input_ids"]
        tgt = tok(text_target=[t for _, t in pairs], truncation=True, max_length=ANSWER_MAX_TOKENS)["input_ids"]
        return [Prompted(s, t, e.id) for s, t, e in zip(src, tgt, examples, strict=True)]

    eval_items = items(eval_ex)

    def evaluate(trainer: Any) -> dict[str, float]:
        answers = greedy_generate(trainer, tok, [it.prompt_ids for it in eval_items], QA_NEW_TOKENS)
        return squad_scores({it.key: a for it, a in zip(eval_items, answers, strict=True)}, eval_ex)

    return TaskSetup(
        task="squad",
        task_type="SEQ_2_SEQ_LM",
        model=model,
        tokenizer_or_processor=tok,
        train_dataset=teacher_forced(items(train_ex), args.max_length, causal=False),
        eval_dataset=teacher_forced(eval_items, args.max_length, causal=False),
        data_collator=PadCollator(tok.pad_token_id, decoder_mask=True),
        compute_metrics=None,
        evaluate_fn=evaluate,
        main_metric="f1",
        data_label="",
        details={"prompt_format": "t5"},
    )


def _causal_qa(args: TaskArgs, path: str, train_ex: list[QAExample], eval_ex: list[QAExample]) -> TaskSetup:
    tok = load_tokenizer(path, args.trust_remote_code)
    model = causal_model(path, tok, args.trust_remote_code)
    prompter = CausalPrompter(tok, args.max_length)

    def items(examples: list[QAExample]) -> list[Prompted]:
        out = []
        for e in examples:
            target = prompter.target(e.answers[0])
            build = partial(_qa_prompt, e)
            out.append(Prompted(prompter.prompt(build, e.context, len(target)), target, e.id))
        return out

    eval_items = items(eval_ex)

    def evaluate(trainer: Any) -> dict[str, float]:
        answers = greedy_generate(trainer, tok, [it.prompt_ids for it in eval_items], QA_NEW_TOKENS)
        return squad_scores({it.key: a for it, a in zip(eval_items, answers, strict=True)}, eval_ex)

    return TaskSetup(
        task="squad",
        task_type="CAUSAL_LM",
        model=model,
        tokenizer_or_processor=tok,
        train_dataset=teacher_forced(items(train_ex), args.max_length, causal=True),
        eval_dataset=teacher_forced(eval_items, args.max_length, causal=True),
        data_collator=PadCollator(tok.pad_token_id),
        compute_metrics=None,
        evaluate_fn=evaluate,
        main_metric="f1",
        data_label="",
        details={"prompt_format": prompter.format},
    )


def _qa_prompt(example: QAExample, context: str) -> str:
    # the data module's instruction format ("...\n\nContext: ...\nQuestion: ...\nAnswer:"), with a cut context
    return generative_pairs([replace(example, context=context)], style="chat")[0][0]
