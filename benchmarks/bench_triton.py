"""MoE layer benchmark on a GPU: moec's Triton backend vs HF experts implementations, torch.compile, _grouped_mm.

    python benchmarks/bench_triton.py [--shapes mixtral-8x7b qwen3-30b-a3b deepseek-v3] [--tokens 1 4 16 ...]
                                      [--quantized]

Per shape (bf16, Mixtral-style routing with the shape's E/H/I/k) and token count: layer time
of each row, achieved bandwidth (bytes of the distinct experts touched / time) as a fraction
of the peak, measured here as the best of large device-to-device copies, and TFLOP/s.
`--quantized` adds moec with int8 and int4 (g128) experts (bf16 activations): their bandwidth
counts the packed bytes read (weights + scales), and each cell gives the speed-up over the
bf16 moec row (issue 4's goal: int4 >= 3x at 1-16 tokens, >= 80% of peak).
`--graphs` adds each moec row timed in a CUDA graph (triton.testing.do_bench_cudagraph): the kernels' time
without the host's launch work, as a graphed decode step (compile(cuda_graphs=True)) runs them.
`--shapes tiny` smoke-tests the script anywhere (TRITON_INTERPRET=1 on a CPU).
"""

import argparse
import copy
import sys
from math import nan
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from triton_shapes import SHAPES, hf_block, timer  # noqa: E402

import moec  # noqa: E402
from moec.canonical import resolve  # noqa: E402
from moec.passes.quantize_experts import quantized_tensors  # noqa: E402
from moec.quant import nbytes  # noqa: E402


def peak_bandwidth(device: str) -> float:
    """Bytes/s read by the best large copy (read + write counted, as a stream benchmark does)."""
    if device != "cuda":
        return float("nan")
    a = torch.empty(2**30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() / timer(device)(lambda: b.copy_(a))


def grouped_mm_layer(block):
    """The fastest plain-torch formulation: sorted tokens + torch._grouped_mm (no Python loop)."""
    ex, gate = block.experts, block.gate

    def run(x):
        logits = F.linear(x, gate.weight)
        w, ids = logits.softmax(-1, dtype=torch.float32).topk(block.top_k)  # [T, k]
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        k = ids.shape[1]
        order = ids.reshape(-1).argsort()
        offs = torch.bincount(ids.reshape(-1), minlength=ex.gate_up_proj.shape[0]).cumsum(0).to(torch.int32)
        xs = x[order // k]
        h = torch._grouped_mm(xs, ex.gate_up_proj.transpose(1, 2), offs=offs)
        g, u = h.chunk(2, -1)
        y = torch._grouped_mm(F.silu(g) * u, ex.down_proj.transpose(1, 2), offs=offs) * w.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, order // k, y)
    return run


def quantized_rows(base, H: int, I: int) -> dict:
    """label -> (moec block with quantized experts, bytes read per expert): int8 and int4 g128
    (the largest of 128/64/32 dividing H and I on other shapes, as on `tiny`)."""
    group = next(g for g in (128, 64, 32) if H % g == 0 and I % g == 0)
    out = {}
    for cfg in (moec.Int8Experts(), moec.Int4Experts(group)):
        block = moec.compile(copy.deepcopy(base), backend="triton", quantize=cfg)
        if not moec.inspect(block).blocks:
            print(f"{cfg}: not rewritten: {moec.inspect(block).rejected[0].reason}")
            continue
        # the quantized graph no longer reads the bf16 expert weights: free them (DeepSeek-V3's are 22 GB a copy)
        block.experts.gate_up_proj.data, block.experts.down_proj.data = torch.empty(0), torch.empty(0)
        t = [quantized_tensors(resolve(block, moec.inspect(block).blocks[0].path), role) for role in ("w13", "w2")]
        label = "int8" if cfg.bits == 8 else f"int4 g{group}"
        out[f"moec (triton) {label}"] = (block, sum(nbytes(r) for r in t) / base.experts.gate_up_proj.shape[0])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=[s for s in SHAPES if s != "tiny"], choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096])
    ap.add_argument("--no-torch-compile", action="store_true")
    ap.add_argument("--quantized", action="store_true", help="add moec rows with int8 and int4 (g128) experts")
    ap.add_argument("--graphs", action="store_true", help="time each moec row in a CUDA graph too (no host work)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    time_of, peak = timer(device), peak_bandwidth(device)
    time_graph = timer(device, graph=True)
    console = Console(width=220)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    console.print(f"{name}: peak bandwidth (copy) {peak / 1e12:.2f} TB/s; torch {torch.__version__}")
    for shape in args.shapes:
        E, H, I, k = SHAPES[shape]
        rows = {}
        base = hf_block(shape, "grouped_mm", dtype, device)
        for impl in ("grouped_mm", "batched_mm"):
            rows[f"HF {impl}"] = hf_block(shape, impl, dtype, device) if impl != "grouped_mm" else base
        if not args.no_torch_compile:
            rows["torch.compile(HF grouped_mm)"] = torch.compile(copy.deepcopy(base), dynamic=True)
        rows["torch._grouped_mm"] = grouped_mm_layer(base)
        rows["moec (triton)"] = moec.compile(copy.deepcopy(base), backend="triton")
        quantized = quantized_rows(base, H, I) if args.quantized else {}
        t = Table(title=f"{shape} (E={E}, H={H}, I={I}, k={k}), bf16: us  (% peak bandwidth | TFLOP/s); "
                        "quantized rows: us (% peak bandwidth in packed bytes | speed-up over moec bf16)")
        t.add_column("implementation")
        for T in args.tokens:
            t.add_column(f"{T}", justify="right")
        bf16_moec = {}  # tokens -> seconds of the moec (triton) row (of its graph row for the quantized graph rows)
        entries = {**{r: (f, 3 * H * I * 2) for r, f in rows.items()}, **quantized}
        if args.graphs:
            entries |= {f"{r} [CUDA graph]": v for r, v in entries.items() if r.startswith("moec")}
        for label, (fn, expert_bytes) in entries.items():
            graph = label.endswith("[CUDA graph]")
            base_label = label.removesuffix(" [CUDA graph]")
            cells = []
            for T in args.tokens:
                x = torch.randn(1, T, H, device=device, dtype=dtype)
                with torch.no_grad():
                    try:
                        s = (time_graph if graph else time_of)(
                            lambda: fn(x.view(T, H)) if label == "torch._grouped_mm" else fn(x))
                    except Exception as e:  # a baseline that cannot run this shape says so in its cell
                        cells.append(type(e).__name__)
                        continue
                touched = E * (1 - (1 - k / E) ** T)  # expected distinct experts hit by T tokens
                bw = touched * expert_bytes / s
                if base_label == "moec (triton)":
                    bf16_moec[T, graph] = s
                if base_label in quantized:
                    cells.append(f"{s * 1e6:.0f} ({100 * bw / peak:.0f}% | {bf16_moec.get((T, graph), nan) / s:.2f}x)")
                else:
                    cells.append(f"{s * 1e6:.0f} ({100 * bw / peak:.0f}% | {2 * T * k * 3 * H * I / s / 1e12:.0f})")
            t.add_row(label, *cells)
        console.print(t)


if __name__ == "__main__":
    main()
