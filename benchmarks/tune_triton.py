"""Autotune the Triton experts kernels' tiles on this GPU; write the config file moec reads.

    python benchmarks/tune_triton.py [--shapes mixtral-8x7b ...] [--tokens 1 4 16 ...] [--dtype bf16]
                                     [--quantized] [--out DIR]

For each shape and token count, times every config of the search space (triton.testing.do_bench)
and keeps the fastest. `--quantized` tunes the int8 and int4 (g128) kernels instead (their own
keys in the file, "...-w8" / "...-w4g128"; int4 K tiles stay within a group). Writes
DIR/<device>__triton-<version>.json (default: the shipped folder, backends/triton_configs/);
point $MOEC_TRITON_CONFIGS at DIR to use another folder.
`--shapes tiny --tokens 1` smoke-tests the script on a CPU (TRITON_INTERPRET=1); there it writes
nothing unless --out is given (interpreter timings say nothing about a GPU).
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
from rich.progress import track

sys.path.insert(0, str(Path(__file__).parent))
from triton_shapes import SHAPES, timer  # noqa: E402

from moec.backends import triton_experts  # noqa: E402,F401
from moec.backends.triton_config import SHIPPED, Config, device_name, file_name, forced, shape_key  # noqa: E402
from moec.quant import Int4Experts, Int8Experts, quantize  # noqa: E402

SPACE = [Config(m, n, kk, w, s) for m, n, kk, w, s in itertools.product(
    (16, 32, 64, 128), (32, 64, 128, 256), (64, 128), (4, 8), (2, 3, 4))]


def experts_call(E: int, H: int, I: int, dtype: torch.dtype, dev, cfg):
    """(config key suffix, largest K tile, fn(x, ids, w)) running the experts kernels on random weights."""
    w13 = torch.randn(E, 2 * I, H, device=dev, dtype=dtype) * 0.02
    w2 = torch.randn(E, H, I, device=dev, dtype=dtype) * 0.02
    act = ("silu", True, 1.0, 0.0, False)
    if cfg is None:
        return "", 128, lambda x, ids, w: torch.ops.moec.triton_experts(x, ids, w, w13, None, w2, None, *act)
    t13, t2 = quantize(cfg, w13), quantize(cfg, w2)
    del w13, w2
    if cfg.bits == 8:
        return "w8", 128, lambda x, ids, w: torch.ops.moec.triton_experts_int8(
            x, ids, w, t13["q"], t13["scale"], None, t2["q"], t2["scale"], None, *act)
    return f"w4g{cfg.group_size}", cfg.group_size, lambda x, ids, w: torch.ops.moec.triton_experts_int4(
        x, ids, w, t13["q"], t13["scale"], None, None, t2["q"], t2["scale"], None, None, cfg.group_size, *act)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=[s for s in SHAPES if s != "tiny"], choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--quantized", action="store_true", help="tune the int8 and int4 (g128) kernels")
    ap.add_argument("--out", type=Path, help="default: the shipped folder on a GPU, nothing written on a CPU")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or (SHIPPED if dev.type == "cuda" else None)
    time_of = timer(dev.type)
    name = file_name(device_name(dev))
    table = json.loads((out / name).read_text()) if out and (out / name).is_file() else {}
    for shape in args.shapes:
        E, H, I, k = SHAPES[shape]
        for qcfg in (Int8Experts(), Int4Experts(128)) if args.quantized else (None,):
            quant, max_k, fn = experts_call(E, H, I, dtype, dev, qcfg)
            entry = table.setdefault(shape_key(E, 2 * I, H, k, dtype, quant), {})
            for T in args.tokens:
                x = torch.randn(T, H, device=dev, dtype=dtype)
                w, ids = torch.randn(T, E, device=dev).softmax(-1).topk(k)
                best = None
                for cfg in track(SPACE, description=f"{shape} {quant or args.dtype} T={T}"):
                    if cfg.block_k > min(H, max_k) or (dtype == torch.float32 and cfg.block_k > 64):
                        continue
                    with forced(cfg):
                        try:
                            sec = time_of(lambda: fn(x, ids, w))
                        except triton.runtime.errors.OutOfResources:
                            continue
                    if best is None or sec < best[0]:
                        best = (sec, cfg)
                entry[str(T)] = vars(best[1])
                print(f"{shape} {quant or args.dtype} T={T}: {best[0] * 1e6:.1f} us with {best[1]}")
    if out is None:
        print(f"not written ({dev.type}: pass --out DIR to write {name})")
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(table, indent=1, sort_keys=True))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
