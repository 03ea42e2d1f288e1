"""A finished run, loaded back and scored.

For GLUE runs, what ``deft compare`` (its thresholded curves) uses: :func:`load_run_model`, :func:`run_rows`,
:func:`evaluate_glue`; the rows are chosen exactly as training chose them.

For every task family, the task registry as the other commands use it: :func:`task_setup` builds a task from
a command's options (``deft measure``, ``deft energy``, ``deft prune``), :func:`load_run` rebuilds a finished
run's task and model from its ``results.json`` and ``adapter/`` (``deft skip``), :func:`input_batches` turns
one of a task's datasets into batches of model inputs, and :func:`score` computes a task's dev metrics for
any model, as ``deft train`` computed them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .common import RunError

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


def load_adapter(setup: TaskSetup, adapter: str | Path, *, merge: bool):
    """``setup.model`` with the trained method in ``adapter`` loaded on it, merged into the weights for
    ``merge`` (as deployed; see :func:`merge_adapter`)."""
    from ..methods import load_trainable

    model = load_trainable(setup.model, adapter, task_type=setup.task_type)
    return merge_adapter(model) if merge else model


def load_run(run_dir: Path, **override: Any) -> tuple[TaskSetup, Any, dict[str, Any]]:
    """(task setup, trained model in eval mode, results.json) of a finished run of any task family. The task is
    rebuilt from the run's stored options (``results.json["config"]``) through the registry, as ``deft train``
    built it; ``override`` replaces some of them (e.g. ``max_eval_samples``).

    The adapter is loaded, not merged: the model then runs the code path it was trained and evaluated through.
    That matters beyond float noise: peft's question-answering wrapper does not pass ``token_type_ids`` on to
    the model, so an extractive SQuAD adapter never saw segment ids, and its merged model (which gets them)
    answers differently."""
    res = json.loads((run_dir / "results.json").read_text())
    cfg = res["config"]
    # a GLUE run trained on rows padded (and cut) to a fixed length is scored on the same rows
    setup = task_setup(SimpleNamespace(**cfg), pad_to_max_length=cfg.get("pad_to_max_length"), **override)
    return setup, load_adapter(setup, run_dir / "adapter", merge=False).eval(), res


# the keys a Trainer hands to compute_metrics as label_ids, in its order (one array, or a tuple of them)
_LABEL_ORDER = ("labels", "start_positions", "end_positions")


def score(model, setup: TaskSetup, batch_size: int) -> tuple[dict[str, float], float]:
    """(dev metrics of ``setup``'s eval set, seconds spent inside ``model``) for ``model``: what ``deft train``
    reported for the same rows and model. Metrics from logits (GLUE, image, extractive SQuAD) go through the
    task's ``compute_metrics``, with predictions and labels gathered as the Trainer gathers them; metrics that
    need generation (generative SQuAD, lm-instruct) come from its ``evaluate_fn``."""
    model.eval()
    with _model_clock(model) as seconds:
        if setup.evaluate_fn is not None:
            # evaluate_fn reads the model and the eval batch size of the Trainer (greedy_generate also detaches
            # the Trainer's density probe, of which a scoring pass has none)
            trainer = SimpleNamespace(model=model, args=SimpleNamespace(per_device_eval_batch_size=batch_size))
            metrics = setup.evaluate_fn(trainer)
        elif setup.compute_metrics is not None:
            metrics = setup.compute_metrics(_predict(model, setup, batch_size))
        else:  # no family of the registry builds such a task; a new one must say how it is scored
            raise RunError(f"task {setup.task!r} has neither compute_metrics nor evaluate_fn: it cannot be scored")
    return {k: float(v) for k, v in metrics.items()}, seconds()


def _predict(model, setup: TaskSetup, batch_size: int):
    """The ``EvalPrediction`` the Trainer's evaluation hands to ``compute_metrics``: every model output but the
    loss (one array when there is one) and the label keys of the batches, each concatenated over the eval set,
    rows of different widths (extractive QA's logits per token) padded with -100 as the Trainer pads them."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import EvalPrediction
    from transformers.trainer_pt_utils import nested_concat, nested_numpify

    def one(t: tuple) -> Any:
        return t[0] if len(t) == 1 else t

    device = next(model.parameters()).device
    preds: Any = None
    labels: Any = None
    with torch.no_grad():
        for b in DataLoader(setup.eval_dataset, batch_size=batch_size, collate_fn=setup.data_collator):
            out = model(**{k: v.to(device) for k, v in b.items() if k not in LABEL_KEYS})
            p = one(tuple(v.cpu() for k, v in out.items() if k != "loss"))
            lab = one(tuple(b[k] for k in _LABEL_ORDER if k in b))
            preds = p if preds is None else nested_concat(preds, p, padding_index=-100)
            labels = lab if labels is None else nested_concat(labels, lab, padding_index=-100)
    return EvalPrediction(predictions=nested_numpify(preds), label_ids=nested_numpify(labels))


@contextmanager
def _model_clock(model) -> Iterator[Callable[[], float]]:
    """Times the calls into ``model`` while open; the callable it gives returns their seconds so far. Only model
    time counts: not collating, decoding generated ids to text nor computing a metric. A seq2seq generation
    runs its encoder once outside the model's forward, so the encoder's calls are timed too; a depth count keeps
    calls nested inside a timed one (the encoder inside a forward) from being counted twice."""
    from ..arch import unwrap_model

    inner: Any = unwrap_model(model)  # a transformers model: get_encoder is a method there
    timed = [inner]
    if getattr(getattr(inner, "config", None), "is_encoder_decoder", False):
        timed.append(inner.get_encoder())
    state = {"depth": 0, "start": 0.0, "total": 0.0}

    def enter(*_: Any) -> None:
        if state["depth"] == 0:
            state["start"] = time.perf_counter()
        state["depth"] += 1

    def leave(*_: Any) -> None:
        state["depth"] -= 1
        if state["depth"] == 0:
            state["total"] += time.perf_counter() - state["start"]

    handles = [h for m in timed for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        yield lambda: state["total"]
    finally:
        for h in handles:
            h.remove()


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
