"""The task layer end to end: each task family trains 2 DEFT steps and evaluates on tiny random models.

Models are random and tiny (hidden 32), so the checks are about plumbing: the metrics exist and lie in
range, the density is measured, results.json says where the data came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, PreTrainedTokenizerFast

from deft.data import EXTRACTIVE_META_KEYS, make_synthetic_images
from deft.recipes.train import TrainArgs, train_with_setup
from deft.tasks import (
    CausalPrompter,
    PadCollator,
    glue_data_label,
    glue_examples,
    load_squad_data,
    qa_mode,
    sentiment_accuracy,
    setup_task,
)
from deft.testing import tiny_config

CITIES = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Peru", "Lima"), ("Japan", "Tokyo")]


def _squad_json(articles: list[dict]) -> dict:
    return {"version": "1.1", "data": articles}


def _article(title: str, paragraphs: list[tuple[str, list[tuple[str, str, str]]]]) -> dict:
    """paragraphs: (context, [(id, question, answer)]); answer_start is found in the context."""
    return {
        "title": title,
        "paragraphs": [
            {
                "context": ctx,
                "qas": [
                    {"id": qid, "question": q, "answers": [{"text": a, "answer_start": ctx.index(a)}]}
                    for qid, q, a in qas
                ],
            }
            for ctx, qas in paragraphs
        ],
    }


@pytest.fixture(scope="module")
def squad_dir(tmp_path_factory) -> Path:
    """dev-v1.1.json only: 5 articles x 2 paragraphs x 2 questions (the split takes 1 article for eval)."""
    arts = []
    for country, city in CITIES:
        p1 = (
            f"{city} is the capital of {country}. It is a large city with many old buildings.",
            [
                (f"{country}-1", f"What is the capital of {country}?", city),
                (f"{country}-2", f"What does {city} have many of?", "old buildings"),
            ],
        )
        p2 = (
            f"The people of {country} speak their own language. {city} has a famous museum.",
            [
                (f"{country}-3", f"What does {city} have?", "a famous museum"),
                (f"{country}-4", "Who speaks their own language?", f"The people of {country}"),
            ],
        )
        arts.append(_article(country, [p1, p2]))
    d = tmp_path_factory.mktemp("squad")
    (d / "dev-v1.1.json").write_text(json.dumps(_squad_json(arts)), encoding="utf-8")
    return d


def _word_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the test texts (no T5 / Llama tokenizer is available offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    words = [
        "question",
        "context",
        "Context",
        "Question",
        "Answer",
        "Review",
        "Sentiment",
        "positive",
        "negative",
        ":",
        "?",
        ".",
        *"the with a short span copied from Is this movie or one word".split(),
    ]
    for country, city in CITIES:
        words += (
            f"{city} is the capital of {country} It is a large city with many old buildings What does have "
            f"many The people speak their own language a famous museum Who"
        ).split()
    tk.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=specials))
    if kind == "t5":  # T5 appends </s> to every sequence
        tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    else:  # Llama prepends <s>
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>"
    )


def _generative_dir(tmp_path_factory, kind: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    d = tmp_path_factory.mktemp(f"tiny-{kind}")
    tok = _word_tokenizer(kind)
    ids = dict(vocab_size=len(tok), pad_token_id=0, eos_token_id=1, bos_token_id=3)
    torch.manual_seed(0)
    if kind == "t5":
        model = AutoModelForSeq2SeqLM.from_config(tiny_config("t5", decoder_start_token_id=0, **ids))
    else:
        model = AutoModelForCausalLM.from_config(tiny_config("llama", **ids))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    return _generative_dir(tmp_path_factory, "t5")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return _generative_dir(tmp_path_factory, "llama")


def _args(model: Path, task: str, data_dir: Path | None, out: Path, **kw) -> TrainArgs:
    # 8 training rows / batch 4 = 2 optimizer steps in one epoch
    base = dict(
        model=str(model),
        task=task,
        data_dir=str(data_dir) if data_dir else None,
        output=str(out),
        epochs=1,
        batch_size=4,
        eval_batch_size=8,
        max_train_samples=8,
        max_eval_samples=4,
        max_length=64,
        lr=1e-2,
        eps=1e-3,
        alpha=1.0,
        logging_steps=1,
        quiet=True,
    )
    return TrainArgs(**{**base, **kw})


def _check_run(res: dict, out: Path, main: str) -> None:
    assert res["main_metric"] == main
    assert 0.0 <= res["metric"] <= 1.0
    assert 0.0 <= res["metrics"]["density"] <= 1.0 and len(res["density"]["layers"]) >= 2
    assert any(f"eval_{main}" in h for h in res["log_history"])  # generation metrics are logged too
    assert any("density_loss" in h for h in res["log_history"])  # alpha = 1 really trained the density term
    assert json.loads((out / "results.json").read_text())["metric"] == res["metric"]
    assert (out / "adapter" / "deft_method.json").exists()


# ---------------------------------------------------------------------------------------------- units
def test_squad_single_file_is_split_by_article_and_labelled(tmp_path):
    arts = [
        _article("Alpha", [("Alpha is red.", [("a1", "What is Alpha?", "red")])]),
        _article("Beta", [("Beta is blue.", [("b1", "What is Beta?", "blue")])]),
    ]
    (tmp_path / "dev-v1.1.json").write_text(json.dumps(_squad_json(arts)), encoding="utf-8")
    train, dev, label = load_squad_data(str(tmp_path))
    assert len(train) == len(dev) == 1 and train[0].title != dev[0].title
    assert label.startswith(
        "SQuAD v1.1 dev-v1.1.json split by article (seed 0): 80% train / 20% eval — "
        "a split of one file (1 / 1 articles, 1 / 1 questions"
    )
    assert load_squad_data(str(tmp_path))[1][0].id == dev[0].id  # the split does not depend on anything else
    # with the official train file present, both files are used as they are
    (tmp_path / "train-v1.1.json").write_text(json.dumps(_squad_json(arts[:1])), encoding="utf-8")
    train, dev, label = load_squad_data(str(tmp_path))
    assert (len(train), len(dev)) == (1, 2) and "official" in label


def test_collator_drops_meta_keys_and_pads():
    feats = [
        {
            "input_ids": [5, 6, 7],
            "attention_mask": [1, 1, 1],
            "example_id": "q1",
            "offset_mapping": [None],
            "context": "c",
            "start_positions": 1,
        },
        {
            "input_ids": [5],
            "attention_mask": [1],
            "example_id": "q2",
            "offset_mapping": [None],
            "context": "c",
            "start_positions": 0,
        },
    ]
    batch = PadCollator(0, drop=EXTRACTIVE_META_KEYS)(feats)
    assert set(batch) == {"input_ids", "attention_mask", "start_positions"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]] and batch["attention_mask"][1].tolist() == [1, 0, 0]
    s2s = PadCollator(0, decoder_mask=True)([{"input_ids": [4], "labels": [8, 1]}, {"input_ids": [4], "labels": [1]}])
    assert s2s["labels"].tolist() == [[8, 1], [1, -100]] and s2s["decoder_attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_qa_mode_by_family():
    assert [qa_mode(tiny_config(t)) for t in ("bert", "distilbert", "t5", "bart", "llama", "gpt2")] == [
        "extractive",
        "extractive",
        "seq2seq",
        "seq2seq",
        "causal",
        "causal",
    ]


def test_causal_prompter_uses_the_chat_template():
    tok = _word_tokenizer("llama")
    tok.chat_template = (
        "{% for m in messages %}<s> {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} Answer :{% endif %}"
    )
    p = CausalPrompter(tok, max_length=16)
    assert p.format == "chat"
    target = p.target("Paris")
    assert tok.convert_ids_to_tokens(target) == ["Paris", "</s>"]
    ids = p.prompt(lambda text: f"Question : {text}", "What is the capital of France ? " * 4, len(target))
    assert len(ids) + len(target) <= 16
    assert tok.convert_ids_to_tokens(ids)[:3] == ["<s>", "Question", ":"]  # the start is kept, the text is cut
    assert tok.convert_ids_to_tokens(ids)[-2:] == ["Answer", ":"]  # the generation prompt is kept


def test_sentiment_accuracy_reads_the_first_label_word():
    m = sentiment_accuracy(["Positive.", "The review is negative", "maybe"], [1, 1, 0])
    assert m == {"accuracy": pytest.approx(1 / 3), "valid_answer_rate": pytest.approx(2 / 3)}


# ---------------------------------------------------------------------------------------------- families
def test_glue_setup_matches_classification(tiny_model_dir, tmp_path):
    setup = setup_task(_args(tiny_model_dir, "sst2", None, tmp_path, data_source="builtin"))
    assert (setup.task, setup.task_type, setup.main_metric, setup.evaluate_fn) == ("sst2", "SEQ_CLS", "accuracy", None)
    assert len(setup.train_dataset) == 8 and len(setup.eval_dataset) == 4
    assert setup.data_label.startswith("builtin SST-2 sample")


def test_squad_extractive_bert(tiny_model_dir, squad_dir, tmp_path):
    out = tmp_path / "run"
    res = train_with_setup(_args(tiny_model_dir, "squad", squad_dir, out))
    _check_run(res, out, "f1")
    assert res["task_type"] == "QUESTION_ANS" and res["task_details"]["qa_mode"] == "extractive"
    assert 0 <= res["metrics"]["exact_match"] <= res["metrics"]["f1"] <= 1
    assert res["metrics"]["f1_percent"] == pytest.approx(100 * res["metrics"]["f1"])
    assert "loss" in res["metrics"]  # eval features carry span labels: teacher-forced eval loss
    assert "split by article (seed 0)" in res["data"]


def test_squad_seq2seq_t5(t5_dir, squad_dir, tmp_path):
    out = tmp_path / "run"
    res = train_with_setup(_args(t5_dir, "squad", squad_dir, out))
    _check_run(res, out, "f1")
    assert res["task_type"] == "SEQ_2_SEQ_LM" and res["task_details"]["qa_mode"] == "seq2seq"
    assert {"density_encoder", "density_decoder"} <= set(res["metrics"])
    assert any("eval_f1" in h for h in res["log_history"])


def test_squad_causal_llama(llama_dir, squad_dir, tmp_path):
    out = tmp_path / "run"
    args = _args(llama_dir, "squad", squad_dir, out, max_length=40)  # forces the context to be cut
    setup = setup_task(args)
    assert setup.details["prompt_format"] == "plain"
    for f in setup.train_dataset.features:  # prompt masked, answer + eos learned, never longer than max_length
        assert len(f["input_ids"]) <= 40 and f["labels"][0] == -100 and f["labels"][-1] == 1
        prompt = [i for i, lab in zip(f["input_ids"], f["labels"], strict=True) if lab == -100]
        assert setup.tokenizer_or_processor.decode(prompt).endswith("Answer :")  # the template survives the cut
    texts = [setup.tokenizer_or_processor.decode(f["input_ids"]) for f in setup.train_dataset.features]
    assert any("capital" in t and "buildings" not in t for t in texts)  # ... the end of the context does not
    res = train_with_setup(args, setup)
    _check_run(res, out, "f1")
    assert res["task_type"] == "CAUSAL_LM" and res["task_details"]["qa_mode"] == "causal"


def test_lm_instruct_llama(llama_dir, tmp_path):
    out = tmp_path / "run"
    res = train_with_setup(_args(llama_dir, "lm-instruct", None, out, data_source="builtin"))
    _check_run(res, out, "accuracy")
    assert 0 <= res["metrics"]["valid_answer_rate"] <= 1 and "Sentiment:" in res["data"]


def test_image_vit(tmp_path):
    root = tmp_path / "images"
    make_synthetic_images(root / "train", 4, seed=0)
    make_synthetic_images(root / "val", 2, seed=1)
    model_dir = tmp_path / "tiny-vit"
    torch.manual_seed(0)
    AutoModel.from_config(tiny_config("vit")).save_pretrained(model_dir)
    out = tmp_path / "run"
    res = train_with_setup(_args(model_dir, "image", root, out, max_eval_samples=None))
    _check_run(res, out, "accuracy")
    assert res["task_type"] == "IMAGE_CLS" and res["eval_examples"] == 6
    assert res["task_details"]["classes"] == ["blue", "green", "red"]


def test_unknown_task_names_the_choices(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'translation'.*nor squad, image or lm-instruct"):
        setup_task(_args(tiny_model_dir, "translation", None, tmp_path))


def test_glue_folder_without_train_file_splits_dev_once(tmp_path):
    # a GLUE copy with only QNLI's dev.tsv: a fixed 80/20 split, the same for every --seed, disjoint
    d = tmp_path / "QNLI"
    d.mkdir()
    rows = ["index\tquestion\tsentence\tlabel"] + [
        f"{i}\tq{i}?\ts{i}.\t{'entailment' if i % 2 else 'not_entailment'}" for i in range(50)
    ]
    (d / "dev.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    parts = []
    for seed in (0, 1):
        args = TrainArgs(task="qnli", data_dir=str(tmp_path), seed=seed)
        train, dev = glue_examples(args, "qnli")
        parts.append(([e.text_a for e in train], [e.text_a for e in dev]))
        assert "split 80/20" in glue_data_label(args, "qnli")
    (train, dev), again = parts
    assert again == (train, dev)
    assert len(dev) == 10 and len(train) == 40
    assert set(train).isdisjoint(dev) and set(train) | set(dev) == {f"q{i}?" for i in range(50)}
    # with a train file present nothing is split
    (d / "train.tsv").write_text("\n".join(rows[:11]) + "\n", encoding="utf-8")
    train2, dev2 = glue_examples(TrainArgs(task="qnli", data_dir=str(tmp_path)), "qnli")
    assert len(train2) == 10 and len(dev2) == 50
