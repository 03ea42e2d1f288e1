"""``deft compare``: PEFT (alpha=0) vs DEFT (alpha) over seeds, everything else equal, with the
training-free baseline (each finished run thresholded per layer, TEAL-style) and the iso-accuracy table.

Finished runs are reused, so a comparison resumes; compare.json / compare.csv / compare.md, the layerwise
plot and tradeoff.png / .svg (metric vs effective density, the baseline curve beside the trained runs) are
written atomically under ``output``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..analysis.tradeoff import mean_std
from ..core.report import DensityReport, density_change
from ..fields import build, flat, options
from ..fields import help_field as _h
from ..io import write_json, write_text
from .evaluate import evaluate_glue, labelled_batches, load_run_model, merge_adapter, run_rows
from .train import RunArgs, TrainArgs, train


@dataclass
class CompareRunArgs(RunArgs):
    output: str = _h("folder for the runs, compare.json/csv and the plot", default="runs/compare")


@dataclass
class CompareArgs(TrainArgs):
    """Arguments of ``deft compare``: PEFT (alpha 0, no thresholds) vs DEFT (the density options given: by default
    training under thresholds; --preset paper: the paper's density loss) with everything else equal. With
    ``--distill W`` and no ``--teacher``, each DEFT run distills from the same seed's PEFT run."""

    run: CompareRunArgs = field(default_factory=CompareRunArgs)
    seeds: list[int] = _h("seeds; each runs PEFT and DEFT", default_factory=lambda: [0])
    baseline_densities: list[float] = _h(
        "target densities of the '+ thresholds' curves: each finished run thresholded per layer (TEAL-style, "
        "thresholds calibrated on training rows only) and evaluated on dev (`baseline_densities: []` in a --config "
        "file: no curves)",
        default_factory=lambda: [0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05],
    )
    calib_samples: int = _h("training rows (a seeded subset) the per-layer thresholds are calibrated on", default=512)
    max_drop: float = _h("iso-accuracy: largest drop from dense PEFT's mean metric, in points", default=0.5)


# ---------------------------------------------------------------------------------------------- compare
def compare(args: CompareArgs) -> dict[str, Any]:
    """PEFT (alpha=0) and DEFT (alpha) for each seed; finished runs are reused, so it resumes."""
    from ..analysis.plots import layerwise_density
    from ..analysis.report_plots import iso_accuracy_plot

    out = Path(args.run.output)
    runs: dict[str, list[dict[str, Any]]] = {"PEFT": [], "DEFT": []}
    for seed in args.seeds:
        for label, alpha in (("PEFT", 0.0), ("DEFT", args.density.alpha)):
            run_dir = out / f"{label.lower()}-seed{seed}"
            if (run_dir / "results.json").exists() and not args.run.overwrite:
                res = json.loads((run_dir / "results.json").read_text())
                print(f"deft: reusing finished run {run_dir}")
            else:
                kw = {k: v for k, v in flat(args).items() if k in options(TrainArgs)}
                kw.update(seed=seed, alpha=alpha, output=str(run_dir), resume=True)
                if label == "PEFT":  # the plain PEFT baseline: no masking and no distillation either
                    kw.update(target_density=None, distill=0.0, teacher=None)
                elif args.density.distill > 0 and not args.backbone.teacher:
                    # distillation in a comparison: the dense teacher is the same seed's PEFT run, trained just
                    # before (the student's own unmasked outputs cost points: docs/RESULTS.md, ablation)
                    kw.update(teacher=str(out / f"peft-seed{seed}"))
                print(f"deft: training {label} (alpha={alpha:g}, seed={seed}) -> {run_dir}")
                res = train(build(TrainArgs, kw))
            runs[label].append(res)

    summary = summarize(runs)
    curves = threshold_curves(args, runs)
    iso = compare_iso_accuracy(runs, curves, args.max_drop)
    reports = {k: [DensityReport.from_dict(r["density"]) for r in v] for k, v in runs.items()}
    plot = layerwise_density(
        reports, out / "layerwise_density.png", title=f"{args.backbone.model} / {args.data.task} / {args.peft.method}"
    )
    payload = {
        "summary": summary,
        "config": flat(args),
        "runs": {
            k: [
                {
                    "seed": r["config"]["seed"],
                    "metric": r["metric"],
                    "density": r["density"]["overall"],
                    "dir": r["config"]["output"],
                }
                for r in v
            ]
            for k, v in runs.items()
        },
        "threshold_curves": curves,
        "iso_accuracy": iso,
    }
    write_json(out / "compare.json", payload)
    curve_png, _ = iso_accuracy_plot(
        payload,
        out / "tradeoff",
        title=f"{args.backbone.model} / {args.data.task} / {args.peft.method}: metric vs effective density",
    )
    write_text(out / "compare.csv", _csv(summary))
    table = format_table(summary)
    iso_table = format_iso_table(iso, summary["main_metric"])
    write_text(out / "compare.md", table + "\n\n" + iso_table + "\n")
    print(table)
    print("\n" + iso_table)
    print(f"\ntable: {out / 'compare.md'} (also compare.json, compare.csv)\nplots: {plot}, {curve_png}")
    return summary


# The training-free baseline every DEFT result must beat: the PEFT model thresholded per layer
# (TEAL-style). Curves are keyed by the run kind they threshold.
BASELINE_KIND = "PEFT + thresholds"


def _thresholds_kind(label: str) -> str:
    return f"{label} + thresholds"


def _curve_skip_reason(res: dict[str, Any]) -> str | None:
    from ..data import GLUE_TASKS

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
            per_seed.append(
                {
                    "seed": r["config"]["seed"],
                    "dir": str(run_dir),
                    "points": _cached_curve(run_dir, label, densities, args),
                }
            )
        points = []
        for i, d in enumerate(densities):
            at = [s["points"][i] for s in per_seed]
            m, ms = mean_std([p["metric"] for p in at])
            e, es = mean_std([p["density"] for p in at])
            x, _ = mean_std([p["exact_density"] for p in at])
            points.append(
                {
                    "target_density": d,
                    "metric_mean": m,
                    "metric_std": ms,
                    "density_mean": e,
                    "density_std": es,
                    "exact_density_mean": x,
                }
            )
        curves[_thresholds_kind(label)] = {"points": points, "seeds": per_seed}
    return curves


def _cached_curve(run_dir: Path, label: str, densities: list[float], args: CompareArgs) -> list[dict[str, Any]]:
    """threshold_curve, kept in RUN/threshold_curve.json so that rerunning a comparison (it reuses finished
    runs) does not evaluate them again; recomputed when the run, the targets or the calibration size change."""
    import hashlib

    cache = run_dir / "threshold_curve.json"
    key = {
        "densities": densities,
        "calib_samples": args.calib_samples,
        "results_sha1": hashlib.sha1((run_dir / "results.json").read_bytes()).hexdigest(),
    }
    if cache.exists() and not args.run.overwrite:
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


def threshold_curve(
    run_dir: str | Path, densities: list[float], *, calib_samples: int = 512, batch_size: int | None = None
) -> list[dict[str, Any]]:
    """One finished GLUE run thresholded per layer at each target density: per point the dev metric, the
    effective density (``|h| > t_layer`` at the W2 inputs), the exact-zero density and the thresholds.

    The thresholds come from one calibration pass over a seeded subset of ``calib_samples`` of the rows
    the run trained on (never its dev rows); every target is then scored on the same dev batches, the
    ones the run's own metric was computed on, with the sub-threshold W2 inputs zeroed.
    """
    from .. import sparse
    from ..core.report import count_thresholded
    from ..tasks import drop_labels, seeded_subset

    run_dir = Path(run_dir)
    model, tok, res = load_run_model(run_dir)
    model = merge_adapter(model)  # as served, and cheaper to run; site names are the same before and after
    cfg, main = res["config"], res["main_metric"]
    bs = batch_size or cfg.get("eval_batch_size", 64)
    train_rows, dev_rows = run_rows(cfg)
    calib_rows = seeded_subset(train_rows, calib_samples, cfg["seed"])
    calib = [drop_labels(b) for b in labelled_batches(calib_rows, tok, cfg, bs, by_length=True)]
    dev = labelled_batches(dev_rows, tok, cfg, bs, by_length=True)
    include_padding = cfg.get("include_padding", False)
    by_target = sparse.calibrate_threshold_curve(model, calib, densities, include_padding=include_padding)
    points = []
    for d in densities:
        (metrics, _), report = count_thresholded(
            model, by_target[d], lambda: evaluate_glue(model, dev, cfg["task"]), include_padding=include_padding
        )
        points.append(
            {
                "target_density": d,
                "metric": metrics[main],
                "density": report.overall,
                "exact_density": report.exact_overall,
                "thresholds": by_target[d],
            }
        )
    return points


def compare_iso_accuracy(
    runs: dict[str, list[dict[str, Any]]], curves: dict[str, Any], max_drop: float
) -> dict[str, Any]:
    """compare.json's ``iso_accuracy`` block: per run kind (plain runs: one point each, mean over seeds;
    "+ thresholds" curves: one point per target), the lowest effective density within ``max_drop`` points
    of dense PEFT's mean metric, the metric there, and the metric at the density the training-free
    baseline reaches (see :func:`deft.analysis.tradeoff.iso_accuracy`). Metrics and densities are fractions."""
    from ..analysis.tradeoff import iso_accuracy

    kinds: dict[str, list[tuple[float, float]]] = {}
    for label, rs in runs.items():
        m, _ = mean_std([r["metric"] for r in rs])
        d, _ = mean_std([r["density"]["overall"] for r in rs])
        kinds[label] = [(d, m)]
    for kind, c in curves.items():
        kinds[kind] = [(p["density_mean"], p["metric_mean"]) for p in c["points"]]
    reference, _ = mean_std([r["metric"] for r in runs["PEFT"]])
    out = iso_accuracy(
        kinds, reference, max_drop / 100.0, matched_kind=BASELINE_KIND if BASELINE_KIND in kinds else None
    )
    out.update(reference_kind="PEFT", max_drop_points=max_drop)
    return out


def format_iso_table(iso: dict[str, Any], metric: str) -> str:
    """The iso-accuracy table: per run kind, the lowest effective density within max-drop and the metric."""
    matched = iso.get("matched_density")
    head = [
        "run",
        "lowest eff. density (%)",
        f"{metric} there (%)",
        f"{metric} at {100 * matched:.2f} % (%)" if matched is not None else f"{metric} at baseline's (%)",
    ]

    def pct(v: float | None) -> str:
        return "-" if v is None or math.isnan(v) else f"{100 * v:.2f}"

    body = [
        [k, pct(v["density"]), pct(v["metric"]), pct(v["metric_at_matched_density"])] for k, v in iso["kinds"].items()
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    title = (
        f"Iso-accuracy: lowest effective density within {iso['max_drop_points']:g} points of dense "
        f"{iso['reference_kind']} ({metric} {pct(iso['reference'])} %); last column: at the density "
        f"{iso.get('matched_kind') or BASELINE_KIND} reaches there"
    )
    lines = [title, ""]
    for row in [head, ["-" * w for w in widths], *body]:
        lines.append(
            "| "
            + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            + " |"
        )
    return "\n".join(lines)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for label, rs in runs.items():
        m, ms = mean_std([r["metric"] for r in rs])
        d, ds = mean_std([r["density"]["overall"] for r in rs])
        u, us = mean_std([r["density"].get("union_overall", float("nan")) for r in rs])
        rows[label] = {
            "metric_mean": m,
            "metric_std": ms,
            "density_mean": d,
            "density_std": ds,
            "union_density_mean": u,
            "union_density_std": us,
            "seeds": [r["config"]["seed"] for r in rs],
            "trainable_percent": rs[0]["trainable_percent"] if rs else None,
        }
    first = next(iter(runs.values()))[0]
    change = density_change(rows["PEFT"]["density_mean"], rows["DEFT"]["density_mean"])
    return {
        "task": first["task"],
        "main_metric": first["main_metric"],
        "model": first["config"]["model"],
        "method": first["config"]["method"],
        "alpha": runs["DEFT"][0]["config"]["alpha"],
        # the default recipe trains DEFT under thresholds (at alpha 0): the title says so
        "target_density": runs["DEFT"][0]["config"].get("target_density"),
        "data": first.get("data"),
        "rows": rows,
        "density_change_percent": change,
        "metric_change_points": 100 * (rows["DEFT"]["metric_mean"] - rows["PEFT"]["metric_mean"]),
    }


def format_table(summary: dict[str, Any]) -> str:
    """The paper-style table: metric mean ± std, density mean ± std, Density Change %."""
    metric = summary["main_metric"]
    lines = [
        f"{summary['model']} / {summary['task']} / {summary['method']} (DEFT alpha={summary['alpha']:g}"
        + (f", target density {target:g}" if (target := summary.get("target_density")) else "")
        + f"); data: {summary['data']}",
        "",
    ]
    head = ["run", f"{metric} (%)", "density (%)", "union density (%)", "trainable %"]
    body = [
        [
            label,
            f"{100 * r['metric_mean']:.2f} ± {100 * r['metric_std']:.2f}",
            f"{100 * r['density_mean']:.2f} ± {100 * r['density_std']:.2f}",
            f"{100 * r['union_density_mean']:.2f}",
            f"{r['trainable_percent']:.3f}",
        ]
        for label, r in summary["rows"].items()
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    for row in [head, ["-" * w for w in widths], *body]:
        lines.append(
            "| "
            + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            + " |"
        )
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
