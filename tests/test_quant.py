"""Quantized experts: moec's int8/int4 format, the torch kernels against a dequantized naive
reference, and quantize_experts end to end on HF models."""

import copy
import dataclasses
import os
import pickle
import subprocess
import sys

import numba
import pytest
import torch

import moec
from moec import models
from moec.canonical import resolve
from moec.ir import ExpertsSpec
from moec.ops import experts_args
from moec.passes.quantize_experts import quantized_tensors
from moec.backends import torch_backend
from moec.backends.torch_backend import activate
from moec.quant import (Int4Experts, Int8Experts, QuantLinear, dequantize, int8_quantized_rows, int8_rows,
                        quantize, weight_only)

from conftest import TOL, rel_err
from test_ops import naive_experts

CONFIGS = [Int8Experts(), Int4Experts(32), Int4Experts(64, symmetric=False), Int4Experts(128),
           Int4Experts(32, signed_scale=True)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
def test_roundtrip_error_is_half_a_step(cfg):
    w = torch.randn(3, 40, 256) * torch.rand(3, 40, 1)  # rows of different ranges
    t = quantize(cfg, w)
    scale = t["scale"] if cfg.bits == 8 else t["scale"].repeat_interleave(cfg.group_size, dim=-1)
    step = (scale[..., None] if cfg.bits == 8 else scale).abs()
    err = (dequantize(cfg, t) - w).abs()
    if getattr(cfg, "signed_scale", False):
        # the group's largest-magnitude weight is -8 steps, exactly but for the step's rounding to fp16 (away from
        # zero, less than 2^-10 of it: quant._fp16); weights of the other sign past +7.5 steps clip to +7 (at most
        # one step off), every other weight is within half a step
        groups = w.reshape(3, 40, -1, cfg.group_size)
        extreme = groups.abs().argmax(-1, keepdim=True)
        at = err.reshape(groups.shape).gather(-1, extreme)
        assert (at <= groups.abs().gather(-1, extreme) * 2.0 ** -10).all()
        clipped = w / scale > 7.5
        assert (err[clipped] <= step[clipped] * (1 + 1e-5)).all()
        err, step = err[~clipped], step[~clipped]
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()
    packed_bytes = t["q"].numel()
    assert packed_bytes == w.numel() // (8 // cfg.bits)


@pytest.mark.parametrize("cfg", CONFIGS[1:], ids=lambda c: c.describe())
def test_int4_scales_are_fp16_numbers(cfg):
    """Every int4 step is an fp16 number (so ort_layouts stores them in fp16): a normal one at most 2^-10 above the
    step it rounds, a step below fp16's normal range the next multiple of 2^-24; a group of zeros gets 2^-14 and
    dequantizes to zeros; the weights stay within half a (new) step, on the meta device too."""
    w = torch.randn(2, 8, 256) * torch.rand(2, 8, 1) * 10
    w[0, 0, :cfg.group_size] = 0
    w[1, 2, cfg.group_size:2 * cfg.group_size] *= 1e-6
    t = quantize(cfg, w)
    s = t["scale"]
    assert (s.half().float() == s).all()
    assert s[0, 0, 0].abs() == 2.0 ** -14 and (dequantize(cfg, t)[0, 0, :cfg.group_size] == 0).all()
    if cfg.symmetric and not cfg.signed_scale:  # the step amax/7, made the next fp16 number at or above it
        exact = w.reshape(2, 8, -1, cfg.group_size).abs().amax(-1) / 7
        normal = exact >= 2.0 ** -14
        assert (s >= exact).all() and (s[normal] <= exact[normal] * (1 + 2.0 ** -10)).all()
        assert s[1, 2, 1] - exact[1, 2, 1] < 2.0 ** -24 and not normal[1, 2, 1]
        assert ((dequantize(cfg, t) - w).abs() <= s.repeat_interleave(cfg.group_size, -1) / 2).all()
    assert quantize(cfg, w.to("meta"))["scale"].device.type == "meta"


def _quantized_experts(cfg, x, ids, w, t13, b13, t2, b2, e):
    if cfg.bits == 8:
        return torch.ops.moec.experts_int8(x, ids, w, t13["q"], t13["scale"], b13, t2["q"], t2["scale"], b2,
                                           *experts_args(e))
    return torch.ops.moec.experts_int4(x, ids, w, t13["q"], t13["scale"], t13.get("zero"), b13,
                                       t2["q"], t2["scale"], t2.get("zero"), b2, *experts_args(e))


SPECS = [ExpertsSpec(8, 64, 128, "silu"), ExpertsSpec(4, 128, 64, "gelu", gated=False, bias=True),
         ExpertsSpec(4, 64, 64, "swiglu_oai", bias=True, alpha=1.702, limit=7.0),
         ExpertsSpec(4, 64, 64, "silu", weight_on_input=True)]


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=lambda c: c.describe())
@pytest.mark.parametrize("e", SPECS, ids=lambda e: e.describe())
@pytest.mark.parametrize("T,k", [(1, 1), (1, 2), (6, 2), (40, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_kernels_match_dequantized_reference(cfg, e, T, k, dtype, int4_kernel):
    if cfg.bits == 8 and int4_kernel == "numba":
        pytest.skip("int8 experts run the numba kernels either way")
    E, H, I = e.num_experts, e.hidden, e.inter
    N1 = 2 * I if e.gated else I
    x = torch.randn(T, H).to(dtype)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = torch.rand(T, k)
    t13, t2 = quantize(cfg, torch.randn(E, N1, H) / H**0.5), quantize(cfg, torch.randn(E, H, I) / I**0.5)
    b13 = torch.randn(E, N1).to(dtype) if e.bias else None
    b2 = torch.randn(E, H).to(dtype) if e.bias else None
    got = _quantized_experts(cfg, x, ids, w, t13, b13, t2, b2, e)
    ref = naive_experts(x, ids, w, dequantize(cfg, t13, dtype), b13, dequantize(cfg, t2, dtype), b2, e)
    assert got.dtype == dtype and rel_err(got, ref) < TOL[dtype]


@pytest.mark.parametrize("cfg", [Int8Experts(), Int4Experts(32, signed_scale=True)]
                         + [Int4Experts(g, sym) for g in (32, 64, 128) for sym in (True, False)],
                         ids=lambda c: c.describe())
@pytest.mark.parametrize("dequant_min_rows", [100, 3, 1])
def test_quantized_kernels_on_every_row_count(cfg, dequant_min_rows, int4_kernel, monkeypatch):
    """Experts with 0..5 rows (int4 takes rows two at a time in numba, four at a time in C, the rest alone) and
    inputs of 256/384; every expert in the kernels, experts of 3+ rows dequantized for MKL (mixed), every expert
    dequantized."""
    if cfg.bits == 8 and int4_kernel == "numba":
        pytest.skip("int8 experts run the numba kernels either way")
    monkeypatch.setattr(torch_backend, "DEQUANT_MIN_ROWS", dequant_min_rows)
    monkeypatch.setattr(torch_backend, "NATIVE_MIN_ROWS", dequant_min_rows)
    e = ExpertsSpec(6, 256, 384, "silu")
    counts = [0, 1, 2, 3, 4, 5]
    ids = torch.tensor([i for i, n in enumerate(counts) for _ in range(n)])[torch.randperm(sum(counts))].view(-1, 1)
    x, w = torch.randn(ids.shape[0], e.hidden), torch.rand(ids.shape[0], 1)
    t13 = quantize(cfg, torch.randn(6, 2 * e.inter, e.hidden) / 16)
    t2 = quantize(cfg, torch.randn(6, e.hidden, e.inter) / 16)
    got = _quantized_experts(cfg, x, ids, w, t13, None, t2, None, e)
    ref = naive_experts(x, ids, w, dequantize(cfg, t13), None, dequantize(cfg, t2), None, e)
    assert rel_err(got, ref) < TOL[torch.float32]


def _a8_reference(x, ids, w, gemm, e):
    """Routed experts with gemm(v [K], "13" or "2", expert) -> [N] for each GEMM, token by token."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            i = ids[t, j]
            xin = x[t].float() * w[t, j] if e.weight_on_input else x[t].float()
            h = gemm(xin, "13", i)
            y = gemm(activate(h[None], e.activation, e.gated, e.alpha, e.limit)[0], "2", i)
            out[t] += y if e.weight_on_input else w[t, j] * y
    return out


def _int8_activations_reference(x, ids, w, t13, b13, t2, b2, e):
    """int8 experts with int8 activations as documented: each GEMM's input row rounded to int8 at a step of its
    amax/127 (moec.quant.int8_quantized_rows), the int8 products summed exactly (int64), then times the weight
    scale, times the row's step, plus the bias (fp32, in that order)."""
    def gemm(v, which, i):  # v [K] -> [N]
        t, b = (t13, b13) if which == "13" else (t2, b2)
        q, step = int8_quantized_rows(v[None], v.shape[0])
        y = (q.long() @ t["q"][i].long().t()).float() * t["scale"][i] * step
        return y[0] if b is None else y[0] + b[i].float()

    return _a8_reference(x, ids, w, gemm, e)


def _int4_activations_reference(cfg, x, ids, w, t13, b13, t2, b2, e):
    """int4 experts with int8 activations as documented: each GEMM's input row rounded to int8 per group of the
    weights' group size (moec.quant.int8_rows), times the dequantized weights, in fp64, plus the bias."""
    w13, w2 = dequantize(cfg, t13, torch.float64), dequantize(cfg, t2, torch.float64)

    def gemm(v, which, i):
        wt, b = (w13, b13) if which == "13" else (w2, b2)
        y = (int8_rows(v[None], cfg.group_size).double() @ wt[i].T)[0].float()
        return y if b is None else y + b[i].float()

    return _a8_reference(x, ids, w, gemm, e)


@pytest.mark.parametrize("e", SPECS, ids=lambda e: e.describe())
@pytest.mark.parametrize("T,k", [(1, 1), (1, 2), (6, 2), (40, 3)])
@pytest.mark.parametrize("dequant_min_rows", [100, 3, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_activations_match_their_reference(e, T, k, dequant_min_rows, dtype, monkeypatch):
    """Int8Experts(activations="int8") on the torch backend: moec's kernels (few rows), torch._int_mm (many rows)
    and both in one call give the reference's numbers, on inputs of 1 and 1000 times unit scale and an all-zero
    token (every row rounded as the reference rounds it: the sums of int8 products are exact on both sides); under weight_only() the op is the weight-only one; and it is not the weight-only result."""
    monkeypatch.setattr(torch_backend, "DEQUANT_MIN_ROWS", dequant_min_rows)
    E, H, I = e.num_experts, e.hidden, e.inter
    N1 = 2 * I if e.gated else I
    gen = torch.Generator().manual_seed(T * k)
    cfg = Int8Experts(activations="int8")
    t13 = quantize(cfg, torch.randn(E, N1, H, generator=gen) / H**0.5)
    t2 = quantize(cfg, torch.randn(E, H, I, generator=gen) / I**0.5)
    b13 = torch.randn(E, N1, generator=gen).to(dtype) if e.bias else None
    b2 = torch.randn(E, H, generator=gen).to(dtype) if e.bias else None
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=gen)
    for scale in (1.0, 1e3):
        x = (torch.randn(T, H, generator=gen) * scale).to(dtype)
        if T > 1:
            x[-1] = 0  # a step of 0
        args = (x, ids, w, t13["q"], t13["scale"], b13, t2["q"], t2["scale"], b2, *experts_args(e))
        got = torch.ops.moec.experts_int8(*args, True)
        want = _int8_activations_reference(x, ids, w, t13, b13, t2, b2, e)
        assert got.dtype == dtype and rel_err(got, want) < TOL[dtype], (scale, rel_err(got, want))
        with weight_only():
            assert torch.equal(torch.ops.moec.experts_int8(*args, True), torch.ops.moec.experts_int8(*args))
        if dtype == torch.float32:
            assert rel_err(torch.ops.moec.experts_int8(*args), want) > 1e-4  # the weight-only result differs


A4 = [Int4Experts(32, activations="int8"), Int4Experts(64, symmetric=False, activations="int8"),
      Int4Experts(32, signed_scale=True, activations="int8")]


@pytest.fixture(params=["native", "numba"])
def int4_kernel(request, monkeypatch):
    """The native int4 kernels (backends/cpu_native: int8 activations, and weight-only where the CPU has AVX-512),
    or the numba kernels and fallback where they are not built."""
    from moec.backends import cpu_native

    if request.param == "numba":
        monkeypatch.setattr(cpu_native, "library", lambda: None)
    elif cpu_native.library() is None:
        import platform
        import shutil

        assert platform.machine() != "x86_64" or not (shutil.which("cc") or shutil.which("gcc")), \
            "a C compiler is here, yet the native kernel did not build (see the warning)"
        pytest.skip("no C compiler for x86-64: the native kernel cannot be built here")
    return request.param


@pytest.mark.parametrize("cfg", A4, ids=lambda c: c.describe())
@pytest.mark.parametrize("e", SPECS, ids=lambda e: e.describe())
@pytest.mark.parametrize("T,k", [(1, 1), (1, 2), (6, 2), (40, 3)])
@pytest.mark.parametrize("dequant_min_rows", [None, 100, 3, 1])
def test_int4_int8_activations_match_their_reference(cfg, e, T, k, dequant_min_rows, int4_kernel, monkeypatch):
    """Int4Experts(activations="int8") on the torch backend: the native kernel (or numba where it is not built) at
    few rows, the rounded rows on dequantized weights at many, give the reference's numbers (rows rounded per group,
    as ONNX Runtime rounds them) on inputs of 1 and 1000 times unit scale, an all-zero token and a token with one
    input 1e4 times the others (its group's other inputs round to 0); under weight_only() the op is the weight-only
    one; and it is not the weight-only result. dequant_min_rows None: the kernel takes every row (the op's short
    path, torch_backend._native_int4, where the native kernel is built)."""
    if dequant_min_rows is not None:
        monkeypatch.setattr(torch_backend, "DEQUANT_MIN_ROWS", dequant_min_rows)
        monkeypatch.setattr(torch_backend, "NATIVE_MIN_ROWS", dequant_min_rows)
    E, H, I = e.num_experts, e.hidden, e.inter
    N1 = 2 * I if e.gated else I
    gen = torch.Generator().manual_seed(T * k)
    t13 = quantize(cfg, torch.randn(E, N1, H, generator=gen) / H**0.5)
    t2 = quantize(cfg, torch.randn(E, H, I, generator=gen) / I**0.5)
    b13 = torch.randn(E, N1, generator=gen) if e.bias else None
    b2 = torch.randn(E, H, generator=gen) if e.bias else None
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=gen)
    for scale in (1.0, 1e3):
        x = torch.randn(T, H, generator=gen) * scale
        if T > 1:
            x[-1] = 0  # a step of 0
            x[0, 3] *= 1e4
        args = (x, ids, w, t13["q"], t13["scale"], t13.get("zero"), b13, t2["q"], t2["scale"], t2.get("zero"), b2,
                *experts_args(e))
        got = torch.ops.moec.experts_int4(*args, True)
        want = _int4_activations_reference(cfg, x, ids, w, t13, b13, t2, b2, e)
        assert rel_err(got, want) < TOL[torch.float32], (scale, rel_err(got, want))
        with weight_only():
            assert torch.equal(torch.ops.moec.experts_int4(*args, True), torch.ops.moec.experts_int4(*args))
        assert rel_err(torch.ops.moec.experts_int4(*args), want) > 1e-4  # the weight-only result differs


@pytest.mark.parametrize("cfg", [Int4Experts(g, sym, activations="int8") for g in (32, 64, 128) for sym in (True, False)],
                         ids=lambda c: c.describe())
@pytest.mark.parametrize("N", [35, 37])
def test_native_int4_kernel_on_every_group_count(cfg, N, int4_kernel):
    """cpu_quant.grouped_qmm(int8_groups=True) on inputs of 1280 (40, 20 or 10 groups a row: the AVX2 kernel's blocks
    of 8 groups, the AVX-512 one's steps of 4, and the groups past them), 0..9 rows an expert (tiles of 4 rows and
    their tails) and 35 or 37 channels (threads take chunks of 32: a last chunk of 3 channels runs the per-channel
    kernel, one of 5 two overlapping tiles of 4), against the reference; then the kernel built for AVX2 only
    (vpmaddubsw instead of VNNI), called on one expert straight from its library."""
    import ctypes

    import numpy as np

    from moec.backends import cpu_native, cpu_quant

    counts = np.array([2, 0, 1, 5, 3, 4, 9])
    E, K, g = len(counts), 1280, cfg.group_size
    gen = torch.Generator().manual_seed(g)
    t = quantize(cfg, torch.randn(E, N, K, generator=gen))
    W = dequantize(cfg, t, torch.float64)
    x = torch.randn(int(counts.sum()), K, generator=gen) * torch.rand(int(counts.sum()), 1, generator=gen) * 100
    x[5, 7], x[8, 1000] = float("nan"), float("inf")  # rows of a NaN and an inf: NaN outputs, as the reference's
    rows = cpu_quant.expert_rows(counts)
    got = cpu_quant.grouped_qmm(x, rows, t["q"], t["scale"], t.get("zero"), int8_groups=True)
    xr = int8_rows(x, g).double()
    want = torch.cat([xr[a:b] @ W[e].T for e, (a, b) in enumerate(zip(rows[0], rows[2]))]).float()
    bad = torch.tensor([r in (5, 8) for r in range(len(x))])
    assert torch.isnan(want[bad]).all() and torch.isnan(got[bad]).all() and torch.isfinite(got[~bad]).all()
    err = (got[~bad].double() - want[~bad]).abs().amax(1) / want[~bad].abs().amax(1)  # each row against its own
    assert err.max() < TOL[torch.float32], err.max()
    if int4_kernel == "numba":
        return
    lib = ctypes.CDLL(str(cpu_native.build(("-O3", "-mavx2", "-mfma", "-shared", "-fPIC"))))
    x8, step, xi = cpu_native.pack(x[:2].numpy(), K // g)  # expert 0's rows
    out = np.zeros((2, N), np.float32)
    zero = t["zero"][0].contiguous().numpy() if "zero" in t else None
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    I64 = ctypes.c_int64
    lib.moec_int4(p(x8), p(step), p(xi), I64(2), I64(K), p(t["q"][0].contiguous().numpy()),
                     p(t["scale"][0].contiguous().numpy()), None if zero is None else p(zero), I64(K // g), p(out),
                     I64(N), I64(0), I64(N))
    assert rel_err(torch.from_numpy(out), want[:2]) < TOL[torch.float32]


@pytest.mark.parametrize("cfg", [Int4Experts(g, sym) for g in (32, 64, 128) for sym in (True, False)],
                         ids=lambda c: c.describe())
def test_weight_only_int4_kernel_on_every_shape(cfg, int4_kernel):
    """cpu_quant.grouped_qmm on weight-only int4 (the C kernel, else numba): 0..9 rows an expert (the C kernel's
    tiles of 4 rows, 2 and 1 with their channel tiles), 37 channels (chunks and channel tiles with tails), inputs of
    1280, rows from 1e-3 to 1e3 times unit scale, a row with one input 1e4 times the rest; each row's outputs
    against an fp64 reference relative to that row's largest; NaN and inf rows give non-finite outputs (the C
    kernel: the reference's own); then the kernel built for AVX2 only (8 lanes), called on one expert straight
    from its library."""
    import numpy as np

    from moec.backends import cpu_native, cpu_quant

    counts = np.array([2, 0, 1, 5, 3, 4, 9])
    E, N, K, g = len(counts), 37, 1280, cfg.group_size
    gen = torch.Generator().manual_seed(g + cfg.symmetric)
    t = quantize(cfg, torch.randn(E, N, K, generator=gen))
    W = dequantize(cfg, t, torch.float64)
    R = int(counts.sum())
    x = torch.randn(R, K, generator=gen) * torch.logspace(-3, 3, R).unsqueeze(1)
    x[3, 100] *= 1e4
    x[5, 7], x[8, 1000] = float("nan"), float("inf")
    rows = cpu_quant.expert_rows(counts)
    got = cpu_quant.grouped_qmm(x, rows, t["q"], t["scale"], t.get("zero"))
    want = torch.cat([x[a:b].double() @ W[e].T for e, (a, b) in enumerate(zip(rows[0], rows[2]))])
    bad = torch.tensor([r in (5, 8) for r in range(R)])
    assert not torch.isfinite(got[bad]).any() and torch.isfinite(got[~bad]).all()
    err = (got[~bad].double() - want[~bad]).abs().amax(1) / want[~bad].abs().amax(1)
    assert err.max() < TOL[torch.float32], err.max()
    if int4_kernel == "numba":
        return
    assert ((got[bad] == want[bad].float()) | (got[bad].isnan() & want[bad].isnan())).all()
    import ctypes

    lib = ctypes.CDLL(str(cpu_native.build(("-O3", "-mavx2", "-mfma", "-shared", "-fPIC"))))
    xk = np.ascontiguousarray(x[:2].numpy().reshape(2, K // 32, 16, 2).swapaxes(2, 3).reshape(2, K))  # evens, odds
    out = np.zeros((2, N), np.float32)
    zero = t["zero"][0].contiguous().numpy() if "zero" in t else None
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    I64 = ctypes.c_int64
    lib.moec_int4(p(xk), None, None, I64(2), I64(K), p(t["q"][0].contiguous().numpy()),
                  p(t["scale"][0].contiguous().numpy()), None if zero is None else p(zero), I64(K // g), p(out), I64(N),
                  I64(0), I64(N))
    err = (torch.from_numpy(out).double() - want[:2]).abs().amax(1) / want[:2].abs().amax(1)
    assert err.max() < TOL[torch.float32], err.max()


def test_int4_int8_activations_give_the_same_numbers_call_after_call():
    """The op called again and again, memory allocated and freed between calls, gives the reference's numbers every
    time (a launcher that let its packed rows be freed before the C kernel read them gave other numbers, or NaN, at
    most calls)."""
    cfg = Int4Experts(64, activations="int8")
    e = ExpertsSpec(8, 320, 192, "silu")
    gen = torch.Generator().manual_seed(1)
    t13, t2 = quantize(cfg, torch.randn(8, 384, 320, generator=gen) / 10), quantize(cfg, torch.randn(8, 320, 192, generator=gen) / 10)
    x, ids, w = torch.randn(3, 320, generator=gen), torch.tensor([[0, 1], [2, 3], [4, 5]]), torch.full((3, 2), 0.5)
    args = (x, ids, w, t13["q"], t13["scale"], None, None, t2["q"], t2["scale"], None, None, *experts_args(e), True)
    want = _int4_activations_reference(cfg, x, ids, w, t13, None, t2, None, e)
    threads = numba.get_num_threads()
    try:
        for n in (1, threads):  # on one thread the freed rows were reused at most calls
            numba.set_num_threads(n)
            for _ in range(8):
                assert rel_err(torch.ops.moec.experts_int4(*args), want) < TOL[torch.float32], n
                junk = [torch.randn(1000) for _ in range(50)]  # noqa: F841  (reuses what a freed buffer held)
    finally:
        numba.set_num_threads(threads)


def test_the_native_kernel_not_built_is_said_once_and_the_fallback_runs(monkeypatch):
    """A compiler that fails (or MOEC_NATIVE=0): library() is None with one warning that says why and what runs
    instead (the rounded rows times the dequantized weights), which still gives the reference's numbers."""
    import logging

    from moec.backends import cpu_native, cpu_quant

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("moec").addHandler(handler)
    monkeypatch.setenv("CC", "/bin/false")
    cpu_native.library.cache_clear()
    try:
        assert cpu_native.library() is None and cpu_native.library() is None
        text = " ".join(r.getMessage() for r in records)
        assert len(records) == 1 and "/bin/false" in text and "dequantized weights" in text, text
        cfg = Int4Experts(32, activations="int8")
        t = quantize(cfg, torch.randn(2, 48, 256))
        x = torch.randn(3, 256)
        got = cpu_quant.grouped_qmm(x, cpu_quant.expert_rows([1, 2]), t["q"], t["scale"], int8_groups=True)
        want = torch.cat([int8_rows(x[:1], 32) @ dequantize(cfg, t)[0].T, int8_rows(x[1:], 32) @ dequantize(cfg, t)[1].T])
        assert rel_err(got, want) < TOL[torch.float32]
        monkeypatch.setenv("MOEC_NATIVE", "0")
        monkeypatch.delenv("CC")
        cpu_native.library.cache_clear()
        assert cpu_native.library() is None
    finally:
        logging.getLogger("moec").removeHandler(handler)
        cpu_native.library.cache_clear()


def test_round_rows_is_the_reference_rounding():
    """The numba rounding of the torch backend's int8 activations (cpu_quant.round_rows, a row or groups of a row)
    gives int8_quantized_rows' numbers to the bit (and int8_rows' with scaled=True): magnitudes from subnormal to 1e38, ties at half a step, 0, NaN and
    inf rows, a row of one input."""
    from moec.backends import cpu_quant

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 300, generator=gen) * torch.exp(torch.randn(64, 1, generator=gen) * 20).clamp(max=1e37)
    x[0] = 0
    x[1] *= 1e-43  # subnormal step: rounds to 0
    x[2, :] = torch.arange(300) - 149.5  # amax 149.5: many products land near .5
    x[3, 0], x[4, 7], x[5, 9] = float("nan"), float("inf"), -float("inf")
    x[6, :] = (torch.arange(300) % 253 - 126.5).float()  # step 1 (amax 127): every other input an exact tie
    x[6, 0] = 127
    for rows, groups in ((x, 1), (x[:, :1], 1), (x[:1], 1), (x, 10), (x[:, :64], 2)):  # 10 groups of 30, 2 of 32
        q, step = cpu_quant.round_rows(rows, groups)
        q_ref, step_ref = int8_quantized_rows(rows, rows.shape[1] // groups)
        same = lambda a, b: torch.equal(a.nan_to_num(0.25), b.nan_to_num(0.25))  # NaN where the reference has NaN
        assert same(q, q_ref) and same(step, step_ref), (rows.shape, groups)
        scaled, _ = cpu_quant.round_rows(rows, groups, scaled=True)
        assert same(scaled, int8_rows(rows, rows.shape[1] // groups)), (rows.shape, groups)
    q_ref, step_ref = int8_quantized_rows(x, x.shape[1])
    assert torch.isnan(q_ref[3:6]).any(-1).all() and step_ref[1] == 0 and step_ref[6] == 1
    assert (q_ref[6, 1:] % 2 == 0).all()  # ties to even
    t = quantize(Int8Experts(), torch.randn(2, 8, 300, generator=gen))
    rows = cpu_quant.expert_rows([64, 0])
    for bad in (torch.ones(63), torch.ones(0)):  # row scales: one per row
        with pytest.raises(ValueError, match="row scales"):
            cpu_quant.grouped_qmm(x, rows, t["q"], t["scale"], row_scale=bad)
    with pytest.raises(ValueError, match="row scales"):  # and for int8 experts only
        cpu_quant.grouped_qmm(x, rows, t["q"].float(), row_scale=torch.ones(64))


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 70])
def test_native_pack_is_the_reference_rounding(rows):
    """cpu_native.pack (C, rows split over the threads 8 at a time) gives int8_quantized_rows' numbers to the bit,
    for groups of 32, 64 and 128: magnitudes from subnormal to 1e37 (steps just above FLT_MIN kept), ties at half a
    step, 0; a group holding NaN or inf gets a NaN step and zeros (its rows' outputs NaN downstream). Each 32
    inputs come as (evens | odds), xi holds each group's sum, and an AVX2-only build writes the same bytes."""
    import ctypes

    import numpy as np

    from moec.backends import cpu_native

    if cpu_native.library() is None:
        pytest.skip("the native kernels are not built here")
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 384, generator=gen) * torch.exp(torch.randn(rows, 1, generator=gen) * 20).clamp(max=1e37)
    special = [torch.zeros(384), torch.randn(384, generator=gen) * 1e-40, torch.arange(384) - 191.5,
               (torch.arange(384) % 253 - 126.5).float()]  # 0; subnormal; many ties near .5; exact ties at step 1
    x[:len(special)] = torch.stack(special)[:rows]
    if rows > 4:
        x[4, 0], x[4, 200] = float("nan"), float("inf")  # groups 0 and 200 // g
        x[5, 383] = -float("inf")
    if rows > 6:
        x[6] = torch.randn(384, generator=gen) * 1e-33  # steps ~1e-35: small, but above FLT_MIN (not zeroed)
    for g in (32, 64, 128):
        x8, step, xi = cpu_native.pack(x.numpy(), 384 // g)
        q_ref, step_ref = int8_quantized_rows(x, g)
        q = torch.from_numpy(x8).view(rows, 12, 2, 16).transpose(2, 3).reshape(rows, 384).float()  # kernel order back
        bad = ~torch.isfinite(step_ref)  # [rows, 384/g]
        assert torch.isnan(torch.from_numpy(step)[bad]).all() and (q.view(rows, -1, g)[bad] == 0).all()
        assert torch.equal(torch.from_numpy(step)[~bad], step_ref[~bad]), g
        assert torch.equal(q.view(rows, -1, g)[~bad], q_ref.view(rows, -1, g)[~bad]), g
        assert torch.equal(torch.from_numpy(xi).long(), q.view(rows, -1, g).sum(-1).long()), g
        if rows == 9:  # an AVX2-only build (no AVX-512 encodings) writes the same bytes
            lib = ctypes.CDLL(str(cpu_native.build(("-O3", "-mavx2", "-mfma", "-shared", "-fPIC"))))
            out = np.zeros_like(x8), np.zeros_like(step), np.zeros_like(xi)
            p = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
            lib.moec_pack_a8(p(x.numpy()), ctypes.c_int64(384), ctypes.c_int64(g), *map(p, out), ctypes.c_int64(0),
                             ctypes.c_int64(rows))
            assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(out, (x8, step, xi))), g
    assert rows < 5 or (bad.sum() == 3 and step_ref[0, 0] == 0 and step_ref[1, 0] == 0)
    assert rows < 7 or (step_ref[6] > 0).all()


@pytest.mark.parametrize("hidden,inter", [(1, 8), (8, 1)])
def test_int8_activations_with_one_input(hidden, inter):
    """A GEMM with one input (torch._int_mm sums those wrongly on CPU) and tiny rows (amax 1e-37: a subnormal
    step, whose reciprocal overflows) still give the reference's numbers on both paths."""
    e = ExpertsSpec(4, hidden, inter, "silu")
    cfg = Int8Experts(activations="int8")
    gen = torch.Generator().manual_seed(hidden)
    t13 = quantize(cfg, torch.randn(4, 2 * inter, hidden, generator=gen))
    t2 = quantize(cfg, torch.randn(4, hidden, inter, generator=gen))
    for T in (1, 40):
        ids, w = torch.randint(0, 4, (T, 1), generator=gen), torch.rand(T, 1, generator=gen)
        x = torch.randn(T, hidden, generator=gen)
        x[0] *= 1e-37
        got = torch.ops.moec.experts_int8(x, ids, w, t13["q"], t13["scale"], None, t2["q"], t2["scale"], None,
                                          *experts_args(e), True)
        want = _int8_activations_reference(x, ids, w, t13, None, t2, None, e)
        assert torch.isfinite(got).all() and rel_err(got, want) < TOL[torch.float32], T


@pytest.mark.parametrize("cfg,numerics", [(Int8Experts(activations="int8"), "int8 activations, one scale per row"),
                                          (Int4Experts(32, activations="int8"),
                                           "int8 activations per group of 32 inputs, as ONNX Runtime's")],
                         ids=["int8", "int4"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_int8_activations_on_the_torch_backend(family, cfg, numerics, tmp_path):
    """compile(quantize=...(activations="int8")) on the torch backend: each block proved on the
    weight-only numerics, the report names the numerics run and their measured error; the logits are the
    weight-only model's under weight_only() and not without it, at one token (moec's kernels) and at 80 (int8
    GEMMs, or rounded rows on dequantized int4 weights); moec.save/load keep the config; a backend that does not
    run a8 refuses it with what to do."""
    kw = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=64)
    model = models.tiny_model(family, **kw)
    a8 = moec.compile(copy.deepcopy(model), quantize=cfg)
    w8 = moec.compile(copy.deepcopy(model), quantize=dataclasses.replace(cfg, activations="fp32"))
    report = moec.inspect(a8)
    assert report.blocks and not report.rejected, report
    assert numerics in " ".join(str(report).split())
    assert all("with int8 activations: max relative error" in b.proof for b in report.blocks)
    for batch, seq in ((1, 1), (2, 40)):
        inputs = models.example_inputs(model, batch=batch, seq=seq)
        with torch.no_grad():
            got, weight_only_logits = a8(**inputs).logits, w8(**inputs).logits
            with weight_only():
                assert rel_err(a8(**inputs).logits, weight_only_logits) < 1e-6
        assert rel_err(got, weight_only_logits) > 1e-5, (batch, seq)
    moec.save(a8, tmp_path / "m.safetensors")
    fresh = moec.load(models.tiny_model(family, seed=1, **kw), tmp_path / "m.safetensors")
    assert moec.inspect(fresh).quantize == cfg
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, got)
    again = moec.load(models.tiny_model(family, seed=2, **kw), tmp_path / "m.safetensors", quantize=cfg)  # the same
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, got)
    with pytest.raises(ValueError, match="load it without quantize="):  # the file's tensors fix the format
        moec.load(models.tiny_model(family, **kw), tmp_path / "m.safetensors", quantize=moec.Int8Experts())
    with pytest.raises(ValueError, match="backend='onnxruntime' quantizes unquantized weights"):
        moec.load(models.tiny_model(family, **kw), tmp_path / "m.safetensors", backend="onnxruntime")
    with pytest.raises(NotImplementedError, match="int8 activations .* not in backend 'triton'"):
        moec.compile(copy.deepcopy(model), quantize=cfg, backend="triton")


def _dequantized_twin(model, qmodel, cfg):
    """The model compiled without quantization, its expert weights replaced by the dequantized ones."""
    twin = moec.compile(copy.deepcopy(model))
    for b in moec.inspect(qmodel).blocks:
        qblock, tblock = resolve(qmodel, b.path), resolve(twin, b.path)
        gm = tblock.__dict__["_moec_graph"]
        spec, bindings = gm.meta["moe_spec"], gm.meta["bindings"]
        for role in ("w13", "w2"):  # the twin's canonical tensors are its own weights (or views of them)
            target = bindings[role].get(tblock)
            target.data.copy_(dequantize(cfg, quantized_tensors(qblock, role), target.dtype))
        if cfg.router:
            target = bindings["router_weight"].get(tblock)
            target.data.copy_(dequantize(cfg, quantized_tensors(qblock, "router"), target.dtype)[0])
        if cfg.shared and spec.shared:  # every QuantLinear of the shared experts: its twin Linear dequantized
            for name, m in resolve(qblock, spec.shared.module).named_modules():
                if isinstance(m, QuantLinear):
                    target = resolve(resolve(twin, b.path), f"{spec.shared.module}.{name}").weight
                    target.data.copy_(dequantize(cfg, dict(m.named_buffers()), target.dtype)[0])
    return twin


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=lambda c: c.describe())
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_hf_quantized_equals_dequantized_model(cfg, family):
    model = models.tiny_model(family, hidden_size=64, intermediate_size=64, moe_intermediate_size=64)
    qmodel = moec.compile(copy.deepcopy(model), quantize=cfg)
    report = moec.inspect(qmodel)
    assert report.blocks and not report.rejected, report
    assert all(cfg.describe() in b.experts for b in report.blocks)
    assert all(f"[{cfg.describe()}]" in repr(resolve(qmodel, b.path)) for b in report.blocks)  # print(model)
    assert f"{cfg.describe()} (weight-only: fp32 activations" in " ".join(str(report).split())  # the numerics run
    twin = _dequantized_twin(model, qmodel, cfg)
    inputs = models.example_inputs(model, batch=2, seq=5)
    with torch.no_grad():
        assert rel_err(qmodel(**inputs).logits, twin(**inputs).logits) < 1e-4


def test_group_size_must_divide_the_input_dim():
    model = models.tiny_model("mixtral", hidden_size=96)  # 96 is not a multiple of 64
    with pytest.warns(UserWarning, match=r"no MoE block rewritten .*not a multiple of the int4 group size 64.*; "
                                         r"and 1 more candidate\(s\) rejected; moec.inspect\(model\) lists them"):
        moec.compile(model, quantize=Int4Experts(64))
    rejected = moec.inspect(model).rejected
    assert rejected and all("not a multiple of the int4 group size 64" in r.reason for r in rejected)
    assert all(r.path in r.reason for r in rejected)


def test_bad_configs_and_no_moe():
    with pytest.raises(ValueError, match="group_size"):
        Int4Experts(100)
    with pytest.raises(TypeError, match="quantize must be"):
        moec.compile(models.tiny_model("mixtral"), quantize="int4")
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="no MoE block"):
        assert moec.compile(plain, quantize=Int8Experts()) is plain


@pytest.mark.parametrize("cfg", [Int8Experts(shared=True, router=True), Int4Experts(32, symmetric=False, shared=True),
                                 Int4Experts(32, router=True)], ids=lambda c: c.describe())
@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_shared_and_router_quantized_when_asked(cfg, family):
    model = models.tiny_model(family, hidden_size=64, intermediate_size=64, moe_intermediate_size=64)
    qmodel = moec.compile(copy.deepcopy(model), quantize=cfg)
    report = moec.inspect(qmodel)
    assert report.blocks and all(cfg.describe() in b.experts for b in report.blocks)
    for b in report.blocks:  # the shared MLP's 3 linears; its sigmoid gate (outside the shared module) stays
        shared = resolve(qmodel, b.path).__dict__["_moec_graph"].meta["moe_spec"].shared
        assert sum(isinstance(m, QuantLinear)
                   for m in resolve(qmodel, f"{b.path}.{shared.module}").modules()) == (3 if cfg.shared else 0)
        assert bool(quantized_tensors(resolve(qmodel, b.path), "router")) == cfg.router
    twin = _dequantized_twin(model, qmodel, cfg)
    inputs = models.example_inputs(model, batch=2, seq=5)
    with torch.no_grad():
        assert rel_err(qmodel(**inputs).logits, twin(**inputs).logits) < 1e-4
    plain = moec.compile(copy.deepcopy(model), quantize=dataclasses.replace(cfg, shared=False, router=False))
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())  # by default shared experts and router
    assert not any(quantized_tensors(resolve(plain, b.path), "router") for b in report.blocks)  # keep their dtype


@pytest.mark.parametrize("cfg", [Int8Experts(router=True), Int4Experts(32, router=True)], ids=lambda c: c.describe())
def test_a_quantized_router_follows_its_fp_weight(cfg):
    """router=True keeps the fp router weight in the block; changed after compile (in place, load_state_dict,
    .data =), the block quantizes it again before its next call: the model equals its dequantized twin with the
    new router quantized. Cast after compile, it runs in the new dtype (it used to fail on the router's dtype)."""
    model = models.tiny_model("mixtral")
    qmodel = moec.compile(copy.deepcopy(model), quantize=cfg)
    twin = _dequantized_twin(model, qmodel, cfg)
    inputs = models.example_inputs(model, batch=2, seq=5)
    name = f"{moec.inspect(qmodel).blocks[0].path}.gate.weight"
    for how in ("in place", "load_state_dict", ".data ="):
        new = torch.randn_like(model.get_parameter(name)) * 3
        with torch.no_grad():
            if how == "in place":
                qmodel.get_parameter(name).copy_(new)
            elif how == "load_state_dict":
                qmodel.load_state_dict({**qmodel.state_dict(), name: new})
            else:
                qmodel.get_parameter(name).data = new.clone()
            twin.get_parameter(name).copy_(dequantize(cfg, quantize(cfg, new[None]), torch.float32)[0])
            assert rel_err(qmodel(**inputs).logits, twin(**inputs).logits) < 1e-4, how
    for dtype in (torch.bfloat16, torch.float32):
        qmodel.to(dtype)
        with torch.no_grad():
            assert torch.isfinite(qmodel(**inputs).logits).all()


def test_torch_compile_and_export_follow_a_quantized_router_and_released_experts():
    """Traced (torch.compile, torch.export), a block cannot compare its router weight's version: it quantizes the
    router at each call, so a router changed after the first compiled call, or before an export, is followed (the
    graph kept the first call's quantized router: 0.75 relative error). Released expert tensors given new values
    raise under torch.compile as in eager calls (the graph ignored them)."""
    model = models.tiny_model("mixtral").eval()
    qmodel = moec.compile(copy.deepcopy(model), quantize=Int4Experts(32, router=True))
    eager = copy.deepcopy(qmodel)
    ids = models.example_inputs(model, batch=2, seq=5)["input_ids"]
    torch._dynamo.reset()
    fast = torch.compile(qmodel, backend="aot_eager", dynamic=False)
    with torch.no_grad():
        fast(ids)
        for m in (qmodel, eager):
            for layer in m.model.layers:
                layer.mlp.gate.weight.mul_(-1.5)
        want = eager(ids).logits
        assert rel_err(fast(ids).logits, want) < 1e-5
        for m in (qmodel, eager):  # changed again: the export quantizes it too
            for layer in m.model.layers:
                layer.mlp.gate.weight.mul_(-0.5)
        exported = torch.export.export(qmodel, (ids,), kwargs={"use_cache": False}).module()
        assert rel_err(exported(ids, use_cache=False).logits, eager(ids).logits) < 1e-5
    torch._dynamo.reset()
    qmodel = moec.compile(copy.deepcopy(model), quantize=Int8Experts())
    fast = torch.compile(qmodel, backend="aot_eager", dynamic=False)
    with torch.no_grad():
        fast(ids)
    emptied = next(n for n, p in qmodel.named_parameters() if p.numel() == 0)
    owner, attr = emptied.rsplit(".", 1)
    setattr(qmodel.get_submodule(owner), attr, torch.nn.Parameter(model.get_parameter(emptied).detach().clone()))
    with torch.no_grad(), pytest.raises(RuntimeError, match="given new values after compile"):
        fast(ids)
    torch._dynamo.reset()


def other_layer(state: dict, i: int):
    """(name, tensor) of decoder layer i's entries of a model's state_dict, named as inside the layer"""
    pre = f"model.layers.{i}."
    return ((k[len(pre):], v) for k, v in state.items() if k.startswith(pre))


def test_released_expert_weights_given_new_values_are_refused():
    """A quantized block runs its quantized buffers: new values in its released fp expert tensors (.data =, a new
    Parameter) would be ignored, so the next call raises; a load_state_dict of fp expert weights raises, saying why,
    and the model's own state (emptied tensors) loads."""
    model = models.tiny_model("mixtral")
    qmodel = moec.compile(copy.deepcopy(model), quantize=Int8Experts())
    inputs = models.example_inputs(model, batch=1, seq=3)
    with torch.no_grad():
        before = qmodel(**inputs).logits
    other = models.tiny_model("mixtral", seed=1).state_dict()
    for state in (model.state_dict(), other):
        with pytest.raises(RuntimeError, match="load_state_dict cannot give it new expert weights"):
            qmodel.load_state_dict(state, strict=False)
        with torch.no_grad():  # refused before anything was copied (the embedding comes first)
            assert torch.equal(qmodel(**inputs).logits, before)
    with pytest.raises(RuntimeError, match="load_state_dict cannot give it new expert weights"):
        qmodel.model.layers[1].load_state_dict(dict(other_layer(other, 1)), strict=False)  # a submodule's load too
    qmodel.load_state_dict(qmodel.state_dict())
    with torch.no_grad():  # the hook travels with the model
        assert torch.equal(pickle.loads(pickle.dumps(qmodel))(**inputs).logits, qmodel(**inputs).logits)
    emptied = next(n for n, p in qmodel.named_parameters() if p.numel() == 0)
    owner, attr = emptied.rsplit(".", 1)
    for replace in (lambda t: setattr(qmodel.get_parameter(emptied), "data", t),
                    lambda t: setattr(qmodel.get_submodule(owner), attr, torch.nn.Parameter(t))):
        replace(model.get_parameter(emptied).detach().clone())
        with torch.no_grad(), pytest.raises(RuntimeError, match="given new values after compile"):
            qmodel(**inputs)
        setattr(qmodel.get_submodule(owner), attr, torch.nn.Parameter(torch.empty(0)))
    with torch.no_grad():
        qmodel(**inputs)  # emptied again: it runs


def test_quantized_router_exports_to_onnx(tmp_path):
    """router=True is graph ops (dequantize, then the route): the ONNX file computes it too."""
    import onnxruntime as ort

    model, cfg = models.tiny_model("mixtral"), Int4Experts(32, router=True)
    report = moec.export_onnx(model, models.example_inputs(model, batch=2, seq=5), tmp_path / "m.onnx", quantize=cfg,
                              kv_cache=False)
    assert [b.op for b in report.blocks] == ["QMoE"] * 2
    twin = _dequantized_twin(model, moec.compile(copy.deepcopy(model), quantize=cfg), cfg)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    inputs = models.example_inputs(model, batch=1, seq=3, seed=5)
    with torch.no_grad():
        ref = twin(**inputs).logits
    assert rel_err(torch.from_numpy(session.run(None, {"input_ids": inputs["input_ids"].numpy()})[0]), ref) < 1e-4


def test_shared_quantization_is_torch_cpu_only(tmp_path):
    model = models.tiny_model("qwen2_moe")
    with pytest.raises(NotImplementedError, match="shared=True"):
        moec.compile(copy.deepcopy(model), backend="onnxruntime", quantize=Int8Experts(shared=True))
    with pytest.raises(NotImplementedError, match="shared=True"):
        moec.export_onnx(model, models.example_inputs(model, batch=2, seq=3), tmp_path / "m.onnx",
                         quantize=Int8Experts(shared=True))


@pytest.mark.parametrize("cfg,family", [(Int8Experts(), "mixtral"), (Int4Experts(32, symmetric=False), "mixtral"),
                                        (Int4Experts(32, shared=True), "qwen2_moe")], ids=lambda c: str(c))
def test_save_and_load_without_requantizing(cfg, family, tmp_path):
    model = moec.compile(models.tiny_model(family), quantize=cfg)
    path = tmp_path / "model.safetensors"
    moec.save(model, str(path))
    fresh = models.tiny_model(family, seed=1)  # other weights: everything must come from the file
    moec.load(fresh, str(path))
    assert moec.inspect(fresh).quantize == cfg
    inputs = models.example_inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_load_refuses_other_format_versions(tmp_path, monkeypatch):
    model = moec.compile(models.tiny_model("mixtral"), quantize=Int8Experts())
    path = str(tmp_path / "model.safetensors")
    monkeypatch.setattr(moec.quant, "FORMAT_VERSION", 99)
    moec.save(model, path)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="format version 99"):
        moec.load(models.tiny_model("mixtral"), path)


def test_kernels_run_where_no_cache_directory_is_writable():
    """numba refuses cache=True where it finds no writable cache directory (here: no cache locator applies);
    the kernels then compile without a disk cache instead of failing to import."""
    code = ("import torch\nfrom moec.backends import cpu_quant\n"
            "from moec.quant import Int8Experts, dequantize, quantize\n"
            "t = quantize(Int8Experts(), torch.randn(2, 16, 32))\nx = torch.randn(3, 32)\n"
            "got = cpu_quant.grouped_qmm(x, cpu_quant.expert_rows([2, 1]), *t.values())\n"
            "w = dequantize(Int8Experts(), t)\nref = torch.cat([x[:2] @ w[0].T, x[2:] @ w[1].T])\n"
            "assert (got - ref).abs().max() < 1e-5 * ref.abs().max()\n"
            "print(type(cpu_quant._int8_kernel._cache).__name__)")
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "numba.core.caching._IPythonCacheLocator"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "NullCache"


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_quantized_model_releases_its_fp_experts(family):
    """After compile(quantize=...) the model holds the quantized experts, not the fp ones as well."""
    model = models.tiny_model(family, hidden_size=64, intermediate_size=64, moe_intermediate_size=64)
    qmodel = moec.compile(copy.deepcopy(model), quantize=Int4Experts(32))
    blocks = [resolve(qmodel, b.path) for b in moec.inspect(qmodel).blocks]
    q = [quantized_tensors(b, role) for b in blocks for role in ("w13", "w2")]
    fp_bytes = sum(t["q"].shape[0] * t["q"].shape[1] * t["q"].shape[2] * 2 * 4 for t in q)  # [E, N, K/2] -> fp32
    original = dict(model.state_dict())
    emptied = {n for n, t in qmodel.state_dict().items() if t.numel() == 0 and original[n].numel()}
    assert emptied and all(".experts." in n for n in emptied)
    freed = _bytes(original[n] for n in emptied)
    assert freed == fp_bytes  # moec holds no copies of the fp experts (GPT-OSS's interleaved ones neither)
    qbytes = _bytes(t for d in q for t in d.values())
    assert _bytes(qmodel.state_dict().values()) == _bytes(original.values()) - freed + qbytes
    held = {id(t): t for t in [*qmodel.parameters(), *qmodel.buffers()]}.values()  # moec's copies too
    extra = _bytes(t for b in blocks for n, t in b.named_buffers(recurse=False)
                   if n.startswith("_moec_") and not n.startswith(("_moec_w13_", "_moec_w2_")))
    assert _bytes(held) == _bytes({id(t): t for t in [*model.parameters(), *model.buffers()]}.values()) \
        - freed + qbytes + extra


def test_released_blocks_refuse_what_needs_the_fp_experts(tmp_path):
    model = moec.compile(models.tiny_model("mixtral"), quantize=Int8Experts())
    block = resolve(model, moec.inspect(model).blocks[0].path)
    handle = block.gate.register_forward_hook(lambda *a: None)  # would not fire in the compiled graph
    with pytest.raises(NotImplementedError, match="original expert weights were released"):
        block(torch.randn(1, 3, model.config.hidden_size))
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)  # a profiler's, say
    try:
        with pytest.raises(NotImplementedError, match="a global forward hook"):
            block(torch.randn(1, 3, model.config.hidden_size))
    finally:
        handle.remove()
    with pytest.raises(NotImplementedError, match="use moec.save"):
        model.save_pretrained(str(tmp_path))


@pytest.mark.parametrize("cfg", [Int8Experts(), Int4Experts(32)], ids=lambda c: c.describe())
def test_quantized_model_follows_half_and_bf16(cfg):
    """.half() / .to(bfloat16) after compile casts the scales too: the kernels take them (as fp32) and the outputs
    stay within the dtype's rounding of the fp32 model's."""
    model = models.tiny_model("mixtral").eval()
    moec.compile(model, quantize=cfg)
    inputs = models.example_inputs(model, batch=2, seq=5)
    with torch.no_grad():
        ref = model(**inputs).logits
        for dtype, tol in ((torch.float16, 5e-3), (torch.bfloat16, 3e-2)):
            got = copy.deepcopy(model).to(dtype)(**inputs).logits
            assert got.dtype == dtype and rel_err(got, ref) < tol, (dtype, rel_err(got, ref))


def test_out_of_range_expert_ids_raise():
    cfg = Int8Experts()
    e = ExpertsSpec(4, 64, 64, "silu")
    t13, t2 = quantize(cfg, torch.randn(4, 128, 64)), quantize(cfg, torch.randn(4, 64, 64))
    x, w = torch.randn(2, 64), torch.rand(2, 2)
    with pytest.raises(ValueError, match="out of range"):
        _quantized_experts(cfg, x, torch.tensor([[0, 4], [1, 2]]), w, t13, None, t2, None, e)


@pytest.mark.parametrize("bad", ["zero int32", "zero shape", "scale channels", "scale experts", "groups", "out f64",
                                 "rows"])
def test_grouped_qmm_refuses_what_the_kernels_would_misread(bad):
    """The kernels read raw memory and take E, N and the groups from the scales: a tensor of another dtype or shape
    is refused with a ValueError (the C kernels gave wrong numbers, or wrote past `out`, on each of these)."""
    from moec.backends import cpu_quant

    t = quantize(Int4Experts(32, symmetric=False), torch.randn(2, 16, 64))
    q, s, z, out, rows = t["q"], t["scale"], t["zero"], torch.empty(3, 16), cpu_quant.expert_rows([2, 1])
    if bad == "zero int32":
        z = z.int()
    elif bad == "zero shape":
        z = z[:, :8]
    elif bad == "scale channels":
        s = torch.rand(2, 64, 2)
    elif bad == "scale experts":
        s, z = s[:1], z[:1]
    elif bad == "groups":
        s, z = torch.rand(2, 16, 3), None
    elif bad == "out f64":
        out = out.double()
    else:
        rows = cpu_quant.expert_rows([2, 1, 0])
    with pytest.raises(ValueError, match="grouped_qmm"):
        cpu_quant.grouped_qmm(torch.randn(3, 64), rows, q, s, z, out=out)


@pytest.mark.parametrize("n,K,N", [(1, 2, 3), (5, 1024, 16), (33, 3000, 80), (3, 4097, 8)])
def test_int8_sums_without_vnni_are_torch_int_mm_exactly(n, K, N):
    """Without VNNI (torch._int_mm ~27x slower than an fp32 GEMM there) the int8 GEMM sums 1024 inputs at a time in
    fp32, exact: the same int32 sums as torch._int_mm, extremes (-128 x -128 on every input) included."""
    g = torch.Generator().manual_seed(K)
    x = torch.randint(-128, 128, (n, K), dtype=torch.int8, generator=g)
    q = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    x[0], q[0] = -128, -128  # 2^14 a product: each part of 1024 sums to 2^24
    assert torch.equal(torch_backend.int8_sums(x, q), torch._int_mm(x, q.t()))
