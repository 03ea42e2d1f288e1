"""Recipes behind the CLI: train one run, compare PEFT vs DEFT over seeds, measure a model.

Each function takes a typed dataclass of arguments (the CLI builds it from flags and config files) and
writes everything it produces under ``output``: ``results.json``, plots, the trained adapter. Results
are written atomically, and a run folder with checkpoints resumes with ``resume=True``.
"""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError, DeftError
from .fields import help_field as _h
from .io import write_json, write_text
from .analysis.tradeoff import mean_std
from .core.report import DensityReport, density_change


class RunError(DeftError, RuntimeError):
    """A run cannot start as asked (bad option combination, existing output, missing data)."""


@dataclass
class TrainArgs:
    """Arguments of ``deft train`` (and of each run of ``deft compare``)."""

    model: str = _h("model alias (minilm, smollm2), local path or hub id", default="minilm")
    task: str = _h("a GLUE task (sst2, mrpc, rte, cola, stsb, qnli, qqp, mnli), squad (use --max-length 384), "
                   "image or lm-instruct", default="sst2")
    method: str = _h("PEFT method: lora, prefix, prompt, ia3, bitfit, adapter, qlora", default="lora",
                     choices=("lora", "prefix", "prompt", "ia3", "bitfit", "adapter", "qlora"))
    alpha: float = _h("density-loss weight (0 = plain PEFT)", default=3.0)
    loss: str = _h("density surrogate: l0 (smooth-l0, GELU/SiLU) or tanh (ReLU)", default="l0", choices=("l0", "tanh"))
    eps: float = _h("smooth-l0 eps", default=1e-7)
    beta: float = _h("tanh slope", default=10.0)
    granularity: str = _h("token (per entry) or feature_map (the paper's batch feature map)", default="token",
                          choices=("token", "feature_map"))
    alpha_warmup: float = _h("fraction of training over which alpha ramps up from 0 (the task is learnt first)",
                               default=0.5)
    adaptive: bool = _h("ADA-DEFT: adaptive per-layer density weights (see docs/ada-deft.md)", default=False)
    include_padding: bool = _h("count padded positions in loss and metric (research-code behaviour)", default=False)
    pad_to_max_length: int | None = _h("GLUE: pad every row to this many tokens, as the paper's research code did "
                                       "(with --include-padding its density metric counts them)", default=None)
    threshold: float = _h("density metric: |x| > threshold counts as non-zero", default=0.0)
    target_density: float | None = _h("train under thresholds: mask |h| <= t_layer at every MLP down-projection input "
                                      "so this share of units stays active (e.g. 0.05); writes adapter/thresholds.json",
                                      default=None)
    density_ramp: float = _h("--target-density: share of training over which the density goes from 1 to the target",
                             default=0.6)
    density_schedule: str = _h("--target-density: shape of that ramp, cosine or linear", default="cosine",
                               choices=("cosine", "linear"))
    threshold_momentum: float = _h("--target-density: moving-average factor of the per-layer thresholds", default=0.9)
    straight_through: bool = _h("--target-density: gradients pass through masked units (straight-through)",
                                default=False)
    distill: float = _h("weight of a KL term to the same model's dense (unmasked) outputs (0 = off)", default=0.0)
    epochs: float = _h("training epochs", default=1.0)
    eval_every: float | None = _h("evaluate every this share of training (e.g. 0.25; default: once per epoch); "
                                  "deft tune prunes on these evaluations", default=None)
    lr: float = _h("peak learning rate (linear decay, warmup_ratio warm-up)", default=1e-3)
    warmup_ratio: float = _h("fraction of steps of learning-rate warm-up", default=0.06)
    weight_decay: float = _h("AdamW weight decay", default=0.0)
    batch_size: int = _h("per-device training batch size", default=8)
    eval_batch_size: int = _h("per-device evaluation batch size", default=64)
    grad_accum: int = _h("gradient accumulation steps", default=1)
    max_length: int = _h("maximum tokens per example", default=128)
    seed: int = _h("random seed", default=0)
    output: str = _h("run folder (results.json, plots, adapter, checkpoints)", default="runs/train")
    data_dir: str | None = _h("GLUE root with TASK/{train,dev}.tsv (e.g. path/to/glue holding SST-2/train.tsv); squad: folder with "
                              "dev-v1.1.json (+ train-v1.1.json); image: folder with train/CLASS/*.png and "
                              "val/CLASS/*.png", default=None)
    data_source: str = _h("auto, local, hub or builtin (the shipped SST-2 sample)", default="auto",
                          choices=("auto", "local", "hub", "builtin"))
    max_train_samples: int | None = _h("use a seeded subset of the training set", default=None)
    max_eval_samples: int | None = _h("use a seeded subset of the dev set", default=None)
    lora_r: int = _h("LoRA rank", default=8)
    lora_alpha: float = _h("LoRA alpha (scale = lora_alpha / r)", default=16.0)
    lora_dropout: float = _h("LoRA dropout", default=0.0)
    lora_bias: str = _h("biases LoRA also trains: none, lora_only (lets DEFT move MLP units below zero), all",
                         default="lora_only", choices=("none", "lora_only", "all"))
    target_modules: str = _h("LoRA targets: mlp+attention, mlp, attention, all-linear or a comma list",
                             default="mlp+attention")
    num_virtual_tokens: int = _h("prefix / prompt tuning virtual tokens", default=20)
    adapter_type: str = _h("bottleneck adapter: pfeiffer or houlsby", default="pfeiffer", choices=("pfeiffer", "houlsby"))
    adapter_reduction_factor: int = _h("adapter bottleneck = hidden // factor", default=16)
    train_pooler: bool = _h("classification: also train the backbone's pooler (BERT's dense + tanh on [CLS]) fully; "
                            "needed when the checkpoint's pooler is untrained, as in all-MiniLM-L6-v2", default=False)
    quantize: int | None = _h("quantize the frozen base weights to 8 or 4 bits (QLoRA-style)", default=None, choices=(8, 4))
    quant_backend: str = _h("auto (bitsandbytes on CUDA, deft's int codes on CPU), deft or bnb", default="auto",
                            choices=("auto", "deft", "bnb"))
    quant_group_size: int | None = _h("quantization group size (4-bit default 64)", default=None)
    prune_dir: str | None = _h("a `deft prune` folder whose WANDA masks are kept during training", default=None)
    logging_steps: int = _h("log every N optimizer steps", default=25)
    report_to: list[str] = _h("also log to: tensorboard, wandb, ... (train_log.csv is always written)",
                              default_factory=list)
    resume: bool = _h("continue the interrupted run in --output from its last checkpoint", default=False)
    overwrite: bool = _h("start over even if --output holds a finished or interrupted run", default=False)
    gradient_checkpointing: bool = _h("recompute activations in backward to save memory", default=False)
    activation: str | None = _h("replace every MLP activation by this one before training, e.g. relu "
                                "('relufication' of a GELU/SiLU model; then --loss tanh applies)", default=None)
    trust_remote_code: bool = _h("allow model code from the hub (off: only transformers' own classes)", default=False)
    sites: list[str] | None = _h("module-name globs of the activations, for model types deft does not know",
                                 default=None)
    quiet: bool = _h("no progress bars", default=False)


@dataclass
class CompareArgs(TrainArgs):
    """Arguments of ``deft compare``: PEFT (alpha=0) vs DEFT (alpha) with everything else equal."""

    seeds: list[int] = _h("seeds; each runs PEFT and DEFT", default_factory=lambda: [0])
    output: str = _h("folder for the runs, compare.json/csv and the plot", default="runs/compare")
    baseline_densities: list[float] = _h(
        "target densities of the '+ thresholds' curves: each finished run thresholded per layer (TEAL-style, "
        "thresholds calibrated on training rows only) and evaluated on dev (empty: no curves)",
        default_factory=lambda: [0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05])
    calib_samples: int = _h("training rows (a seeded subset) the per-layer thresholds are calibrated on",
                            default=512)
    max_drop: float = _h("iso-accuracy: largest drop from dense PEFT's mean metric, in points", default=0.5)


@dataclass
class MeasureArgs:
    """Arguments of ``deft measure``: activation density of a model or trained adapter on a task's dev set."""

    model: str = _h("model alias, local path or hub id", default="minilm")
    task: str = _h("GLUE task whose dev set is measured", default="sst2")
    adapter: str | None = _h("a run's adapter folder (RUN/adapter) to load on the model", default=None)
    data_dir: str | None = _h("GLUE folder with TASK/{train,dev}.tsv", default=None)
    data_source: str = _h("auto, local, hub or builtin", default="auto", choices=("auto", "local", "hub", "builtin"))
    max_eval_samples: int | None = _h("seeded subset of the dev set", default=None)
    max_length: int = _h("maximum tokens per example", default=128)
    batch_size: int = _h("batch size", default=64)
    threshold: float = _h("|x| > threshold counts as non-zero", default=0.0)
    include_padding: bool = _h("count padded positions", default=False)
    sites: list[str] | None = _h("module-name globs for unknown model types", default=None)
    activation: str | None = _h("the activation the adapter was trained with (deft train --activation)", default=None)
    use_thresholds: bool = _h("apply the adapter's thresholds.json when it has one (the effective density is then "
                              "measured beside the exact-zero one)", default=True)
    output: str | None = _h("write density.json here (a folder)", default=None)
    trust_remote_code: bool = _h("allow model code from the hub", default=False)


# ---------------------------------------------------------------------------------------------- helpers
def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    from .version import __version__

    return {
        "deft": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.system()}",
    }


def load_model_and_tokenizer(name: str, task: str, *, trust_remote_code: bool = False, **load_kwargs: Any):
    """Tokenizer and sequence-classification model for a GLUE ``task`` (see :mod:`deft.tasks`)."""
    from .tasks import (
        load_model_and_tokenizer as load,  # lazily: `deft --help` should not import torch
    )

    return load(name, task, trust_remote_code=trust_remote_code, **load_kwargs)


def _load_split(args, task: str, split: str, n: int | None, seed: int):
    from .data import load_glue
    from .tasks import seeded_subset

    return seeded_subset(load_glue(task, split, data_dir=args.data_dir, source=args.data_source), n, seed)


def _method_config(args: TrainArgs):
    from .methods import MethodConfig

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


def _density_config(args: TrainArgs):
    from .train.trainer import DensityConfig

    try:
        return _new_density_config(DensityConfig, args)
    except ValueError as e:  # DensityConfig checks every value it is given: a bad value is the user's option
        if isinstance(e, DeftError):
            raise
        raise ConfigError(str(e)) from None


def _new_density_config(DensityConfig, args: TrainArgs):  # noqa: N803 - the class, passed in lazily
    return DensityConfig(
        alpha=args.alpha,
        kind=args.loss,  # type: ignore[arg-type]
        eps=args.eps,
        beta=args.beta,
        granularity=args.granularity,  # type: ignore[arg-type]
        include_padding=args.include_padding,
        threshold=args.threshold,
        sites=args.sites,
        alpha_warmup=args.alpha_warmup,
        adaptive=args.adaptive,
        target_density=args.target_density,
        density_ramp=args.density_ramp,
        density_schedule=args.density_schedule,  # type: ignore[arg-type]
        threshold_momentum=args.threshold_momentum,
        straight_through=args.straight_through,
        distill=args.distill,
    )


def _last_checkpoint(ckpt_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None


# ---------------------------------------------------------------------------------------------- train
def train(args: TrainArgs) -> dict[str, Any]:
    """Fine-tune with PEFT + density loss (GLUE, squad, image, lm-instruct); returns and writes results.json."""
    from .tasks import train_with_setup

    return train_with_setup(args)


# ---------------------------------------------------------------------------------------------- compare
def compare(args: CompareArgs) -> dict[str, Any]:
    """PEFT (alpha=0) and DEFT (alpha) for each seed; finished runs are reused, so it resumes."""
    from .analysis.plots import layerwise_density

    out = Path(args.output)
    runs: dict[str, list[dict[str, Any]]] = {"PEFT": [], "DEFT": []}
    for seed in args.seeds:
        for label, alpha in (("PEFT", 0.0), ("DEFT", args.alpha)):
            run_dir = out / f"{label.lower()}-seed{seed}"
            if (run_dir / "results.json").exists() and not args.overwrite:
                res = json.loads((run_dir / "results.json").read_text())
                print(f"deft: reusing finished run {run_dir}")
            else:
                kw = {f.name: getattr(args, f.name) for f in fields(TrainArgs)}
                kw.update(seed=seed, alpha=alpha, output=str(run_dir), resume=True)
                if label == "PEFT":  # the plain PEFT baseline: no masking and no distillation either
                    kw.update(target_density=None, distill=0.0)
                print(f"deft: training {label} (alpha={alpha:g}, seed={seed}) -> {run_dir}")
                res = train(TrainArgs(**kw))
            runs[label].append(res)

    summary = summarize(runs)
    curves = threshold_curves(args, runs)
    iso = compare_iso_accuracy(runs, curves, args.max_drop)
    reports = {k: [DensityReport.from_dict(r["density"]) for r in v] for k, v in runs.items()}
    plot = layerwise_density(reports, out / "layerwise_density.png", title=f"{args.model} / {args.task} / {args.method}")
    write_json(out / "compare.json", {"summary": summary, "config": asdict(args), "runs": {
        k: [{"seed": r["config"]["seed"], "metric": r["metric"], "density": r["density"]["overall"],
             "dir": r["config"]["output"]} for r in v] for k, v in runs.items()},
        "threshold_curves": curves, "iso_accuracy": iso})
    write_text(out / "compare.csv", _csv(summary))
    table = format_table(summary)
    iso_table = format_iso_table(iso, summary["main_metric"])
    write_text(out / "compare.md", table + "\n\n" + iso_table + "\n")
    print(table)
    print("\n" + iso_table)
    print(f"\ntable: {out / 'compare.md'} (also compare.json, compare.csv)\nplot:  {plot}")
    return summary


# The training-free baseline every DEFT result must beat: the PEFT model thresholded per layer
# (TEAL-style). Curves are keyed by the run kind they threshold.
BASELINE_KIND = "PEFT + thresholds"


def _thresholds_kind(label: str) -> str:
    return f"{label} + thresholds"


def _curve_skip_reason(res: dict[str, Any]) -> str | None:
    from .data import GLUE_TASKS

    cfg = res["config"]
    # results.json from before other task families existed has no task_type: those were all GLUE
    if res.get("task_type", "SEQ_CLS") != "SEQ_CLS" or res.get("task") not in GLUE_TASKS:
        return f"task {res.get('task')!r} is not GLUE sequence classification"
    if cfg.get("quantize") or cfg.get("prune_dir"):
        return "quantized or pruned runs are not rebuilt for evaluation here"
    return None


def threshold_curves(args: CompareArgs, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The "+ thresholds" curve of every run kind: each finished run thresholded per layer at each of
    ``args.baseline_densities`` (thresholds calibrated on ``args.calib_samples`` of its training rows)
    and evaluated on its own dev rows. ``{kind: {"points": [mean over seeds per target], "seeds": [...]}}``;
    empty (with a printed note) where the task family is not GLUE classification."""
    densities = list(args.baseline_densities or [])
    if not densities:
        return {}
    reason = next((r for rs in runs.values() for r in map(_curve_skip_reason, rs) if r), None)
    if reason:
        print(f"deft: no '+ thresholds' curves: {reason}")
        return {}
    curves: dict[str, Any] = {}
    for label, rs in runs.items():
        if label.endswith("+ thresholds"):
            continue
        if label != "PEFT" and any(r["config"].get("target_density") for r in rs):
            # such a run was trained under its own thresholds: its point (metric, effective density) is the
            # comparison; thresholds recalibrated on it unmasked would describe another model
            print(f"deft: no '{_thresholds_kind(label)}' curve: the {label} runs were trained with --target-density")
            continue
        per_seed = []
        for r in rs:
            run_dir = Path(r["config"]["output"])
            per_seed.append({"seed": r["config"]["seed"], "dir": str(run_dir),
                             "points": _cached_curve(run_dir, label, densities, args)})
        points = []
        for i, d in enumerate(densities):
            at = [s["points"][i] for s in per_seed]
            m, ms = mean_std([p["metric"] for p in at])
            e, es = mean_std([p["density"] for p in at])
            x, _ = mean_std([p["exact_density"] for p in at])
            points.append({"target_density": d, "metric_mean": m, "metric_std": ms, "density_mean": e,
                           "density_std": es, "exact_density_mean": x})
        curves[_thresholds_kind(label)] = {"points": points, "seeds": per_seed}
    return curves


def _cached_curve(run_dir: Path, label: str, densities: list[float], args: CompareArgs) -> list[dict[str, Any]]:
    """threshold_curve, kept in RUN/threshold_curve.json so that rerunning a comparison (it reuses finished
    runs) does not evaluate them again; recomputed when the run, the targets or the calibration size change."""
    import hashlib

    cache = run_dir / "threshold_curve.json"
    key = {"densities": densities, "calib_samples": args.calib_samples,
           "results_sha1": hashlib.sha1((run_dir / "results.json").read_bytes()).hexdigest()}
    if cache.exists() and not args.overwrite:
        try:
            saved = json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError):
            saved = {}
        if saved.get("key") == key:
            print(f"deft: reusing thresholded curve {cache}")
            return saved["points"]
    print(f"deft: thresholding {label} ({run_dir.name}) at densities {', '.join(f'{d:g}' for d in densities)}")
    points = threshold_curve(run_dir, densities, calib_samples=args.calib_samples)
    write_json(cache, {"key": key, "points": points})
    return points


def threshold_curve(run_dir: str | Path, densities: list[float], *, calib_samples: int = 512,
                    batch_size: int | None = None) -> list[dict[str, Any]]:
    """One finished GLUE run thresholded per layer at each target density: per point the dev metric, the
    effective density (``|h| > t_layer`` at the W2 inputs), the exact-zero density and the thresholds.

    The thresholds come from one calibration pass over a seeded subset of ``calib_samples`` of the rows
    the run trained on (never its dev rows); every target is then scored on the same dev batches, the
    ones the run's own metric was computed on, with the sub-threshold W2 inputs zeroed.
    """
    from . import sparse
    from .cli_extra import _merge
    from .core.report import count_thresholded
    from .tasks import seeded_subset

    run_dir = Path(run_dir)
    model, tok, res = _load_run_model(run_dir)
    model = _merge(model)  # as served, and cheaper to run; site names are the same before and after
    cfg, main = res["config"], res["main_metric"]
    bs = batch_size or cfg.get("eval_batch_size", 64)
    train_rows, dev_rows = _run_rows(cfg)
    calib_rows = seeded_subset(train_rows, calib_samples, cfg["seed"])
    calib = [_drop_labels(b) for b in _batches(calib_rows, tok, cfg, bs, by_length=True)]
    dev = _batches(dev_rows, tok, cfg, bs, by_length=True)
    include_padding = cfg.get("include_padding", False)
    by_target = sparse.calibrate_threshold_curve(model, calib, densities, include_padding=include_padding)
    points = []
    for d in densities:
        (metrics, _), report = count_thresholded(model, by_target[d], lambda: evaluate_glue(model, dev, cfg["task"]),
                                                 include_padding=include_padding)
        points.append({"target_density": d, "metric": metrics[main], "density": report.overall,
                       "exact_density": report.exact_overall, "thresholds": by_target[d]})
    return points


def compare_iso_accuracy(runs: dict[str, list[dict[str, Any]]], curves: dict[str, Any], max_drop: float
                         ) -> dict[str, Any]:
    """compare.json's ``iso_accuracy`` block: per run kind (plain runs: one point each, mean over seeds;
    "+ thresholds" curves: one point per target), the lowest effective density within ``max_drop`` points
    of dense PEFT's mean metric, the metric there, and the metric at the density the training-free
    baseline reaches (see :func:`deft.analysis.tradeoff.iso_accuracy`). Metrics and densities are fractions."""
    from .analysis.tradeoff import iso_accuracy

    kinds: dict[str, list[tuple[float, float]]] = {}
    for label, rs in runs.items():
        m, _ = mean_std([r["metric"] for r in rs])
        d, _ = mean_std([r["density"]["overall"] for r in rs])
        kinds[label] = [(d, m)]
    for kind, c in curves.items():
        kinds[kind] = [(p["density_mean"], p["metric_mean"]) for p in c["points"]]
    reference, _ = mean_std([r["metric"] for r in runs["PEFT"]])
    out = iso_accuracy(kinds, reference, max_drop / 100.0,
                       matched_kind=BASELINE_KIND if BASELINE_KIND in kinds else None)
    out.update(reference_kind="PEFT", max_drop_points=max_drop)
    return out


def format_iso_table(iso: dict[str, Any], metric: str) -> str:
    """The iso-accuracy table: per run kind, the lowest effective density within max-drop and the metric."""
    matched = iso.get("matched_density")
    head = ["run", "lowest eff. density (%)", f"{metric} there (%)",
            f"{metric} at {100 * matched:.2f} % (%)" if matched is not None else f"{metric} at baseline's (%)"]

    def pct(v: float | None) -> str:
        return "-" if v is None or math.isnan(v) else f"{100 * v:.2f}"

    body = [[k, pct(v["density"]), pct(v["metric"]), pct(v["metric_at_matched_density"])]
            for k, v in iso["kinds"].items()]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    title = (f"Iso-accuracy: lowest effective density within {iso['max_drop_points']:g} points of dense "
             f"{iso['reference_kind']} ({metric} {pct(iso['reference'])} %); last column: at the density "
             f"{iso.get('matched_kind') or BASELINE_KIND} reaches there")
    lines = [title, ""]
    for row in [head, ["-" * w for w in widths], *body]:
        lines.append("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |")
    return "\n".join(lines)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rows = {}
    for label, rs in runs.items():
        m, ms = mean_std([r["metric"] for r in rs])
        d, ds = mean_std([r["density"]["overall"] for r in rs])
        u, us = mean_std([r["density"].get("union_overall", float("nan")) for r in rs])
        rows[label] = {
            "metric_mean": m, "metric_std": ms, "density_mean": d, "density_std": ds,
            "union_density_mean": u, "union_density_std": us, "seeds": [r["config"]["seed"] for r in rs],
            "trainable_percent": rs[0]["trainable_percent"] if rs else None,
        }
    first = next(iter(runs.values()))[0]
    change = density_change(rows["PEFT"]["density_mean"], rows["DEFT"]["density_mean"])
    return {
        "task": first["task"], "main_metric": first["main_metric"], "model": first["config"]["model"],
        "method": first["config"]["method"], "alpha": runs["DEFT"][0]["config"]["alpha"],
        "data": first.get("data"), "rows": rows, "density_change_percent": change,
        "metric_change_points": 100 * (rows["DEFT"]["metric_mean"] - rows["PEFT"]["metric_mean"]),
    }


def format_table(summary: dict[str, Any]) -> str:
    """The paper-style table: metric mean ± std, density mean ± std, Density Change %."""
    metric = summary["main_metric"]
    lines = [
        f"{summary['model']} / {summary['task']} / {summary['method']} (DEFT alpha={summary['alpha']:g}); "
        f"data: {summary['data']}",
        "",
    ]
    head = ["run", f"{metric} (%)", "density (%)", "union density (%)", "trainable %"]
    body = [
        [label, f"{100 * r['metric_mean']:.2f} ± {100 * r['metric_std']:.2f}",
         f"{100 * r['density_mean']:.2f} ± {100 * r['density_std']:.2f}", f"{100 * r['union_density_mean']:.2f}",
         f"{r['trainable_percent']:.3f}"]
        for label, r in summary["rows"].items()
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    for row in [head, ["-" * w for w in widths], *body]:
        lines.append("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |")
    lines.append("")
    lines.append(
        f"Density Change: {summary['density_change_percent']:.2f} %   "
        f"({metric} change: {summary['metric_change_points']:+.2f} points)"
    )
    return "\n".join(lines)


def _csv(summary: dict[str, Any]) -> str:
    head = "run,metric,metric_mean,metric_std,density_mean,density_std,union_density_mean,density_change_percent"
    rows = [
        f"{k},{summary['main_metric']},{r['metric_mean']},{r['metric_std']},{r['density_mean']},{r['density_std']},"
        f"{r['union_density_mean']},{summary['density_change_percent'] if k == 'DEFT' else 0.0}"
        for k, r in summary["rows"].items()
    ]
    return "\n".join([head, *rows]) + "\n"


# ---------------------------------------------------------------------------------------------- skip
@dataclass
class SkipArgs:
    """Arguments of ``deft skip``: drop (nearly) silent MLP blocks of a trained run (ADA-DEFT)."""

    run: str = _h("a finished run folder (with results.json and adapter/)", default="runs/train")
    max_drop: float = _h("largest accepted metric drop, in points (e.g. 0.5)", default=0.5)
    max_eval_samples: int | None = _h("seeded subset of the dev set used to choose and measure", default=None)
    batch_size: int = _h("evaluation batch size", default=64)
    use_thresholds: bool = _h("evaluate under the run's adapter/thresholds.json when it has one", default=True)
    output: str | None = _h("write skip.json here (default: the run folder)", default=None)


def _load_run_model(run_dir: Path):
    from .methods import load_trainable

    res = json.loads((run_dir / "results.json").read_text())
    cfg = res["config"]
    model, tok = load_model_and_tokenizer(cfg["model"], cfg["task"], trust_remote_code=cfg.get("trust_remote_code", False),
                                          activation=cfg.get("activation"))
    model = load_trainable(model, run_dir / "adapter", task_type="SEQ_CLS")
    return model.eval(), tok, res


def _run_rows(run_cfg: dict[str, Any], **override: Any) -> tuple[list, list]:
    """(training rows, evaluation rows) of a GLUE run, chosen exactly as its training chose them: where a
    local folder has only a dev file, the rows it trained on are kept out of the evaluation rows."""
    from types import SimpleNamespace

    from .tasks import _glue_examples

    fields_ = {"data_dir": None, "data_source": "auto", "max_train_samples": None, "max_eval_samples": None,
               "seed": 0, **run_cfg, **override}
    return _glue_examples(SimpleNamespace(**fields_), run_cfg["task"])


def _batches(rows: list, tok, run_cfg: dict[str, Any], batch_size: int, *, by_length: bool = False
             ) -> list[dict[str, Any]]:
    """Padded batches of ``rows``; ``by_length`` groups rows of similar length (a third less padding to run
    on SST-2 dev; metrics do not depend on the order, densities never count padding)."""
    import torch
    from transformers import DataCollatorWithPadding

    from .data import GlueDataset

    ds = GlueDataset(rows, tok, run_cfg["max_length"])
    if by_length and len(ds):
        ids = ds.encodings["input_ids"]
        ds = torch.utils.data.Subset(ds, sorted(range(len(ds)), key=lambda i: len(ids[i])))
    return list(torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tok)))


def _drop_labels(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


def _eval_loader(run_cfg: dict[str, Any], tok, n: int | None, batch_size: int):
    return _batches(_run_rows(run_cfg, max_eval_samples=n)[1], tok, run_cfg, batch_size)


def evaluate_glue(model, batches, task: str) -> tuple[dict[str, float], float]:
    """(GLUE metrics, seconds of model time) of ``model`` over labelled ``batches``."""
    import torch

    from .data import glue_metrics

    preds, refs, secs = [], [], 0.0
    with torch.no_grad():
        for b in batches:
            inputs = {k: v for k, v in b.items() if k != "labels"}
            t0 = time.perf_counter()
            logits = model(**inputs).logits
            secs += time.perf_counter() - t0
            preds.append(logits)
            refs.append(b["labels"])
    return glue_metrics(task, torch.cat(preds), torch.cat(refs)), secs


def skip(args: SkipArgs) -> dict[str, Any]:
    """Choose MLP blocks to skip under ``max_drop``, then measure metric, runtime and weights of the result."""
    from .methods import count_parameters
    from .core.report import measure_density
    from .inference.skip import choose_skips, skip_mlp_blocks
    from .core.threshold import apply_thresholds, find_thresholds, load_thresholds

    run_dir = Path(args.run)
    if not (run_dir / "results.json").exists():
        raise RunError(f"{run_dir} has no results.json: pass a finished run folder to --run")
    model, tok, res = _load_run_model(run_dir)
    cfg, main = res["config"], res["main_metric"]
    batches = _eval_loader(cfg, tok, args.max_eval_samples, args.batch_size)
    report = DensityReport.from_dict(res["density"])
    th_file = find_thresholds(run_dir) if args.use_thresholds else None
    thresholds = load_thresholds(th_file, model) if th_file else None

    def load():
        # the model as served: with its thresholds, every candidate is judged under the same sparsity
        m = _load_run_model(run_dir)[0]
        if thresholds:
            apply_thresholds(m, thresholds)
        return m

    def metric(m) -> float:
        return 100 * evaluate_glue(m, batches, cfg["task"])[0][main]

    density = None
    if thresholds:
        measured = measure_density(model, [_drop_labels(b) for b in batches], thresholds=thresholds)
        density = {"effective": measured.overall, "exact": measured.exact_overall, "thresholds": str(th_file)}
        print(f"deft: evaluating under {th_file}: effective density {100 * measured.overall:.2f} %, "
              f"exact-zero density {100 * measured.exact_overall:.2f} %")
        apply_thresholds(model, thresholds)
    base_metrics, base_time = evaluate_glue(model, batches, cfg["task"])
    choice = choose_skips(load, report, metric, max_drop=args.max_drop, baseline=100 * base_metrics[main])
    params_before = count_parameters(model).total
    skipped, info = skip_mlp_blocks(load(), report, 0.0, layers=choice["skip_layers"])
    skip_metrics, skip_time = evaluate_glue(skipped, batches, cfg["task"])
    out = {
        "run": str(run_dir), "main_metric": main, "max_drop_points": args.max_drop,
        "skipped_layers": choice["skip_layers"], "skipped_modules": info.skipped,
        "layer_densities": [l.density for l in report.layers],
        "metric_before": base_metrics[main], "metric_after": skip_metrics[main],
        "model_seconds_before": base_time, "model_seconds_after": skip_time,
        "runtime_change_percent": 100 * (skip_time - base_time) / base_time if base_time else None,
        "params_before": params_before, "params_freed": info.freed_params,
        "memory_change_percent": -100 * info.freed_params / params_before,
        "density_before": density,  # effective and exact-zero density under thresholds.json (None without)
        "trace": choice["trace"],
    }
    write_json(Path(args.output or run_dir) / "skip.json", out)
    print(f"skipped MLP blocks {choice['skip_layers']} of {len(report.layers)}; {main}: "
          f"{100 * out['metric_before']:.2f} -> {100 * out['metric_after']:.2f}; model time "
          f"{base_time:.2f}s -> {skip_time:.2f}s; weights freed {info.freed_params:,} ({out['memory_change_percent']:.1f}%)")
    return out


# ---------------------------------------------------------------------------------------------- measure
def measure(args: MeasureArgs) -> DensityReport:
    """Density of a model (optionally with a trained adapter) on a GLUE dev set."""
    import torch
    from transformers import DataCollatorWithPadding

    from .data import GlueDataset
    from .methods import load_trainable
    from .core.report import measure_density
    from .core.threshold import find_thresholds, load_thresholds

    model, tok = load_model_and_tokenizer(args.model, args.task, trust_remote_code=args.trust_remote_code,
                                          activation=args.activation)
    if args.adapter:
        model = load_trainable(model, args.adapter, task_type="SEQ_CLS")
    th_file = find_thresholds(args.adapter) if args.adapter and args.use_thresholds else None
    if th_file and args.threshold:
        raise ConfigError(f"--threshold {args.threshold:g} and {th_file} both set counting thresholds; drop "
                          "--threshold or pass --no-use-thresholds")
    thresholds = load_thresholds(th_file, model, sites=args.sites) if th_file else None
    dev = GlueDataset(_load_split(args, args.task, "dev", args.max_eval_samples, 0), tok, args.max_length)
    collate = DataCollatorWithPadding(tok)
    loader = torch.utils.data.DataLoader(dev, batch_size=args.batch_size, collate_fn=collate)
    batches = ({k: v for k, v in b.items() if k != "labels"} for b in loader)
    report = measure_density(model, batches, threshold=args.threshold, include_padding=args.include_padding,
                             sites=args.sites, thresholds=thresholds)
    if th_file:
        print(f"per-layer thresholds: {th_file} (applied; density below is the effective density)")
    print(report.table())
    if args.output:
        write_json(Path(args.output) / "density.json", {"density": report.to_dict(), "args": asdict(args)})
    return report
