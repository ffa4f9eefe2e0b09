"""Compile-only check of every Triton kernel variant for real GPU targets, with no GPU.

    python -m moec.backends.triton_aot [--arch 80 90]

Compiles each kernel with each constexpr combination moec launches (dtypes, activations,
gating, gate/up row orders, biases, int8/int4 weights) to PTX/cubin for the given compute capabilities. Must run
WITHOUT TRITON_INTERPRET (interpreted kernels cannot be compiled); the tests call it in a
subprocess.
"""

from __future__ import annotations

import argparse
import itertools

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moec.backends import triton_experts as te

_unquantized = dict(s_ptr=None, z_ptr=None, QUANT=0, HAS_ZERO=False, GROUP=1)  # weights in the activation dtype


def _sig(kernel, pointers: dict[str, str], floats=(), **constexprs):
    """Triton signature: pointers as given, named floats fp32, constexprs, every other arg i32."""
    sig = {}
    for a in kernel.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif a in pointers:
            sig[a] = f"*{pointers[a]}"
        else:
            sig[a] = "fp32" if a in floats else "i32"
    return sig, constexprs


def variants():
    """(name, kernel, signature, constexprs) for every variant moec can launch."""
    ids = {"ids_ptr": "i32", "counts_ptr": "i32", "rank_ptr": "i32", "start_ptr": "i32", "end_ptr": "i32",
           "npad_ptr": "i32", "sorted_ptr": "i32", "block_expert_ptr": "i32"}
    yield "count", te._count_kernel, *_sig(te._count_kernel, ids, BLOCK=256)
    yield "offsets", te._offsets_kernel, *_sig(te._offsets_kernel, ids, BLOCK_M=16, E_PAD=256)
    yield "scatter", te._scatter_kernel, *_sig(te._scatter_kernel, ids, BLOCK=256)
    yield "block_expert", te._block_expert_kernel, *_sig(te._block_expert_kernel, ids, BLOCK_M=16, BLOCK_B=32,
                                                          E_PAD=256)
    experts = [(a, True, False, False) for a in te.ACTIVATIONS] + [
        ("gelu", False, True, False), ("relu", False, False, False), ("silu", True, True, True)]
    # every epilogue in bf16; the other dtypes with the common one (the dtype changes loads and dots)
    for dt, (act, gated, bias, woi) in [("bf16", v) for v in experts] + [(d, experts[0]) for d in ("fp16", "fp32")]:
        ptrs = {"x_ptr": dt, "w_ptr": dt, "b_ptr": dt, "wts_ptr": "fp32", "h_ptr": dt, **ids}
        bk = 64 if dt == "fp32" else 128
        step = 2 if act == "swiglu_oai" else 1  # GPT-OSS keeps gate and up rows interleaved
        yield f"gemm1[{dt},{act},gated{gated:d},bias{bias:d},woi{woi:d},step{step}]", te._gemm1_kernel, *_sig(
            te._gemm1_kernel, ptrs, ("alpha", "limit"), TOP_K=2, ROW_STEP=step, ACT=te.ACTIVATIONS[act],
            GATED=gated, HAS_BIAS=bias, WEIGHT_ON_INPUT=woi, **_unquantized, UPCAST=False, IEEE=dt == "fp32",
            BLOCK_M=16, BLOCK_N=64, BLOCK_K=bk)
    for dt, bias, woi in [("bf16", b, w) for b, w in itertools.product((False, True), (False, True))] + [
            ("fp16", False, False), ("fp32", False, False)]:
        ptrs = {"h_ptr": dt, "w_ptr": dt, "b_ptr": dt, "wts_ptr": "fp32", "y_ptr": "fp32", **ids}
        yield f"gemm2[{dt},bias{bias:d},woi{woi:d}]", te._gemm2_kernel, *_sig(
            te._gemm2_kernel, ptrs, HAS_BIAS=bias, WEIGHT_ON_INPUT=woi, **_unquantized, UPCAST=False,
            IEEE=dt == "fp32", BLOCK_M=64, BLOCK_N=128, BLOCK_K=64 if dt != "fp32" else 32)
    # quantized weights (int8; int4 symmetric / with zero points, two group sizes): every format in bf16 with
    # the common epilogue, GPT-OSS's epilogue once, fp16 and fp32 activations once each
    quants = [(8, False, 0), (4, False, 128), (4, True, 32)]
    cases = [("bf16", q, experts[0]) for q in quants] + [
        ("bf16", quants[2], ("swiglu_oai", True, True, False)), ("fp16", quants[1], experts[0]),
        ("fp32", quants[0], experts[0])]
    for dt, (quant, zero, group), (act, gated, bias, woi) in cases:
        q = {"w_ptr": "i8" if quant == 8 else "u8", "s_ptr": "fp32", "z_ptr": "u8"}
        qc = dict(QUANT=quant, HAS_ZERO=zero, GROUP=max(group, 1), **({} if zero else {"z_ptr": None}))
        name = f"{dt},w{quant}{'g%d' % group if group else ''}{',zero' if zero else ''}"
        bk = 64 if dt == "fp32" else 128
        ptrs = {"x_ptr": dt, "b_ptr": dt, "wts_ptr": "fp32", "h_ptr": dt, **q, **ids}
        yield f"gemm1[{name},{act},bias{bias:d}]", te._gemm1_kernel, *_sig(
            te._gemm1_kernel, ptrs, ("alpha", "limit"), TOP_K=2, ROW_STEP=2 if act == "swiglu_oai" else 1,
            ACT=te.ACTIVATIONS[act], GATED=gated,
            HAS_BIAS=bias, WEIGHT_ON_INPUT=woi, **qc, UPCAST=False, IEEE=dt == "fp32", BLOCK_M=16, BLOCK_N=64,
            BLOCK_K=bk)
        ptrs = {"h_ptr": dt, "b_ptr": dt, "wts_ptr": "fp32", "y_ptr": "fp32", **q, **ids}
        yield f"gemm2[{name},bias{bias:d}]", te._gemm2_kernel, *_sig(
            te._gemm2_kernel, ptrs, HAS_BIAS=bias, WEIGHT_ON_INPUT=woi, **qc, UPCAST=False, IEEE=dt == "fp32",
            BLOCK_M=16, BLOCK_N=64, BLOCK_K=bk)


def compile_all(archs=(80, 90)) -> list[str]:
    """Compile every variant for every arch; returns 'arch name' strings of the successes (raises on failure)."""
    done = []
    for arch in archs:
        for name, kernel, sig, constexprs in variants():
            try:
                triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", arch, 32))
            except Exception as e:
                raise RuntimeError(f"{name} does not compile for sm_{arch}: {e}") from e
            done.append(f"sm_{arch} {name}")
    return done


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    for line in compile_all(ap.parse_args().arch):
        print("compiled", line)


if __name__ == "__main__":
    main()
