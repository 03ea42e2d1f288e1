"""Training-step cost of DEFT's modes next to plain PEFT: MiniLM + LoRA on SST-2, the demo recipe.

One optimizer step (forward + backward + gradient clipping + AdamW step + scheduler step) of a
``deft.DeftTrainer``, built as ``deft train`` builds it (LoRA r=8 on attention and MLP, batch 8,
max_length 128, real rows of the built-in SST-2 training sample, padded per batch), for each of:

    PEFT            DensityConfig(alpha=0): no loss, no masking (the probe still counts the density)
    target          DensityConfig(alpha=0, target_density=0.05): every W2 input |h| <= t_layer zeroed,
                    t_layer a moving average of the batch's 95th percentile of |h| (deft.core.threshold)
    target+loss     the same with the density loss (alpha=1) on top
    default         DensityConfig(): the default recipe, target 0.05 with straight-through gradients
    DEFT            DensityConfig(alpha=3): the exact-zero density loss, no masking
    Trainer         a plain transformers.Trainer on the same model: no probe at all (what the probe costs)

Every side gets its own copy of the same LoRA model and the same batches; the sides take turns, one
step each (A, B, C, ... A, B, C, ...), after a warm-up. For every batch the fastest of its repeats is
kept (background load only ever adds time) and the per-batch minima are summed; ``ratio`` is that sum
over PEFT's. The target-density sides start past the density ramp, so every timed step measures the
per-layer quantile at the target density (at density 1, early in the ramp, there is none to take).

    python benchmarks/bench_train_step.py --quick --threads 1 --clock cpu --out train_step.json   # ~1.5 min
    python benchmarks/bench_train_step.py --threads 1 --clock cpu --out train_step.json           # ~3-4 min
    python benchmarks/bench_train_step.py --threads 1 --profile   # + where target mode's time goes
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, set_seed

import deft.core.probe
from deft.fields import build
from deft.methods import apply_method
from deft.recipes.train import TrainArgs, task_args
from deft.tasks import setup_task
from deft.train.trainer import DeftTrainer, DensityConfig

from _common import CLOCKS, add_timing_options, interleaved, loadavg, machine, median, write_json

TARGET = 0.05


def side(**options: Any) -> DensityConfig:
    """A side's DensityConfig: only the options named, the rest off (no thresholds, no alpha warm-up, masked units
    get no gradient), as every side was timed before DensityConfig's defaults became the thresholded recipe."""
    return DensityConfig(**{"target_density": None, "alpha_warmup": 0.0, "straight_through": False, **options})


SIDES: dict[str, DensityConfig | None] = {
    "PEFT": side(alpha=0.0),
    "target": side(alpha=0.0, target_density=TARGET),
    "target+loss": side(alpha=1.0, target_density=TARGET),
    "default": DensityConfig(target_density=TARGET),  # deft train's recipe: straight-through on top of "target"
    "DEFT": side(alpha=3.0),
    "Trainer": None,  # no deft at all
}
MAX_STEPS = 1000  # the schedules' horizon; the timed steps start at 70 %, past the 60 % density ramp


def make_trainer(model: torch.nn.Module, density: DensityConfig | None, out_dir: str, lr: float) -> Trainer:
    targs = TrainingArguments(
        output_dir=out_dir,
        learning_rate=lr,
        per_device_train_batch_size=8,
        max_steps=MAX_STEPS,
        warmup_steps=0.06,
        lr_scheduler_type="linear",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    tr = DeftTrainer(model, targs, density=density) if density is not None else Trainer(model, targs)
    tr.create_optimizer_and_scheduler(num_training_steps=MAX_STEPS)
    tr.state.max_steps = MAX_STEPS
    tr.state.global_step = int(0.7 * MAX_STEPS)
    # set by Trainer's training loop, which these steps bypass
    tr.current_gradient_accumulation_steps = 1
    return tr


def one_step(tr: Trainer, batch: dict[str, torch.Tensor]) -> float:
    """What Trainer's inner loop does for one optimizer step without accumulation; returns the loss."""
    samples, num_items = tr.get_batch_samples(iter([batch]), 1, tr.args.device)
    loss = tr.training_step(tr.model, samples[0], num_items)
    tr.accelerator.clip_grad_norm_(tr.model.parameters(), tr.args.max_grad_norm)
    tr.optimizer.step()
    tr.lr_scheduler.step()
    tr.model.zero_grad(set_to_none=True)
    tr.state.global_step += 1
    return float(loss)


class Stopwatch:
    """Accumulated seconds of a wrapped function (here: deft.core.probe._batch_quantile, the suspect)."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def profile(tr: Trainer, batches: list[dict[str, torch.Tensor]], steps: int) -> dict[str, Any]:
    """Share of the target-density step spent in the per-layer quantile, and torch's operator table."""
    watch = Stopwatch(deft.core.probe._batch_quantile)
    deft.core.probe._batch_quantile = watch  # the probe's hook looks the name up in its module at every call
    try:
        t0 = time.perf_counter()
        for i in range(steps):
            one_step(tr, batches[i % len(batches)])
        total = time.perf_counter() - t0
    finally:
        deft.core.probe._batch_quantile = watch.fn
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(min(steps, 6)):
            one_step(tr, batches[i % len(batches)])
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return {
        "steps": steps,
        "step_ms": 1e3 * total / steps,
        "quantile_ms_per_step": 1e3 * watch.seconds / steps,
        "quantile_calls_per_step": watch.calls / steps,
        "quantile_share": watch.seconds / total,
        "top_ops": table,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 batches x 3 repeats (default 16 x 5)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats of every batch (overrides the default)")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma separated, from {', '.join(SIDES)}")
    ap.add_argument("--profile", action="store_true", help="also time deft.core.probe._batch_quantile in target mode")
    add_timing_options(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    before = machine()
    n_batches, repeats, warmup = (8, 3, 3) if args.quick else (16, 5, 5)
    repeats = args.repeats or repeats
    clock = CLOCKS[args.clock]
    names = [s for s in args.sides.split(",") if s]
    if "PEFT" not in names or any(s not in SIDES for s in names):
        raise SystemExit(f"--sides: PEFT plus any of {', '.join(SIDES)}")

    run_args = build(
        TrainArgs,
        dict(model="minilm", task="sst2", method="lora", lora_bias="lora_only", batch_size=8, max_length=128, lr=1e-3),
    )
    set_seed(0)
    setup = setup_task(task_args(run_args))
    base = apply_method(setup.model, run_args.peft, task_type=setup.task_type)
    data = setup.train_dataset
    batches = [setup.data_collator([data[i] for i in range(8 * b, 8 * b + 8)]) for b in range(n_batches)]
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    lengths = [int(b["input_ids"].shape[1]) for b in batches]

    tmp = tempfile.TemporaryDirectory()
    trainers = {n: make_trainer(copy.deepcopy(base), SIDES[n], f"{tmp.name}/{n}", run_args.optim.lr) for n in names}
    for i in range(warmup):  # first calls: allocator, lazy inits, the first quantiles replacing t = 0
        for tr in trainers.values():
            one_step(tr, batches[i % n_batches])

    # times[side][batch] = the repeats of that batch; the sides take turns within every (repeat, batch)
    times: dict[str, list[list[float]]] = {n: [[] for _ in batches] for n in names}
    for _ in range(repeats):
        for b, batch in enumerate(batches):
            took = interleaved([lambda tr=tr, b=batch: one_step(tr, b) for tr in trainers.values()], 1, clock=clock)
            for n, t in zip(trainers, took, strict=True):
                times[n][b] += t

    print(
        f"MiniLM-L6 + LoRA (r=8, mlp+attention), batch 8 of the SST-2 sample ({min(lengths)}-{max(lengths)} "
        f"tokens padded, {sum(tokens) / len(tokens):.0f} real tokens/batch), torch threads {torch.get_num_threads()}, "
        f"{args.clock} clock, load {before['loadavg_1min']}"
    )
    peft_best = sum(min(ts) for ts in times["PEFT"])
    results = []
    for n in names:
        best = sum(min(ts) for ts in times[n])
        # per-round ratio to PEFT on the same batch in the same round, a second estimate robust to drift
        ratios = [t / p for tb, pb in zip(times[n], times["PEFT"], strict=True) for t, p in zip(tb, pb, strict=True)]
        row = dict(
            side=n,
            config=None
            if SIDES[n] is None
            else {k: v for k, v in vars(SIDES[n]).items() if k in ("alpha", "target_density")},
            best_step_ms=1e3 * best / n_batches,
            median_step_ms=1e3 * median([t for tb in times[n] for t in tb]),
            ratio_vs_peft=best / peft_best,
            median_round_ratio_vs_peft=median(ratios),
        )
        results.append(row)
        print(
            f"{n:>12}: best {row['best_step_ms']:7.1f} ms/step  median {row['median_step_ms']:7.1f} ms/step  "
            f"ratio vs PEFT {row['ratio_vs_peft']:.3f}x (median of per-round ratios "
            f"{row['median_round_ratio_vs_peft']:.3f}x)",
            flush=True,
        )

    prof = None
    if args.profile and "target" in trainers:
        prof = profile(trainers["target"], batches, 2 * n_batches)
        print(
            f"target mode: {prof['step_ms']:.1f} ms/step, of which deft.core.probe._batch_quantile "
            f"{prof['quantile_ms_per_step']:.1f} ms ({100 * prof['quantile_share']:.1f} %, "
            f"{prof['quantile_calls_per_step']:.0f} calls/step)\n{prof['top_ops']}"
        )
    tmp.cleanup()
    out = {
        "results": results,
        "profile_target": prof,
        "config": {
            "quick": args.quick,
            "batches": n_batches,
            "repeats": repeats,
            "warmup_steps": warmup,
            "batch_size": 8,
            "max_length": 128,
            "padded_lengths": lengths,
            "real_tokens": tokens,
            "target_density": TARGET,
            "clock": args.clock,
            "seconds": round(time.perf_counter() - start, 1),
            "probe_quantile_sample": getattr(deft.core.probe, "_QUANTILE_SAMPLE", None),
        },
        "machine": {**before, "loadavg_1min_after": loadavg()},
    }
    print(f"done in {out['config']['seconds']} s")
    write_json(args.out, out)


if __name__ == "__main__":
    main()
