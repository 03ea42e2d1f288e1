"""Down-projection micro-benchmark: dense nn.Linear vs deft.sparse.SparseDown over a density sweep.

Two shapes (the down-projection W2 maps the MLP width back to the hidden size):
    135M  SmolLM2-135M   1536 -> 576
    7B    LLaMA-7B      11008 -> 4096
Two regimes:
    decode   one token (batch 1): per-token gather of the active W2 columns (embedding_bag on CPU,
             Triton split-K GEMV on CUDA fp16/bf16)
    batched  32 sequences x 64 tokens: a fraction `density` of the units is non-zero for the batch (the
             *union* density), the rest is zero for every token and is sliced out of W2 before one GEMM

The sparse module runs with max_density=1.0 so the sparse kernel is timed at every density (in real use
SparseDown switches to the dense kernel above its cutoff). Both sides are timed in the same run with
torch.utils.benchmark.Timer; `speedup` = dense time / sparse time (> 1: sparse is faster).

    python benchmarks/bench_mlp.py --quick --out results.json
    python benchmarks/bench_mlp.py --device cuda --out results_cuda.json
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import torch
from torch import nn

from deft.sparse import SparseDown

from _common import interleaved, loadavg, machine, write_json

SHAPES = {"135M": (1536, 576), "7B": (11008, 4096)}  # (in = MLP width, out = hidden)
DENSITIES = (0.05, 0.10, 0.20, 0.30, 0.50, 0.70, 1.00)
DECODE_INPUTS = 16  # 16 random active sets of 5 % of the 7B W2 (9 MB each) overflow a 32 MB L3


def make_input(regime: str, tokens: int, width: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """Random activations with exactly round(density * width) units non-zero (per token / for the batch)."""
    k = max(1, round(density * width))
    if regime == "decode":
        x = torch.zeros(1, width)
        x[0, torch.randperm(width, generator=gen)[:k]] = torch.randn(k, generator=gen)
        return x
    x = torch.zeros(tokens, width)
    units = torch.randperm(width, generator=gen)[:k]
    x[:, units] = torch.randn(tokens, k, generator=gen)  # dense inside the union: the GEMM's worst case
    return x


def timeit_pair(dense, sparse, min_run_time: float, rounds: int) -> tuple[float, float]:
    """Seconds per call of each, interleaved over ``rounds`` and the fastest block kept (see _common)."""
    dense(), sparse()  # warm-up: lazy caches (W2^T), Triton compilation
    t_dense, t_sparse = interleaved([dense, sparse], rounds, min_run_time=min_run_time)
    return min(t_dense), min(t_sparse)


def cuda_graph_pair(dense, sparse, n_inputs: int, rounds: int) -> tuple[float, float]:
    """Seconds per call of each on the GPU: ``n_inputs`` calls (one per input) captured in one CUDA graph,
    replayed and timed with CUDA events; the median of ``rounds`` timings of 20 replays each.

    A graph removes the Python and launch overhead (tens of microseconds per eager call, as long as the
    7B GEMV itself), which is how a decode loop worth optimising runs (CUDA graphs / torch.compile).
    """
    graphs = []
    for fn in (dense, sparse):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up on a side stream, as capture requires (and Triton autotuning)
            for _ in range(3):
                for _ in range(n_inputs):
                    fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n_inputs):
                fn()
        graphs.append(g)
    times: list[list[float]] = [[], []]
    for _ in range(rounds):
        for i, g in enumerate(graphs):  # interleaved
            g.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                g.replay()
            end.record()
            end.synchronize()
            times[i].append(start.elapsed_time(end) / 1e3 / (20 * n_inputs))
    med = [sorted(t)[len(t) // 2] for t in times]
    return med[0], med[1]


def peak_bandwidth(device: str) -> float | None:
    """Measured device-memory bandwidth in bytes/s (a 1 GiB copy, bytes read + written), GPU only."""
    if device != "cuda":
        return None
    a = torch.empty(1 << 29, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        b.copy_(a)
    end.record()
    end.synchronize()
    return 2 * a.numel() * a.element_size() * 20 / (start.elapsed_time(end) / 1e3)


def crossover(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Density below which sparse wins: the sweep's last winning density and a linear interpolation."""
    rows = sorted(rows, key=lambda r: r["density"])
    wins = [r["density"] for r in rows if r["speedup"] > 1.0]
    estimate = None
    for a, b in itertools.pairwise(rows):
        if a["speedup"] > 1.0 >= b["speedup"]:
            t = (a["speedup"] - 1.0) / (a["speedup"] - b["speedup"])
            estimate = a["density"] + t * (b["density"] - a["density"])
            break
    if estimate is None and rows and rows[-1]["speedup"] > 1.0:
        estimate = 1.0  # wins everywhere measured
    return {"sparse_wins_at": wins, "crossover_density": estimate}


def run(device: str, quick: bool, dtype: torch.dtype) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    bandwidth = peak_bandwidth(device)
    if bandwidth:
        print(f"measured copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)")
    min_run_time, rounds = (0.05, 3) if quick else (0.3, 5)
    results: list[dict[str, Any]] = []
    for shape, (width, hidden) in SHAPES.items():
        lin = nn.Linear(width, hidden).to(device=device, dtype=dtype)
        for regime in ("decode", "batched"):
            if regime == "decode":
                tokens = 1
            elif device == "cpu" and shape == "7B":
                # one 2048-token GEMM of this shape takes seconds on a small CPU: fewer tokens, same union
                tokens = 32 if quick else 512
            else:
                tokens = 32 * 64
            sparse = SparseDown(lin, regime="decode" if regime == "decode" else "batched", max_density=1.0)
            for d in DENSITIES:
                # decode: cycle through independent inputs so the active W2 rows of one call are not still
                # in cache for the next (a real decode step's active set changes from token to token)
                n_inputs = DECODE_INPUTS if regime == "decode" else 1
                xs = [make_input(regime, tokens, width, d, gen).to(device=device, dtype=dtype) for _ in range(n_inputs)]
                nxt = itertools.cycle(xs).__next__
                with torch.inference_mode():
                    if device == "cuda" and regime == "decode":
                        # the graph replays the calls in order: the dense and sparse closures see every input
                        it_d, it_s = itertools.cycle(xs).__next__, itertools.cycle(xs).__next__
                        t_dense, t_sparse = cuda_graph_pair(
                            lambda lin=lin, it=it_d: lin(it()),
                            lambda sp=sparse, it=it_s: sp(it()),
                            n_inputs,
                            5 if quick else 15,
                        )
                    else:
                        t_dense, t_sparse = timeit_pair(
                            lambda lin=lin, it=nxt: lin(it()), lambda sp=sparse, it=nxt: sp(it()), min_run_time, rounds
                        )
                row = dict(
                    shape=shape,
                    regime=regime,
                    tokens=tokens,
                    density=d,
                    dense_ms=1e3 * t_dense,
                    sparse_ms=1e3 * t_sparse,
                    speedup=t_dense / t_sparse,
                    target_speedup=0.7 / d,
                )
                if bandwidth:
                    # bytes the kernels must read: all of W2 (dense) / the active rows of W2^T (sparse), + x, y
                    w_bytes = width * hidden * lin.weight.element_size()
                    io = (tokens * (width + hidden)) * lin.weight.element_size()
                    row["dense_bw_frac"] = (w_bytes + io) / t_dense / bandwidth
                    row["sparse_bw_frac"] = (d * w_bytes + io) / t_sparse / bandwidth
                results.append(row)
                roof = (
                    f"  of peak bw: dense {100 * row['dense_bw_frac']:3.0f}% sparse {100 * row['sparse_bw_frac']:3.0f}%"
                    if bandwidth
                    else ""
                )
                print(
                    f"{shape:>5} {regime:>7} tokens={tokens:<5} density={100 * d:5.1f}%"
                    f"  dense {row['dense_ms']:9.4f} ms"
                    f"  sparse {row['sparse_ms']:9.4f} ms  speedup {row['speedup']:5.2f}x{roof}",
                    flush=True,
                )
    summary = {}
    for shape in SHAPES:
        for regime in ("decode", "batched"):
            c = crossover([r for r in results if r["shape"] == shape and r["regime"] == regime])
            summary[f"{shape}/{regime}"] = c
            est = "never" if c["crossover_density"] is None else f"~{100 * c['crossover_density']:.0f}%"
            print(
                f"crossover {shape}/{regime}: sparse wins below {est} density "
                f"(won at {[f'{100 * d:g}%' for d in c['sparse_wins_at']]})"
            )
    return {"results": results, "crossover": summary, "copy_bandwidth_bytes_per_s": bandwidth}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="default: float32 on cpu, float16 on cuda (the Triton kernel's dtypes)",
    )
    ap.add_argument("--quick", action="store_true", help="short timings, fewer batched tokens for 7B on CPU")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dtype = getattr(torch, args.dtype or ("float16" if args.device == "cuda" else "float32"))
    start = time.perf_counter()
    before = machine(args.device)
    out = run(args.device, args.quick, dtype)
    out["machine"] = {**before, "loadavg_1min_after": loadavg()}
    out["config"] = {
        "quick": args.quick,
        "dtype": str(dtype),
        "densities": DENSITIES,
        "shapes": {k: {"in": v[0], "out": v[1]} for k, v in SHAPES.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(f"done in {out['config']['seconds']} s")
    write_json(args.out, out)


if __name__ == "__main__":
    main()
