"""Offloaded experts on models whose routing means something (moec.examples.fine_moe_lm / tiny_moe_lm, trained here).

    python benchmarks/bench_offload.py [--model fine|tiny] [--new-tokens 128] [--prompt 32] [--rounds 3] [--threads 2]

Table 1, cache behaviour per policy and budget (10/25/50% of the experts, disk store, router prefetch of width 2;
then the routing policy without prefetch, with widths 1 and 3, and with the predictor fitted by
moec.offload.fit_prefetch on 4 batches of 8 x 128 training bytes at widths 1-3): hit rate, prefetch precision/recall, MB read
per generated token, and Belady's bound (the best hit rate without prefetch on the same calls), from one greedy
generation of --new-tokens after a --prompt-token prompt of held-out text.
Table 2, generation tokens/s (same generation): fully resident (moec, no offload), offloaded at each budget
(policy auto, disk store, prefetch auto: none on a CPU; and 25% with router prefetch), naive on-demand loading (one
slot, no prefetch: every expert read from disk at each use), and int8 experts resident and offloaded at 25%
(the store holds the quantized experts; same tokens as resident int8) with their MB read per token. Systems interleaved per round; medians over --rounds; each round's wall time printed.
--cold: every expert read from the disk store is dropped from the page cache right after, so that each read
goes to the disk, as when the experts do not fit in memory (without it, a small model's store stays in the page
cache and "naive on-demand" reads come from memory).
Table 3, projection (a trace-driven replay of this run's routing, `moec.offload.simulate`): tokens/s of GPU
offload for real model sizes, misses per token x expert bytes / link bandwidth + the resident compute time,
at the same budgets. Assumptions printed with it.
Table 4, the pool's own cost per miss (no model): Qwen3-30B-A3B's layout (48 blocks of 128 experts, top-8) with
experts of a few bytes in the host store, so that a miss costs only moec's bookkeeping (slot lookup, the policy's
victim search over every slot, the statistics); a Zipf routing trace, at budgets up to thousands of slots.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import moec
from moec import examples
from moec.offload import Pool, optimal, simulate

BUDGETS = ("10%", "25%", "50%")
# (name, expert bytes in bf16, routed experts per layer, top-k, layers, resident compute s/token on an H100)
MODELS = (("Mixtral-8x7B", 3 * 4096 * 14336 * 2, 8, 2, 32, 0.012),
          ("DeepSeek-V2-Lite", 3 * 2048 * 1408 * 2, 64, 6, 26, 0.006),
          ("Qwen3-30B-A3B", 3 * 2048 * 768 * 2, 128, 8, 48, 0.008))
LINKS = (("PCIe 4 x16", 25e9), ("PCIe 5 x16", 50e9), ("NVMe", 6e9))


def generate(model, prompt, n):
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out, n / (time.perf_counter() - t0)


LOAD = {"fine": examples.fine_moe_lm, "tiny": examples.tiny_moe_lm}


def offloaded(load, budget, policy="auto", prefetch="auto", quantize=None):
    model = load()
    moec.compile(model, quantize=quantize, offload=moec.Offload(budget=budget, policy=policy, prefetch=prefetch))
    return model


def cold_reads() -> None:
    """Every expert the disk store reads leaves the page cache right after (POSIX_FADV_DONTNEED), so each read goes
    to the disk, as for a model whose experts do not fit the machine's memory (--cold)."""
    from moec.offload.store import DiskStore

    read = DiskStore.read_into

    def cold(self, block, role, e, into):
        out = read(self, block, role, e, into)
        path = self._file(block)
        _, _, offset, nbytes = self._entries(block, path)[f"{role}.{e}"]
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return out

    DiskStore.read_into = cold


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=tuple(LOAD), default="fine")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tables", default="1,2,3,4", help="which tables to run, e.g. 2")
    ap.add_argument("--cold", action="store_true", help="table 2: every store read goes to the disk (page cache dropped "
                                                         "after each read: experts bigger than memory)")
    args = ap.parse_args()
    if args.cold:
        cold_reads()
    tables = {int(t) for t in args.tables.split(",")}
    torch.set_num_threads(args.threads)
    console = Console(width=170)
    prompt = examples.heldout_batches(seq_len=args.prompt)[0][:1]
    n, load = args.new_tokens, LOAD[args.model]

    if 4 in tables:
        pool_table(console, args.rounds)
    if not tables & {1, 2, 3}:
        return
    if 1 in tables:
        cache_table(console, load, args, prompt, n)
    resident = load()
    moec.compile(resident)
    if 2 in tables:
        speed_table(console, load, args, prompt, n, resident)
    if 3 in tables:
        projection_table(console, load, prompt, n, resident)


def cache_table(console, load, args, prompt, n):
    t1 = Table(title=f"cache behaviour: {args.model}_moe_lm, {n} tokens after {args.prompt}, disk store")
    for col in ("policy", "budget", "slots", "prefetch (width)", "hit rate", "prefetch precision", "prefetch recall",
                "MB read/token", "best without prefetch"):
        t1.add_column(col)
    runs = [(policy, budget, "router", 2) for policy in ("lru", "lfu", "routing", "auto") for budget in BUDGETS]
    runs += [("routing", budget, pf, w) for budget in BUDGETS for pf, w in ((None, 2), ("router", 1), ("router", 3))]
    runs += [("routing", budget, "fitted", w) for budget in BUDGETS for w in (1, 2, 3)]
    train = examples.evenly_spaced_batches(examples.corpus("train"), 128, 4, 8)  # the fit's text: never held out
    for policy, budget, prefetch, width in runs:
        model = load()
        moec.compile(model, offload=moec.Offload(budget=budget, policy=policy, prefetch=prefetch and "router",
                                                 prefetch_width=width))
        if prefetch == "fitted":
            moec.offload.fit_prefetch(model, train)
        generate(model, prompt, n)
        st = moec.inspect(model).offload
        s, slots = st.total(), sum(st.slots.values())
        r = st.rates(s)
        t1.add_row(policy, budget, str(slots), f"{prefetch} ({width})" if prefetch else "none", f"{r['hit_rate']:.1%}",
                   f"{r['prefetch_precision']:.1%}", f"{r['prefetch_recall']:.1%}", f"{s.bytes_read / 2**20 / n:.2f}",
                   f"{optimal(list(st.trace), slots):.1%}")
    console.print(t1)
    console.print("best without prefetch: Belady's bound on the same calls (moec.offload.optimal: evicts the expert "
                  "needed furthest ahead; no policy that waits for the call to load can beat it)")


def speed_table(console, load, args, prompt, n, resident):
    resident_q = load()
    int8 = moec.Int8Experts()  # int4's groups (32+) do not divide fine_moe_lm's expert width (80)
    moec.compile(resident_q, quantize=int8)
    systems = {"resident (moec, no offload)": resident, "naive on-demand (1 slot, no prefetch)":
               offloaded(load, 1, "lru", None), **{f"offload {b} (auto)": offloaded(load, b) for b in BUDGETS},
               "offload 25% (auto, prefetch router)": offloaded(load, "25%", "auto", "router"),
               "resident int8": resident_q, "offload 25% int8 (auto)": offloaded(load, "25%", quantize=int8)}
    want = {False: generate(resident, prompt, n)[0], True: generate(resident_q, prompt, n)[0]}
    os.sync()  # the stores written back, so that --cold's page-cache drops take (dirty pages stay cached)
    speeds = {name: [] for name in systems}
    for rnd in range(args.rounds):
        t0 = time.perf_counter()
        for name, model in systems.items():
            out, tps = generate(model, prompt, n)
            assert torch.equal(out, want["int8" in name]), f"{name}: other tokens than the resident model"
            speeds[name].append(tps)
        console.print(f"round {rnd + 1}: {time.perf_counter() - t0:.1f} s wall")
    t2 = Table(title=f"generation tokens/s (median of {args.rounds} interleaved rounds, {args.threads} threads; "
                     f"same tokens as resident, or as resident int8){'; every store read from the disk' * args.cold}")
    for col in ("system", "tokens/s", "vs naive", "vs resident", "MB read/token"):
        t2.add_column(col)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    naive, full = med["naive on-demand (1 slot, no prefetch)"], med["resident (moec, no offload)"]
    for name, v in med.items():
        st = moec.inspect(systems[name]).offload
        read = f"{st.total().bytes_read / 2**20 / (n * args.rounds):.2f}" if st else "-"
        t2.add_row(name, f"{v:.1f}", f"{v / naive:.2f}x", f"{v / full:.2f}x", read)
    console.print(t2)


def projection_table(console, load, prompt, n, resident):
    model = offloaded(load, "100%", "routing", None)
    generate(model, prompt, n)
    trace = list(moec.inspect(model).offload.trace)
    blocks = {b for b, _ in trace}
    cfg = resident.config
    E = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    t3 = Table(title="projection: GPU offload of real sizes, this run's hit rates (routing policy, replayed "
                     "without prefetch), tokens/s = 1 / (misses/token x expert bytes / link + compute)")
    for col in ("model", "budget", "hit rate (replay)", *[name for name, _ in LINKS], "resident"):
        t3.add_column(col)
    for name, nbytes, _, k, layers, compute in MODELS:
        for budget in BUDGETS:
            slots = max(1, int(float(budget[:-1]) / 100 * E * len(blocks)))
            hit = simulate(trace, slots, "routing")
            misses = (1 - hit) * k * layers  # per decoded token, at the trained model's hit rate
            t3.add_row(name, budget, f"{hit:.1%}",
                       *[f"{1 / (misses * nbytes / bw + compute):.1f}" for _, bw in LINKS], f"{1 / compute:.0f}")
    console.print(t3)
    console.print("projection assumptions: hit rates of this model's routing carried over to the real sizes "
                  "(real routing differs); loads not overlapped with compute (prefetch would hide part of them); "
                  "compute per token as listed in MODELS (bf16 on an H100, not measured here).")


def pool_table(console, rounds, blocks=48, E=128, k=8, calls=4000):
    """Table 4: microseconds of moec's bookkeeping per miss (tiny experts in the host store)."""
    rng = np.random.default_rng(0)
    trace = [(f"b{c % blocks}", sorted({int(e) for e in rng.zipf(1.2, k) % E})) for c in range(calls)]
    t4 = Table(title=f"the pool's cost per miss: {blocks} blocks of {E} experts, top-{k}, Zipf routing, "
                     f"{calls} calls, experts of 16 bytes (host store); medians of {rounds}")
    for col in ("budget", "slots", "policy", "hit rate", "us per call", "us per miss"):
        t4.add_column(col)
    for budget in ("2%", "10%", "25%", "50%"):
        for policy in ("lru", "routing"):
            times = []  # s per round
            for _ in range(rounds):
                pool = Pool(moec.Offload(budget=budget, store="host", policy=policy, prefetch=None), "cpu")
                for b in range(blocks):
                    pool.register(f"b{b}", {"w13": torch.zeros(E, 2, 2)})
                t0 = time.perf_counter()
                for block, need in trace:
                    pool.note_call(block, frozenset(need))
                    held = pool.pin(block, need)
                    for e in need:
                        pool.acquire(block, e, held)
                    pool.release(block, held)
                times.append(time.perf_counter() - t0)
            s, t = pool.stats.total(), statistics.median(times)
            (slots,) = pool.stats.slots.values()
            t4.add_row(budget, str(slots), policy, f"{s.hits / (s.hits + s.misses):.1%}", f"{t / calls * 1e6:.1f}",
                       f"{t / s.misses * 1e6:.1f}")
    console.print(t4)
    console.print("us per call: one block's lookups of its k experts; us per miss: the replay's time (hits included) "
                  "over its misses.")


if __name__ == "__main__":
    main()
