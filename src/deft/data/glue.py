"""GLUE tasks: the task table, TSV / hub / built-in loading, task metrics and a tokenized Dataset.

Local files follow the layout of the GLUE download script: ``DATA_DIR/SST-2/train.tsv``,
``DATA_DIR/SST-2/dev.tsv`` and so on (MNLI's dev file is ``dev_matched.tsv``). GLUE text contains bare
double quotes, so the TSVs are read with ``csv.QUOTE_NONE``: with quoting on, one stray quote swallows
the rest of the file into one field.
"""

from __future__ import annotations

import csv
import importlib.resources
import math
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from deft.data.errors import DataError

Split = Literal["train", "dev"]
Source = Literal["auto", "local", "hub", "builtin"]
SOURCES: tuple[str, ...] = ("auto", "local", "hub", "builtin")

_BINARY = ("0", "1")
_ENTAILMENT = ("entailment", "not_entailment")


@dataclass(frozen=True)
class GlueTask:
    """Where one GLUE task's files live and how to read them.

    text_a / text_b / label are column names. Files without a header line (CoLA) get the implied
    header ``columns`` instead, so both kinds are read the same way. ``labels`` is the label vocabulary
    in id order (the file's label string at position i becomes id i, the same ids the Hugging Face
    ``glue`` dataset uses); ``None`` marks the regression task (STS-B).
    """

    name: str
    dir_name: str
    text_a: str
    text_b: str | None
    label: str
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    train_file: str = "train.tsv"
    dev_file: str = "dev.tsv"
    columns: tuple[str, ...] | None = None  # implied header of a header-less file
    hub_text_a: str = "sentence"
    hub_text_b: str | None = None
    hub_dev_split: str = "validation"

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    def file_name(self, split: Split) -> str:
        return self.train_file if split == "train" else self.dev_file


GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("sst2", "SST-2", "sentence", None, "label", _BINARY, ("accuracy",), "accuracy"),
        GlueTask(
            "mrpc",
            "MRPC",
            "#1 String",
            "#2 String",
            "Quality",
            _BINARY,
            ("f1", "accuracy"),
            "f1",
            hub_text_a="sentence1",
            hub_text_b="sentence2",
        ),
        GlueTask(
            "rte",
            "RTE",
            "sentence1",
            "sentence2",
            "label",
            _ENTAILMENT,
            ("accuracy",),
            "accuracy",
            hub_text_a="sentence1",
            hub_text_b="sentence2",
        ),
        GlueTask(
            "cola",
            "CoLA",
            "sentence",
            None,
            "label",
            _BINARY,
            ("matthews_correlation",),
            "matthews_correlation",
            columns=("source", "label", "original_label", "sentence"),
        ),
        GlueTask(
            "stsb",
            "STS-B",
            "sentence1",
            "sentence2",
            "score",
            None,
            ("pearson", "spearmanr", "combined"),
            "pearson",
            hub_text_a="sentence1",
            hub_text_b="sentence2",
        ),
        GlueTask(
            "qnli",
            "QNLI",
            "question",
            "sentence",
            "label",
            _ENTAILMENT,
            ("accuracy",),
            "accuracy",
            hub_text_a="question",
            hub_text_b="sentence",
        ),
        GlueTask(
            "qqp",
            "QQP",
            "question1",
            "question2",
            "is_duplicate",
            _BINARY,
            ("f1", "accuracy"),
            "f1",
            hub_text_a="question1",
            hub_text_b="question2",
        ),
        GlueTask(
            "mnli",
            "MNLI",
            "sentence1",
            "sentence2",
            "gold_label",
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            "accuracy",
            dev_file="dev_matched.tsv",
            hub_text_a="premise",
            hub_text_b="hypothesis",
            hub_dev_split="validation_matched",
        ),
    )
}


@dataclass
class Example:
    """One sentence (pair) with its label id (classification) or score (STS-B).

    line: 1-based line of the row in its TSV (for hub data, the 1-based row number), so a bad
    prediction can be traced back to its source.
    """

    text_a: str
    text_b: str | None
    label: int | float
    line: int


def glue_task(task: str) -> GlueTask:
    """The table entry of ``task``; spellings like ``SST-2`` and ``STS-B`` are accepted too."""
    key = task.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise DataError(f"unknown GLUE task {task!r}; supported tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def load_glue(
    task: str,
    split: str,
    data_dir: str | PathLike[str] | None = None,
    source: str = "auto",
) -> list[Example]:
    """Examples of one GLUE ``split`` ("train" or "dev"; "validation" is accepted for "dev").

    source: "local" reads ``data_dir`` (the GLUE root holding ``SST-2/`` etc., or the task folder
    itself); "hub" uses the Hugging Face ``datasets`` package; "builtin" is the small SST-2 sample
    shipped with deft (3,000 train rows, the full 872-row dev set); "auto" picks local when
    ``data_dir`` is given, else builtin for sst2, else hub.
    """
    spec = glue_task(task)
    split_ = _split(split)
    if source not in SOURCES:
        raise DataError(f"source={source!r} is not one of {', '.join(SOURCES)}")
    if source == "auto":
        source = "local" if data_dir is not None else ("builtin" if spec.name == "sst2" else "hub")
    if source == "local":
        if data_dir is None:
            raise DataError("source='local' needs data_dir (--data-dir), the folder holding the GLUE task folders")
        return read_glue_tsv(_local_file(spec, split_, Path(data_dir)), spec)
    if source == "builtin":
        return _load_builtin(spec, split_)
    return _load_hub(spec, split_)


def read_glue_tsv(path: str | PathLike[str], task: str | GlueTask) -> list[Example]:
    """Parse one GLUE TSV file; any malformed row raises :class:`DataError` naming ``path:LINE``."""
    spec = task if isinstance(task, GlueTask) else glue_task(task)
    path = Path(path)
    try:
        # utf-8-sig drops the BOM the GLUE script leaves at the start of the MRPC files.
        with open(path, encoding="utf-8-sig", newline="") as f:
            return _parse_rows(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), spec, path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    except csv.Error as e:
        raise DataError(f"{path}: {e}") from e


def _parse_rows(reader: Any, spec: GlueTask, path: Path) -> list[Example]:
    if spec.columns is None:
        header = next(reader, None)
        if header is None:
            raise DataError.at(path, 1, f"empty file; expected a header line naming the columns of {spec.dir_name}")
    else:
        header = list(spec.columns)
    wanted = [c for c in (spec.text_a, spec.text_b, spec.label) if c is not None]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError.at(path, 1, f"header lacks column(s) {missing} for {spec.name}; header is {header}")
    ia, il = header.index(spec.text_a), header.index(spec.label)
    ib = header.index(spec.text_b) if spec.text_b is not None else None

    examples = []
    for row in reader:
        line = reader.line_num  # physical line: QUOTE_NONE means no field spans lines
        if not row:  # blank line, e.g. a doubled trailing newline
            continue
        if len(row) != len(header):
            raise DataError.at(path, line, f"expected {len(header)} tab-separated columns, found {len(row)}")
        label = _parse_label(row[il], spec, path, line)
        examples.append(Example(row[ia], row[ib] if ib is not None else None, label, line))
    if not examples:
        # caught here, naming the file: an empty split otherwise fails much later, deep in the Trainer
        # ("num_samples=0"), without saying which file was empty
        first = 1 if spec.columns is not None else 2
        raise DataError.at(
            path,
            first,
            "no data rows"
            + (" after the header line" if spec.columns is None else "")
            + f"; expected one tab-separated {spec.dir_name} example per line",
        )
    return examples


def _parse_label(raw: str, spec: GlueTask, path: Path, line: int) -> int | float:
    value = raw.strip()
    if spec.labels is None:
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise DataError.at(path, line, f"score {raw!r} in column {spec.label!r} is not a finite number")
        return score
    if value not in spec.labels:
        raise DataError.at(
            path, line, f"unknown label {raw!r} in column {spec.label!r}; expected one of {list(spec.labels)}"
        )
    return spec.labels.index(value)


def _split(split: str) -> Split:
    if split in ("dev", "validation"):
        return "dev"
    if split == "train":
        return "train"
    raise DataError(f"split={split!r}: GLUE splits are 'train' and 'dev' (the test sets have no labels)")


def find_local_file(spec: GlueTask, split: Split, data_dir: Path) -> Path | None:
    """The split's TSV under ``data_dir`` (the GLUE root, or the task folder itself), or None."""
    name = spec.file_name(split)
    return next((p for p in (data_dir / spec.dir_name / name, data_dir / name) if p.is_file()), None)


def _local_file(spec: GlueTask, split: Split, data_dir: Path) -> Path:
    path = find_local_file(spec, split, data_dir)
    if path is not None:
        return path
    raise DataError(
        f"{data_dir / spec.dir_name / spec.file_name(split)}: no such file. "
        "--data-dir should be the GLUE root laid out as "
        f"TASK_DIR/{{train,dev}}.tsv, here {spec.dir_name}/{spec.train_file} and {spec.dir_name}/{spec.dev_file}"
    )


def _load_builtin(spec: GlueTask, split: Split) -> list[Example]:
    if spec.name != "sst2":
        raise DataError(
            f"source='builtin' only ships sst2, not {spec.name}; pass --data-dir with the GLUE files "
            f"({spec.dir_name}/{spec.train_file}, {spec.dir_name}/{spec.dev_file})"
        )
    resource = importlib.resources.files("deft.data") / "builtin" / f"sst2_{split}.tsv"
    with importlib.resources.as_file(resource) as path:  # a real path, so errors can name it
        return read_glue_tsv(path, spec)


def _load_hub(spec: GlueTask, split: Split) -> list[Example]:
    layout = f"{spec.dir_name}/{spec.train_file} and {spec.dir_name}/{spec.dev_file}"
    try:
        import datasets  # optional: only hub loading needs it
    except ImportError as e:
        raise DataError(
            f"GLUE {spec.name} from the Hugging Face hub needs the `datasets` package, which is not installed: "
            f"pip install 'deft-sparsity[hub]', or download GLUE and pass --data-dir DIR with {layout}"
        ) from e
    hub_split = "train" if split == "train" else spec.hub_dev_split
    try:
        # nyu-mll/glue is the hub's canonical home of the old "glue" script dataset (same data, same ids).
        ds = datasets.load_dataset("nyu-mll/glue", spec.name, split=hub_split)
    except Exception as e:  # offline, no cache, hub outage: all end the same way for the user
        raise DataError(
            f"could not load GLUE {spec.name} ({hub_split}) from the Hugging Face hub "
            f"({type(e).__name__}: {e}); when offline, pass --data-dir DIR with {layout}"
        ) from e
    cast = float if spec.is_regression else int
    return [
        Example(row[spec.hub_text_a], row[spec.hub_text_b] if spec.hub_text_b else None, cast(row["label"]), i + 1)
        for i, row in enumerate(ds)
    ]


def glue_metrics(task: str, predictions: Any, references: Any) -> dict[str, float]:
    """The task's GLUE metrics as plain floats (accuracy and F1 in [0, 1], correlations in [-1, 1]).

    predictions: logits (N, C) or class ids (N,) for classification; scores (N,) or (N, 1) for STS-B.
    """
    # Imported here: scipy/sklearn cost a second at import and only evaluation needs them.
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    spec = glue_task(task)
    preds, refs = _as_numpy(predictions), _as_numpy(references).reshape(-1)
    if spec.is_regression:
        preds = preds.reshape(-1).astype(np.float64)
    elif preds.ndim == 2:
        preds = preds.argmax(axis=-1)
    if preds.shape != refs.shape:
        raise DataError(f"predictions has {preds.shape[0]} rows but references has {refs.shape[0]}")

    if spec.is_regression:
        pearson = float(pearsonr(preds, refs.astype(np.float64))[0])
        spearman = float(spearmanr(preds, refs)[0])
        return {"pearson": pearson, "spearmanr": spearman, "combined": (pearson + spearman) / 2}
    scorers = {
        "accuracy": lambda: accuracy_score(refs, preds),
        "f1": lambda: f1_score(refs, preds),
        "matthews_correlation": lambda: matthews_corrcoef(refs, preds),
    }
    return {name: float(scorers[name]()) for name in spec.metrics}


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


class GlueDataset(Dataset):
    """Tokenized GLUE examples, unpadded (pad per batch with ``DataCollatorWithPadding``).

    Tokenized once up front in one batched call: a fast tokenizer does all of SST-2 train in seconds,
    and items are then cheap however often the trainer visits them.
    """

    def __init__(self, examples: Sequence[Example], tokenizer: Any, max_length: int = 128) -> None:
        pairs = [e.text_b is not None for e in examples]
        if any(pairs) and not all(pairs):
            raise DataError("examples mix sentence pairs and single sentences; load them from one task")
        texts_a = [e.text_a for e in examples]
        texts_b = [e.text_b for e in examples] if pairs and pairs[0] else None
        self.encodings = tokenizer(texts_a, texts_b, truncation=True, max_length=max_length) if examples else {}
        self.labels = [e.label for e in examples]
        self.is_regression = any(isinstance(e.label, float) for e in examples)
        self.keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in self.encodings]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {k: torch.tensor(self.encodings[k][i], dtype=torch.long) for k in self.keys}
        item["labels"] = torch.tensor(self.labels[i], dtype=torch.float if self.is_regression else torch.long)
        return item
