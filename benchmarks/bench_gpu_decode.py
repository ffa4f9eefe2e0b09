"""Whole-model generation on a GPU: HF (grouped_mm experts) vs moec's Triton backend, KV cache.

    python benchmarks/bench_gpu_decode.py [--models mixtral qwen3] [--dtype bf16|fp32] [--prompt 16] [--new 64]
                                          [--batch 1] [--rounds 3] [--hf-compile]

Systems: HF eager (dynamic cache), moec eager (dynamic cache), moec with cuda_graphs=True (static cache, each
one-token step a CUDA graph replay), and with --hf-compile transformers' own fast path (static cache, its forward
auto-compiled by torch.compile with CUDA graphs, mode "reduce-overhead": compiled in the warm-up round).

Models are a few layers of real MoE shapes with random weights, built on the GPU (no downloads):
"mixtral" = Mixtral-8x7B layers (E=8, H=4096, I=14336, top-2), "qwen3" = Qwen3-30B-A3B layers
(E=128, H=2048, I=768, top-8). Per model: prefill time of the prompt, decode tokens/s of
greedy generation (the prompt's forward excluded), whether each system's tokens equal HF's, and the
largest relative error of each system's logits over HF's generated sequence (teacher-forced: all read
the same tokens) against HF's model in fp32 on the same weights: in bf16, HF's own error is the yardstick.
With random weights the next-token logits are nearly flat, so in bf16 a rounding difference can change a
greedy token and the sequences part; fp32 (TF32 off) shows the rewrite itself. The two systems run in turn, `--rounds` times; medians are printed.
"""

import argparse
import copy
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import moec
from moec import models

MODELS = {
    "mixtral": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32000)),
    "qwen3": ("qwen3_moe", dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                                num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                vocab_size=32000, decoder_sparse_step=1, mlp_only_layers=[])),
}


def seconds(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--hf-compile", action="store_true", help="add transformers' static cache + torch.compile row")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False
    console = Console()
    t = Table(title=f"generation, {args.dtype}, batch {args.batch}, {args.prompt}-token prompt + {args.new} new tokens "
                    f"({torch.cuda.get_device_name()}, torch {torch.__version__})")
    for col in ("model", "system", "prefill ms", "decode tokens/s", "same tokens as HF", "logits error vs fp32"):
        t.add_column(col, justify="right")
    torch.set_default_device("cuda")
    for name in args.models:
        family, shape = MODELS[name]
        build = lambda: models.tiny_model(family, dtype=dtype, num_hidden_layers=args.layers, **shape)  # noqa: E731
        hf = build()
        gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
        systems = {"HF": (hf, {}),
                   "moec (triton)": (moec.compile(build(), backend="triton"), {}),
                   "moec (triton) + CUDA graphs": (moec.compile(build(), backend="triton", cuda_graphs=True), {})}
        if args.hf_compile:
            systems["HF static cache + torch.compile"] = (hf, dict(cache_implementation="static"))
        console.print(f"{name}: {len(moec.inspect(systems['moec (triton)'][0]).blocks)} blocks rewritten, "
                      f"{sum(p.numel() for p in hf.parameters()) / 1e9:.2f} B parameters a copy")
        ids = torch.randint(4, hf.config.vocab_size, (args.batch, args.prompt))
        times = {label: ([], []) for label in systems}
        tokens = {}
        with torch.no_grad():
            for _ in range(args.rounds + 1):  # the first round warms up (kernel compilation), not counted
                for label, (model, extra) in systems.items():
                    prefill = seconds(lambda: model(ids))
                    total = seconds(lambda: tokens.__setitem__(label, model.generate(ids, **gen, **extra)))
                    times[label][0].append(prefill)
                    times[label][1].append(args.batch * args.new / max(total - prefill, 1e-9))
            # every system reads HF's sequence; the reference is HF's model on the same weights in fp32
            ref = (copy.deepcopy(hf).float() if dtype != torch.float32 else hf)(tokens["HF"]).logits.float()
            errs = {label: ((model(tokens["HF"]).logits.float() - ref).abs().max() / ref.abs().max()).item()
                    for label, (model, _) in systems.items()}
        for label, (prefill, tps) in times.items():
            t.add_row(name, label, f"{statistics.median(prefill[1:]) * 1e3:.1f}", f"{statistics.median(tps[1:]):.0f}",
                      str(torch.equal(tokens[label], tokens["HF"])), f"{errs[label]:.1e}")
        graphs = moec.inspect(systems["moec (triton) + CUDA graphs"][0]).cuda_graphs
        console.print(f"{name}: {graphs.describe()}")
        del hf, systems
        torch.cuda.empty_cache()
    console.print(t)


if __name__ == "__main__":
    main()
