"""Does a model trained under per-layer thresholds run faster? MiniLM + LoRA at 5 % effective density, CPU.

A ``deft train --target-density 0.05`` run (``--run``, e.g. from ``deft train --model minilm --task sst2
--method lora --alpha 0 --target-density 0.05 --output runs/bench-td05``) has its adapter merged and its
``thresholds.json`` applied: every down-projection (W2) input ``|h| <= t_layer`` is zero. Its sparsity is
*per token*: each token keeps ~5 % of the 1,536 units, but almost every unit is kept by some token of a
batch (union density ~93 %), so slicing W2 by the union of the batch cannot help. Timed on batches of 32
SST-2 dev sentences, tokenized and padded as ``deft eval`` does:

    dense           the merged model, no thresholds (for scale: what thresholding itself costs)
    dense-thr       the reference: ``F.hardshrink(h, t)`` (= ``h * (|h| > t)`` in one pass, ~6x cheaper than that
                    product) then the same nn.Linear; every other path's output is compared to it
    union           sparsify(regime="batched"): union of the batch sliced out of W2 (falls back to dense
                    above its union cutoff, as it does here)
    gather          sparsify(regime="decode", native=False): per token, the W2^T rows of its own active
                    units, one F.embedding_bag (FBGEMM) call for the whole batch, the units found with
                    hardshrink + nonzero() of the result's bits
    native          sparsify(regime="decode"), the default where a C++ compiler is present: the same gather
                    in deft's compiled kernel (deft.sparse.native), one pass per token that thresholds,
                    compacts and adds the kept W2^T rows (left out, and said so, without a compiler)
    csr             the thresholded input as a CSR matrix (tokens x units, its arrays found as gather finds
                    them) times W2^T with torch.addmm (MKL sparse BLAS)

Two measurements, each timed interleaved (one call of every side per round, the fastest round kept):

    W2-only         the six down-projections alone, on the W2 inputs the batch really produces (captured
                    from the dense-thr model): time summed over the layers
    whole model     the full forward of the sequence classifier

``speedup`` = dense-thr time / the path's time in the same run. Every path's output is checked against
dense-thr with ``torch.testing.assert_close`` (W2 outputs and logits) before it is timed.

    python benchmarks/bench_threshold.py --run runs/bench-td05 --quick --threads 1 --clock cpu --out threshold.json
    python benchmarks/bench_threshold.py --run runs/bench-td05 --threads 1 --clock cpu --out threshold.json
    # ~1 min and ~4-5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deft.recipes.evaluate import eval_loader as _eval_loader
from deft.recipes.evaluate import load_run_model as _load_run_model
from deft.sparse import load_thresholds, native, sparsify

from _common import CLOCKS, add_timing_options, interleaved, loadavg, machine, median, write_json

BATCH = 32
PATHS = ("dense", "dense-thr", "union", "gather", "native", "csr")


class ThresholdedLinear(nn.Module):
    """The reference: the dense down-projection of the thresholded input (what sparse paths must equal)."""

    def __init__(self, base: nn.Linear, threshold: float) -> None:
        super().__init__()
        self.base, self.threshold = base, threshold

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # hardshrink keeps x where |x| > t, else 0: the same values as h * (|h| > t), in one vectorised pass
        return self.base(F.hardshrink(h, self.threshold))


class CsrDown(nn.Module):
    """W2 on the thresholded input as sparse CSR x dense through torch.sparse (MKL on CPU).

    The CSR arrays are found as SparseDown's gather finds its bags (hardshrink, then nonzero() of the
    result's bits, which lists the kept entries row by row: CSR order), which is cheaper than
    ``Tensor.to_sparse_csr()`` on the thresholded dense input; only the product differs between the two.
    """

    def __init__(self, base: nn.Linear, threshold: float) -> None:
        super().__init__()
        self.threshold, self.bias = threshold, base.bias
        self.wt = base.weight.detach().t().contiguous()  # (in, out): the dense operand, row-major
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-1]
        kept = F.hardshrink(h.reshape(-1, self.in_features), self.threshold)
        flat = kept.reshape(-1)
        nz = flat.view(torch.int32).nonzero().squeeze(1)  # float32: +0.0 is the only all-zero bit pattern
        rows = torch.div(nz, self.in_features, rounding_mode="floor")
        crow = torch.zeros(kept.shape[0] + 1, dtype=torch.long)
        torch.cumsum(torch.bincount(rows, minlength=kept.shape[0]), 0, out=crow[1:])
        # built valid by construction: skip torch's invariant checks (they cost a pass over the indices)
        csr = torch.sparse_csr_tensor(
            crow, nz - rows * self.in_features, flat.index_select(0, nz), kept.shape, check_invariants=False
        )
        out = torch.addmm(self.bias, csr, self.wt)
        return out.reshape(*lead, self.out_features)


def swap_down(model: nn.Module, thresholds: dict[str, float], make) -> nn.Module:
    """A copy of ``model`` with every thresholded W2 replaced by ``make(linear, threshold)``."""
    m = copy.deepcopy(model)
    for name, t in thresholds.items():
        parent, _, child = name.rpartition(".")
        setattr(m.get_submodule(parent), child, make(m.get_submodule(name), t))
    return m


def capture_inputs(model: nn.Module, thresholds: dict[str, float], batch: dict) -> dict[str, torch.Tensor]:
    """The raw W2 input of every thresholded layer for ``batch`` (2-D: tokens incl. padding x units)."""
    got: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda _m, a, n=n: got.__setitem__(n, a[0].detach().reshape(-1, a[0].shape[-1]).clone())
        )
        for n in thresholds
    ]
    with torch.inference_mode():
        model(**batch)
    for h in hooks:
        h.remove()
    return got


def w2_modules(
    model: nn.Module, variants: dict[str, nn.Module], name: str, paths: tuple[str, ...]
) -> dict[str, nn.Module]:
    """Each path's module for site ``name`` (dense: the plain nn.Linear of the unthresholded model)."""
    return {p: (model if p == "dense" else variants[p]).get_submodule(name) for p in paths}


def densities(h: torch.Tensor, t: float, valid: torch.Tensor) -> dict[str, float]:
    active = h.abs() > t
    return {
        "per_token": float(active[valid].float().mean()),
        "per_token_incl_padding": float(active.float().mean()),
        "union": float(active.any(0).float().mean()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--run",
        required=True,
        help="the run folder of a finished MiniLM + LoRA `deft train --target-density 0.05` run (with "
        "results.json and adapter/thresholds.json), e.g. `deft train --model minilm --task sst2 "
        "--method lora --alpha 0 --target-density 0.05 --output runs/bench-td05`",
    )
    ap.add_argument("--quick", action="store_true", help="2 batches, 3 rounds (default 4 batches, 7 rounds)")
    add_timing_options(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    start = time.perf_counter()
    before = machine()
    paths = PATHS
    if native.library() is None:
        print("no C++ compiler (or DEFT_NATIVE=0): the native path is left out")
        paths = tuple(p for p in PATHS if p != "native")
    n_batches, rounds, w2_rounds = (2, 3, 10) if args.quick else (4, 7, 25)
    clock = CLOCKS[args.clock]

    run_dir = Path(args.run)
    peft, tok, res = _load_run_model(run_dir)
    model = peft.merge_and_unload().eval()  # as served: SparseDown needs a plain nn.Linear W2
    thresholds = load_thresholds(run_dir, model)
    batches = [
        {k: v for k, v in b.items() if k != "labels"} for b in _eval_loader(res["config"], tok, None, BATCH)[:n_batches]
    ]

    variants: dict[str, nn.Module] = {
        "dense": model,
        "dense-thr": swap_down(model, thresholds, ThresholdedLinear),
        "union": sparsify(copy.deepcopy(model), mode="threshold", threshold=thresholds, regime="batched"),
        "gather": sparsify(copy.deepcopy(model), mode="threshold", threshold=thresholds, regime="decode", native=False),
        "native": sparsify(copy.deepcopy(model), mode="threshold", threshold=thresholds, regime="decode"),
        "csr": swap_down(model, thresholds, CsrDown),
    }
    torch.set_grad_enabled(False)

    layers: list[dict[str, Any]] = []
    w2_best = {p: 0.0 for p in paths}
    whole_best = {p: 0.0 for p in paths}
    # dense-thr time / path time of the same batch in the same round: a second, paired estimate that a
    # burst of background load during one side's best round cannot skew
    whole_ratios: dict[str, list[float]] = {p: [] for p in paths}
    tokens = []
    for bi, batch in enumerate(batches):
        valid = batch["attention_mask"].reshape(-1).bool()
        tokens.append({"padded": int(valid.numel()), "valid": int(valid.sum())})
        with torch.inference_mode():
            ref_logits = variants["dense-thr"](**batch).logits
            for p in paths[2:]:  # whole-model outputs equal the reference up to float reassociation
                torch.testing.assert_close(variants[p](**batch).logits, ref_logits, rtol=1e-4, atol=1e-4)
        for name, h in capture_inputs(variants["dense-thr"], thresholds, batch).items():
            mods = w2_modules(model, variants, name, paths)
            with torch.inference_mode():
                ref = mods["dense-thr"](h)
                for p in paths[2:]:
                    torch.testing.assert_close(mods[p](h), ref, rtol=1e-4, atol=1e-4)
                times = interleaved([lambda m=mods[p], h=h: m(h) for p in paths], w2_rounds, clock=clock)
            row = {"batch": bi, "site": name, "threshold": thresholds[name], **densities(h, thresholds[name], valid)}
            for p, ts in zip(paths, times, strict=True):
                row[f"{p}_ms"] = 1e3 * min(ts)
                w2_best[p] += min(ts)
            layers.append(row)
        with torch.inference_mode():
            times = interleaved([lambda m=variants[p], b=batch: m(**b) for p in paths], rounds, clock=clock)
        ref_times = times[paths.index("dense-thr")]
        for p, ts in zip(paths, times, strict=True):
            whole_best[p] += min(ts)
            whole_ratios[p] += [r / t for r, t in zip(ref_times, ts, strict=True)]
        print(
            f"batch {bi}: {tokens[-1]['valid']} of {tokens[-1]['padded']} tokens real, whole model "
            + ", ".join(f"{p} {1e3 * min(ts):.0f} ms" for p, ts in zip(paths, times, strict=True)),
            flush=True,
        )

    n_layers = len(layers)
    summary = {
        "per_token_density": sum(r["per_token"] for r in layers) / n_layers,
        "per_token_density_incl_padding": sum(r["per_token_incl_padding"] for r in layers) / n_layers,
        "union_density": sum(r["union"] for r in layers) / n_layers,
        "paths": {},
    }
    print(
        f"\nMiniLM-L6 + LoRA at {100 * summary['per_token_density']:.1f} % per-token density of the W2 input "
        f"(real tokens; {100 * summary['per_token_density_incl_padding']:.1f} % with padding; union "
        f"{100 * summary['union_density']:.1f} %), batch {BATCH}, {n_batches} batches, torch threads "
        f"{torch.get_num_threads()}, {args.clock} clock, load {before['loadavg_1min']}"
    )
    print(
        f"{'path':>10} {'W2 ms/batch':>12} {'W2 speedup':>11} {'model ms/batch':>15} {'model speedup':>14} "
        f"{'(paired median)':>16}"
    )
    for p in paths:
        s = {
            "w2_ms_per_batch": 1e3 * w2_best[p] / n_batches,
            "w2_speedup": w2_best["dense-thr"] / w2_best[p],
            "model_ms_per_batch": 1e3 * whole_best[p] / n_batches,
            "model_speedup": whole_best["dense-thr"] / whole_best[p],
            "model_speedup_paired_median": median(whole_ratios[p]),
        }
        summary["paths"][p] = s
        print(
            f"{p:>10} {s['w2_ms_per_batch']:12.1f} {s['w2_speedup']:10.2f}x {s['model_ms_per_batch']:15.1f} "
            f"{s['model_speedup']:13.2f}x {s['model_speedup_paired_median']:15.2f}x"
        )
    # the W2-only ceiling: the whole-model speedup if the six W2 calls cost nothing at all
    ref = summary["paths"]["dense-thr"]
    summary["model_speedup_ceiling_w2_free"] = ref["model_ms_per_batch"] / (
        ref["model_ms_per_batch"] - ref["w2_ms_per_batch"]
    )
    print(
        f"W2 share of the dense-thr forward: {100 * ref['w2_ms_per_batch'] / ref['model_ms_per_batch']:.0f} % "
        f"(whole-model ceiling with W2 free: {summary['model_speedup_ceiling_w2_free']:.2f}x)"
    )

    out = {
        "summary": summary,
        "layers": layers,
        "config": {
            "run": str(run_dir),
            "batch": BATCH,
            "batches": n_batches,
            "tokens": tokens,
            "rounds": rounds,
            "w2_rounds": w2_rounds,
            "clock": args.clock,
            "quick": args.quick,
            "thresholds": thresholds,
            "run_accuracy": res.get("metric"),
            "seconds": round(time.perf_counter() - start, 1),
        },
        "machine": {**before, "loadavg_1min_after": loadavg(), "mkl": torch.backends.mkl.is_available()},
    }
    print(f"done in {out['config']['seconds']} s")
    write_json(args.out, out)


if __name__ == "__main__":
    main()
