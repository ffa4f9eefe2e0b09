"""Expert parallelism on this machine (gloo, CPU): 2 ranks x 1 thread against 1 process x 2 threads, and a projection.

    python benchmarks/bench_distributed.py [--model mix|deepseek] [--rounds 3] [--new-tokens 64] [--prefill 256]
    python benchmarks/bench_distributed.py --project          # the projection table only
    python benchmarks/bench_distributed.py --balance          # copies of busy experts: the ranks' loads only

Both systems serve the same 2 requests: the single process as a batch of 2 (torch.set_num_threads(2)), each
rank one of them (data-parallel attention, experts sharded, OMP_NUM_THREADS=1). Per request: greedy decode of
--new-tokens after 16 prompt tokens (KV cache; synced_gpus on the ranks) and one prefill forward of --prefill
tokens. Reported: aggregate tokens/s (both requests over the slowest rank's time), the routed experts' bytes held
per process, RSS after serving and peak RSS per process (each rank builds the whole model before compile
releases the other shards; moec.load_sharded avoids that peak), and the bytes a rank sent to the other per
decoded token. The two systems run
interleaved, --rounds times, medians; the first round warms up. --project: bytes per token of the same exchange
(one row out and one result back per (token, slot) pair on another rank, bf16) for DeepSeek-V3 (hidden 7168,
top-8, 256 experts, 58 MoE layers) on 8 and 64 GPUs, over published link speeds, beside DeepEP's own figures.
--balance: the busiest rank's share of the routed pairs on the trained fine_moe_lm, with 0-4 copies of busy
experts per rank (moec.distributed.placement from a calibration on training text, loads of held-out text).
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = {"mix": "demo_model", "deepseek": "deepseek_style_model"}


def serve(args, rank: int, world: int) -> dict:
    """This process's share of the 2 requests: timed decode and prefill, memory, bytes exchanged (JSON-able)."""
    import torch

    import moec
    from moec import models

    model = getattr(models, MODELS[args.model])().eval()
    prompts = models.example_inputs(model, batch=2, seq=16, seed=1)["input_ids"]
    long = models.example_inputs(model, batch=2, seq=args.prefill, seed=2)["input_ids"]
    mine = slice(None) if world == 1 else slice(rank, rank + 1)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    if world > 1:
        kw["synced_gpus"] = True
        moec.compile(model, expert_parallel=moec.ExpertParallel())
    else:
        moec.compile(model)
    expert_bytes = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                       if ("_moec_shard_" in n or ".experts." in n) and "shared" not in n)
    with torch.no_grad():
        model.generate(prompts[mine], max_new_tokens=4, do_sample=False, **({"synced_gpus": True} if world > 1 else {}))
        stats = moec.inspect(model).expert_parallel
        sent0 = stats.bytes_sent if stats else 0
        t = time.perf_counter()
        model.generate(prompts[mine], **kw)
        decode = time.perf_counter() - t
        sent = (stats.bytes_sent - sent0) if stats else 0
        t = time.perf_counter()
        model(input_ids=long[mine], use_cache=False)
        prefill = time.perf_counter() - t
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"rank": rank, "decode_s": decode, "prefill_s": prefill, "expert_bytes": expert_bytes, "rss": rss,
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "sent_per_token": sent / (args.new_tokens * prompts[mine].shape[0])}


def worker(args):
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        torch.set_num_threads(1)
    else:
        rank = 0
        torch.set_num_threads(2)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:  # torchrun interleaves the ranks' stdout
        json.dump(serve(args, rank, world), f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run(args, world: int) -> list[dict]:
    out_dir = tempfile.mkdtemp(prefix="moec-ep-")
    me = [os.path.abspath(__file__), "--worker", "--model", args.model, "--new-tokens", str(args.new_tokens),
          "--prefill", str(args.prefill), "--out", out_dir]
    cmd = [sys.executable, *me] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *me]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
                         if world > 1 else os.environ)
    if out.returncode:
        raise RuntimeError(f"{cmd} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    results = []
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            results.append(json.load(f))
    shutil.rmtree(out_dir)
    return results


def project():
    from rich.console import Console
    from rich.table import Table

    H, k, layers, elem = 7168, 8, 58, 2  # DeepSeek-V3 (256 experts: uniform routing): hidden, top-k, MoE layers; bf16
    links = {"NVLink (H800, ~160 GB/s per GPU)": 160e9, "NVLink (H100, ~450 GB/s per GPU per direction)": 450e9,
             "InfiniBand 400 Gb/s (~50 GB/s per GPU)": 50e9}
    t = Table(title="Projection: DeepSeek-V3 exchange per MoE layer, 128 decode tokens per rank (moec's rows: bf16 both "
                    "ways, one per (token, slot) pair on another rank)")
    for col in ("GPUs", "link", "bytes per layer per rank", "time per layer (dispatch + combine)",
                "per decode step (58 layers)", "DeepEP low-latency, published (dispatch + combine)"):
        t.add_column(col)
    deepep = {8: "77 + 114 us (EP8, FP8 dispatch, RDMA)", 64: "173 + 314 us (EP64)"}
    for n in (8, 64):
        per_layer = 2 * 128 * k * (n - 1) / n * H * elem  # rows out + results back, uniform routing
        for name, bw in links.items():
            if n == 64 and "NVLink" in name:
                continue  # 64 GPUs span nodes: the inter-node link bounds it
            t.add_row(str(n), name, f"{per_layer / 2**20:.1f} MiB", f"{per_layer / bw * 1e6:.0f} us",
                      f"{layers * per_layer / bw * 1e3:.1f} ms", deepep[n] if "InfiniBand" in name else "-")
    Console(width=200).print(t)


def balance(replicas=(0, 1, 2, 4), worlds=(2, 4, 8)):
    """How evenly the ranks' experts are loaded, with copies of the busiest (ExpertParallel(replicas=...)) placed
    from a calibration run (fine_moe_lm, 64 experts, top-6, 4 blocks): loads measured on held-out text, copies
    placed from other windows of the held-out text or from the training text."""
    from rich.console import Console
    from rich.table import Table

    import moec
    from moec import examples
    from moec.distributed import placement

    model = examples.fine_moe_lm()
    heldout = examples.corpus("heldout")
    half = len(heldout) // 2
    seen = moec.calibrate(model, examples.evenly_spaced_batches(heldout[half:], 128, 4, 8))
    fits = {"held-out text, other windows": examples.evenly_spaced_batches(heldout[:half], 128, 4, 8),
            "training text": examples.evenly_spaced_batches(examples.corpus("train"), 128, 4, 8)}
    fits = {name: moec.calibrate(model, batches) for name, batches in fits.items()}
    t = Table(title="Expert load per rank, fine_moe_lm: the busiest rank's pairs over the mean rank's (1.00 = even) on "
                    "held-out text (32 x 128 tokens), mean of the 4 blocks / worst block")
    for col in ("ranks", "copies per rank", "experts per rank", *(f"copies placed from {n}" for n in fits),
                "copies placed from training text, on training text (in-sample)"):
        t.add_column(col)

    def ratio(held, load):  # a copied expert's pairs split evenly over its copies
        copies = [sum(e in h for h in held) for e in range(len(load))]
        per = [sum(load[e] / copies[e] for e in h) for h in held]
        return max(per) / (sum(per) / len(held))

    for world in worlds:
        for r in replicas:
            cells, own = [], None
            for fit in fits.values():
                held = [placement(len(b.load), world, b.load, r) for b in fit.blocks]
                out = [ratio(h, b.load) for h, b in zip(held, seen.blocks)]
                cells.append(f"{statistics.mean(out):.3f} / {max(out):.3f}")
                own = [ratio(h, b.load) for h, b in zip(held, fit.blocks)]  # the last fit's (training text)
            t.add_row(str(world), str(r), f"{64 // world} + {r}", *cells, f"{statistics.mean(own):.3f} / {max(own):.3f}")
    Console(width=200).print(t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=tuple(MODELS), default="mix")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--project", action="store_true")
    ap.add_argument("--balance", action="store_true", help="the load-balance table of expert copies only")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.project:
        return project()
    if args.balance:
        return balance()
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    results = {1: [], 2: []}
    for rnd in range(args.rounds + 1):  # round 0 warms up (page cache, imports)
        t0 = time.perf_counter()
        for world in (1, 2):
            r = run(args, world)
            if rnd:
                results[world].append(r)
        console.print(f"round {rnd}{' (warm-up)' if not rnd else ''}: {time.perf_counter() - t0:.1f} s wall")
    t = Table(title=f"{args.model}: 2 requests, 1 process x 2 threads vs 2 ranks x 1 thread (gloo), medians of "
                    f"{args.rounds} interleaved rounds")
    for col in ("system", f"decode tok/s ({args.new_tokens} new, 2 requests)", f"prefill {args.prefill} tok/s (2 requests)",
                "routed expert MiB per process", "RSS after serving, MiB", "peak RSS, MiB",
                "bytes sent per generated token (prompt included)"):
        t.add_column(col)
    for world, name in ((1, "1 process x 2 threads"), (2, "2 ranks x 1 thread (expert parallel)")):
        rounds = results[world]
        decode = statistics.median(2 * args.new_tokens / max(r["decode_s"] for r in rr) for rr in rounds)
        prefill = statistics.median(2 * args.prefill / max(r["prefill_s"] for r in rr) for rr in rounds)
        last = rounds[-1]
        t.add_row(name, f"{decode:.1f}", f"{prefill:.0f}", " / ".join(f"{r['expert_bytes'] / 2**20:.1f}" for r in last),
                  " / ".join(f"{r['rss'] / 2**20:.0f}" for r in last), " / ".join(f"{r['peak'] / 2**20:.0f}" for r in last),
                  " / ".join(f"{r['sent_per_token'] / 1024:.1f} KiB" for r in last) if world > 1 else "-")
    console.print(t)
    project()


if __name__ == "__main__":
    main()
