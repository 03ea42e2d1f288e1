"""The task layer end to end: each task family trains 2 DEFT steps and evaluates on tiny random models.

Models are random and tiny (hidden 32), so the checks are about plumbing: the metrics exist and lie in
range, the density is measured, results.json says where the data came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModel, PreTrainedTokenizerFast

from deft.data import EXTRACTIVE_META_KEYS, make_synthetic_images
from deft.fields import build
from deft.recipes.train import TrainArgs, task_args, train_with_setup
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
    return build(TrainArgs, {**base, **kw})


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
    setup = setup_task(task_args(_args(tiny_model_dir, "sst2", None, tmp_path, data_source="builtin")))
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
    setup = setup_task(task_args(args))
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
        setup_task(task_args(_args(tiny_model_dir, "translation", None, tmp_path)))


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
        args = task_args(build(TrainArgs, {"task": "qnli", "data_dir": str(tmp_path), "seed": seed}))
        train, dev = glue_examples(args, "qnli")
        parts.append(([e.text_a for e in train], [e.text_a for e in dev]))
        assert "split 80/20" in glue_data_label(args, "qnli")
    (train, dev), again = parts
    assert again == (train, dev)
    assert len(dev) == 10 and len(train) == 40
    assert set(train).isdisjoint(dev) and set(train) | set(dev) == {f"q{i}?" for i in range(50)}
    # with a train file present nothing is split
    (d / "train.tsv").write_text("\n".join(rows[:11]) + "\n", encoding="utf-8")
    train2, dev2 = glue_examples(task_args(build(TrainArgs, {"task": "qnli", "data_dir": str(tmp_path)})), "qnli")
    assert len(train2) == 10 and len(dev2) == 50


# ------------------------------------------------------------------------------------- measure / energy / prune
@pytest.fixture(scope="module")
def vit_images(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny ViT checkpoint, image folder with 4 train / 2 val pictures of each of 3 colours)."""
    d = tmp_path_factory.mktemp("vit")
    make_synthetic_images(d / "images" / "train", 4, seed=0)
    make_synthetic_images(d / "images" / "val", 2, seed=1)
    torch.manual_seed(0)
    AutoModel.from_config(tiny_config("vit")).save_pretrained(d / "model")
    return d / "model", d / "images"


FAMILIES = ("squad-bert", "squad-t5", "lm-instruct", "image")  # the task families besides GLUE, by model kind


@pytest.fixture
def family_tasks(tiny_model_dir, squad_dir, t5_dir, llama_dir, vit_images) -> dict[str, tuple[Path, str, Path | None]]:
    """(tiny model, task, data folder or None for the builtin sample) of each of :data:`FAMILIES`."""
    return {
        "squad-bert": (tiny_model_dir, "squad", squad_dir),
        "squad-t5": (t5_dir, "squad", squad_dir),
        "lm-instruct": (llama_dir, "lm-instruct", None),
        "image": (vit_images[0], "image", vit_images[1]),
    }


def _count_flags(command: str, model: Path, task: str, data_dir: Path | None, out: Path, *extra: str) -> list[str]:
    flags = [command, "--model", str(model), "--task", task, "--batch-size", "3", "--output", str(out), *extra]
    return flags + (["--data-dir", str(data_dir)] if data_dir else ["--data-source", "builtin"])


def _padded_positions(lengths: list[int], batch_size: int) -> int:
    chunks = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
    return sum(len(c) * max(c) for c in chunks)


@pytest.mark.parametrize("family", FAMILIES)
def test_measure_and_energy_work_for_every_task_family(family, family_tasks, tmp_path):
    from transformers import AutoConfig

    from deft import cli

    model, task, data_dir = family_tasks[family]
    extra = ["--max-eval-samples", "5", "--max-length", "48"]
    assert cli.main(_count_flags("measure", model, task, data_dir, tmp_path / "m", *extra)) == 0
    assert cli.main(_count_flags("energy", model, task, data_dir, tmp_path / "e", *extra)) == 0
    density = json.loads((tmp_path / "m" / "density.json").read_text())["density"]
    report = json.loads((tmp_path / "e" / "energy.json").read_text())["energy"]

    # the expectation, independently: every MLP of the model, and the real (unpadded) positions of the
    # eval rows deft train would evaluate on, never the padding the batches of 3 add
    config = AutoConfig.from_pretrained(model)
    groups = {"encoder": config.num_layers, "decoder": config.num_decoder_layers} if family == "squad-t5" else None
    n_layers = sum(groups.values()) if groups else config.num_hidden_layers
    assert len(density["layers"]) == n_layers
    assert sorted({layer["group"] for layer in density["layers"]}) == (sorted(groups) if groups else ["all"])
    args = _args(model, task, data_dir, tmp_path, max_eval_samples=5, max_length=48, max_train_samples=1)
    setup = setup_task(task_args(args))
    feats = [setup.eval_dataset[i] for i in range(len(setup.eval_dataset))]
    assert report["examples"] == len(feats) >= 4
    if family == "image":
        per_image = (config.image_size // config.patch_size) ** 2 + 1  # patches + [CLS]
        assert all(layer["tokens"] == len(feats) * per_image for layer in density["layers"])
        return
    lengths = [len(f["input_ids"]) for f in feats]
    assert _padded_positions(lengths, 3) > sum(lengths)  # the batches really hold padding
    assert report["tokens"] == sum(lengths)
    for layer in density["layers"]:
        if layer["group"] == "decoder":  # T5's decoder runs on the answer tokens only
            assert layer["tokens"] == sum(len(f["labels"]) for f in feats)
        else:
            assert layer["tokens"] == sum(lengths), layer["name"]
        assert 0 < layer["density"] <= 1


def test_measure_of_a_trained_lm_instruct_adapter_gives_back_its_density(llama_dir, tmp_path):
    from deft import cli

    out = tmp_path / "run"
    res = train_with_setup(_args(llama_dir, "lm-instruct", None, out, data_source="builtin"))
    flags = ["--max-eval-samples", "4", "--max-length", "64", "--adapter", str(out / "adapter")]
    assert cli.main(_count_flags("measure", llama_dir, "lm-instruct", None, tmp_path / "m", *flags)) == 0
    measured = json.loads((tmp_path / "m" / "density.json").read_text())["density"]
    assert measured["overall"] == pytest.approx(res["density"]["overall"], abs=1e-9)
    assert [layer["tokens"] for layer in measured["layers"]] == [layer["tokens"] for layer in res["density"]["layers"]]


def test_glue_measure_energy_and_prune_count_what_the_glue_loader_gives(tiny_relu_model_dir, glue_dir, tmp_path):
    """The registry path gives GLUE the numbers it had: dev rows (seed 0), DataCollatorWithPadding, no labels."""
    from deft import cli
    from deft.analysis.energy import estimate_energy
    from deft.compress.prune import PruneConfig, load_masks, wanda_prune
    from deft.core.report import measure_density
    from deft.recipes.compress import PruneArgs, prune
    from deft.tasks import drop_labels, glue_loader, glue_rows, load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(tiny_relu_model_dir), "sst2")
    dev = glue_rows(SimpleNamespace(data_dir=str(glue_dir), data_source="auto"), "sst2", "dev", 20, 0)
    batches = [drop_labels(b) for b in glue_loader(dev, tok, 32, 8)]
    flags = ["--data-dir", str(glue_dir), "--max-eval-samples", "20", "--max-length", "32", "--batch-size", "8"]
    common = ["--model", str(tiny_relu_model_dir), "--task", "sst2", *flags]
    assert cli.main(["measure", *common, "--output", str(tmp_path / "m")]) == 0
    assert cli.main(["energy", *common, "--output", str(tmp_path / "e")]) == 0
    measured = json.loads((tmp_path / "m" / "density.json").read_text())["density"]
    assert measured == json.loads(json.dumps(measure_density(model, batches).to_dict()))
    priced = json.loads((tmp_path / "e" / "energy.json").read_text())["energy"]
    assert priced == json.loads(json.dumps(estimate_energy(model, batches).to_dict()))
    assert measured["overall"] < 1  # ReLU: real zeros were counted

    # prune: 2 batches of 8 of the training rows --seed 3 picks
    calib_args = dict(calib_batches=2, calib_batch_size=8, max_length=32, seed=3, save_model=False)
    prune(PruneArgs(model=str(tiny_relu_model_dir), data_dir=str(glue_dir), output=str(tmp_path / "p"), **calib_args))
    train = glue_rows(SimpleNamespace(data_dir=str(glue_dir), data_source="auto"), "sst2", "train", 16, 3)
    calib = [drop_labels(b) for b in glue_loader(train, tok, 32, 8)]
    expected = wanda_prune(load_model_and_tokenizer(str(tiny_relu_model_dir), "sst2")[0], calib, PruneConfig()).masks
    saved = load_masks(tmp_path / "p")
    assert sorted(saved) == sorted(expected)
    assert all(torch.equal(saved[n].cpu(), expected[n].cpu()) for n in expected)


def test_prune_calibrates_on_an_lm_instruct_task_and_keeps_the_lm_head(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from deft.recipes.compress import PruneArgs, prune

    out = tmp_path / "p"
    calib = dict(calib_batches=2, calib_batch_size=4, max_length=64)
    res = prune(PruneArgs(model=str(llama_dir), task="lm-instruct", data_source="builtin", output=str(out), **calib))
    assert res["calib_batches"] == 2 and res["overall"] == pytest.approx(0.5)
    original = AutoModelForCausalLM.from_pretrained(llama_dir)
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(pruned.lm_head.weight, original.lm_head.weight)  # saved, not re-initialised
    assert not torch.equal(pruned.model.layers[0].mlp.down_proj.weight, original.model.layers[0].mlp.down_proj.weight)


def test_skip_needs_a_finished_run(tmp_path, capsys):
    from deft import cli

    from conftest import one_error_line

    assert cli.main(["skip", "--run", str(tmp_path)]) == 2
    assert "has no results.json" in one_error_line(capsys, "skip")


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_scores_every_task_family_as_train_did(family, family_tasks, tmp_path):
    from deft import cli

    model, task, data_dir = family_tasks[family]
    run = tmp_path / "run"
    kw = {"data_source": "builtin"} if family == "lm-instruct" else {}
    res = train_with_setup(_args(model, task, data_dir, run, max_eval_samples=5, **kw))
    # the rows and batches train evaluated on: its 5 eval rows (image: all 6 pictures) in batches of 8
    flags = ["skip", "--run", str(run), "--max-eval-samples", "5", "--batch-size", "8"]

    # no drop allowed: whatever is skipped, the model before skipping is the run's own, scored as train scored it
    assert cli.main([*flags, "--max-drop", "0", "--output", str(tmp_path / "s0")]) == 0
    kept = json.loads((tmp_path / "s0" / "skip.json").read_text())
    assert kept["task"] == res["task"] and kept["main_metric"] == res["main_metric"]
    assert kept["metric_before"] == pytest.approx(res["metric"], abs=1e-6)
    assert kept["eval_examples"] == res["eval_examples"]
    assert kept["model_seconds_before"] > 0

    # any drop allowed: every block goes, and the weights with them
    assert cli.main([*flags, "--max-drop", "100", "--output", str(tmp_path / "s")]) == 0
    skipped = json.loads((tmp_path / "s" / "skip.json").read_text())
    densities = [layer["density"] for layer in res["density"]["layers"]]
    assert skipped["skipped_layers"] == sorted(range(len(densities)), key=densities.__getitem__)  # sparsest first
    assert skipped["params_freed"] > 0 and skipped["memory_change_percent"] < 0
    assert skipped["metric_before"] == kept["metric_before"]
    # the model measured after choosing is the one the choice scored last: all blocks skipped
    assert 100 * skipped["metric_after"] == pytest.approx(skipped["trace"][-1]["metric"])
    assert 0 <= skipped["metric_after"] <= 1


def test_score_of_a_generation_task_reads_what_the_model_generates(llama_dir, tmp_path):
    from deft.recipes.evaluate import score

    args = task_args(_args(llama_dir, "lm-instruct", None, tmp_path, data_source="builtin", max_eval_samples=5))
    setup = setup_task(args)
    tok, model = setup.tokenizer_or_processor, setup.model
    # a random model says no label word; this one says "positive" whatever it reads
    boost = torch.zeros(len(tok))
    boost[tok.convert_tokens_to_ids("positive")] = 100.0
    model.lm_head.register_forward_hook(lambda _m, _i, logits: logits + boost)
    labels = [int(r.label) for r in glue_examples(args, "sst2")[1]]
    metrics, seconds = score(model, setup, batch_size=2)  # 3 batches, left-padded
    assert metrics == {"accuracy": pytest.approx(sum(labels) / 5), "valid_answer_rate": 1.0}
    assert 0 < sum(labels) < 5 and seconds > 0
