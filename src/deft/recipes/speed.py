"""``deft speed``: is a run trained under thresholds faster to serve, on this machine?

The run's adapter is merged (as deployed) and its ``adapter/thresholds.json`` served two ways on the same
dev batches: **dense**, the plain merged model, which is what serving it without deft costs; and **sparse**,
``deft.sparsify(mode="threshold", regime="decode")``, where every token reads only the W2 rows of its own
units above threshold (on CPU through deft's compiled kernel when a C++ compiler is present). Before any
timing, the sparse outputs are checked against the merged model with the thresholds applied as a mask
(:func:`deft.sparse.apply_thresholds`): same outputs up to float reassociation, or the command fails.

Timing alternates the two sides batch by batch over several rounds (background load hits both alike)
and keeps each batch's fastest round. For a measurement to quote, benchmarks/bench_threshold.py times
more paths and W2 on its own.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fields import help_field as _h
from ..io import write_json
from .common import RunError
from .evaluate import input_batches, load_run, merge_adapter


@dataclass
class SpeedArgs:
    """Arguments of ``deft speed``: forward time of a run's merged model, dense vs served sparse."""

    run: str = _h(
        "a finished run trained under thresholds (results.json, adapter/thresholds.json)", default="runs/train"
    )
    batch_size: int = _h("rows per forward", default=32)
    batches: int = _h("dev batches timed (the first ones)", default=4)
    rounds: int = _h("timing rounds; each batch's fastest counts", default=5)
    threads: int | None = _h("torch threads (default: torch's own choice)", default=None)
    output: str | None = _h("write speed.json here (default: the run folder)", default=None)


def _first_tensor(out: Any):
    """The forward's main output (logits, start logits, ...), whatever the model's output class."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if hasattr(out, "values") else out
    return next(v for v in values if isinstance(v, torch.Tensor))


def speed(args: SpeedArgs) -> dict[str, Any]:
    """Time the merged model dense and sparsified on the run's dev batches; the sparse outputs are checked first."""
    import torch

    from ..core.threshold import apply_thresholds, find_thresholds, load_thresholds
    from ..sparse import native, sparse_stats, sparsify

    run_dir = Path(args.run)
    if not (run_dir / "results.json").exists():
        raise RunError(f"{run_dir} has no results.json: pass a finished run folder to --run")
    if find_thresholds(run_dir) is None:
        raise RunError(
            f"{run_dir} has no adapter/thresholds.json: deft speed serves a run trained under thresholds "
            "(deft train --target-density D, the default)"
        )
    for name, value in (("--batch-size", args.batch_size), ("--batches", args.batches), ("--rounds", args.rounds)):
        if value < 1:
            raise RunError(f"{name} must be at least 1, got {value}")
    if args.threads is not None:
        if args.threads < 1:
            raise RunError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    setup, trained, res = load_run(run_dir)
    dense = merge_adapter(trained).eval()
    thresholds = load_thresholds(run_dir, dense)
    try:
        sparse = sparsify(
            copy.deepcopy(dense), mode="threshold", threshold=thresholds, regime="decode", track_stats=True
        )
    except TypeError as e:  # a W2 that is not a plain linear layer after the merge (e.g. a bottleneck adapter)
        raise RunError(f"{run_dir}: its down-projections cannot be served sparse: {e}") from e
    batches = list(itertools.islice(input_batches(setup, args.batch_size), args.batches))

    with torch.inference_mode():
        # the sparse model must compute what the thresholded model computes
        with apply_thresholds(dense, thresholds):
            wanted = [_first_tensor(dense(**b)) for b in batches]
        for i, (b, want) in enumerate(zip(batches, wanted, strict=True)):
            got = _first_tensor(sparse(**b))
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                diff = float((got - want).abs().max())
                raise RunError(f"{run_dir}: sparse outputs differ from the thresholded model on batch {i} by {diff:g}")
        best = {"dense": [float("inf")] * len(batches), "sparse": [float("inf")] * len(batches)}
        for _ in range(args.rounds):
            for i, b in enumerate(batches):
                for side, model in (("dense", dense), ("sparse", sparse)):
                    t0 = time.perf_counter()
                    model(**b)
                    best[side][i] = min(best[side][i], time.perf_counter() - t0)

    stats = sparse_stats(sparse).values()
    pairs = sum(s.units_total for s in stats)
    # padded positions count too: the kernel reads (and skips) them like any other token
    share = 1 - sum(s.units_skipped for s in stats) / pairs if pairs else None
    dense_ms = 1e3 * sum(best["dense"]) / len(batches)
    sparse_ms = 1e3 * sum(best["sparse"]) / len(batches)
    result = {
        "run": str(run_dir),
        "dense_ms_per_batch": dense_ms,
        "sparse_ms_per_batch": sparse_ms,
        "speedup": dense_ms / sparse_ms,
        "share_of_w2_inputs_read": share,
        "compiled_kernel": native.library() is not None,
        "batch_size": args.batch_size,
        "batches": len(batches),
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "device": str(next(dense.parameters()).device),
        "metric_of_the_run": {res["main_metric"]: res["metric"]},
    }
    kernel = "deft's compiled CPU kernel" if result["compiled_kernel"] else "torch's ops (no C++ compiler found)"
    print(
        f"{run_dir}: {len(batches)} dev batches of {args.batch_size}, {torch.get_num_threads()} torch thread(s), "
        f"best of {args.rounds} rounds\n"
        f"  dense  {dense_ms:8.1f} ms per batch (the merged model)\n"
        f"  sparse {sparse_ms:8.1f} ms per batch ({kernel}; "
        f"{'-' if share is None else f'{100 * share:.1f} %'} of W2 input entries read, padding included)\n"
        f"  speed-up {result['speedup']:.2f}x"
    )
    out = Path(args.output) if args.output else run_dir
    print(f"wrote {write_json(out / 'speed.json', result)}")
    return result
