"""``lm-instruct``: SST-2 as instruction-style generation for decoder-only models ("...Review: TEXT\nSentiment:"
-> "positive" / "negative"), scored on the first label word the model generates."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..data import DataError
from ..models import resolve
from .base import PadCollator, TaskArgs, TaskSetup, load_tokenizer
from .generation import CausalPrompter, Prompted, causal_model, greedy_generate, teacher_forced
from .glue import glue_data_label, glue_examples
from .squad import qa_mode

SENTIMENT_WORDS = ("negative", "positive")  # SST-2 label ids 0 / 1


def _review_prompt(sentence: str) -> str:
    # the instruction lets an instruct model answer in the label words before any training
    return f"Is this movie review positive or negative? Answer with one word.\n\nReview: {sentence}\nSentiment:"


def sentiment_accuracy(generated: Sequence[str], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy of the first label word in each generation ("The review is positive" counts as positive),
    and how often a generation contained a label word at all."""
    found = [[w for w in re.findall(r"[a-z]+", g.lower()) if w in SENTIMENT_WORDS] for g in generated]
    words = [f[0] if f else "" for f in found]
    correct = sum(w == SENTIMENT_WORDS[y] for w, y in zip(words, labels, strict=True))
    valid = sum(w in SENTIMENT_WORDS for w in words)
    n = max(len(labels), 1)
    return {"accuracy": correct / n, "valid_answer_rate": valid / n}


def setup(args: TaskArgs) -> TaskSetup:
    """lm-instruct: SST-2 as instruction-style generation for decoder-only models."""
    from transformers import AutoConfig

    path = resolve(args.model)
    config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    if qa_mode(config) != "causal":
        raise DataError(
            f"--task lm-instruct trains a decoder-only LM; {args.model} is a "
            f"{config.model_type} model (use --task sst2 for classification)"
        )
    tok = load_tokenizer(path, args.trust_remote_code)
    model = causal_model(path, tok, args.trust_remote_code)
    prompter = CausalPrompter(tok, args.max_length)
    train, dev = glue_examples(args, "sst2")

    def items(rows: list) -> list[Prompted]:
        out = []
        for r in rows:
            target = prompter.target(SENTIMENT_WORDS[int(r.label)])
            out.append(Prompted(prompter.prompt(_review_prompt, r.text_a, len(target)), target, str(r.line)))
        return out

    eval_items = items(dev)

    def evaluate(trainer: Any) -> dict[str, float]:
        said = greedy_generate(trainer, tok, [it.prompt_ids for it in eval_items], max_new_tokens=8)
        return sentiment_accuracy(said, [int(r.label) for r in dev])

    return TaskSetup(
        task="lm-instruct",
        task_type="CAUSAL_LM",
        model=model,
        tokenizer_or_processor=tok,
        train_dataset=teacher_forced(items(train), args.max_length, causal=True),
        eval_dataset=teacher_forced(eval_items, args.max_length, causal=True),
        data_collator=PadCollator(tok.pad_token_id),
        compute_metrics=None,
        evaluate_fn=evaluate,
        main_metric="accuracy",
        data_label=f"{glue_data_label(args, 'sst2')}, as generation: "
        "'...Review: TEXT\\nSentiment:' -> 'positive' / 'negative'",
        details={"family": "lm-instruct", "prompt_format": prompter.format},
    )
