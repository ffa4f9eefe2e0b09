"""Autotune the Triton experts kernels' tiles on this GPU; write the config file moec reads.

    python benchmarks/tune_triton.py [--shapes mixtral-8x7b ...] [--tokens 1 4 16 ...] [--dtype bf16]
                                     [--quantized | --all] [--space full|fast] [--jobs N] [--out DIR]

For each token count, shape and weight format, times every config of the search space
(triton.testing.do_bench_cudagraph: the kernels replayed in a CUDA graph, without the launches'
host work, which would hide the tiles' differences at decode sizes) and the heuristic's, keeps the fastest and prints both. `--quantized`
tunes the int8 and int4 (g128; 64/32 where 128 does not divide the shape) kernels instead (their
own keys in the file, "...-w8" / "...-w4g128";
int4 K tiles stay within a group); `--all` tunes the three formats. `--space fast` searches the
BLOCK_M tiles that fit the rows each expert gets (about 48 configs a cell, not 192). `--jobs N`
compiles every config first in N processes on small copies of the weights (Triton's disk cache
then serves the timing loop; compiling is most of a cold run). The file is rewritten after every
cell, small token counts first, so a run cut short keeps what it measured.
Writes DIR/<device>__triton-<version>.json (default: the shipped folder, backends/triton_configs/);
point $MOEC_TRITON_CONFIGS at DIR to use another folder.
`--shapes tiny --tokens 1` smoke-tests the script on a CPU (TRITON_INTERPRET=1); there it writes
nothing unless --out is given (interpreter timings say nothing about a GPU).
"""

import argparse
import itertools
import json
import multiprocessing
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from triton_shapes import SHAPES, timer  # noqa: E402

from moec.backends import triton_experts  # noqa: E402,F401
from moec.backends.triton_config import (SHIPPED, Config, device_name, file_name, forced, heuristic,  # noqa: E402
                                         shape_key)
from moec.quant import Int4Experts, Int8Experts, quantize  # noqa: E402

FULL = [Config(m, n, kk, w, s) for m, n, kk, w, s in itertools.product(
    (16, 32, 64, 128), (32, 64, 128, 256), (64, 128), (4, 8), (2, 3, 4))]
FORMATS = ("bf16", "w8", "w4")  # weights in the activation dtype, int8, int4 (group 128, or 64/32 on small shapes)


def space(name: str, T: int, E: int, k: int) -> list[Config]:
    """Candidate tiles for T tokens: all of FULL, or ("fast") the two BLOCK_M that fit the mean rows per expert."""
    if name == "full":
        return FULL
    rows = T * k / E
    ms = (16,) if rows <= 16 else (16, 32) if rows <= 32 else (32, 64) if rows <= 128 else (64, 128)
    return [Config(m, n, kk, w, s) for m, n, kk, w, s in itertools.product(ms, (64, 128, 256), (64, 128), (4, 8),
                                                                         (3, 4))]


def experts_call(E: int, H: int, I: int, dtype: torch.dtype, dev, fmt: str):
    """(config key suffix, largest K tile, fn(x, ids, w)) running the experts kernels of format `fmt`
    on random weights."""
    w13 = torch.randn(E, 2 * I, H, device=dev, dtype=dtype) * 0.02
    w2 = torch.randn(E, H, I, device=dev, dtype=dtype) * 0.02
    act = ("silu", True, 1.0, 0.0, False, "halves")  # activation, gated, alpha, limit, weight_on_input, gate_up
    if fmt == "bf16":
        return "", 128, lambda x, ids, w: torch.ops.moec.triton_experts(x, ids, w, w13, None, w2, None, *act)
    cfg = Int8Experts() if fmt == "w8" else Int4Experts(next(g for g in (128, 64, 32) if H % g == 0 and I % g == 0))
    t13, t2 = quantize(cfg, w13), quantize(cfg, w2)
    if cfg.bits == 8:
        return "w8", 128, lambda x, ids, w: torch.ops.moec.triton_experts_int8(
            x, ids, w, t13["q"], t13["scale"], None, t2["q"], t2["scale"], None, *act)
    return f"w4g{cfg.group_size}", cfg.group_size, lambda x, ids, w: torch.ops.moec.triton_experts_int4(
        x, ids, w, t13["q"], t13["scale"], None, None, t2["q"], t2["scale"], None, None, cfg.group_size, *act)


def inputs(T: int, E: int, H: int, k: int, dtype, dev):
    x = torch.randn(T, H, device=dev, dtype=dtype)
    w, ids = torch.randn(T, E, device=dev).softmax(-1).topk(k)
    return x, ids, w


def usable(cfg: Config, H: int, max_k: int, dtype) -> bool:
    return cfg.block_k <= min(H, max_k) and not (dtype == torch.float32 and cfg.block_k > 64)


def _precompile(job: tuple) -> int:
    """One worker: run each config once on 2-expert copies of the weights (same specialisation, little memory)."""
    cells, configs, dtype = job
    dev = torch.device("cuda")
    done = 0
    for shape, fmt in {(s, f) for s, f, _ in cells}:
        E, H, I, k = SHAPES[shape]
        _, max_k, fn = experts_call(2, H, I, dtype, dev, fmt)
        for T in sorted({T for s, f, T in cells if (s, f) == (shape, fmt)}):
            x, _, w = inputs(T, E, H, k, dtype, dev)
            ids = torch.randint(0, 2, (T, k), device=dev)
            for cfg in configs:
                if usable(cfg, H, max_k, dtype):
                    with forced(cfg):
                        try:
                            fn(x, ids, w)
                            done += 1
                        except triton.runtime.errors.OutOfResources:
                            pass
        torch.cuda.synchronize()
    return done


def precompile(cells, configs, dtype, jobs: int) -> None:
    t0 = time.time()
    chunks = [(cells, configs[i::jobs], dtype) for i in range(jobs)]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        n = sum(pool.map(_precompile, chunks))
    print(f"precompiled {n} kernel runs in {time.time() - t0:.0f} s with {jobs} processes", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=[s for s in SHAPES if s != "tiny"], choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--quantized", action="store_true", help="tune the int8 and int4 (g128) kernels")
    group.add_argument("--all", action="store_true", help="tune the activation-dtype, int8 and int4 kernels")
    ap.add_argument("--space", default="full", choices=["full", "fast"])
    ap.add_argument("--jobs", type=int, default=0, help="compile every config first in N processes (GPU only)")
    ap.add_argument("--out", type=Path, help="default: the shipped folder on a GPU, nothing written on a CPU")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or (SHIPPED if dev.type == "cuda" else None)
    # many cells: short runs; on a GPU in CUDA graphs, so that the kernels' time decides, not the launches' host work
    time_of = timer(dev.type, warmup_ms=5, rep_ms=25, graph=dev.type == "cuda")
    name = file_name(device_name(dev))
    table = json.loads((out / name).read_text()) if out and (out / name).is_file() else {}
    formats = FORMATS if args.all else FORMATS[1:] if args.quantized else FORMATS[:1]
    cells = [(s, f, T) for T in sorted(args.tokens) for s in args.shapes for f in formats]
    if args.jobs and dev.type == "cuda":
        configs = sorted({c for s, _, T in cells for c in (heuristic(T, SHAPES[s][0], SHAPES[s][3], dtype, dev),
                                                           *space(args.space, T, SHAPES[s][0], SHAPES[s][3]))},
                         key=lambda c: tuple(vars(c).values()))
        precompile(cells, configs, dtype, args.jobs)
    calls = {}  # (shape, format) -> (max K tile, fn): weights built once per shape and format
    for shape, fmt, T in cells:
        E, H, I, k = SHAPES[shape]
        if (shape, fmt) not in calls:
            calls.clear()  # one shape's weights at a time (DeepSeek-V3's bf16 experts are 22 GB)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            calls[shape, fmt] = experts_call(E, H, I, dtype, dev, fmt)
        quant, max_k, fn = calls[shape, fmt]
        x, ids, w = inputs(T, E, H, k, dtype, dev)
        h = heuristic(T, E, k, dtype, dev)
        results = {}
        for cfg in [h, *space(args.space, T, E, k)]:
            if cfg in results or not usable(cfg, H, max_k, dtype):
                continue
            with forced(cfg):
                try:
                    results[cfg] = time_of(lambda: fn(x, ids, w))
                except triton.runtime.errors.OutOfResources:
                    continue
        best = min(results, key=results.get)
        table.setdefault(shape_key(E, 2 * I, H, k, dtype, quant), {})[str(T)] = vars(best)
        print(f"{shape} {quant or args.dtype} T={T}: {results[best] * 1e6:.1f} us with {best}; heuristic "
              f"{results.get(h, float('nan')) * 1e6:.1f} us ({len(results)} configs)", flush=True)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / (name + ".tmp")).write_text(json.dumps(table, indent=1, sort_keys=True))
            (out / (name + ".tmp")).replace(out / name)
    print(f"wrote {out / name}" if out else f"not written ({dev.type}: pass --out DIR to write {name})")


if __name__ == "__main__":
    main()
