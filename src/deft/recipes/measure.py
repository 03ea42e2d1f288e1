"""``deft measure`` and ``deft energy``: a model (or a trained adapter) run over a task's dev set, counted.

``measure`` reports the activation density per layer (the effective density under the adapter's
``thresholds.json``); ``energy`` prices the same pass on a dense vs a zero-skipping accelerator
(:mod:`deft.analysis.energy`).

Any task of the registry (:mod:`deft.tasks`: GLUE, squad, image, lm-instruct) works: the model, the eval
rows and the batches are the ones ``deft train`` evaluates on, less the loss's label keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..analysis.energy import EnergyConfig, EnergyReport, estimate_energy
from ..core.report import DensityReport
from ..errors import ConfigError
from ..fields import help_field as _h
from ..io import write_json, write_text
from .evaluate import DATA_DIR_HELP, TASK_NAMES, input_batches, load_adapter, task_setup

TASK_HELP = f"task whose eval set is run: {TASK_NAMES}"


@dataclass
class MeasureArgs:
    """Arguments of ``deft measure``: activation density of a model or trained adapter on a task's dev set."""

    model: str = _h("model alias, local path or hub id", default="minilm")
    task: str = _h(TASK_HELP, default="sst2")
    adapter: str | None = _h("a run's adapter folder (RUN/adapter) to load on the model", default=None)
    data_dir: str | None = _h(DATA_DIR_HELP, default=None)
    data_source: str = _h("auto, local, hub or builtin", default="auto", choices=("auto", "local", "hub", "builtin"))
    max_eval_samples: int | None = _h("seeded subset of the eval set", default=None)
    max_length: int = _h("maximum tokens per example (text tasks)", default=128)
    batch_size: int = _h("batch size", default=64)
    threshold: float = _h("|x| > threshold counts as non-zero", default=0.0)
    include_padding: bool = _h("count padded positions", default=False)
    sites: list[str] | None = _h("module-name globs for unknown model types", default=None)
    activation: str | None = _h("the activation the adapter was trained with (deft train --activation)", default=None)
    use_thresholds: bool = _h(
        "apply the adapter's thresholds.json when it has one (the effective density is then "
        "measured beside the exact-zero one)",
        default=True,
    )
    output: str | None = _h("write density.json here (a folder)", default=None)
    trust_remote_code: bool = _h("allow model code from the hub", default=False)


@dataclass
class EnergyArgs:
    """Arguments of ``deft energy``: energy of a model (or trained adapter) on a task's dev set on a dense
    vs a zero-skipping accelerator (Sponge-style 45 nm cost model; --hardware changes the prices)."""

    model: str = _h("model alias, local path or hub id", default="minilm")
    task: str = _h(TASK_HELP, default="sst2")
    adapter: str | None = _h("a run's adapter folder (RUN/adapter) to load on the model", default=None)
    merge_lora: bool = _h(
        "merge LoRA / IA3 weights into the model first, as deployed (else priced apart)", default=True
    )
    use_thresholds: bool = _h(
        "run under the adapter's thresholds.json when it has one: entries below a layer's "
        "threshold are priced as skipped (effective density)",
        default=True,
    )
    hardware: str | None = _h("YAML/JSON file of EnergyConfig fields (mac_pj, dram_pj, sram_pj, ...)", default=None)
    data_dir: str | None = _h(DATA_DIR_HELP, default=None)
    data_source: str = _h("auto, local, hub or builtin", default="auto")
    max_eval_samples: int | None = _h("seeded subset of the eval set", default=None)
    max_length: int = _h("maximum tokens per example (text tasks)", default=128)
    batch_size: int = _h("batch size (padding is not counted, so it does not change the result)", default=64)
    include_padding: bool = _h("count padded positions as computed", default=False)
    per_layer: bool = _h("also print the per-layer table", default=False)
    output: str | None = _h(
        "folder for energy.json, energy.md and the breakdown plot (a run folder: the report picks it up)", default=None
    )
    activation: str | None = _h("the activation the adapter was trained with (deft train --activation)", default=None)
    trust_remote_code: bool = _h("allow model code from the hub", default=False)


def _load(args: MeasureArgs | EnergyArgs, merge: bool) -> tuple[Any, Any, Path | None, dict[str, float] | None]:
    """(task setup, its model with ``args.adapter`` loaded (merged for ``merge``), the adapter's thresholds.json
    where it is used, its thresholds)."""
    from ..core.threshold import find_thresholds, load_thresholds

    setup = task_setup(args)
    model = load_adapter(setup, args.adapter, merge=merge) if args.adapter else setup.model
    th_file = find_thresholds(args.adapter) if args.adapter and args.use_thresholds else None
    threshold = getattr(args, "threshold", 0.0)
    if th_file and threshold:
        raise ConfigError(
            f"--threshold {threshold:g} and {th_file} both set counting thresholds; drop "
            "--threshold or pass --no-use-thresholds"
        )
    thresholds = load_thresholds(th_file, model, sites=getattr(args, "sites", None)) if th_file else None
    return setup, model, th_file, thresholds


def energy(args: EnergyArgs) -> EnergyReport:
    """Run the dev set through the model with the energy counters attached; print and save the report."""
    from ..analysis.report_plots import energy_breakdown

    cfg = EnergyConfig.from_file(args.hardware) if args.hardware else EnergyConfig()  # fail before loading
    setup, model, th_file, thresholds = _load(args, merge=args.merge_lora)  # names hold before and after merging
    batches = input_batches(setup, args.batch_size)
    report = estimate_energy(model, batches, cfg, include_padding=args.include_padding, thresholds=thresholds)
    if th_file:
        print(f"per-layer thresholds: {th_file} (applied; W2 inputs at or below them priced as skipped)")
    print(report.table(per_layer=args.per_layer))
    if args.output:
        out = Path(args.output)
        write_json(out / "energy.json", {"energy": report.to_dict(), "args": asdict(args)})
        write_text(out / "energy.md", "```\n" + report.table(per_layer=True) + "\n```\n")
        png, _ = energy_breakdown(
            {Path(args.adapter).parent.name if args.adapter else args.model: report},
            out / "energy_breakdown",
            title=f"{args.task}: dense vs zero-skip energy",
        )
        print(f"\nenergy: {out / 'energy.json'} (also energy.md)\nplot:   {png}")
    return report


def measure(args: MeasureArgs) -> DensityReport:
    """Density of a model (optionally with a trained adapter) on a task's eval set."""
    from ..core.report import measure_density

    setup, model, th_file, thresholds = _load(args, merge=False)
    batches = input_batches(setup, args.batch_size)
    report = measure_density(
        model,
        batches,
        threshold=args.threshold,
        include_padding=args.include_padding,
        sites=args.sites,
        thresholds=thresholds,
    )
    if th_file:
        print(f"per-layer thresholds: {th_file} (applied; density below is the effective density)")
    print(report.table())
    if args.output:
        write_json(Path(args.output) / "density.json", {"density": report.to_dict(), "args": asdict(args)})
    return report
