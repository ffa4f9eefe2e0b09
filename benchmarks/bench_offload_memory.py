"""Peak memory of a model bigger than its budget: moec.load_offloaded on a Qwen2-MoE-style model built on meta.

    python benchmarks/bench_offload_memory.py [--layers 8] [--experts 64] [--hidden 1024] [--inter 512]
                                              [--dtype bf16] [--budget 10%] [--tokens 8] [--dir /tmp/moec-mem]

Writes a random checkpoint one shard per layer (the model never exists whole in this process), then in a fresh
process builds the model on the meta device, loads it with moec.load_offloaded (disk store), generates --tokens
greedy tokens, and reports its peak resident memory (ru_maxrss) against the bound
    the fixed footprint (a process that imports torch, transformers and moec and compiles a tiny model)
    + the non-expert weights + the pool (budget) + OVERHEAD_BLOCKS copies (in the model's dtype) of one block's
    experts, what compiling one block holds at once: the block's own, its fp32 copy for the analysis and that
    copy's stacked layout (two copies' worth each from bf16), the stacked layout the graph reads, the serialised
    store file (measured 2.6 on --layers 8 with load_offloaded returning freed pages to the OS: 2026-11-30).
With --layers/--experts large enough the experts exceed the machine's RAM (`free -g`): the run then shows the
model generating all the same.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
OVERHEAD_BLOCKS = 4


def config(args):
    import transformers

    return transformers.Qwen2MoeConfig(
        vocab_size=512, hidden_size=args.hidden, intermediate_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=2, num_experts=args.experts, num_experts_per_tok=6,
        moe_intermediate_size=args.inter, shared_expert_intermediate_size=args.inter, max_position_embeddings=256,
        tie_word_embeddings=True, decoder_sparse_step=1, mlp_only_layers=[], dtype=DTYPES[args.dtype])


def meta_model(args):
    import transformers

    with torch.device("meta"):
        return transformers.Qwen2MoeForCausalLM(config(args)).to(DTYPES[args.dtype]).eval()


def write_checkpoint(args, folder: Path) -> dict:
    """Random weights, one safetensors file per layer plus one for the rest; returns byte counts."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = meta_model(args)
    gen = torch.Generator().manual_seed(0)
    shards, sizes = {}, {"experts": 0, "other": 0}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding
            continue
        layer = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(layer, []).append((name, t))
    for layer, items in shards.items():
        tensors = {}
        for name, t in items:
            std = 0.02 if t.dim() > 1 else 0.0
            v = (torch.randn(t.shape, generator=gen) * std + (1.0 if "norm" in name else 0.0)).to(t.dtype)
            tensors[name] = v
            sizes["experts" if ".experts." in name else "other"] += v.numel() * v.element_size()
        save_file(tensors, str(folder / f"{layer}.safetensors"))
        del tensors
    return sizes


def child(args) -> None:
    """In a fresh process: load offloaded, generate, report peak RSS."""
    import transformers  # noqa: F401  (its import is part of the baseline too)

    import moec

    if args.baseline:  # moec's fixed cost: imports, and compiling (proving) a tiny model
        from moec import models

        moec.compile(models.tiny_model("qwen2_moe"))
        print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
        return
    t0 = time.time()
    model = moec.load_offloaded(meta_model(args), args.dir + "/ckpt",
                                moec.Offload(budget=args.budget, path=args.dir + "/store"))
    load_s = time.time() - t0
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    t0 = time.time()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
    gen_s = time.time() - t0
    st = moec.inspect(model).offload
    s = st.total()
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "load_s": load_s,
                      "gen_s": gen_s, "tokens": out.shape[1] - 16, "slots": st.slots,
                      "hit_rate": st.rates(s)["hit_rate"], "bytes_read": s.bytes_read}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--budget", default="10%")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--dir", default="/tmp/moec-mem")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    t0 = time.time()
    sizes = write_checkpoint(args, Path(args.dir) / "ckpt")
    print(f"checkpoint: {sizes['experts'] / 2**30:.2f} GiB of experts, {sizes['other'] / 2**20:.0f} MiB other "
          f"({time.time() - t0:.0f} s to write)")
    run = lambda *extra: json.loads(subprocess.run(  # noqa: E731
        [sys.executable, __file__, "--child", *extra, *sys.argv[1:]], check=True, capture_output=True,
        text=True).stdout.strip().splitlines()[-1])
    base, r = run("--baseline"), run()
    E, L = args.experts, args.layers
    expert = sizes["experts"] / (E * L)
    pool = sum(r["slots"].values()) * expert
    bound = base["peak_rss"] + sizes["other"] + pool + OVERHEAD_BLOCKS * E * expert
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    print(f"peak RSS {gib(r['peak_rss'])} (fixed footprint {gib(base['peak_rss'])}); bound {gib(bound)} = "
          f"baseline + non-expert {gib(sizes['other'])} + pool {gib(pool)} ({sum(r['slots'].values())} slots) + "
          f"{OVERHEAD_BLOCKS} x one block's experts {gib(OVERHEAD_BLOCKS * E * expert)}; all experts {gib(sizes['experts'])}")
    print(f"load_offloaded {r['load_s']:.0f} s; {r['tokens']} tokens in {r['gen_s']:.1f} s "
          f"({r['tokens'] / r['gen_s']:.2f} tokens/s), hit rate {r['hit_rate']:.1%}, {gib(r['bytes_read'])} read; "
          f"within bound: {r['peak_rss'] <= bound}")


if __name__ == "__main__":
    main()
