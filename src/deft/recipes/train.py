"""``deft train``: fine-tune with PEFT + density loss, for any task family (:mod:`deft.tasks`).

:class:`TrainArgs` holds every option in groups (the CLI builds it from flags and config files);
:func:`train_with_setup` is the recipe: checkpoints / resume, results.json, the plot and the adapter, written
atomically under ``output``. The density and PEFT groups are the library's :class:`deft.DensityConfig` and
:class:`deft.methods.MethodConfig` themselves.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..fields import flat
from ..fields import help_field as _h
from ..io import read_mapping
from ..methods.config import MethodConfig
from ..train.config import DensityConfig
from .common import RunError, check_values, versions

if TYPE_CHECKING:  # pragma: no cover
    from ..tasks import TaskSetup


@dataclass
class ModelArgs:
    """The model: which one, and how it is loaded and compressed."""

    model: str = _h("model alias (minilm, smollm2), local path or hub id", default="minilm")
    activation: str | None = _h(
        "replace every MLP activation by this one before training, e.g. relu "
        "('relufication' of a GELU/SiLU model; then --loss tanh applies)",
        default=None,
    )
    trust_remote_code: bool = _h("allow model code from the hub (off: only transformers' own classes)", default=False)
    quantize: int | None = _h(
        "quantize the frozen base weights to 8 or 4 bits (QLoRA-style)", default=None, choices=(8, 4)
    )
    quant_backend: str = _h(
        "auto (bitsandbytes on CUDA, deft's int codes on CPU), deft or bnb",
        default="auto",
        choices=("auto", "deft", "bnb"),
    )
    quant_group_size: int | None = _h("quantization group size (4-bit default 64)", default=None)
    prune_dir: str | None = _h("a `deft prune` folder whose WANDA masks are kept during training", default=None)
    teacher: str | None = _h(
        "with --distill: a finished run folder (e.g. the dense PEFT run of the same task) whose outputs the KL term "
        "holds the student to (default: the student's own unmasked outputs)",
        default=None,
    )


@dataclass
class DataArgs:
    """The task and its rows."""

    task: str = _h(
        "a GLUE task (sst2, mrpc, rte, cola, stsb, qnli, qqp, mnli), squad (use --max-length 384), "
        "image or lm-instruct",
        default="sst2",
    )
    data_dir: str | None = _h(
        "GLUE root with TASK/{train,dev}.tsv (e.g. path/to/glue holding SST-2/train.tsv); squad: folder with "
        "dev-v1.1.json (+ train-v1.1.json); image: folder with train/CLASS/*.png and "
        "val/CLASS/*.png",
        default=None,
    )
    data_source: str = _h(
        "auto, local, hub or builtin (the shipped SST-2 sample)",
        default="auto",
        choices=("auto", "local", "hub", "builtin"),
    )
    max_train_samples: int | None = _h("use a seeded subset of the training set", default=None)
    max_eval_samples: int | None = _h("use a seeded subset of the dev set", default=None)
    max_length: int = _h("maximum tokens per example", default=128)
    pad_to_max_length: int | None = _h(
        "GLUE: pad every row to this many tokens, as the paper's research code did "
        "(with --include-padding its density metric counts them)",
        default=None,
    )


@dataclass
class OptimArgs:
    """The optimisation and evaluation schedule."""

    epochs: float = _h("training epochs", default=1.0)
    # 5e-4: masked training at 1e-3 collapsed 1 of 3 seeds at target density 0.05 (docs/RESULTS.md)
    lr: float = _h("peak learning rate (linear decay, warmup_ratio warm-up)", default=5e-4)
    warmup_ratio: float = _h("fraction of steps of learning-rate warm-up", default=0.06)
    weight_decay: float = _h("AdamW weight decay", default=0.0)
    batch_size: int = _h("per-device training batch size", default=8)
    eval_batch_size: int = _h("per-device evaluation batch size", default=64)
    grad_accum: int = _h("gradient accumulation steps", default=1)
    eval_every: float | None = _h(
        "evaluate every this share of training (e.g. 0.25; default: once per epoch); "
        "deft tune prunes on these evaluations",
        default=None,
    )
    gradient_checkpointing: bool = _h("recompute activations in backward to save memory", default=False)


@dataclass
class RunArgs:
    """The run folder, the seed and logging."""

    output: str = _h("run folder (results.json, plots, adapter, checkpoints)", default="runs/train")
    seed: int = _h("random seed", default=0)
    resume: bool = _h("continue the interrupted run in --output from its last checkpoint", default=False)
    overwrite: bool = _h("start over even if --output holds a finished or interrupted run", default=False)
    logging_steps: int = _h("log every N optimizer steps", default=25)
    report_to: list[str] = _h(
        "also log to: tensorboard, wandb, ... (train_log.csv is always written)", default_factory=list
    )
    quiet: bool = _h("no progress bars", default=False)


# Every leaf of a group is one flag of its own name (``--lr`` is ``args.optim.lr``); files, results.json and
# search spaces use those flat names too (deft.fields.flat / deft.fields.build). The density and PEFT groups are
# the library's own classes at their own defaults, so deft train, DensityConfig() and DeftTrainer train the same
# recipe, and defaults and help texts are written once, there.
@dataclass
class TrainArgs:
    """Arguments of ``deft train`` (and of each run of ``deft compare``)."""

    backbone: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    peft: MethodConfig = field(default_factory=MethodConfig)
    density: DensityConfig = field(default_factory=DensityConfig)
    optim: OptimArgs = field(default_factory=OptimArgs)
    run: RunArgs = field(default_factory=RunArgs)


# Presets: named sets of deft train option values shipped with deft (presets/NAME.yaml, flat option names), applied
# over the defaults and under everything the user gives: `deft train --preset paper`, `preset: paper` in a --config
# or suite file. The paper preset is the exact-zero DEFT that was the default before training under thresholds.
PRESET_KEY = "preset"
PRESETS_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_preset(name: Any, where: str = "--preset") -> dict[str, Any]:
    """The (checked) option values of preset ``name``; an unknown name is one RunError listing the known ones."""
    if not isinstance(name, str) or name not in preset_names():
        raise RunError(f"{where} {name}: no such preset; known: {', '.join(preset_names())}")
    path = PRESETS_DIR / f"{name}.yaml"
    return check_values(read_mapping(path, "preset"), TrainArgs, f"preset {name} ({path})")


def with_preset(values: Mapping[str, Any], where: str = "--preset") -> dict[str, Any]:
    """``values`` (flat) without their ``preset`` key, over the values of the preset it names: everything given
    explicitly wins over the preset. Without the key, ``values`` unchanged."""
    rest = dict(values)
    name = rest.pop(PRESET_KEY, None)
    return rest if name is None else {**read_preset(name, where), **rest}


def task_args(args: TrainArgs) -> SimpleNamespace:
    """The options of ``args`` as the flat attributes the task layer reads (:class:`deft.tasks.TaskArgs`: ``model``,
    ``task``, ``max_length`` ...; and ``quantize`` ... for loading): the library never sees the recipe's groups."""
    return SimpleNamespace(**flat(args))


def load_teacher(args: TrainArgs, task: str):
    """The model of the finished run ``--teacher`` names, for distillation: it must have been trained on the same
    task with the same base model (the student's batches go into it unchanged)."""
    import json

    from .evaluate import load_run

    where = Path(str(args.backbone.teacher))
    if not (where / "results.json").is_file() or not (where / "adapter").is_dir():
        raise RunError(f"--teacher {where}: not a finished run folder (results.json and adapter/)")
    cfg = json.loads((where / "results.json").read_text())["config"]
    for key, mine in (("task", task), ("model", args.backbone.model)):
        if cfg.get(key) != mine:
            raise RunError(f"--teacher {where}: a {key} {cfg.get(key)!r} run; this run's {key} is {mine!r}")
    # the teacher's own rows are not needed: one dev row keeps its task setup cheap (load_run takes one training row)
    _, teacher, _ = load_run(where, max_eval_samples=1)
    return teacher


def last_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` folder in ``ckpt_dir`` (None when there is none)."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None


def train_with_setup(
    args: Any, setup: TaskSetup | None = None, callbacks: Sequence[Any] | None = None
) -> dict[str, Any]:
    """``deft train`` for any task: PEFT + density loss, checkpoints / resume, results.json, plot, adapter.

    ``args`` is a :class:`TrainArgs`. ``setup`` defaults to ``setup_task(task_args(args))``, built after
    the seed is set (pass one only to reuse a prepared task, e.g. in tests). ``callbacks`` are extra
    ``TrainerCallback`` s for the trainer (``deft tune`` watches the evaluations through one to prune).
    """
    import torch
    from transformers import TrainingArguments, set_seed

    from ..analysis.plots import layerwise_density
    from ..io import write_json
    from ..methods import apply_method, count_parameters, save_trainable
    from ..tasks import setup_task
    from ..train.trainer import DeftTrainer
    from .compress import prepare_compressed_model

    run, optim = args.run, args.optim
    out = Path(run.output)
    ckpt_dir = out / "checkpoints"
    last = last_checkpoint(ckpt_dir)
    if (out / "results.json").exists() and not run.overwrite:
        raise RunError(f"{out} already holds a finished run (results.json); pass --overwrite or another --output")
    if last and not (run.resume or run.overwrite):
        raise RunError(f"{out} holds an interrupted run ({last}); pass --resume to continue it or --overwrite")
    # under torchrun / accelerate launch every process runs this function; only the first one talks and writes
    main_process = int(os.environ.get("RANK", "0")) == 0
    if run.resume and not last and main_process:
        print(f"deft: no checkpoint in {ckpt_dir}; starting from scratch")
    from ..train.callbacks import TrainTimeCallback, checkpoint_progress, use_run_progress

    time_before = 0.0  # seconds of training in the segments before an interruption (train_time_s adds them)
    if run.resume and last:
        time_before, step, total = checkpoint_progress(last)
        if main_process:
            print(f"deft: resuming from {Path(last).name}" + (f" (step {step} of {total})" if step is not None else ""))
    # the density and PEFT groups checked their values when they were made; this one is the recipe's own
    eval_every = optim.eval_every
    if eval_every is not None and not 0 < eval_every < 1:
        raise ConfigError(f"--eval-every is a share of training, 0 < x < 1; got {eval_every!r}")
    if args.backbone.teacher and not args.density.distill > 0:
        raise ConfigError(
            f"--teacher {args.backbone.teacher}: the teacher is only used by distillation; pass --distill W (e.g. 1)"
        )

    from ..train.callbacks import DensityCSVCallback

    set_seed(run.seed)
    setup = setup or setup_task(task_args(args))
    if args.backbone.activation:
        from ..inference.activations import swap_activation

        swap_activation(setup.model, args.backbone.activation)
    model, compression = prepare_compressed_model(setup.model, args.backbone)
    if optim.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_method(model, args.peft, task_type=setup.task_type)
    params = count_parameters(model)

    targs = TrainingArguments(
        output_dir=str(ckpt_dir),
        num_train_epochs=optim.epochs,
        learning_rate=optim.lr,
        warmup_steps=optim.warmup_ratio,  # a float < 1 is a fraction of the steps in transformers 5
        weight_decay=optim.weight_decay,
        lr_scheduler_type="linear",
        per_device_train_batch_size=optim.batch_size,
        per_device_eval_batch_size=optim.eval_batch_size,
        gradient_accumulation_steps=optim.grad_accum,
        # a float eval_steps < 1 is a share of the training steps in transformers
        eval_strategy="steps" if eval_every else "epoch",
        eval_steps=eval_every or None,
        save_strategy="epoch",
        save_total_limit=1,
        logging_steps=run.logging_steps,
        report_to=list(run.report_to),
        seed=run.seed,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        # under torchrun / accelerate launch on CPU-only machines NCCL is absent: use gloo
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else None,
        disable_tqdm=run.quiet,
        dataloader_num_workers=0,
    )
    teacher = load_teacher(args, setup.task) if args.backbone.teacher else None
    trainer = DeftTrainer(
        model,
        targs,
        density=args.density,
        teacher=teacher,
        train_dataset=setup.train_dataset,
        eval_dataset=setup.eval_dataset,
        data_collator=setup.data_collator,
        compute_metrics=setup.compute_metrics,
        callbacks=[TrainTimeCallback(time_before), DensityCSVCallback(out / "train_log.csv"), *(callbacks or ())],
    )
    use_run_progress(trainer, quiet=run.quiet)
    t0 = time.time()
    trainer.train(resume_from_checkpoint=last if (run.resume and last) else None)
    train_time = time_before + time.time() - t0
    evals = [h for h in trainer.state.log_history if "eval_density" in h]
    if evals and evals[-1].get("step") == trainer.state.global_step and trainer.last_density_report is not None:
        metrics = dict(evals[-1])  # the end-of-epoch evaluation already measured the final model
    else:
        metrics = trainer.evaluate()
    report = trainer.last_density_report
    assert report is not None
    if setup.evaluate_fn is not None:
        extra = {f"eval_{k}": float(v) for k, v in setup.evaluate_fn(trainer).items()}
        trainer.log(extra)  # into log_history (and the console) next to the teacher-forced eval
        metrics.update(extra)

    main_process = trainer.is_world_process_zero()  # the other processes of a multi-process run write nothing
    if main_process:
        trained = trainer.model
        assert trained is not None  # the model given to DeftTrainer
        save_trainable(trained, out / "adapter", args.peft, task_type=setup.task_type)
    thresholds = trainer.final_thresholds()
    if thresholds is not None and main_process:
        # part of the model: sparsify(mode="threshold", threshold=<this>) serves it as it was evaluated
        from ..core.threshold import save_thresholds

        save_thresholds(out / "adapter", thresholds)
    if main_process:
        layerwise_density(
            {f"{args.peft.method} alpha={args.density.alpha:g}": report},
            out / "layerwise_density.png",
            title=f"{args.backbone.model} / {setup.task}",
        )
    results = {
        "config": flat(args),
        "task": setup.task,
        "task_type": setup.task_type,
        "main_metric": setup.main_metric,
        "metric": metrics.get(f"eval_{setup.main_metric}"),
        "metrics": {k[5:]: v for k, v in metrics.items() if k.startswith("eval_") and "density_layer" not in k},
        "density": report.to_dict(),
        # the per-layer thresholds the model was trained and evaluated under (the density above is then
        # the effective density: entries at or below them were zeroed), None without --target-density
        "thresholds": thresholds,
        "trainable_params": params.trainable,
        "total_params": params.total,
        "trainable_percent": params.percent,
        "train_examples": len(setup.train_dataset) if isinstance(setup.train_dataset, Sized) else None,
        "eval_examples": len(setup.eval_dataset) if isinstance(setup.eval_dataset, Sized) else None,
        "data": setup.data_label,
        "task_details": setup.details,
        "compression": compression,
        "train_time_s": round(train_time, 1),
        "log_history": trainer.state.log_history,
        "versions": versions(),
    }
    if main_process:
        write_json(out / "results.json", results)
    trainer.probe.detach()
    return results


def train(args: TrainArgs) -> dict[str, Any]:
    """Fine-tune with PEFT + density loss (GLUE, squad, image, lm-instruct); returns and writes results.json."""
    return train_with_setup(args)
