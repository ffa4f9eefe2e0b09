"""Compile time: how long moec takes to find, prove and install MoE blocks (the proof is most of it).

    python benchmarks/bench_compile.py [--experts 256] [--hidden 256] [--inter 256] [--top-k 8]

Rows: a hand-written ModuleList block (E nn.Module experts: the layout moec stacks), a stacked-tensor
block, and an HF Mixtral block of the same size; seconds per compile (median of --repeat), with the
proof's probes reported by moec.inspect. Random weights, CPU.
"""

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import handwritten as hw  # noqa: E402

import moec  # noqa: E402


def builders(E: int, H: int, I: int, k: int) -> dict:
    spec = dict(hidden=H, inter=I, num_experts=E, top_k=k)
    cfg = transformers.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
    return {
        "hand-written ModuleList (loop over experts)": lambda: hw.make_block(hw.Spec(**spec, layout="modulelist")),
        "hand-written stacked (einsum gather)": lambda: hw.make_block(hw.Spec(**spec, layout="stacked_fused",
                                                                              style="einsum_gather")),
        "HF Mixtral block (grouped_mm)": lambda: _init(transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(
            cfg).eval()),
    }


def _init(block):
    """A standalone HF block's parameters are torch.empty (HF initialises them from the model): draw them."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1, generator=gen)
    return block


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    console = Console()
    t = Table(title=f"moec.compile time, E={args.experts}, H={args.hidden}, I={args.inter}, top-{args.top_k}, CPU "
                    f"({torch.get_num_threads()} threads)")
    for col in ("block", "seconds", "result", "proof"):
        t.add_column(col)
    for name, build in builders(args.experts, args.hidden, args.inter, args.top_k).items():
        block = build()
        secs = []
        for _ in range(args.repeat):
            b = copy.deepcopy(block)
            t0 = time.perf_counter()
            moec.compile(b)
            secs.append(time.perf_counter() - t0)
        r = moec.inspect(b)
        result = r.blocks[0].router if r.blocks else f"rejected: {r.rejected[0].reason}"
        t.add_row(name, f"{statistics.median(secs):.1f}", result, r.blocks[0].proof if r.blocks else "-")
    console.print(t)


if __name__ == "__main__":
    main()
