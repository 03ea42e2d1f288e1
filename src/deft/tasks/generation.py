"""Generation for the task families that answer in words (SQuAD with seq2seq or decoder-only models,
lm-instruct): prompts and targets as token ids, teacher-forced features, greedy decoding for the metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data import DataError
from .base import FeatureDataset, pad_rows

ANSWER_MAX_TOKENS = 32  # longest generation target kept (SQuAD answers are a few words)


@dataclass
class Prompted:
    """One generation example: the prompt the model continues and the reference(s) it is scored on."""

    prompt_ids: list[int]
    target_ids: list[int]
    key: str  # question id / row index


def teacher_forced(items: Sequence[Prompted], max_length: int, causal: bool) -> FeatureDataset:
    """Training (and teacher-forced eval) features: prompt + target in one sequence with only the target
    learned (``causal``), or prompt as input and target as labels (seq2seq)."""
    feats = []
    for it in items:
        if causal:  # prompt + answer in one sequence; only the answer is learned
            ids = (it.prompt_ids + it.target_ids)[:max_length]
            labels = ([-100] * len(it.prompt_ids) + it.target_ids)[:max_length]
            feats.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        else:
            feats.append(
                {"input_ids": it.prompt_ids, "attention_mask": [1] * len(it.prompt_ids), "labels": it.target_ids}
            )
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
            chunk = prompts[i : i + bs]
            # decoder-only models continue the last position, so prompts are padded on the left
            ids = pad_rows(chunk, tok.pad_token_id, left=decoder_only)
            mask = pad_rows([[1] * len(p) for p in chunk], 0, left=decoder_only)
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
            out = out.cpu()
            if decoder_only and out.shape[1] >= ids.shape[1] and torch.equal(out[:, : ids.shape[1]], ids):
                out = out[:, ids.shape[1] :]  # most models echo the prompt; some peft paths return only new tokens
            for row in tok.batch_decode(out, skip_special_tokens=True):
                texts.append(row.strip().split("\n")[0].strip())
    finally:
        if probe is not None:
            probe.attach()
        model.train(was_training)
    return texts


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
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
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


def causal_model(path: str, tok: Any, trust_remote_code: bool):
    """A decoder-only LM from ``path`` whose config knows the tokenizer's pad token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model
