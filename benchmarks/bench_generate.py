"""Whole-model generation with a KV cache: moec's ONNX Runtime backend against HF eager and moec's torch backend.

    python benchmarks/bench_generate.py [--models mix gpt_oss] [--prompt 16] [--new-tokens 64] [--rounds 3]
                                        [--threads 2]

Models (random weights, fp32): "mix" = moec.models.demo_model() (Mixtral-style, hidden 512, 8 experts of 1792,
top-2, 4 layers); "gpt_oss" = a GPT-OSS of hidden 512, 4 layers, 8 experts (the size the deployment issue
measured onnxruntime-genai on). Systems, all greedy, the same tokens asserted against HF:
  HF eager (KV cache) | moec torch backend (KV cache) | moec backend="onnxruntime" with the KV cache, fp32 and
  int4 experts (g32) | moec backend="onnxruntime" without the cache (generate recomputes the sequence: how it
  ran before the KV-cache export).
Tokens/s of the whole generate call (prompt included), median of interleaved rounds; each round's wall time is
printed.
"""

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import moec  # noqa: E402
from moec import models  # noqa: E402

GPT_OSS = dict(hidden_size=512, intermediate_size=512, num_hidden_layers=4, num_local_experts=8,
               num_attention_heads=8, num_key_value_heads=2, head_dim=64,
               layer_types=["sliding_attention", "full_attention"] * 2)


def build(name: str):
    return models.demo_model() if name == "mix" else models.tiny_model("gpt_oss", **GPT_OSS)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mix", "gpt_oss"], choices=("mix", "gpt_oss"))
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    so = {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1}
    console = Console()
    for name in args.models:
        ref = build(name).eval()
        systems = {"HF eager (KV cache)": (ref, True)}
        systems["moec torch (KV cache)"] = (moec.compile(copy.deepcopy(ref), backend="torch"), True)
        for label, q in (("fp32", None), ("int4 g32 experts", moec.Int4Experts(32))):
            systems[f"moec onnxruntime {label} (KV cache)"] = (
                moec.compile(copy.deepcopy(ref), backend="onnxruntime", quantize=q, session_options=so), True)
        systems["moec onnxruntime fp32 (no cache)"] = (systems["moec onnxruntime fp32 (KV cache)"][0], False)
        ids = torch.randint(0, ref.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        with torch.no_grad():
            want = ref.generate(ids, **kw)
        speeds = {k: [] for k in systems}
        for rnd in range(args.rounds + 1):  # round 0 warms up (exports, session opening, numba)
            t0 = time.perf_counter()
            for label, (model, cache) in systems.items():
                with torch.no_grad():
                    t = time.perf_counter()
                    out = model.generate(ids, use_cache=cache, **kw)
                    tps = args.new_tokens / (time.perf_counter() - t)
                if "int4" not in label:
                    assert torch.equal(out, want), f"{name}, {label}: other tokens than HF"
                if rnd:
                    speeds[label].append(tps)
            console.print(f"{name} round {rnd}{' (warm-up)' if not rnd else ''}: {time.perf_counter() - t0:.1f} s wall")
        t = Table(title=f"{name}: generate {args.new_tokens} tokens after {args.prompt}, batch 1, {args.threads} "
                        f"threads, median of {args.rounds} rounds")
        for col in ("system", "tokens/s", "vs HF eager"):
            t.add_column(col)
        med = {k: statistics.median(v) for k, v in speeds.items()}
        for label, v in med.items():
            t.add_row(label, f"{v:.1f}", f"{v / med['HF eager (KV cache)']:.2f}x")
        console.print(t)


if __name__ == "__main__":
    main()
