"""End-to-end decode step of a 7B-shaped LLaMA on the GPU: dense vs deft.sparse at 10-60 % density.

The model is transformers' ``LlamaForCausalLM`` with LLaMA-2-7B's shape (32 layers, hidden 4096, MLP
11008, vocab 32000) and random weights in bf16 (no 7B checkpoint can be fetched here; speed does not
depend on the values). One decode step (embedding, 32 blocks against a static KV cache of ``--context``
positions, final norm, lm_head, argmax fed back as the next input) is captured in a CUDA graph and
replayed: at batch 1 a 7B step reads ~13.5 GB of weights, and without a graph the Python/launch
overhead of ~500 eager kernels would hide what sparsity saves. The attention core is written here in a
few lines (the projections and norms are the model's own modules); rotary embeddings are left out,
which costs the same for dense and sparse.

Variants, timed alternately in one run:
    dense       every projection is cuBLAS
    down        ``deft.sparsify(mode="threshold")``: the down-projection input h = act(gate) * up is
                thresholded per layer to the target density and W2 is read only for active units
                (Triton split-K sparse GEMV), i.e. what DEFT's MLP sparsity can give
    all         TEAL-style, ``deft.sparsify(targets="all")``: the inputs of every projection (q/k/v/o,
                gate/up, down) are thresholded to the target density and each projection reads only its
                active weight rows
Thresholds are calibrated per projection on the model's own activations (eager decode steps).

    python benchmarks/bench_decode_gpu.py --out decode_gpu.json
    python benchmarks/bench_decode_gpu.py --layers 4 --quick     # a small smoke run
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from deft.sparse import SparseDown, sparsify, unsparsify

from _common import loadavg, machine, write_json

PROJ_INPUTS = {  # projection -> the modules that read the same input (one threshold each)
    "attn": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "mlp_in": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


def build(layers: int, device: str, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: no 27 GB fp32 copy first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


class Decoder:
    """One greedy decode step over static buffers, so that it can be captured in a CUDA graph."""

    def __init__(self, model: nn.Module, context: int) -> None:
        self.m = model.model
        self.head = model.lm_head
        cfg = model.config
        self.nh, self.hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        dev, dt = self.head.weight.device, self.head.weight.dtype
        n = cfg.num_hidden_layers
        g = torch.Generator(device=dev).manual_seed(1)
        # a filled cache: the step attends to `context` earlier positions, as deep into a generation
        self.k = torch.randn(n, 1, self.nh, context + 1, self.hd, device=dev, dtype=dt, generator=g)
        self.v = torch.randn(n, 1, self.nh, context + 1, self.hd, device=dev, dtype=dt, generator=g)
        self.pos = torch.tensor([context], device=dev)  # the new token's slot
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=dev)

    def step(self) -> None:
        h = self.m.embed_tokens(self.tok)
        for i, layer in enumerate(self.m.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q, k, v = (p(x).view(1, 1, self.nh, self.hd).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
            self.k[i].index_copy_(2, self.pos, k)
            self.v[i].index_copy_(2, self.pos, v)
            o = F.scaled_dot_product_attention(q, self.k[i], self.v[i])  # one query: no mask needed
            h = h + a.o_proj(o.transpose(1, 2).reshape(1, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.head(self.m.norm(h))
        self.tok.copy_(logits.argmax(-1))


def calibrate(model: nn.Module, dec: Decoder, densities: list[float], steps: int) -> dict[float, dict[str, float]]:
    """Per-module thresholds leaving each target density of |input| above them, from eager decode steps."""
    values: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in sum(PROJ_INPUTS.values(), ()):
            hooks.append(
                mod.register_forward_pre_hook(
                    lambda _m, args, name=name: values.setdefault(name, []).append(
                        args[0].detach().abs().float().flatten()
                    )
                )
            )
    with torch.no_grad():
        for _ in range(steps):
            dec.step()
    for h in hooks:
        h.remove()
    out: dict[float, dict[str, float]] = {}
    for d in densities:
        out[d] = {n: float(torch.quantile(torch.cat(v)[: 1 << 24], 1.0 - d)) for n, v in values.items()}
    return out


def graph_time(dec: Decoder, tokens: int, rounds: int) -> float:
    """Seconds per decode step: the step captured once, replayed ``tokens`` times per round, best round."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(3):  # warm-up: cuBLAS handles, Triton autotuning, cached W^T copies
            dec.step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        dec.step()
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(tokens):
            g.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / tokens)
    del g
    return best


def measured_density(model: nn.Module, dec: Decoder, which: tuple[str, ...]) -> float:
    """Fraction of projection inputs above their threshold over one eager step (what the kernels skip)."""
    counts = [0, 0]
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, SparseDown) and name.rsplit(".", 1)[-1] in which:

            def hook(m, args):
                x = args[0]
                counts[0] += int((x.abs() > m.threshold).sum())
                counts[1] += x.numel()

            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        dec.step()
    for h in hooks:
        h.remove()
    return counts[0] / max(counts[1], 1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--context", type=int, default=512, help="cached positions the step attends to")
    p.add_argument("--tokens", type=int, default=64, help="decode steps per timed round")
    p.add_argument("--quick", action="store_true", help="densities 30/50 %% only, fewer rounds")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_gpu.py needs a CUDA GPU (use bench_decode.py on CPU)")
    densities = [0.3, 0.5] if args.quick else [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    rounds = 3 if args.quick else 7
    before = machine("cuda")  # after the check above: it names the GPU
    t0 = time.perf_counter()
    model = build(args.layers, "cuda", getattr(torch, args.dtype))
    dec = Decoder(model, args.context)
    thresholds = calibrate(model, dec, densities, steps=8)
    down_names = [n for n in thresholds[densities[0]] if n.endswith("down_proj")]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    dense_t = graph_time(dec, args.tokens, rounds)
    print(
        f"dense: {1e3 * dense_t:.2f} ms/token, {1 / dense_t:.1f} tok/s, "
        f"{weight_bytes / dense_t / 1e12:.2f} TB/s of weights",
        flush=True,
    )
    for d in densities:
        row = {"density": d}
        # W2 only, through the library's own entry point
        sparsify(
            model,
            mode="threshold",
            threshold={n: thresholds[d][n] for n in down_names},
            regime="decode",
            max_density=1.0,
        )
        row["down_measured_density"] = measured_density(model, dec, ("down_proj",))
        row["down_s"] = graph_time(dec, args.tokens, rounds)
        # every projection (TEAL's setting), through the library as well
        sparsify(model, mode="threshold", threshold=thresholds[d], targets="all", regime="decode", max_density=1.0)
        row["all_measured_density"] = measured_density(model, dec, sum(PROJ_INPUTS.values(), ()))
        row["all_s"] = graph_time(dec, args.tokens, rounds)
        unsparsify(model)
        row["dense_s"] = graph_time(dec, args.tokens, rounds)  # again, so drift shows
        dense = min(dense_t, row["dense_s"])
        row["down_speedup"] = dense / row["down_s"]
        row["all_speedup"] = dense / row["all_s"]
        rows.append(row)
        print(
            f"density {100 * d:3.0f} %: dense {1 / row['dense_s']:6.1f} tok/s | W2 only {1 / row['down_s']:6.1f} tok/s"
            f" ({row['down_speedup']:.2f}x) | all projections {1 / row['all_s']:6.1f} tok/s ({row['all_speedup']:.2f}x)"
            f" | measured density W2 {100 * row['down_measured_density']:.0f} % all "
            f"{100 * row['all_measured_density']:.0f} %",
            flush=True,
        )
        torch.cuda.empty_cache()
    result = {
        "model": f"LLaMA-2-7B-shaped LlamaForCausalLM, {args.layers} layers, random weights, {args.dtype}",
        "context": args.context,
        "tokens_per_round": args.tokens,
        "rounds": rounds,
        "dense_s_first": dense_t,
        "weight_bytes": weight_bytes,
        "rows": rows,
        "gpu": before["gpu"],
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": {**before, "loadavg_1min_after": loadavg()},
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
