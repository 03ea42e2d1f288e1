"""Where does a model trained under thresholds lose its accuracy? Score one finished GLUE run three ways.

* with every layer's threshold (the model as served: this is the run's own metric);
* with no threshold at all (the adapter it learned, run dense: is the adapter itself weaker than PEFT's?);
* with one layer's threshold removed at a time (does one layer's mask hold most of the loss?).

Same dev rows and batching as ``deft compare``'s baseline curve (``deft.recipes.evaluate``), so the first
number equals the run's ``results.json`` metric.

    python benchmarks/mask_ablation.py --run runs/suite/sst2-12k-td02/deft-seed0 --output runs/ablation.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from deft.core.threshold import apply_thresholds, load_thresholds
from deft.errors import DeftError
from deft.recipes.evaluate import evaluate_glue, labelled_batches, load_run_model, merge_adapter, run_rows

from _common import machine, write_json


def ablate(run_dir: Path, batch_size: int | None = None) -> dict[str, Any]:
    if not (run_dir / "results.json").exists():
        raise DeftError(f"{run_dir}: no results.json (not a finished deft train run)")
    model, tok, res = load_run_model(run_dir)
    model = merge_adapter(model)  # as served; the site names are the same before and after
    thresholds = load_thresholds(run_dir, model)
    cfg, main = res["config"], res["main_metric"]
    _, dev_rows = run_rows(cfg)
    dev = labelled_batches(dev_rows, tok, cfg, batch_size or cfg.get("eval_batch_size", 64), by_length=True)

    def score(th: dict[str, float]) -> float:
        if not th:
            return evaluate_glue(model, dev, cfg["task"])[0][main]
        with apply_thresholds(model, th):
            return evaluate_glue(model, dev, cfg["task"])[0][main]

    out: dict[str, Any] = {"run": str(run_dir), "metric": main, "all_thresholds": score(thresholds)}
    out["no_thresholds"] = score({})
    out["without_one_layer"] = {n: score({k: v for k, v in thresholds.items() if k != n}) for n in thresholds}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished run trained with --target-density")
    ap.add_argument("--batch-size", type=int, default=None, help="eval batch size (default: the run's)")
    ap.add_argument("--output", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    try:
        out = ablate(args.run, args.batch_size)
    except DeftError as e:
        raise SystemExit(f"mask_ablation: {e}") from None
    out["machine"] = machine()
    every, none = 100 * out["all_thresholds"], 100 * out["no_thresholds"]
    print(f"{out['metric']} with every threshold: {every:.2f} %; without any: {none:.2f} %")
    for name, v in out["without_one_layer"].items():
        print(f"  without {name}'s threshold: {100 * v:.2f} %")
    write_json(args.output, out)
    return out


if __name__ == "__main__":
    main()
