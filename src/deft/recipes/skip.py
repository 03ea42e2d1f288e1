"""``deft skip``: ADA-DEFT block skipping on a finished run. Choose the (nearly) silent MLP blocks whose
removal costs at most ``max_drop`` points on the dev rows, then measure metric, runtime and freed weights
(the mechanics are :mod:`deft.inference.skip`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.report import DensityReport
from ..fields import help_field as _h
from ..io import write_json
from .common import RunError
from .evaluate import eval_loader, evaluate_glue, load_run_model


@dataclass
class SkipArgs:
    """Arguments of ``deft skip``: drop (nearly) silent MLP blocks of a trained run (ADA-DEFT)."""

    run: str = _h("a finished run folder (with results.json and adapter/)", default="runs/train")
    max_drop: float = _h("largest accepted metric drop, in points (e.g. 0.5)", default=0.5)
    max_eval_samples: int | None = _h("seeded subset of the dev set used to choose and measure", default=None)
    batch_size: int = _h("evaluation batch size", default=64)
    use_thresholds: bool = _h("evaluate under the run's adapter/thresholds.json when it has one", default=True)
    output: str | None = _h("write skip.json here (default: the run folder)", default=None)


def _check_glue_run(run_dir: Path) -> None:
    """A RunError unless ``run_dir`` is a GLUE run: choosing the blocks to skip needs the dev metric after each
    candidate, and only GLUE's is computed here today."""
    import json

    from ..tasks import find_setup, glue

    task = json.loads((run_dir / "results.json").read_text())["config"]["task"]
    if find_setup(task) is not glue.setup:
        raise RunError(
            f"deft skip scores GLUE runs only (sst2, mrpc, ...: their dev metric after each skipped block); "
            f"{run_dir} is a {task!r} run"
        )


def skip(args: SkipArgs) -> dict[str, Any]:
    """Choose MLP blocks to skip under ``max_drop``, then measure metric, runtime and weights of the result."""
    from ..core.report import measure_density
    from ..core.threshold import apply_thresholds, find_thresholds, load_thresholds
    from ..inference.skip import choose_skips, skip_mlp_blocks
    from ..methods import count_parameters
    from ..tasks import drop_labels

    run_dir = Path(args.run)
    if not (run_dir / "results.json").exists():
        raise RunError(f"{run_dir} has no results.json: pass a finished run folder to --run")
    _check_glue_run(run_dir)
    model, tok, res = load_run_model(run_dir)
    cfg, main = res["config"], res["main_metric"]
    batches = eval_loader(cfg, tok, args.max_eval_samples, args.batch_size)
    report = DensityReport.from_dict(res["density"])
    th_file = find_thresholds(run_dir) if args.use_thresholds else None
    thresholds = load_thresholds(th_file, model) if th_file else None

    def load():
        # the model as served: with its thresholds, every candidate is judged under the same sparsity
        m = load_run_model(run_dir)[0]
        if thresholds:
            apply_thresholds(m, thresholds)
        return m

    def metric(m) -> float:
        return 100 * evaluate_glue(m, batches, cfg["task"])[0][main]

    density = None
    if thresholds:
        measured = measure_density(model, [drop_labels(b) for b in batches], thresholds=thresholds)
        exact = measured.exact_overall  # None only when no layer saw a token
        density = {"effective": measured.overall, "exact": exact, "thresholds": str(th_file)}
        print(
            f"deft: evaluating under {th_file}: effective density {100 * measured.overall:.2f} %, "
            f"exact-zero density {'n/a' if exact is None else f'{100 * exact:.2f}'} %"
        )
        apply_thresholds(model, thresholds)
    base_metrics, base_time = evaluate_glue(model, batches, cfg["task"])
    choice = choose_skips(load, report, metric, max_drop=args.max_drop, baseline=100 * base_metrics[main])
    params_before = count_parameters(model).total
    skipped, info = skip_mlp_blocks(load(), report, 0.0, layers=choice["skip_layers"])
    skip_metrics, skip_time = evaluate_glue(skipped, batches, cfg["task"])
    out = {
        "run": str(run_dir),
        "main_metric": main,
        "max_drop_points": args.max_drop,
        "skipped_layers": choice["skip_layers"],
        "skipped_modules": info.skipped,
        "layer_densities": [layer.density for layer in report.layers],
        "metric_before": base_metrics[main],
        "metric_after": skip_metrics[main],
        "model_seconds_before": base_time,
        "model_seconds_after": skip_time,
        "runtime_change_percent": 100 * (skip_time - base_time) / base_time if base_time else None,
        "params_before": params_before,
        "params_freed": info.freed_params,
        "memory_change_percent": -100 * info.freed_params / params_before,
        "density_before": density,  # effective and exact-zero density under thresholds.json (None without)
        "trace": choice["trace"],
    }
    write_json(Path(args.output or run_dir) / "skip.json", out)
    print(
        f"skipped MLP blocks {choice['skip_layers']} of {len(report.layers)}; {main}: "
        f"{100 * out['metric_before']:.2f} -> {100 * out['metric_after']:.2f}; model time "
        f"{base_time:.2f}s -> {skip_time:.2f}s; "
        f"weights freed {info.freed_params:,} ({out['memory_change_percent']:.1f}%)"
    )
    return out
