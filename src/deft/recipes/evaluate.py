"""A finished GLUE run, loaded back and scored: what ``deft compare`` (its thresholded curves) and ``deft skip``
share. The model is rebuilt from ``results.json`` and ``adapter/``; its rows are chosen exactly as training
chose them.

Also the task registry as the counting commands (``deft measure``, ``deft energy``, ``deft prune``) use it, for
every task family: :func:`task_setup` builds a task from a command's options, :func:`input_batches` turns one
of its datasets into batches of model inputs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..tasks import TaskSetup

TASK_NAMES = "a GLUE task (sst2, mrpc, ...), squad, image or lm-instruct"  # for help texts
DATA_DIR_HELP = "data folder: GLUE's with TASK/{train,dev}.tsv, SQuAD's dev-v1.1.json, or image DIR/{train,val}/CLASS/"
# what a task's collator adds for the loss: a density or energy count runs the forward without them
LABEL_KEYS = frozenset({"labels", "start_positions", "end_positions"})


def task_setup(args: Any, **override: Any) -> TaskSetup:
    """:func:`deft.tasks.setup_task` with a command's options (``model``, ``task``, ``data_dir``, ``data_source``,
    ``max_eval_samples``, ``max_length``, ``trust_remote_code``, ``seed`` where it has them; ``override`` wins),
    then ``args.activation`` swapped in as ``deft train`` does. A command that reads only the eval set gets one
    training example prepared (``max_train_samples=1``), not the whole training split."""
    from types import SimpleNamespace

    from ..tasks import setup_task

    names = ("model", "task", "data_dir", "data_source", "max_eval_samples", "max_length", "trust_remote_code", "seed")
    fields_ = {"data_dir": None, "data_source": "auto", "max_eval_samples": None, "trust_remote_code": False, "seed": 0}
    fields_.update({n: getattr(args, n) for n in names if hasattr(args, n)})
    setup = setup_task(SimpleNamespace(**{**fields_, "max_train_samples": 1, **override}))
    if getattr(args, "activation", None):
        from ..inference.activations import swap_activation

        swap_activation(setup.model, args.activation)
    return setup


def input_batches(setup: TaskSetup, batch_size: int, dataset: Any = None):
    """Batches (in order, one pass) of ``dataset`` (default: the setup's eval set) as its collator builds them for
    training, less the keys only the loss reads (:data:`LABEL_KEYS`). An encoder-decoder keeps ``labels``: its
    forward makes the decoder's inputs from them (and ``decoder_attention_mask`` marks their real positions)."""
    from torch.utils.data import DataLoader

    enc_dec = getattr(getattr(setup.model, "config", None), "is_encoder_decoder", False)
    drop = LABEL_KEYS - {"labels"} if enc_dec else LABEL_KEYS
    loader = DataLoader(
        setup.eval_dataset if dataset is None else dataset, batch_size=batch_size, collate_fn=setup.data_collator
    )
    return ({k: v for k, v in b.items() if k not in drop} for b in loader)


def load_run_model(run_dir: Path):
    """(model in eval mode, tokenizer, results.json) of a finished GLUE run folder."""
    from ..methods import load_trainable
    from ..tasks import load_model_and_tokenizer

    res = json.loads((run_dir / "results.json").read_text())
    cfg = res["config"]
    model, tok = load_model_and_tokenizer(
        cfg["model"],
        cfg["task"],
        trust_remote_code=cfg.get("trust_remote_code", False),
        activation=cfg.get("activation"),
    )
    model = load_trainable(model, run_dir / "adapter", task_type="SEQ_CLS")
    return model.eval(), tok, res


def run_rows(run_cfg: dict[str, Any], **override: Any) -> tuple[list, list]:
    """(training rows, evaluation rows) of a GLUE run, chosen exactly as its training chose them: where a
    local folder has only a dev file, the rows it trained on are kept out of the evaluation rows."""
    from types import SimpleNamespace

    from ..tasks import glue_examples

    fields_ = {
        "data_dir": None,
        "data_source": "auto",
        "max_train_samples": None,
        "max_eval_samples": None,
        "seed": 0,
        **run_cfg,
        **override,
    }
    return glue_examples(SimpleNamespace(**fields_), run_cfg["task"])


def labelled_batches(
    rows: list, tok, run_cfg: dict[str, Any], batch_size: int, *, by_length: bool = False
) -> list[dict[str, Any]]:
    """Padded batches of ``rows`` at the run's ``max_length`` (see :func:`deft.tasks.glue_loader`)."""
    from ..tasks import glue_loader

    return list(glue_loader(rows, tok, run_cfg["max_length"], batch_size, by_length=by_length))


def eval_loader(run_cfg: dict[str, Any], tok, n: int | None, batch_size: int) -> list[dict[str, Any]]:
    """Batches of a run's evaluation rows (a seeded subset of ``n`` of them)."""
    return labelled_batches(run_rows(run_cfg, max_eval_samples=n)[1], tok, run_cfg, batch_size)


def evaluate_glue(model, batches, task: str) -> tuple[dict[str, float], float]:
    """(GLUE metrics, seconds of model time) of ``model`` over labelled ``batches``."""
    import torch

    from ..data import glue_metrics
    from ..tasks import drop_labels

    preds, refs, secs = [], [], 0.0
    with torch.no_grad():
        for b in batches:
            inputs = drop_labels(b)
            t0 = time.perf_counter()
            logits = model(**inputs).logits
            secs += time.perf_counter() - t0
            preds.append(logits)
            refs.append(b["labels"])
    return glue_metrics(task, torch.cat(preds), torch.cat(refs)), secs


def merge_adapter(model):
    """peft's merge for LoRA/IA3; methods that cannot merge (prompts, prefixes) are priced as they run."""
    if not hasattr(model, "merge_and_unload"):
        return model
    try:
        return model.merge_and_unload()
    except (AttributeError, ValueError, TypeError, NotImplementedError):
        return model
