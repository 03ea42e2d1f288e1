"""``deft train``: fine-tune with PEFT + density loss, for any task family (:mod:`deft.tasks`).

:class:`TrainArgs` holds every option (the CLI builds it from flags and config files); :func:`train_with_setup`
is the recipe: checkpoints / resume, results.json, the plot and the adapter, written atomically under
``output``. :func:`density_config` and :func:`method_config` turn the options into the library's configs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence, Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DeftError
from ..fields import help_field as _h
from .common import RunError, versions

if TYPE_CHECKING:  # pragma: no cover
    from ..tasks import TaskSetup


@dataclass
class TrainArgs:
    """Arguments of ``deft train`` (and of each run of ``deft compare``)."""

    model: str = _h("model alias (minilm, smollm2), local path or hub id", default="minilm")
    task: str = _h(
        "a GLUE task (sst2, mrpc, rte, cola, stsb, qnli, qqp, mnli), squad (use --max-length 384), "
        "image or lm-instruct",
        default="sst2",
    )
    method: str = _h(
        "PEFT method: lora, prefix, prompt, ia3, bitfit, adapter, qlora",
        default="lora",
        choices=("lora", "prefix", "prompt", "ia3", "bitfit", "adapter", "qlora"),
    )
    alpha: float = _h("density-loss weight (0 = plain PEFT)", default=3.0)
    loss: str = _h("density surrogate: l0 (smooth-l0, GELU/SiLU) or tanh (ReLU)", default="l0", choices=("l0", "tanh"))
    eps: float = _h("smooth-l0 eps", default=1e-7)
    beta: float = _h("tanh slope", default=10.0)
    granularity: str = _h(
        "token (per entry) or feature_map (the paper's batch feature map)",
        default="token",
        choices=("token", "feature_map"),
    )
    alpha_warmup: float = _h(
        "fraction of training over which alpha ramps up from 0 (the task is learnt first)", default=0.5
    )
    adaptive: bool = _h("ADA-DEFT: adaptive per-layer density weights (see docs/ada-deft.md)", default=False)
    include_padding: bool = _h("count padded positions in loss and metric (research-code behaviour)", default=False)
    pad_to_max_length: int | None = _h(
        "GLUE: pad every row to this many tokens, as the paper's research code did "
        "(with --include-padding its density metric counts them)",
        default=None,
    )
    threshold: float = _h("density metric: |x| > threshold counts as non-zero", default=0.0)
    target_density: float | None = _h(
        "train under thresholds: mask |h| <= t_layer at every MLP down-projection input "
        "so this share of units stays active (e.g. 0.05); writes adapter/thresholds.json",
        default=None,
    )
    density_ramp: float = _h(
        "--target-density: share of training over which the density goes from 1 to the target", default=0.6
    )
    density_schedule: str = _h(
        "--target-density: shape of that ramp, cosine or linear", default="cosine", choices=("cosine", "linear")
    )
    threshold_momentum: float = _h("--target-density: moving-average factor of the per-layer thresholds", default=0.9)
    straight_through: bool = _h(
        "--target-density: gradients pass through masked units (straight-through)", default=False
    )
    distill: float = _h("weight of a KL term to the same model's dense (unmasked) outputs (0 = off)", default=0.0)
    epochs: float = _h("training epochs", default=1.0)
    eval_every: float | None = _h(
        "evaluate every this share of training (e.g. 0.25; default: once per epoch); "
        "deft tune prunes on these evaluations",
        default=None,
    )
    lr: float = _h("peak learning rate (linear decay, warmup_ratio warm-up)", default=1e-3)
    warmup_ratio: float = _h("fraction of steps of learning-rate warm-up", default=0.06)
    weight_decay: float = _h("AdamW weight decay", default=0.0)
    batch_size: int = _h("per-device training batch size", default=8)
    eval_batch_size: int = _h("per-device evaluation batch size", default=64)
    grad_accum: int = _h("gradient accumulation steps", default=1)
    max_length: int = _h("maximum tokens per example", default=128)
    seed: int = _h("random seed", default=0)
    output: str = _h("run folder (results.json, plots, adapter, checkpoints)", default="runs/train")
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
    lora_r: int = _h("LoRA rank", default=8)
    lora_alpha: float = _h("LoRA alpha (scale = lora_alpha / r)", default=16.0)
    lora_dropout: float = _h("LoRA dropout", default=0.0)
    lora_bias: str = _h(
        "biases LoRA also trains: none, lora_only (lets DEFT move MLP units below zero), all",
        default="lora_only",
        choices=("none", "lora_only", "all"),
    )
    target_modules: str = _h(
        "LoRA targets: mlp+attention, mlp, attention, all-linear or a comma list", default="mlp+attention"
    )
    num_virtual_tokens: int = _h("prefix / prompt tuning virtual tokens", default=20)
    adapter_type: str = _h(
        "bottleneck adapter: pfeiffer or houlsby", default="pfeiffer", choices=("pfeiffer", "houlsby")
    )
    adapter_reduction_factor: int = _h("adapter bottleneck = hidden // factor", default=16)
    train_pooler: bool = _h(
        "classification: also train the backbone's pooler (BERT's dense + tanh on [CLS]) fully; "
        "needed when the checkpoint's pooler is untrained, as in all-MiniLM-L6-v2",
        default=False,
    )
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
    logging_steps: int = _h("log every N optimizer steps", default=25)
    report_to: list[str] = _h(
        "also log to: tensorboard, wandb, ... (train_log.csv is always written)", default_factory=list
    )
    resume: bool = _h("continue the interrupted run in --output from its last checkpoint", default=False)
    overwrite: bool = _h("start over even if --output holds a finished or interrupted run", default=False)
    gradient_checkpointing: bool = _h("recompute activations in backward to save memory", default=False)
    activation: str | None = _h(
        "replace every MLP activation by this one before training, e.g. relu "
        "('relufication' of a GELU/SiLU model; then --loss tanh applies)",
        default=None,
    )
    trust_remote_code: bool = _h("allow model code from the hub (off: only transformers' own classes)", default=False)
    sites: list[str] | None = _h(
        "module-name globs of the activations, for model types deft does not know", default=None
    )
    quiet: bool = _h("no progress bars", default=False)


def method_config(args: TrainArgs):
    """The :class:`deft.methods.MethodConfig` of the PEFT options in ``args``."""
    from ..methods import MethodConfig

    return MethodConfig(
        method=args.method,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_bias=args.lora_bias,
        target_modules=args.target_modules,
        num_virtual_tokens=args.num_virtual_tokens,
        adapter_type=args.adapter_type,
        adapter_reduction_factor=args.adapter_reduction_factor,
        train_pooler=args.train_pooler,
    )


def density_config(args: TrainArgs):
    """The :class:`deft.DensityConfig` of the density options in ``args``; a value it refuses is a ConfigError."""
    from ..train.trainer import DensityConfig

    try:
        return _new_density_config(DensityConfig, args)
    except ValueError as e:  # DensityConfig checks every value it is given: a bad value is the user's option
        if isinstance(e, DeftError):
            raise
        raise ConfigError(str(e)) from None


def _new_density_config(DensityConfig, args: TrainArgs):  # noqa: N803 - the class, passed in lazily
    return DensityConfig(
        alpha=args.alpha,
        kind=args.loss,
        eps=args.eps,
        beta=args.beta,
        granularity=args.granularity,
        include_padding=args.include_padding,
        threshold=args.threshold,
        sites=args.sites,
        alpha_warmup=args.alpha_warmup,
        adaptive=args.adaptive,
        target_density=args.target_density,
        density_ramp=args.density_ramp,
        density_schedule=args.density_schedule,
        threshold_momentum=args.threshold_momentum,
        straight_through=args.straight_through,
        distill=args.distill,
    )


def last_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` folder in ``ckpt_dir`` (None when there is none)."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None


def train_with_setup(
    args: Any, setup: TaskSetup | None = None, callbacks: Sequence[Any] | None = None
) -> dict[str, Any]:
    """``deft train`` for any task: PEFT + density loss, checkpoints / resume, results.json, plot, adapter.

    ``args`` is a :class:`TrainArgs`. ``setup`` defaults to ``setup_task(args)``, built after
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

    out = Path(args.output)
    ckpt_dir = out / "checkpoints"
    last = last_checkpoint(ckpt_dir)
    if (out / "results.json").exists() and not args.overwrite:
        raise RunError(f"{out} already holds a finished run (results.json); pass --overwrite or another --output")
    if last and not (args.resume or args.overwrite):
        raise RunError(f"{out} holds an interrupted run ({last}); pass --resume to continue it or --overwrite")
    # under torchrun / accelerate launch every process runs this function; only the first one talks and writes
    main_process = int(os.environ.get("RANK", "0")) == 0
    if args.resume and not last and main_process:
        print(f"deft: no checkpoint in {ckpt_dir}; starting from scratch")
    from ..train.callbacks import TrainTimeCallback, checkpoint_progress, use_run_progress

    time_before = 0.0  # seconds of training in the segments before an interruption (train_time_s adds them)
    if args.resume and last:
        time_before, step, total = checkpoint_progress(last)
        if main_process:
            print(f"deft: resuming from {Path(last).name}" + (f" (step {step} of {total})" if step is not None else ""))
    density_cfg = density_config(args)  # validate everything before loading anything heavy
    eval_every = getattr(args, "eval_every", None)
    if eval_every is not None and not 0 < eval_every < 1:
        raise ConfigError(f"--eval-every is a share of training, 0 < x < 1; got {eval_every!r}")
    method_cfg = method_config(args)

    from ..train.callbacks import DensityCSVCallback

    set_seed(args.seed)
    setup = setup or setup_task(args)
    if getattr(args, "activation", None):
        from ..inference.activations import swap_activation

        swap_activation(setup.model, args.activation)
    model, compression = prepare_compressed_model(setup.model, args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_method(model, method_cfg, task_type=setup.task_type)
    params = count_parameters(model)

    targs = TrainingArguments(
        output_dir=str(ckpt_dir),
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        warmup_steps=args.warmup_ratio,  # a float < 1 is a fraction of the steps in transformers 5
        weight_decay=args.weight_decay,
        lr_scheduler_type="linear",
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.grad_accum,
        # a float eval_steps < 1 is a share of the training steps in transformers
        eval_strategy="steps" if args.eval_every else "epoch",
        eval_steps=args.eval_every or None,
        save_strategy="epoch",
        save_total_limit=1,
        logging_steps=args.logging_steps,
        report_to=list(getattr(args, "report_to", [])),
        seed=args.seed,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        # under torchrun / accelerate launch on CPU-only machines NCCL is absent: use gloo
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else None,
        disable_tqdm=args.quiet,
        dataloader_num_workers=0,
    )
    trainer = DeftTrainer(
        model,
        targs,
        density=density_cfg,
        train_dataset=setup.train_dataset,
        eval_dataset=setup.eval_dataset,
        data_collator=setup.data_collator,
        compute_metrics=setup.compute_metrics,
        callbacks=[TrainTimeCallback(time_before), DensityCSVCallback(out / "train_log.csv"), *(callbacks or ())],
    )
    use_run_progress(trainer, quiet=args.quiet)
    t0 = time.time()
    trainer.train(resume_from_checkpoint=last if (args.resume and last) else None)
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
        save_trainable(trained, out / "adapter", method_cfg, task_type=setup.task_type)
    thresholds = trainer.final_thresholds()
    if thresholds is not None and main_process:
        # part of the model: sparsify(mode="threshold", threshold=<this>) serves it as it was evaluated
        from ..core.threshold import save_thresholds

        save_thresholds(out / "adapter", thresholds)
    if main_process:
        layerwise_density(
            {f"{args.method} alpha={args.alpha:g}": report},
            out / "layerwise_density.png",
            title=f"{args.model} / {setup.task}",
        )
    results = {
        "config": asdict(args),
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
