"""Model-level passes on the trained models: held-out perplexity, activated experts, expert memory and tokens/s.

    python benchmarks/bench_model_passes.py [--model fine|tiny] [--rounds 3] [--threads 2] [--new-tokens 64]
                                            [--only topk schedule search top-p prune merge] [--plot out.png]

Every point is `moec.compile(model, ..., approximate=True)` (torch backend; the baseline: plain moec.compile):
  topk      k from the model's own down to 2 (fine_moe_lm: 6..2; tiny_moe_lm: 2, then 1)
  schedule  per-block k of average <= --schedules (moec.topk_schedule: router mass from moec.calibrate)
  search    the same averages by measured loss (moec.topk_search: perplexity on the calibration text)
  top-p     moec.TopP(p) for p in --top-p (activated experts per token measured by moec.calibrate)
  prune     moec.expert_plan(cal, keep=n) for n in --keep (fine: 48, 32, 16; tiny: 6, 4)
  merge     the same counts, mode="merge"
Calibration runs on training text (2 batches of 8 x 128 bytes); the perplexity reads moec.examples.heldout_batches()
(2 batches of 8 x 128 bytes never trained on). Tokens/s: decode at batch 1 and 8 (greedy, --new-tokens after 16,
KV cache) and one prefill forward of the model's longest context (256 tokens), medians of --rounds interleaved
rounds (wall time per round printed). For topk, the alternative weighting (the kept weights scaled back to the
sum the model's k weights had, for routers that do not renormalise, like fine_moe_lm's) is measured on
perplexity only, with a hook on HF's router. --plot writes perplexity against decode tokens/s (batch 8), every point.
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


def points(args, load, cal, train, k0: int) -> dict[str, tuple[str, dict]]:
    """{name: (group, compile options)} of the points asked for, the baseline first."""
    ks = list(range(k0, 1, -1)) if k0 > 2 else [k0, 1]
    E = cal.blocks[0].num_experts
    keep = args.keep or ([48, 32, 16] if E == 64 else [E * 3 // 4, E // 2])
    averages = [a for a in args.schedules if a < k0]
    out = {f"k={k0} (moec, exact)": ("baseline", {})}
    groups = {
        "topk": lambda: {f"k={k}": {"topk": k} for k in ks[1:]},
        "schedule": lambda: {f"mass schedule <= {a}": {"topk": moec.topk_schedule(cal, a)} for a in averages},
        "search": lambda: {f"loss search <= {a}": {"topk": moec.topk_search(
            load(), a, lambda m: examples.perplexity(m, train))} for a in averages},
        "top-p": lambda: {f"top-p {p:g}": {"topk": moec.TopP(p)} for p in args.top_p},
        "prune": lambda: {f"prune to {n}": {"experts": moec.expert_plan(cal, keep=n)} for n in keep},
        "merge": lambda: {f"merge to {n}": {"experts": moec.expert_plan(cal, keep=n, mode="merge")} for n in keep},
    }
    for group in args.only:
        out.update({name: (group, opts) for name, opts in groups[group]().items()})
    return out


def expert_mib(model) -> float:
    """MiB of the routed experts the model holds (its blocks' expert tensors and moec's kept ones)."""
    return sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
               if "experts." in name and "shared" not in name or name.endswith("_kept")) / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=tuple(LOAD), default="fine")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--only", nargs="*", default=["topk", "schedule", "search", "top-p", "prune", "merge"],
                    choices=["topk", "schedule", "search", "top-p", "prune", "merge"])
    ap.add_argument("--schedules", type=float, nargs="*", default=[4.5, 3.3, 2.0],
                    help="average k of the per-block schedules (mass and loss search) to measure")
    ap.add_argument("--top-p", type=float, nargs="*", default=[0.5, 0.7, 0.8, 0.9])
    ap.add_argument("--keep", type=int, nargs="*", help="experts kept per block by prune / merge")
    ap.add_argument("--plot", help="write perplexity vs decode tokens/s (batch 8) as a PNG here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console, load = Console(width=200), LOAD[args.model]
    k0 = load().config.num_experts_per_tok
    batches = examples.heldout_batches()
    train = examples.evenly_spaced_batches(examples.corpus("train"), 128, 2, 8)  # never the held-out text
    cal = moec.calibrate(load(), train)
    console.print(cal)
    plan = points(args, load, cal, train, k0)
    systems, ppl, pairs, mib, alt = {}, {}, {}, {}, {}
    for name, (group, opts) in plan.items():
        model = load()
        moec.compile(model, **opts, **({"approximate": True} if opts else {}))
        systems[name], ppl[name], mib[name] = model, examples.perplexity(model, batches), expert_mib(model)
        blocks = moec.calibrate(model, batches).blocks  # the pairs each token runs, on the held-out text
        pairs[name] = sum(b.pairs for b in blocks) / len(blocks)
        if group == "topk" and (m := mass_kept(load(), opts["topk"])) is not None:
            alt[name] = examples.perplexity(m, batches)

    data = examples.corpus("heldout")
    prompts = {b: torch.stack([data[i * 97:i * 97 + 16] for i in range(b)]).long() for b in (1, 8)}
    long = data[:256][None].long()
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    speed = {name: {"decode 1": [], "decode 8": [], "prefill 256": []} for name in plan}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        t0 = time.perf_counter()
        for name, model in systems.items():
            with torch.no_grad():
                for b, ids in prompts.items():
                    t = time.perf_counter()
                    model.generate(ids, **kw)
                    if rnd:
                        speed[name][f"decode {b}"].append(b * args.new_tokens / (time.perf_counter() - t))
                t = time.perf_counter()
                model(input_ids=long, use_cache=False)
                if rnd:
                    speed[name]["prefill 256"].append(256 / (time.perf_counter() - t))
        console.print(f"round {rnd}{' (warm-up)' if not rnd else ''}: {time.perf_counter() - t0:.1f} s wall")

    base = next(iter(plan))
    med = {name: {m: statistics.median(v) for m, v in speed[name].items()} for name in plan}
    t = Table(title=f"{args.model}_moe_lm: model-level passes, held-out perplexity and tokens/s ({args.threads} "
                    f"threads, median of {args.rounds} interleaved rounds)")
    for col in ("point", "k per block / kept", "experts/token", "expert MiB", "perplexity", "vs exact",
                "kept weights scaled", "decode 1 tok/s", "decode 8 tok/s", "prefill 256 tok/s", "decode 1 / 8 vs exact"):
        t.add_column(col)
    for name, (group, opts) in plan.items():
        o = opts.get("topk", opts.get("experts"))
        what = (str(list(o.values())) if isinstance(o, dict) else str(len(next(iter(o.keep.values()))))
                if isinstance(o, moec.ExpertPlan) else "-" if o is None or isinstance(o, moec.TopP) else str(o))
        t.add_row(name, what, f"{pairs[name]:.2f}", f"{mib[name]:.2f}", f"{ppl[name]:.3f}",
                  f"{ppl[name] / ppl[base] - 1:+.1%}", f"{alt[name]:.3f}" if name in alt else "-",
                  *[f"{med[name][m]:.1f}" for m in ("decode 1", "decode 8", "prefill 256")],
                  f"{med[name]['decode 1'] / med[base]['decode 1']:.2f}x / "
                  f"{med[name]['decode 8'] / med[base]['decode 8']:.2f}x")
    console.print(t)
    if args.plot:
        plot(args.plot, plan, ppl, med, args.model)


def plot(path: str, plan: dict, ppl: dict, med: dict, model: str) -> None:
    """Two panels: every point (log perplexity), and the points within 10% of the exact model's perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = ppl[next(iter(plan))]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    markers = {"baseline": "*", "topk": "o", "schedule": "s", "search": "D", "top-p": "^", "prune": "v", "merge": "P"}
    for ax, near in zip(axes, (False, True)):
        for group, marker in markers.items():
            names = [n for n, (g, _) in plan.items() if g == group and (not near or ppl[n] <= 1.1 * base)]
            if names:
                xs, ys = [med[n]["decode 8"] for n in names], [ppl[n] for n in names]
                ax.scatter(xs, ys, marker=marker, s=90 if group == "baseline" else 40, label=group)
                for n, x, y in zip(names, xs, ys):
                    ax.annotate(n.replace(" (moec, exact)", "").replace("schedule ", "").replace("search ", ""),
                                (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("decode tokens/s, batch 8 (KV cache, CPU)")
        ax.set_ylabel("held-out perplexity")
        if not near:
            ax.set_yscale("log")
        ax.set_title("within 10% of the exact model's perplexity" if near else f"{model}_moe_lm: every point")
        ax.legend(fontsize=7)
    fig.suptitle("model-level passes: quality against throughput (lower right is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
