"""Fewer activated experts (reduce_topk) on the trained models: held-out perplexity and tokens/s per k.

    python benchmarks/bench_model_passes.py [--model fine|tiny] [--rounds 3] [--threads 2] [--new-tokens 64]

For each k from the model's own down to 2 (fine_moe_lm: 6..2; tiny_moe_lm: 2, then 1), and per-block schedules
of average k <= --schedules (moec.topk_schedule on a moec.calibrate run over training text):
`moec.compile(model, topk=k, approximate=True)` (torch backend; the model's own k: plain moec.compile), its
held-out perplexity (moec.examples.heldout_batches: 2 batches of 8 x 128 bytes never trained on) and tokens/s:
decode at batch 1 and 8 (greedy, --new-tokens after 16, KV cache) and one prefill forward of the model's
longest context (256 tokens). Speeds are medians of --rounds interleaved rounds (wall time per round printed).
The alternative weighting (the kept weights scaled back to the sum the model's k weights had, for routers that
do not renormalise, like fine_moe_lm's) is measured on perplexity only, with a hook on HF's router.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from rich.console import Console
from rich.table import Table

import moec
from moec import examples

LOAD = {"fine": examples.fine_moe_lm, "tiny": examples.tiny_moe_lm}


def mass_kept(model, k: int):
    """HF's routers at top-k with the kept weights scaled to the sum of the model's own top-k weights; None if the
    model's routers renormalise their weights (there the two rules are the same) or are not HF's top-k routers."""
    routers = [m for m in model.modules() if hasattr(m, "top_k") and getattr(m, "norm_topk_prob", True) is False]
    if not routers:
        return None
    def hook(mod, args, out, k0=routers[0].top_k):
        logits, scores, ids = out
        full = logits.float().softmax(-1).topk(k0, dim=-1).values.sum(-1, keepdim=True)  # the model's k's sum
        return logits, scores * (full / scores.float().sum(-1, keepdim=True)).to(scores.dtype), ids

    for m in routers:
        m.top_k = k
        m.register_forward_hook(hook)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=tuple(LOAD), default="fine")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--schedules", type=float, nargs="*", default=[4.5, 3.3, 2.0],
                    help="average k of the per-block schedules (moec.topk_schedule) to measure")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console, load = Console(width=160), LOAD[args.model]
    k0 = load().config.num_experts_per_tok
    ks = list(range(k0, 1, -1)) if k0 > 2 else [k0, 1]
    batches = examples.heldout_batches()
    # schedules from a calibration run on training text (not the held-out text the perplexity reads)
    cal = moec.calibrate(load(), examples.evenly_spaced_batches(examples.corpus("train"), 128, 2, 8))
    console.print(cal)
    plans = {k: k for k in ks}
    plans.update({f"schedule avg <= {a}": moec.topk_schedule(cal, a) for a in args.schedules if a < k0})
    systems, ppl = {}, {}
    for k, plan in plans.items():
        model = load()
        moec.compile(model, **({} if plan == k0 else {"topk": plan, "approximate": True}))
        systems[k], ppl[k] = model, examples.perplexity(model, batches)
    alt = {k: examples.perplexity(m, batches) for k in ks[1:] if (m := mass_kept(load(), k)) is not None}

    data = examples.corpus("heldout")
    prompts = {b: torch.stack([data[i * 97:i * 97 + 16] for i in range(b)]).long() for b in (1, 8)}
    long = data[:256][None].long()
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    speed = {k: {"decode 1": [], "decode 8": [], "prefill 256": []} for k in plans}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        t0 = time.perf_counter()
        for k, model in systems.items():
            with torch.no_grad():
                for b, ids in prompts.items():
                    t = time.perf_counter()
                    model.generate(ids, **kw)
                    if rnd:
                        speed[k][f"decode {b}"].append(b * args.new_tokens / (time.perf_counter() - t))
                t = time.perf_counter()
                model(input_ids=long, use_cache=False)
                if rnd:
                    speed[k]["prefill 256"].append(256 / (time.perf_counter() - t))
        console.print(f"round {rnd}{' (warm-up)' if not rnd else ''}: {time.perf_counter() - t0:.1f} s wall")
    t = Table(title=f"{args.model}_moe_lm: reduce_topk, held-out perplexity and tokens/s ({args.threads} threads, "
                    f"median of {args.rounds} interleaved rounds)")
    for col in ("k", "perplexity", "vs k=%d" % k0, "kept weights scaled to k's sum: perplexity",
                "decode 1 tok/s", "decode 8 tok/s", "prefill 256 tok/s", "decode 1 vs k=%d" % k0):
        t.add_column(col)
    base = {m: statistics.median(v) for m, v in speed[k0].items()}
    for k, plan in plans.items():
        med = {m: statistics.median(v) for m, v in speed[k].items()}
        name = str(k) if isinstance(plan, int) else f"{k}: {list(plan.values())}"
        t.add_row(name, f"{ppl[k]:.3f}", f"{ppl[k] / ppl[k0] - 1:+.1%}", f"{alt[k]:.3f}" if k in alt else "-",
                  *[f"{med[m]:.1f}" for m in ("decode 1", "decode 8", "prefill 256")],
                  f"{med['decode 1'] / base['decode 1']:.2f}x")
    console.print(t)


if __name__ == "__main__":
    main()
