"""Encoder throughput: all-MiniLM-L6-v2 (batch 32 SST-2 sentences), dense vs zero-skipping MLPs.

Pretrained MiniLM uses GELU, which has almost no exact zeros, so sparsity is created two ways:

    relu        the GELUs swapped for ReLU (a ReLU-fied model; without fine-tuning its embeddings change,
                here only the speed is of interest)
    thr@D       the GELU model with per-layer magnitude thresholds calibrated so that a fraction D of the
                down-projection inputs stays non-zero (TEAL-style, deft.sparse.calibrate_thresholds)

or comes from training: ``--run DIR`` adds a finished ``deft train`` LoRA run on MiniLM (its adapter merged,
its ``--activation`` applied), e.g. a DEFT run whose density loss silenced most units, timed exactly.

Each is run with both sparse paths of deft.sparse.SparseDown:

    union       units zero for every token of the batch are sliced out of W2, one GEMM (regime="batched")
    per-token   every token gathers its own active W2 columns (regime="decode", embedding_bag on CPU)

Every variant is timed interleaved with its dense twin in the same run (the same model without
sparsify: GELU for gelu/thr, ReLU for relu); `speedup` = dense time / sparse time of the whole forward.
Also reported: per-token and union density of the down-projection input, and the mean cosine between
the variant's mean-pooled embeddings and the dense GELU model's (for ``--run`` variants: the dense run
model's, so 1.0 up to float reassociation).

    python benchmarks/bench_encoder.py --quick --out encoder.json
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from deft.models import minilm_path
from deft.sparse import calibrate_thresholds, sparse_stats, sparsify

from _common import interleaved, loadavg, machine, sst2_sentences, write_json

BATCH = 32


def relu_fied(model: nn.Module) -> nn.Module:
    relu = copy.deepcopy(model)
    for layer in relu.encoder.layer:
        layer.intermediate.intermediate_act_fn = nn.ReLU()
    return relu


def trained_encoder(run_dir: str) -> nn.Module:
    """The encoder of a finished LoRA run on MiniLM, with the adapter merged so SparseDown can wrap W2."""
    from pathlib import Path

    from deft.recipes.evaluate import load_run_model as _load_run_model

    model, _, res = _load_run_model(Path(run_dir))
    if res["config"]["method"] != "lora":
        raise SystemExit(
            f"--run {run_dir}: only LoRA runs can be merged for timing (method {res['config']['method']!r})"
        )
    return model.merge_and_unload().base_model.eval()


def pooled(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def time_pair(dense: nn.Module, sparse: nn.Module, batch: dict, rounds: int) -> tuple[float, float]:
    """Fastest single forward of each over interleaved rounds (background load only ever adds time).

    One forward is ~1 s here, so every round is one call per model rather than an autorange block.
    """
    with torch.inference_mode():
        t_dense, t_sparse = interleaved([lambda: dense(**batch), lambda: sparse(**batch)], rounds)
    return min(t_dense), min(t_sparse)


def densities(model: nn.Module, regime: str) -> dict[str, float]:
    """Per-token (or union) density of the W2 input, from SparseDown's skip counters (padding included)."""
    stats = list(sparse_stats(model).values())
    done = 1.0 - sum(s.units_skipped for s in stats) / sum(s.units_total for s in stats)
    key = "union_density" if regime == "batched" else "per_token_density"
    return {key: done, "dense_fallback_share": sum(s.dense_calls for s in stats) / sum(s.calls for s in stats)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="2 rounds, 2 calibration batches, sentences cut to 32 tokens, one threshold target, "
        "no per-token row for the GELU model (< 90 s on 2 CPU cores)",
    )
    ap.add_argument(
        "--targets",
        default=None,
        help="threshold variants: target densities, comma separated (default 0.1,0.3; --quick: 0.1)",
    )
    ap.add_argument(
        "--run",
        action="append",
        default=[],
        help="a finished `deft train` LoRA run folder on MiniLM to time as well (repeatable)",
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    rounds, calib_batches, max_length = (2, 2, 32) if args.quick else (7, 8, 128)
    before = machine()

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    gelu = AutoModel.from_pretrained(path).eval()
    texts = sst2_sentences(BATCH * (calib_batches + 1))

    def encode(chunk: list[str]) -> dict[str, torch.Tensor]:
        return dict(tok(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))

    batch = encode(texts[:BATCH])  # the timed batch
    calib = [encode(texts[BATCH * (i + 1) : BATCH * (i + 2)]) for i in range(calib_batches)]
    reference = pooled(gelu, batch)
    relu = relu_fied(gelu)

    variants: list[tuple[str, nn.Module, dict[str, Any], torch.Tensor]] = [
        ("gelu exact", gelu, dict(mode="exact"), reference),
        ("relu exact", relu, dict(mode="exact"), reference),
    ]
    targets = args.targets or ("0.1" if args.quick else "0.1,0.3")
    for target in (float(t) for t in targets.split(",")):
        thresholds = calibrate_thresholds(gelu, calib, target)
        variants.append((f"thr@{target:g}", gelu, dict(mode="threshold", threshold=thresholds), reference))
    for run_dir in args.run:
        enc = trained_encoder(run_dir)
        variants.append(
            (f"run:{os.path.basename(os.path.normpath(run_dir))}", enc, dict(mode="exact"), pooled(enc, batch))
        )

    results = []
    print(
        f"MiniLM-L6 batch {BATCH}, {batch['input_ids'].shape[1]} tokens/sentence (padded), "
        f"torch threads {torch.get_num_threads()}"
    )
    for name, base, kw, ref in variants:
        for regime in ("batched", "decode"):
            if args.quick and name == "gelu exact" and regime == "decode":
                continue  # nothing to gather per token in a GELU model: the slowest row, skipped for time
            sparse = copy.deepcopy(base)
            # max_density=1.0 times the sparse kernel even where the dense one would be chosen by default
            sparsify(sparse, regime=regime, max_density=1.0, track_stats=True, **kw)
            # this first call warms up and fills the skip counters (a few int additions per layer)
            cosine = float(torch.cosine_similarity(pooled(sparse, batch), ref, dim=-1).mean())
            dens = densities(sparse, regime)
            t_dense, t_sparse = time_pair(base, sparse, batch, rounds)
            row = dict(
                variant=name,
                path="union" if regime == "batched" else "per-token",
                **dens,
                cosine_vs_gelu=cosine,
                dense_ms=1e3 * t_dense,
                sparse_ms=1e3 * t_sparse,
                dense_sent_per_s=BATCH / t_dense,
                sparse_sent_per_s=BATCH / t_sparse,
                speedup=t_dense / t_sparse,
            )
            results.append(row)
            dkey = "union_density" if regime == "batched" else "per_token_density"
            print(
                f"{name:>16} {row['path']:>9}: {dkey.replace('_', ' ')} {100 * dens[dkey]:5.1f}%  "
                f"dense {row['dense_sent_per_s']:6.1f} sent/s  sparse {row['sparse_sent_per_s']:6.1f} sent/s  "
                f"speedup {row['speedup']:.2f}x  cosine {cosine:.4f}",
                flush=True,
            )

    out = {
        "results": results,
        "config": {
            "batch": BATCH,
            "tokens_per_sentence": int(batch["input_ids"].shape[1]),
            "quick": args.quick,
            "rounds": rounds,
            "max_length": max_length,
            "calibration_sentences": BATCH * calib_batches,
            "seconds": round(time.perf_counter() - start, 1),
        },
        "machine": {**before, "loadavg_1min_after": loadavg()},
    }
    print(f"done in {out['config']['seconds']} s")
    write_json(args.out, out)


if __name__ == "__main__":
    main()
