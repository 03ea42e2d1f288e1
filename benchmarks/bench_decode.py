"""End-to-end greedy decode of SmolLM2-135M: dense vs zero-skipping MLPs at calibrated densities.

TEAL-style magnitude sparsity: for each target density d, per-layer thresholds on the down-projection
input are calibrated on SST-2 dev sentences (``deft.sparse.calibrate_thresholds``), the model is
``deft.sparse.sparsify``-ed in threshold mode, and the same prompt is decoded greedily, dense and
sparse alternately in one run. Reported per density: tokens/s of both, their ratio, and the share of
generated tokens identical to the dense continuation (a cheap quality proxy: thresholding changes the
model's output).

    python benchmarks/bench_decode.py --quick --out decode.json     # 2 densities, 32 tokens
    python benchmarks/bench_decode.py --out decode.json             # 10-60 %, 64 tokens
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deft.data import load_glue
from deft.models import resolve
from deft.sparse import calibrate_thresholds, sparsify, unsparsify

from _common import loadavg, machine, write_json

PROMPT = "Write a short review of a film you liked, and say why.\n\nReview:"


def timed_generate(model, inputs, n_tokens: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False)
    return time.perf_counter() - t0, out[0, inputs["input_ids"].shape[1] :].tolist()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    densities = [0.3, 0.5] if args.quick else [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    n_tokens, rounds = (32, 2) if args.quick else (64, 3)
    before = machine(args.device)

    path = resolve("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).to(args.device).eval()
    inputs = tok(PROMPT, return_tensors="pt").to(args.device)
    sentences = [e.text_a for e in load_glue("sst2", "dev", source="builtin")[:32]]
    calib = [
        dict(tok(sentences[i : i + 8], padding=True, return_tensors="pt").to(args.device))
        for i in range(0, len(sentences), 8)
    ]

    timed_generate(model, inputs, 4)  # warm-up
    rows = []
    for d in densities:
        thresholds = calibrate_thresholds(model, calib, d)
        dense_t, sparse_t = [], []
        for _ in range(rounds):  # alternate: both sides see the same background load
            unsparsify(model)
            t, dense_tokens = timed_generate(model, inputs, n_tokens)
            dense_t.append(t)
            # max_density=1.0: always run the sparse kernel, so each density is really measured
            sparsify(model, mode="threshold", threshold=thresholds, regime="auto", max_density=1.0)
            t, sparse_tokens = timed_generate(model, inputs, n_tokens)
            sparse_t.append(t)
        unsparsify(model)
        same = sum(a == b for a, b in zip(dense_tokens, sparse_tokens, strict=True)) / n_tokens
        row = {
            "target_density": d,
            "dense_tok_s": n_tokens / min(dense_t),
            "sparse_tok_s": n_tokens / min(sparse_t),
            "speedup": min(dense_t) / min(sparse_t),
            "same_tokens_as_dense": same,
        }
        rows.append(row)
        print(
            f"density {100 * d:4.0f} %: dense {row['dense_tok_s']:6.1f} tok/s, sparse {row['sparse_tok_s']:6.1f} "
            f"tok/s, speedup {row['speedup']:.2f}x, same tokens as dense {100 * same:.0f} %",
            flush=True,
        )

    result = {
        "model": "SmolLM2-135M-Instruct (fp32, converted from the packaged GGUF)",
        "device": args.device,
        "new_tokens": n_tokens,
        "rounds": rounds,
        "rows": rows,
        "torch": torch.__version__,
        # the shared record (load average before and after included), as every benchmark writes it
        "machine": {**before, "loadavg_1min_after": loadavg()},
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,  # 1/5/15 min, at the end
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
