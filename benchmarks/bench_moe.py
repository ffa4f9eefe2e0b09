"""MoE block benchmark on CPU: HF experts implementations, torch.compile of HF, and moec.

    python benchmarks/bench_moe.py [--models mixtral deepseek] [--tokens 1 8 64 512] [--no-torch-compile]

Per model shape and token count: median time of one MoE block forward, and its ratio to the
bound measured on this machine: max(bytes of the distinct experts touched / copy bandwidth,
expert FLOPs / fp32 GEMM peak) (field.md). Random weights, no downloads.
"""

import argparse
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import moec  # noqa: E402
from moec import models  # noqa: E402
from moec.timing import median_time  # noqa: E402

BUILDERS = {"mixtral": models.demo_model, "deepseek": models.deepseek_style_model}


def machine_limits() -> tuple[float, float]:
    """(read+write copy bandwidth in bytes/s counting bytes read, fp32 GEMM FLOP/s)."""
    a = torch.empty(64 * 2**20 // 4)
    b = torch.empty_like(a)
    bw = a.numel() * 4 / median_time(lambda: b.copy_(a), 10)
    m = torch.randn(1024, 1024)
    flops = 2 * 1024**3 / median_time(lambda: m @ m, 10)
    return bw, flops


def bound(block_cfg, T: int, bw: float, flops: float) -> float:
    E, k, H, I = block_cfg
    touched = E * (1 - (1 - k / E) ** T)
    return max(touched * 3 * H * I * 4 / bw, 2 * T * k * 3 * H * I / flops)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(BUILDERS))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512])
    ap.add_argument("--no-torch-compile", action="store_true")
    args = ap.parse_args()
    console = Console()
    torch.manual_seed(0)
    bw, flops = machine_limits()
    console.print(f"machine: {torch.get_num_threads()} threads, copy bandwidth {bw / 1e9:.1f} GB/s, "
                  f"fp32 GEMM {flops / 1e9:.0f} GFLOP/s, torch {torch.__version__}")
    for name in args.models:
        impls = {}
        for impl in models.EXPERTS_IMPLEMENTATIONS:
            impls[f"HF {impl}"] = BUILDERS[name](num_hidden_layers=1, experts_implementation=impl).model.layers[0].mlp
        cfg = impls["HF grouped_mm"]
        base = copy.deepcopy(cfg)
        if not args.no_torch_compile:
            impls["torch.compile(HF grouped_mm)"] = torch.compile(copy.deepcopy(cfg), dynamic=True)
        compiled = copy.deepcopy(base)
        moec.compile(compiled)
        impls["moec"] = compiled
        spec = moec.inspect(compiled).blocks[0]
        E, k, H = spec.num_experts, spec.top_k, base.experts.gate_up_proj.shape[-1]
        I = base.experts.down_proj.shape[-1]
        t = Table(title=f"{name}-style MoE block (E={E}, k={k}, H={H}, I={I}{', +shared' if spec.shared != '-' else ''}), "
                        "fp32, median ms (x bound)")
        t.add_column("implementation")
        for T in args.tokens:
            t.add_column(f"{T} tok", justify="right")
        bounds = [bound((E, k, H, I), T, bw, flops) for T in args.tokens]
        t.add_row("bound (routed experts)", *(f"{b * 1e3:.2f}" for b in bounds))
        for label, blk in impls.items():
            cells = []
            for T, b in zip(args.tokens, bounds):
                x = torch.randn(1, T, H)
                s = median_time(lambda: blk(x), 20 if T <= 64 else 5)
                cells.append(f"{s * 1e3:.2f} ({s / b:.1f}x)")
            t.add_row(label, *cells)
        console.print(t)


if __name__ == "__main__":
    main()
