"""MoE benchmark on CPU: HF experts implementations, torch.compile of HF, and moec; block and whole model.

    python benchmarks/bench_moe.py [--models mixtral deepseek] [--tokens 1 8 64 512]
                                   [--levels block model] [--no-torch-compile] [--quantized] [--ort]
                                   [--repeat N] [--breakdown]

Block level: median time of one MoE block forward and its ratio to the bound measured on
this machine: max(bytes of the distinct experts touched (routed + shared) / read bandwidth,
expert FLOPs / fp32 GEMM peak) (field.md). Model level: a whole forward of the model
(2 layers, batch 1, T tokens) and each row's speed-up over the best HF experts
implementation, with the bound (the other parameters read once + each layer's expert bound).
`--quantized` adds moec with int8 and int4 experts (group 128, or the largest of 64/32 that
divides the expert's inner dim), weight-only and with int8 activations ("a8"), and bounds for their packed
bytes (weights + scales). `--ort`
adds moec's onnxruntime backend (CPU provider): MoE nodes in fp32, and with `--quantized` QMoE
int8 / int4 nodes (the export happens in the warm-up call). Blocks with shared experts also get
"+shared" rows (moec's shared MLP quantized too, torch backend).
Each row runs its calls back to back, so its touched weights can stay in the 32 MB L3 cache between
calls. `--repeat N` measures every row N times, in turn, and keeps each row's best median: on a
shared machine a slow spell of a few seconds then hits one pass of a row, not the row.
`--breakdown` adds, per block, where moec's time goes: its graph run node by node, with the time of
the route op, the experts op, the shared experts and the rest, and the most a faster experts op
could give the block: fp32 block / (fp32 block - fp32 experts op).
Random weights, no downloads.
"""

import argparse
import copy
import dataclasses
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import moec  # noqa: E402
from moec import models  # noqa: E402
from moec.canonical import graph_inputs  # noqa: E402
from moec.timing import median_time  # noqa: E402

BUILDERS = {"mixtral": models.demo_model, "deepseek": models.deepseek_style_model}


def machine_limits() -> tuple[float, float]:
    """(read bandwidth in bytes/s, fp32 GEMM FLOP/s): the best of a large sum and a weight-streaming
    GEMM (MKL reads [N, K] weights at up to ~40 GB/s with two rows), and a 1024^3 GEMM."""
    a = torch.randn(64 * 2**20)  # 256 MB, far beyond the caches
    w = torch.randn(16, 2048, 2048)  # 256 MB of weights, 16 GEMMs with two rows each
    x = torch.randn(2, 2048)
    bw = max(a.numel() * 4 / median_time(lambda: a.sum(), 5),
             w.numel() * 4 / median_time(lambda: [torch.mm(w[i], x.T) for i in range(16)], 5))
    m = torch.randn(1024, 1024)
    return bw, 2 * 1024**3 / median_time(lambda: m @ m, 10)


def block_shape(block) -> dict:
    spec = moec.inspect(block).blocks[0]
    ex = block.experts
    shared = getattr(block, "shared_experts", None)
    return dict(E=spec.num_experts, k=spec.top_k, H=ex.gate_up_proj.shape[-1], I=ex.down_proj.shape[-1],
                shared_I=shared.down_proj.in_features if shared is not None else 0)


def quant_configs(I: int, shared: bool = False) -> dict:
    """label -> config: int8, and int4 with the largest group (128/64/32) dividing the expert inner dim I, each
    weight-only and with int8 activations ("a8"); with `shared`, all again with the shared experts quantized."""
    g = next(g for g in (128, 64, 32) if I % g == 0)
    cfgs = {"int8": moec.Int8Experts(), f"int4 g{g}": moec.Int4Experts(g),
            "int8 a8": moec.Int8Experts(activations="int8"), f"int4 g{g} a8": moec.Int4Experts(g, activations="int8")}
    return {**cfgs, **({f"{k} +shared": dataclasses.replace(c, shared=True) for k, c in cfgs.items()} if shared else {})}


def expert_bytes(cfg, H: int) -> float:
    """Bytes per expert weight: fp32, or the packed weight + its fp32 scale (per row of H / per group)."""
    return 4.0 if cfg is None else 1 + 4 / H if cfg.bits == 8 else 0.5 + 4 / cfg.group_size


def bound(s: dict, T: int, bw: float, flops: float, expert_bytes: float = 4.0) -> float:
    E, k, H, I, Is = s["E"], s["k"], s["H"], s["I"], s["shared_I"]
    touched = E * (1 - (1 - k / E) ** T)  # expected distinct experts hit by T tokens
    return max((touched * I * expert_bytes + Is * 4) * 3 * H / bw, 2 * T * (k * I + Is) * 3 * H / flops)


def model_bound(model, s: dict, T: int, bw: float, flops: float, expert_bytes: float = 4.0) -> float:
    """A whole forward: every parameter read once, except the token embedding (T rows of it) and the
    routed experts (per layer, the distinct experts touched: `bound`), over the read bandwidth."""
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if ".mlp.experts." not in n and "embed_tokens" not in n)
    return dense / bw + model.config.num_hidden_layers * bound({**s, "shared_I": 0}, T, bw, flops, expert_bytes)


def rows(name: str, level: str, torch_compile: bool, quantized: bool, ort: bool) -> dict:
    """label -> module: every HF experts implementation, torch.compile of HF's default, moec."""
    out = {}
    for impl in models.EXPERTS_IMPLEMENTATIONS:
        m = BUILDERS[name](num_hidden_layers=1 if level == "block" else 2, experts_implementation=impl)
        out[f"HF {impl}"] = m.model.layers[0].mlp if level == "block" else m
    base = out["HF grouped_mm"]
    if torch_compile:
        out["torch.compile(HF grouped_mm)"] = torch.compile(copy.deepcopy(base), dynamic=True)
    out["moec"] = moec.compile(copy.deepcopy(base))
    block = base if level == "block" else base.model.layers[0].mlp
    has_shared = getattr(block, "shared_experts", None) is not None
    qcfgs = quant_configs(block.experts.down_proj.shape[-1], has_shared) if quantized else {}
    for label, q in qcfgs.items():
        out[f"moec {label}"] = moec.compile(copy.deepcopy(base), quantize=q)
    if ort:  # the ONNX export keeps shared experts in fp32
        for label, q in {"": None, **{k: c for k, c in qcfgs.items() if not c.shared}}.items():
            out[f"moec onnxruntime {label}".strip()] = moec.compile(copy.deepcopy(base), backend="onnxruntime",
                                                                     quantize=q)
    return out


def inputs_for(level: str, model, T: int):
    if level == "block":
        return (torch.randn(1, T, model.experts.gate_up_proj.shape[-1]),), {}
    return (), models.example_inputs(model, seq=T)


class _Timed(fx.Interpreter):
    """Runs a compiled block's graph node by node, adding each node's time to its part: the moec route
    (and capacity) op, the moec experts op, the shared experts (call_module nodes), or the rest (reshapes,
    adds, ...)."""

    def run_node(self, n):
        t0 = time.perf_counter()
        out = super().run_node(n)
        name = str(getattr(n.target, "_qualified_op_name", ""))
        part = ("route" if name in ("moec::route", "moec::capacity") else "experts" if name.startswith("moec::")
                else "shared" if n.op == "call_module" else "rest")
        self.ms[part] = self.ms.get(part, 0.0) + (time.perf_counter() - t0) * 1e3
        return out


def breakdown(console, name: str, impls: dict, tokens: list[int], H: int, repeat: int) -> None:
    """Table: per moec row (torch backend), the block's median ms and the median ms of each part of its
    graph, timed in place (run node by node: the rest includes the interpreter's own overhead)."""
    t = Table(title=f"{name}-style MoE block: where moec's time goes, median ms of the block and of each part "
                    f"of its graph run node by node (speed-up vs moec fp32)")
    for col in ("implementation", "tokens", "block", "route", "experts", "shared", "rest"):
        t.add_column(col, justify="left" if col == "implementation" else "right")
    limits = []
    for T in tokens:
        x = torch.randn(1, T, H)
        ref = None
        for label, m in impls.items():
            ms = {}
            for _ in range(repeat):  # each part's best median over the passes
                gm = m.__dict__["_moec_graph"]
                run = _Timed(gm)
                runs = []
                with torch.no_grad():
                    for i in range(52 if T <= 64 else 7):
                        run.ms = {}
                        run.run(x, *graph_inputs(gm, m))
                        if i >= 2:  # after two warm-up runs
                            runs.append(run.ms)
                now = {"block": median_time(lambda: m(x), 50 if T <= 64 else 5) * 1e3,
                       **{k: statistics.median(r.get(k, 0.0) for r in runs) for k in ("route", "experts", "shared", "rest")}}
                ms = {k: min(ms.get(k, v), v) for k, v in now.items()}
            ref = ref or ms
            t.add_row(label, str(T), *(f"{v:.3f}" + (f" ({ref[k] / v:.1f}x)" if k in ("block", "experts") else "")
                                       if v else "-" for k, v in ms.items()))
        outside = ref["block"] - ref["experts"]
        limits.append(f"{T} tok " + (f"{ref['block'] / outside:.1f}x" if outside > 0 else "n/a (noisy run)"))
        t.add_section()
    console.print(t)
    console.print(f"most any experts op could give the {name}-style block (fp32 block / (fp32 block - its experts "
                  f"op)): {', '.join(limits)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512])
    ap.add_argument("--levels", nargs="+", default=["block", "model"], choices=["block", "model"])
    ap.add_argument("--no-torch-compile", action="store_true")
    ap.add_argument("--quantized", action="store_true")
    ap.add_argument("--ort", action="store_true", help="add moec's onnxruntime backend rows")
    ap.add_argument("--repeat", type=int, default=1, help="measure every row N times, keep its best median")
    ap.add_argument("--breakdown", action="store_true", help="per block: time in route, experts, shared, rest")
    args = ap.parse_args()
    console = Console()
    torch.manual_seed(0)
    bw, flops = machine_limits()
    console.print(f"machine: {torch.get_num_threads()} threads, read bandwidth {bw / 1e9:.1f} GB/s, "
                  f"fp32 GEMM {flops / 1e9:.0f} GFLOP/s, torch {torch.__version__}")
    for name in args.models:
        for level in args.levels:
            impls = rows(name, level, not args.no_torch_compile, args.quantized, args.ort)
            ref = impls["HF grouped_mm"]
            s = block_shape(ref if level == "block" else ref.model.layers[0].mlp)
            title = (f"{name}-style {'MoE block' if level == 'block' else 'model (2 layers)'} (E={s['E']}, k={s['k']}, "
                     f"H={s['H']}, I={s['I']}{', shared ' + str(s['shared_I']) if s['shared_I'] else ''}), fp32, "
                     f"median ms{f', best of {args.repeat} passes' if args.repeat > 1 else ''} "
                     f"({'x bound' if level == 'block' else 'speed-up vs best HF'})")
            t = Table(title=title)
            t.add_column("implementation")
            for T in args.tokens:
                t.add_column(f"{T} tok", justify="right")
            times, failed = {label: [] for label in impls}, {}
            for T in args.tokens:
                a, kw = inputs_for(level, ref, T)
                best = {}
                for _ in range(args.repeat):  # rows in turn, so a slow spell of the machine hits one pass only
                    for label, m in impls.items():
                        if label in failed:
                            continue
                        try:
                            secs = median_time(lambda: m(*a, **kw), 20 if T <= 64 else 5)
                        except Exception as e:  # e.g. a model torch.export cannot export: say so in the table
                            failed[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                            continue
                        best[label] = min(best.get(label, secs), secs)
                for label, secs in best.items():
                    times[label].append(secs)
            for q, cfg in {"": None, **(quant_configs(s["I"]) if args.quantized else {})}.items():  # bounds for the configs without +shared
                eb = expert_bytes(cfg, s["H"])
                b = [bound(s, T, bw, flops, eb) if level == "block" else
                     model_bound(ref, s, T, bw, flops, eb) for T in args.tokens]
                t.add_row(f"bound {q}".strip(), *(f"{v * 1e3:.2f}" for v in b))
            if level == "block":
                ref_row = [bound(s, T, bw, flops) for T in args.tokens]
            else:  # the best HF experts implementation at each token count
                ref_row = [min(times[f"HF {i}"][j] for i in models.EXPERTS_IMPLEMENTATIONS) for j in range(len(args.tokens))]
            for label, ts in times.items():
                ratio = (lambda v, r: f"{v / r:.1f}x") if level == "block" else (lambda v, r: f"{r / v:.2f}x")
                if label in failed:
                    t.add_row(label, f"failed: {failed[label]}")
                    continue
                t.add_row(label, *(f"{v * 1e3:.2f} ({ratio(v, r)})" for v, r in zip(ts, ref_row)))
            console.print(t)
            if args.breakdown and level == "block":
                breakdown(console, name, {k: m for k, m in impls.items() if k.startswith("moec")
                                          and "onnxruntime" not in k}, args.tokens, s["H"], args.repeat)


if __name__ == "__main__":
    main()
