"""SQuAD v1.1: loading, an article-level split, extractive and generative preprocessing, metrics.

Only the dev file (``dev-v1.1.json``, 10,570 questions over 48 articles) is available here, so train
and eval sets are both carved out of it by :func:`split_squad`. Results on such a split are not
comparable with published SQuAD dev numbers.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from deft.data.errors import DataError

# Keys of an eval feature that postprocessing needs but the model must not receive.
EXTRACTIVE_META_KEYS: tuple[str, ...] = ("example_id", "offset_mapping", "context")
_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class QAExample:
    """One question. answers / answer_starts are parallel lists (SQuAD dev has up to 3 references)."""

    id: str
    question: str
    context: str
    answers: list[str]
    answer_starts: list[int]
    title: str = ""


def load_squad(path: str | PathLike[str]) -> list[QAExample]:
    """All questions of a SQuAD v1.1 JSON file, in file order."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            root = json.load(f)
    except FileNotFoundError as e:
        raise DataError(f"{path}: no such file (expected a SQuAD v1.1 JSON such as dev-v1.1.json)") from e
    except json.JSONDecodeError as e:
        raise DataError.at(path, e.lineno, f"invalid JSON: {e.msg} (column {e.colno})") from e

    examples = []
    articles = _get(root, "data", path, "the top level")
    for a, article in enumerate(articles):
        title = str(_get(article, "title", path, f"article {a}"))
        for p, para in enumerate(_get(article, "paragraphs", path, f"article {title!r}")):
            context = _get(para, "context", path, f"article {title!r} paragraph {p}")
            for q in _get(para, "qas", path, f"article {title!r} paragraph {p}"):
                qid = _get(q, "id", path, f"a question of article {title!r} paragraph {p}")
                where = f"question {qid}"
                answers = _get(q, "answers", path, where)
                examples.append(
                    QAExample(
                        id=str(qid),
                        question=_get(q, "question", path, where),
                        context=context,
                        answers=[_get(ans, "text", path, where) for ans in answers],
                        answer_starts=[int(_get(ans, "answer_start", path, where)) for ans in answers],
                        title=title,
                    )
                )
    return examples


def _get(obj: Any, key: str, path: Path, where: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise DataError(f"{path}: {where}: missing key {key!r} (not SQuAD v1.1 format?)")
    return obj[key]


def split_squad(
    examples: Sequence[QAExample], eval_fraction: float = 0.2, seed: int = 0
) -> tuple[list[QAExample], list[QAExample]]:
    """(train, eval) split of ONE file by article title, seeded.

    This is a split of a single SQuAD file (in practice the official dev set), not the official
    train/dev split. Whole articles go to one side, so no paragraph or near-duplicate question leaks
    across; ``eval_fraction`` is therefore a fraction of articles, not of questions.
    """
    if not 0 < eval_fraction < 1:
        raise DataError(f"eval_fraction={eval_fraction} must lie strictly between 0 and 1")
    titles = list(dict.fromkeys(e.title for e in examples))  # first-appearance order: seed alone decides
    if len(titles) < 2:
        raise DataError(f"split_squad needs at least 2 articles to split by title, got {len(titles)}")
    random.Random(seed).shuffle(titles)
    n_eval = min(len(titles) - 1, max(1, round(eval_fraction * len(titles))))
    eval_titles = set(titles[:n_eval])
    return ([e for e in examples if e.title not in eval_titles], [e for e in examples if e.title in eval_titles])


# ---- extractive (encoder models with a span head) -------------------------------------------------


def _encode(examples: Sequence[QAExample], tokenizer: Any, max_length: int, stride: int) -> Any:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"extractive SQuAD preprocessing needs a fast tokenizer (offset mappings); got {type(tokenizer).__name__}"
        )
    # Long contexts become several windows overlapping by `stride` tokens; only the context is cut.
    enc = tokenizer(
        [e.question.lstrip() for e in examples],  # leading spaces waste tokens and shift nothing useful
        [e.context for e in examples],
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    _check_windows_cover_contexts(enc, examples)
    return enc


def _check_windows_cover_contexts(enc: Any, examples: Sequence[QAExample], slack: int = 50) -> None:
    """The windows of every example must reach the end of its context.

    tokenizers 0.23.2 returned only the first overflow window, so the rest of a long context vanished
    without an error; answers there could never be found. ``slack`` characters of tolerance allow for
    trailing text a tokenizer normalises away.
    """
    reach = [0] * len(examples)
    for i, offsets in enumerate(enc["offset_mapping"]):
        j = enc["overflow_to_sample_mapping"][i]
        ids = enc.sequence_ids(i)
        ends = [o[1] for o, sid in zip(offsets, ids, strict=True) if sid == 1]
        if ends:
            reach[j] = max(reach[j], max(ends))
    for e, r in zip(examples, reach, strict=True):
        if r < len(e.context.rstrip()) - slack:
            import tokenizers

            raise DataError(
                f"SQuAD example {e.id}: the tokenizer's overflow windows stop at character {r} of a "
                f"{len(e.context)}-character context (tokenizers {tokenizers.__version__}); "
                "tokenizers 0.23.2 drops windows: pip install 'tokenizers>=0.23.3'"
            )


def _model_inputs(enc: Any, i: int) -> dict[str, list[int]]:
    return {k: enc[k][i] for k in _MODEL_KEYS if k in enc}


def _cls_index(input_ids: list[int], tokenizer: Any) -> int:
    cls = getattr(tokenizer, "cls_token_id", None)
    return input_ids.index(cls) if cls is not None and cls in input_ids else 0


def prepare_extractive_train(
    examples: Sequence[QAExample], tokenizer: Any, max_length: int = 384, stride: int = 128
) -> list[dict[str, Any]]:
    """Training features with start_positions / end_positions (token indices, inclusive end).

    A window that does not contain the whole first answer is labelled with the CLS index (0 for BERT
    style tokenizers): the model learns "no answer here" for it, as in the original BERT recipe.
    """
    enc = _encode(examples, tokenizer, max_length, stride)
    features = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        example = examples[enc["overflow_to_sample_mapping"][i]]
        feature: dict[str, Any] = _model_inputs(enc, i)
        start, end = _answer_span(example, offsets, enc.sequence_ids(i))
        if start is None:
            start = end = _cls_index(feature["input_ids"], tokenizer)
        feature["start_positions"], feature["end_positions"] = start, end
        features.append(feature)
    return features


def _answer_span(
    example: QAExample, offsets: Sequence[tuple[int, int]], sequence_ids: Sequence[int | None]
) -> tuple[int | None, int | None]:
    """Token span of the first answer inside this window, or (None, None) when it is not all inside."""
    context_tokens = [t for t, s in enumerate(sequence_ids) if s == 1]
    if not example.answers or not context_tokens:
        return None, None
    start_char = example.answer_starts[0]
    end_char = start_char + len(example.answers[0])
    first, last = context_tokens[0], context_tokens[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return None, None
    start = first
    while start <= last and offsets[start][0] <= start_char:  # last token starting at or before the answer
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:  # first token ending at or after the answer
        end -= 1
    return start - 1, end + 1


def prepare_extractive_eval(
    examples: Sequence[QAExample], tokenizer: Any, max_length: int = 384, stride: int = 128
) -> list[dict[str, Any]]:
    """Eval features: model inputs plus the keys in :data:`EXTRACTIVE_META_KEYS`.

    offset_mapping is None on question and special tokens so postprocessing can only pick context.
    Drop the meta keys before batching the features for the model.
    """
    enc = _encode(examples, tokenizer, max_length, stride)
    features = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        example = examples[enc["overflow_to_sample_mapping"][i]]
        sequence_ids = enc.sequence_ids(i)
        feature: dict[str, Any] = _model_inputs(enc, i)
        feature["example_id"] = example.id
        feature["context"] = example.context
        feature["offset_mapping"] = [tuple(o) if s == 1 else None for o, s in zip(offsets, sequence_ids, strict=True)]
        features.append(feature)
    return features


def postprocess_extractive(
    features: Sequence[Mapping[str, Any]],
    start_logits: Any,
    end_logits: Any,
    n_best: int = 20,
    max_answer_len: int = 30,
) -> dict[str, str]:
    """{example id: answer text}: over all windows of a question, the context span with the largest
    start + end logit, among the ``n_best`` starts and ends of each window (end >= start, at most
    ``max_answer_len`` tokens). A question with no valid span gets "".

    start_logits / end_logits: one row per feature, (num_features, seq_len) padded or a list of rows.
    """
    best: dict[str, tuple[float, str]] = {}
    for feature, s_row, e_row in zip(features, start_logits, end_logits, strict=True):
        offsets = feature["offset_mapping"]
        s_log, e_log = _row(s_row)[: len(offsets)], _row(e_row)[: len(offsets)]  # drop batch padding
        qid = feature["example_id"]
        best.setdefault(qid, (-np.inf, ""))
        for s in np.argsort(s_log)[::-1][:n_best]:
            for e in np.argsort(e_log)[::-1][:n_best]:
                if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_len:
                    continue
                score = float(s_log[s] + e_log[e])
                if score > best[qid][0]:
                    best[qid] = (score, feature["context"][offsets[s][0] : offsets[e][1]])
    return {qid: text for qid, (_, text) in best.items()}


def _row(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu()
    return np.asarray(x, dtype=np.float64).reshape(-1)


# ---- generative (seq2seq / decoder-only models) ---------------------------------------------------


def generative_pairs(examples: Sequence[QAExample], style: Literal["t5", "chat"] = "t5") -> list[tuple[str, str]]:
    """(source text, target text) pairs; the target is the first reference answer.

    "t5": the T5 paper's SQuAD format, ``question: ... context: ...``.
    "chat": an instruction prompt for decoder-only models (apply a chat template on top if wanted).
    """
    if style not in ("t5", "chat"):
        raise DataError(f"style={style!r}: expected 't5' or 'chat'")
    pairs = []
    for e in examples:
        if not e.answers:
            raise DataError(f"question {e.id} has no answer to use as a generation target")
        if style == "t5":
            source = f"question: {e.question} context: {e.context}"
        else:
            source = (
                f"Answer the question with a short span copied from the context.\n\n"
                f"Context: {e.context}\nQuestion: {e.question}\nAnswer:"
            )
        pairs.append((source, e.answers[0]))
    return pairs


# ---- metrics ---------------------------------------------------------------------------------------


def squad_metrics(predictions: Mapping[str, str], examples: Sequence[QAExample]) -> dict[str, float]:
    """SQuAD exact match and token F1, in percent (0-100) as the official script reports them.

    Every example is scored; one without a prediction counts as answered "" (the official script
    also scores missing answers as wrong). A prediction id that is not among ``examples`` is an error,
    since it means predictions and examples come from different sets.
    """
    from torchmetrics.functional.text import squad  # lazy: torchmetrics' text module is slow to import

    ids = {e.id for e in examples}
    unknown = [qid for qid in predictions if qid not in ids]
    if unknown:
        raise DataError(f"predictions for {len(unknown)} unknown question id(s), e.g. {unknown[0]!r}")
    if not examples:
        raise DataError("squad_metrics needs at least one example")
    preds = [{"id": e.id, "prediction_text": predictions.get(e.id, "")} for e in examples]
    target: list[dict[str, str | dict[str, list[str] | list[int]]]] = [
        {"id": e.id, "answers": {"text": e.answers, "answer_start": e.answer_starts}} for e in examples
    ]
    return {k: float(v) for k, v in squad(preds, target).items()}
