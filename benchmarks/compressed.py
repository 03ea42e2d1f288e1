"""DEFT on compressed models: {dense, WANDA 50 %, WANDA 2:4, int8} x {PEFT alpha=0, DEFT}.

MiniLM (all-MiniLM-L6-v2) + LoRA on SST-2 through the ``deft.recipes`` machinery. For each compression the base
model is pruned / quantized right after loading (``deft.recipes.compress.prepare_compressed_model``), then LoRA
trains on top with or without the density loss. Reported per run: the task metric, the MLP activation
density (eval set), and the weight sparsity of the frozen base (fraction of exactly-zero weights in the
transformer blocks; int8 rounds the smallest weights of each row to 0 too).

    python benchmarks/compressed.py --quick                       # 128 train / 128 eval rows, 1 epoch
    python benchmarks/compressed.py --output runs/compressed      # builtin SST-2 sample, recipe defaults

Writes OUTPUT/compressed.json and OUTPUT/compressed.md; finished runs are reused (pass --overwrite to redo).
Each run is ``deft train --preset paper`` with ``--prune-dir`` / ``--quantize 8`` and the defaults otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from deft.core.report import density_change
from deft.fields import build
from deft.io import write_text
from deft.recipes import train as run
from deft.recipes.common import versions
from deft.recipes.compress import REPORT_NAME, PruneArgs, prune

from _common import loadavg, machine, write_json

# name -> (prune options or None, quantize bits or None)
COMPRESSIONS: dict[str, tuple[dict[str, Any] | None, int | None]] = {
    "dense": (None, None),
    "wanda50": ({"sparsity": 0.5}, None),
    "wanda2:4": ({"nm": "2:4"}, None),
    "int8": (None, 8),
}


def prune_dir_for(name: str, opts: dict[str, Any], args: argparse.Namespace) -> str:
    out = Path(args.output) / f"prune-{name.replace(':', '-')}"
    if not (out / REPORT_NAME).exists() or args.overwrite:
        prune(
            PruneArgs(
                model=args.model,
                task="sst2",
                data_dir=args.data_dir,
                data_source=args.data_source,
                calib_batches=args.calib_batches,
                output=str(out),
                save_model=False,
                overwrite=True,
                **opts,
            )
        )
    return str(out)


def one_run(
    name: str, alpha: float, args: argparse.Namespace, prune_dir: str | None, quantize: int | None
) -> dict[str, Any]:
    run_dir = Path(args.output) / f"{name.replace(':', '-')}-{'deft' if alpha > 0 else 'peft'}"
    row_file = run_dir / "compression.json"
    if (run_dir / "results.json").exists() and row_file.exists() and not args.overwrite:
        print(f"reusing {run_dir}")
        return json.loads(row_file.read_text())
    options = dict(
        preset="paper",  # the paper's exact-zero DEFT (and its plain-PEFT baseline at alpha 0), as measured
        model=args.model,
        task="sst2",
        method="lora",
        alpha=alpha,
        epochs=args.epochs,
        seed=args.seed,
        data_dir=args.data_dir,
        data_source=args.data_source,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        output=str(run_dir),
        overwrite=True,
        quiet=True,
        logging_steps=args.logging_steps,
        prune_dir=prune_dir,
        quantize=quantize,
        quant_backend="deft",
    )
    train_args = build(run.TrainArgs, run.with_preset(options))
    print(f"training {name} alpha={alpha:g} -> {run_dir}")
    t0 = time.time()
    res = run.train(train_args)
    info = res.get("compression") or {}
    if "weight_sparsity" not in info:  # dense base: prepare_compressed_model reports nothing
        info["weight_sparsity"] = {"overall": 0.0}
    row = {
        "compression": name,
        "alpha": alpha,
        "run": "DEFT" if alpha > 0 else "PEFT",
        "main_metric": res["main_metric"],
        "metric": res["metric"],
        "density": res["density"]["overall"],
        "weight_sparsity": info["weight_sparsity"]["overall"],
        "quant": info.get("quant"),
        "prune": info.get("prune"),
        "train_examples": res["train_examples"],
        "eval_examples": res["eval_examples"],
        "wall_s": round(time.time() - t0, 1),
        "dir": str(run_dir),
    }
    write_json(row_file, row, quiet=True)
    return row


def table(rows: list[dict[str, Any]], header: str) -> str:
    by = {(r["compression"], r["run"]): r for r in rows}
    metric = rows[0]["main_metric"] if rows else "metric"
    lines = [
        header,
        "",
        f"| base | run | alpha | {metric} (%) | activation density (%) | density change (%) | "
        "weight sparsity (%) | base weight bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peft = by.get((r["compression"], "PEFT"))
        change = (
            density_change(peft["density"], r["density"])
            if r["run"] == "DEFT" and peft and peft["density"] > 0
            else float("nan")
        )
        size = f"{r['quant']['bytes_after']:,} (int{r['quant']['config']['bits']})" if r.get("quant") else "float32"
        lines.append(
            f"| {r['compression']} | {r['run']} | {r['alpha']:g} | {100 * r['metric']:.2f} | "
            f"{100 * r['density']:.2f} | {'' if math.isnan(change) else f'{change:.2f}'} | "
            f"{100 * r['weight_sparsity']:.2f} | {size} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--data-source", default="builtin")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--output", default="runs/compressed")
    p.add_argument("--quick", action="store_true", help="128 train / 128 eval rows, 1 epoch, 4 calibration batches")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--calib-batches", type=int, default=None)
    p.add_argument("--alpha", type=float, default=run.read_preset("paper")["alpha"], help="DEFT density-loss weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logging-steps", type=int, default=25)
    p.add_argument("--compressions", default=",".join(COMPRESSIONS), help=f"subset of {','.join(COMPRESSIONS)}")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    quick = dict(epochs=1.0, max_train_samples=128, max_eval_samples=128, calib_batches=4) if args.quick else {}
    defaults = dict(epochs=run.TrainArgs().optim.epochs, max_train_samples=None, max_eval_samples=None, calib_batches=8)
    for k, v in {**defaults, **quick}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    names = [n.strip() for n in args.compressions.split(",") if n.strip()]
    unknown = [n for n in names if n not in COMPRESSIONS]
    if unknown:
        p.error(f"unknown compression(s) {unknown}; known: {', '.join(COMPRESSIONS)}")

    # the recipe trains on the GPU when there is one (deft.recipes.train: use_cpu=not cuda.is_available())
    before = machine("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    rows = []
    for name in names:
        prune_opts, bits = COMPRESSIONS[name]
        prune_dir = prune_dir_for(name, prune_opts, args) if prune_opts else None
        for alpha in (0.0, args.alpha):
            rows.append(one_run(name, alpha, args, prune_dir, bits))
    header = (
        f"{args.model} / sst2 / LoRA; data: {args.data_source}, train {rows[0]['train_examples']} rows, "
        f"eval {rows[0]['eval_examples']} rows, {args.epochs:g} epoch(s), seed {args.seed}"
        + (" (--quick)" if args.quick else "")
    )
    md = table(rows, header)
    out = Path(args.output)
    summary = {
        "args": vars(args),
        "rows": rows,
        "wall_s": round(time.time() - t0, 1),
        "versions": versions(),
        "machine": {**before, "loadavg_1min_after": loadavg()},
    }
    write_json(out / "compressed.json", summary, quiet=True)  # both files are named below
    write_text(out / "compressed.md", md + "\n")
    print(md)
    print(f"\n{out / 'compressed.md'}  {out / 'compressed.json'}  ({summary['wall_s']} s)")
    return summary


if __name__ == "__main__":
    main()
