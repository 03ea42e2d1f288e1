"""``deft energy``, ``deft sweep`` and ``deft report``: argument dataclasses and the functions behind them.

:data:`EXTRA_COMMANDS` maps each command name to ``(args class, help, function(args))`` in the shape of
:data:`deft.cli.COMMANDS`, so the CLI builds their flags from the dataclass fields like it does for
``train``. A field with ``metadata["positional"]`` is meant as a positional argument (``deft report
RUN_DIR...``); until the parser knows that flag it is accepted as ``--run-dirs``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .analysis.energy import EnergyConfig, EnergyReport, estimate_energy
from .fields import help_field as _h
from .io import write_json, write_text
from .run import RunError
from .sweep import SweepArgs, sweep
from .tune import TuneArgs, tune


@dataclass
class EnergyArgs:
    """Arguments of ``deft energy``: energy of a model (or trained adapter) on a task's dev set on a dense
    vs a zero-skipping accelerator (Sponge-style 45 nm cost model; --hardware changes the prices)."""

    model: str = _h("model alias, local path or hub id", default="minilm")
    task: str = _h("GLUE task whose dev set is run", default="sst2")
    adapter: str | None = _h("a run's adapter folder (RUN/adapter) to load on the model", default=None)
    merge_lora: bool = _h("merge LoRA / IA3 weights into the model first, as deployed (else priced apart)",
                          default=True)
    use_thresholds: bool = _h("run under the adapter's thresholds.json when it has one: entries below a layer's "
                              "threshold are priced as skipped (effective density)", default=True)
    hardware: str | None = _h("YAML/JSON file of EnergyConfig fields (mac_pj, dram_pj, sram_pj, ...)", default=None)
    data_dir: str | None = _h("GLUE folder with TASK/{train,dev}.tsv", default=None)
    data_source: str = _h("auto, local, hub or builtin", default="auto")
    max_eval_samples: int | None = _h("seeded subset of the dev set", default=None)
    max_length: int = _h("maximum tokens per example", default=128)
    batch_size: int = _h("batch size (padding is not counted, so it does not change the result)", default=64)
    include_padding: bool = _h("count padded positions as computed", default=False)
    per_layer: bool = _h("also print the per-layer table", default=False)
    output: str | None = _h("folder for energy.json, energy.md and the breakdown plot (a run folder: the "
                            "report picks it up)", default=None)
    activation: str | None = _h("the activation the adapter was trained with (deft train --activation)", default=None)
    trust_remote_code: bool = _h("allow model code from the hub", default=False)


@dataclass
class ReportArgs:
    """Arguments of ``deft report``: one self-contained HTML page and a Markdown report from finished runs."""

    run_dirs: list[str] = field(
        default_factory=list,
        metadata={"help": "run, compare or sweep folders (results.json / compare.json / sweep.jsonl)",
                  "positional": True},
    )
    output: str = _h("folder for report.html, report.md and figures/", default="runs/report")
    title: str = _h("report title", default="DEFT report")


def _merge(model):
    """peft's merge for LoRA/IA3; methods that cannot merge (prompts, prefixes) are priced as they run."""
    if not hasattr(model, "merge_and_unload"):
        return model
    try:
        return model.merge_and_unload()
    except (AttributeError, ValueError, TypeError, NotImplementedError):
        return model


def energy(args: EnergyArgs) -> EnergyReport:
    """Run the dev set through the model with the energy counters attached; print and save the report."""
    import torch
    from transformers import DataCollatorWithPadding

    from .data import GlueDataset
    from .methods import load_trainable
    from .analysis.report_plots import energy_breakdown
    from .run import _load_split, load_model_and_tokenizer

    cfg = EnergyConfig.from_file(args.hardware) if args.hardware else EnergyConfig()  # fail before loading
    model, tok = load_model_and_tokenizer(args.model, args.task, trust_remote_code=args.trust_remote_code,
                                          activation=args.activation)
    if args.adapter:
        model = load_trainable(model, args.adapter, task_type="SEQ_CLS")
        if args.merge_lora:
            model = _merge(model)
    from .core.threshold import find_thresholds, load_thresholds

    th_file = find_thresholds(args.adapter) if args.adapter and args.use_thresholds else None
    thresholds = load_thresholds(th_file, model) if th_file else None  # names hold before and after merging
    dev = GlueDataset(_load_split(args, args.task, "dev", args.max_eval_samples, 0), tok, args.max_length)
    loader = torch.utils.data.DataLoader(dev, batch_size=args.batch_size, collate_fn=DataCollatorWithPadding(tok))
    batches = ({k: v for k, v in b.items() if k != "labels"} for b in loader)
    report = estimate_energy(model, batches, cfg, include_padding=args.include_padding, thresholds=thresholds)
    if th_file:
        print(f"per-layer thresholds: {th_file} (applied; W2 inputs at or below them priced as skipped)")
    print(report.table(per_layer=args.per_layer))
    if args.output:
        out = Path(args.output)
        write_json(out / "energy.json", {"energy": report.to_dict(), "args": asdict(args)})
        write_text(out / "energy.md", "```\n" + report.table(per_layer=True) + "\n```\n")
        png, _ = energy_breakdown({Path(args.adapter).parent.name if args.adapter else args.model: report},
                                  out / "energy_breakdown", title=f"{args.task}: dense vs zero-skip energy")
        print(f"\nenergy: {out / 'energy.json'} (also energy.md)\nplot:   {png}")
    return report


def report(args: ReportArgs) -> tuple[Path, Path]:
    from .analysis.report import build_report

    if not args.run_dirs:
        raise RunError("name at least one run, compare or sweep folder (RUN_DIRS)")
    html_path, md_path = build_report(args.run_dirs, args.output, title=args.title)
    print(f"report: {html_path}\n        {md_path}")
    return html_path, md_path


EXTRA_COMMANDS: dict[str, tuple[type, str, Callable[[Any], Any]]] = {
    "energy": (EnergyArgs, "energy on a dense vs a zero-skipping accelerator (Sponge-style cost model)", energy),
    "sweep": (SweepArgs, "train a grid of alphas / eps / betas / methods / seeds; resumable", sweep),
    "report": (ReportArgs, "self-contained HTML + Markdown report (tables, plots, configs) of finished runs",
               report),
    "tune": (TuneArgs, ("multi-objective search (metric up, density down) over train options; resumable, "
                        "many workers can share one study"), tune),
}
