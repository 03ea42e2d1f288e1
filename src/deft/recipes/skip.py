"""``deft skip``: ADA-DEFT block skipping on a finished run. Choose the (nearly) silent MLP blocks whose
removal costs at most ``max_drop`` points of the run's dev metric, then measure metric, runtime and freed
weights (the mechanics are :mod:`deft.inference.skip`).

Any task family of the registry (:mod:`deft.tasks`) works: the run's task and model are rebuilt from its
``results.json`` and ``adapter/`` and scored as ``deft train`` scored them (:func:`deft.recipes.evaluate.score`:
from the logits for GLUE, image and extractive SQuAD, by greedy generation for generative SQuAD and
lm-instruct)."""

from __future__ import annotations

import copy
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.report import DensityReport
from ..fields import help_field as _h
from ..io import write_json
from .common import RunError
from .evaluate import input_batches, load_run, score


@dataclass
class SkipArgs:
    """Arguments of ``deft skip``: drop (nearly) silent MLP blocks of a trained run (ADA-DEFT)."""

    run: str = _h("a finished run folder (with results.json and adapter/)", default="runs/train")
    max_drop: float = _h(
        "largest accepted drop of the run's main metric, in points (100 x the fraction: accuracy, F1, ...; e.g. 0.5)",
        default=0.5,
    )
    max_eval_samples: int | None = _h("seeded subset of the dev set used to choose and measure", default=None)
    batch_size: int = _h("evaluation batch size", default=64)
    use_thresholds: bool = _h("evaluate under the run's adapter/thresholds.json when it has one", default=True)
    output: str | None = _h("write skip.json here (default: the run folder)", default=None)


# every task's main metric is a fraction (TaskSetup.main_metric: accuracy, F1, EM, Matthews or Pearson
# correlation), so a point is a hundredth of it, on every family alike
POINTS = 100


def skip(args: SkipArgs) -> dict[str, Any]:
    """Choose MLP blocks to skip under ``max_drop``, then measure metric, runtime and weights of the result."""
    from ..core.report import measure_density
    from ..core.threshold import apply_thresholds, find_thresholds, load_thresholds
    from ..inference.skip import choose_skips, skip_mlp_blocks
    from ..methods import count_parameters

    run_dir = Path(args.run)
    if not (run_dir / "results.json").exists():
        raise RunError(f"{run_dir} has no results.json: pass a finished run folder to --run")
    setup, trained, res = load_run(run_dir, max_eval_samples=args.max_eval_samples)
    main = res["main_metric"]
    report = DensityReport.from_dict(res["density"])
    th_file = find_thresholds(run_dir) if args.use_thresholds else None
    thresholds = load_thresholds(th_file, trained) if th_file else None

    def load():
        # a fresh copy of the trained model (skipping replaces modules in place), as served: with its
        # thresholds, every candidate is judged under the same sparsity
        m = copy.deepcopy(trained)
        if thresholds:
            apply_thresholds(m, thresholds)
        return m

    def metric(m) -> float:
        return POINTS * score(m, setup, args.batch_size)[0][main]

    density = None
    if thresholds:
        measured = measure_density(trained, input_batches(setup, args.batch_size), thresholds=thresholds)
        exact = measured.exact_overall  # None only when no layer saw a token
        density = {"effective": measured.overall, "exact": exact, "thresholds": str(th_file)}
        print(
            f"deft: evaluating under {th_file}: effective density {100 * measured.overall:.2f} %, "
            f"exact-zero density {'n/a' if exact is None else f'{100 * exact:.2f}'} %"
        )
    model = load()
    base_metrics, base_time = score(model, setup, args.batch_size)
    choice = choose_skips(load, report, metric, max_drop=args.max_drop, baseline=POINTS * base_metrics[main])
    params_before = count_parameters(model).total
    skipped, info = skip_mlp_blocks(load(), report, 0.0, layers=choice["skip_layers"])
    skip_metrics, skip_time = score(skipped, setup, args.batch_size)
    out = {
        "run": str(run_dir),
        "task": setup.task,
        "main_metric": main,
        "max_drop_points": args.max_drop,
        "skipped_layers": choice["skip_layers"],
        "skipped_modules": info.skipped,
        "layer_densities": [layer.density for layer in report.layers],
        "metric_before": base_metrics[main],
        "metric_after": skip_metrics[main],
        "metrics_before": base_metrics,
        "metrics_after": skip_metrics,
        "eval_examples": len(setup.eval_dataset) if isinstance(setup.eval_dataset, Sized) else None,
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
        f"{POINTS * out['metric_before']:.2f} -> {POINTS * out['metric_after']:.2f}; model time "
        f"{base_time:.2f}s -> {skip_time:.2f}s; "
        f"weights freed {info.freed_params:,} ({out['memory_change_percent']:.1f}%)"
    )
    return out
