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

One module per family (:mod:`deft.tasks.glue`, :mod:`~deft.tasks.squad`, :mod:`~deft.tasks.image`,
:mod:`~deft.tasks.lm_instruct`), each with a ``setup(args)``; :data:`TASKS` maps task names to them. What
the families share is in :mod:`deft.tasks.base` and :mod:`deft.tasks.generation`. Training itself is a
recipe: :func:`deft.recipes.train.train_with_setup`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..data import GLUE_TASKS, DataError
from ..errors import ConfigError
from . import glue, image, lm_instruct, squad
from .base import FeatureDataset, PadCollator, TaskArgs, TaskSetup, drop_labels, loads_model, seeded_subset
from .generation import CausalPrompter, greedy_generate
from .glue import glue_data_label, glue_examples, glue_loader, glue_rows, load_model_and_tokenizer, split_dev
from .lm_instruct import sentiment_accuracy
from .squad import load_squad_data, qa_mode, squad_scores

OTHER_TASKS = ("squad", "image", "lm-instruct")  # besides the GLUE names
# task name -> the setup of its family; GLUE names are also found in other spellings (SST-2, sts_b)
TASKS: dict[str, Callable[[TaskArgs], TaskSetup]] = {
    "squad": squad.setup,
    "image": image.setup,
    "lm-instruct": lm_instruct.setup,
    "lm_instruct": lm_instruct.setup,
    **{name: glue.setup for name in GLUE_TASKS},
}


def _is_glue(task: str) -> bool:
    return task.replace("-", "").replace("_", "") in GLUE_TASKS


def find_setup(task: str) -> Callable[[TaskArgs], TaskSetup]:
    """The setup function of ``task`` (any case; GLUE names in any spelling), or a DataError naming the tasks."""
    name = task.lower()
    if name not in TASKS and _is_glue(name):
        name = name.replace("-", "").replace("_", "")
    if name not in TASKS:
        raise DataError(
            f"unknown task {task!r}: not a GLUE task ({', '.join(GLUE_TASKS)}) "
            f"nor {', '.join(OTHER_TASKS[:-1])} or {OTHER_TASKS[-1]}"
        )
    return TASKS[name]


@loads_model
def setup_task(args: TaskArgs) -> TaskSetup:
    """The model, data, collator and metrics of ``args.task`` (set the seed first: heads are random)."""
    task = args.task.lower()
    pad_to = getattr(args, "pad_to_max_length", None)
    if pad_to is not None:
        if not _is_glue(task):
            raise ConfigError(f"--pad-to-max-length is for GLUE tasks (the research code's setting), not {args.task!r}")
        if not (isinstance(pad_to, int) and pad_to > 0):
            raise ConfigError(f"--pad-to-max-length must be a whole number > 0, got {pad_to!r}")
    return find_setup(args.task)(args)


__all__ = [
    "OTHER_TASKS",
    "TASKS",
    "CausalPrompter",
    "FeatureDataset",
    "PadCollator",
    "TaskArgs",
    "TaskSetup",
    "drop_labels",
    "find_setup",
    "glue_data_label",
    "glue_examples",
    "glue_loader",
    "glue_rows",
    "greedy_generate",
    "load_model_and_tokenizer",
    "load_squad_data",
    "qa_mode",
    "seeded_subset",
    "sentiment_accuracy",
    "setup_task",
    "split_dev",
    "squad_scores",
]
