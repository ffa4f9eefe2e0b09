"""Triton experts: token alignment + two fused grouped GEMMs (the role of vLLM's fused_moe).

    moec::align_block_size(ids[T,k], E, BLOCK_M) -> sorted[P] int32, block_expert[P/BLOCK_M] int32, n_padded[1] int32
    moec::triton_experts(x[T,H], ids[T,k], w[T,k], W13[E,N1,H], b13?, W2[E,H,I], b2?, ...) -> [T,H]
    moec::triton_experts_int8(x, ids, w, Q13 int8[E,N1,H], S13[E,N1], b13?, Q2, S2, b2?, ...) -> [T,H]
    moec::triton_experts_int4(x, ids, w, Q13 u8[E,N1,H/2], S13[E,N1,H/g], Z13?, b13?, Q2, S2, Z2?, b2?, g, ...)

Alignment sorts the T*k (token, slot) pairs by expert and pads each expert's run to a
multiple of BLOCK_M, on the device with no host sync: P = T*k + min(T*k, E)*(BLOCK_M-1)
rows are reserved, the padding holds the sentinel T*k, and GEMM programs past n_padded exit.

    GEMM 1 (grid: row blocks x I/BLOCK_N):  h[p, :] = act(x[p//k] @ W13[e].T + b13[e])   # gather + gated epilogue
    GEMM 2 (grid: row blocks x H/BLOCK_N):  y[p, :] = w[p] * (h[p] @ W2[e].T + b2[e])    # combine weight epilogue
    out[t] = sum_k y[t*k + j]                                                          # fp32, deterministic

Each BLOCK_M block of sorted rows belongs to one expert, so its weight tile is read once
per block. Quantized weights (moec.quant's format, read in place) are dequantized in
registers inside the K loop and fed to the dots in the activation dtype: int8 tiles are
converted as they are (integers up to 127 are exact in fp16/bf16) and the per-channel scale
multiplies the fp32 accumulator once, in the epilogue; an int4 K tile (within one scale
group: BLOCK_K <= group size) loads its packed bytes once, splits the nibbles into the even
(low) and odd (high) K rows, subtracts the zero point (8 if symmetric), multiplies by the
group's scale, and meets the activation tile's even and odd columns in two dots.
fp32 accumulation; fp32 inputs use IEEE dots (no TF32) to match the torch backend. Under
TRITON_INTERPRET=1, bf16 loads are upcast right away (the interpreter keeps bf16 as raw
integers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from moec.backends.triton_config import config_for

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "swiglu_oai": 4}


# --- alignment ------------------------------------------------------------------------------

@triton.jit
def _count_kernel(ids_ptr, counts_ptr, rank_ptr, n, BLOCK: tl.constexpr):
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = p < n
    e = tl.load(ids_ptr + p, mask=m, other=0)
    tl.store(rank_ptr + p, tl.atomic_add(counts_ptr + e, 1, mask=m), mask=m)  # old count = rank in expert


@triton.jit
def _offsets_kernel(counts_ptr, start_ptr, end_ptr, npad_ptr, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    e = tl.arange(0, E_PAD)
    c = tl.load(counts_ptr + e, mask=e < E, other=0)
    padded = (c + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    tl.store(start_ptr + e, end - padded, mask=e < E)
    tl.store(end_ptr + e, end, mask=e < E)
    tl.store(npad_ptr, tl.sum(padded, axis=0))


@triton.jit
def _scatter_kernel(ids_ptr, rank_ptr, start_ptr, sorted_ptr, n, BLOCK: tl.constexpr):
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = p < n
    e = tl.load(ids_ptr + p, mask=m, other=0)
    dst = tl.load(start_ptr + e, mask=m, other=0) + tl.load(rank_ptr + p, mask=m, other=0)
    tl.store(sorted_ptr + dst, p.to(tl.int32), mask=m)


@triton.jit
def _block_expert_kernel(end_ptr, block_expert_ptr, E, n_blocks, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
                         E_PAD: tl.constexpr):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    e = tl.arange(0, E_PAD)
    end = tl.load(end_ptr + e, mask=e < E, other=2**30)
    # a block's expert is the first whose run ends after the block starts (empty runs end earlier)
    expert = tl.sum((end[None, :] <= (b * BLOCK_M)[:, None]).to(tl.int32), axis=1)
    tl.store(block_expert_ptr + b, expert, mask=b < n_blocks)


@torch.library.custom_op("moec::align_block_size", mutates_args=())
def align_block_size(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = ids.numel()
    dev = ids.device
    rows = n + min(n, num_experts) * (block_m - 1)  # worst case of padding, known without a sync
    counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)
    rank = torch.empty(n, dtype=torch.int32, device=dev)
    start, end = torch.empty_like(counts), torch.empty_like(counts)
    sorted_ids = torch.full((rows,), n, dtype=torch.int32, device=dev)
    n_blocks = triton.cdiv(rows, block_m)
    block_expert = torch.empty(n_blocks, dtype=torch.int32, device=dev)
    n_padded = torch.empty(1, dtype=torch.int32, device=dev)
    e_pad = triton.next_power_of_2(num_experts)
    _count_kernel[(triton.cdiv(n, 256),)](ids, counts, rank, n, BLOCK=256)
    _offsets_kernel[(1,)](counts, start, end, n_padded, num_experts, BLOCK_M=block_m, E_PAD=e_pad)
    _scatter_kernel[(triton.cdiv(n, 256),)](ids, rank, start, sorted_ids, n, BLOCK=256)
    block_b = max(1, min(64, 8192 // e_pad))
    _block_expert_kernel[(triton.cdiv(n_blocks, block_b),)](end, block_expert, num_experts, n_blocks, BLOCK_M=block_m,
                                                            BLOCK_B=block_b, E_PAD=e_pad)
    return sorted_ids, block_expert, n_padded


@align_block_size.register_fake
def _(ids, num_experts, block_m):
    n = ids.numel()
    rows = n + min(n, num_experts) * (block_m - 1)
    i32 = dict(dtype=torch.int32, device=ids.device)
    return torch.empty(rows, **i32), torch.empty((rows + block_m - 1) // block_m, **i32), torch.empty(1, **i32)


# --- grouped GEMMs --------------------------------------------------------------------------

@triton.jit
def _activate(g, u, ACT: tl.constexpr, GATED: tl.constexpr, alpha, limit):
    """fp32 [BM, BN] -> activation (gated: act(g) * u; GPT-OSS: clamped (u + 1) * g * sigmoid(alpha g))."""
    if ACT == 4:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        return (u + 1) * (g * tl.sigmoid(g * alpha))
    if ACT == 0:
        a = g * tl.sigmoid(g)
    elif ACT == 1:
        a = 0.5 * g * (1 + tl.erf(g * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (1 + (2 * tl.sigmoid(2 * inner) - 1))  # tanh(z) = 2 sigmoid(2z) - 1
    else:
        a = tl.maximum(g, 0.0)
    if GATED:
        a = a * u
    return a


@triton.jit
def _weight_dot(acc, a, w_ptr, s_ptr, z_ptr, w_off, s_off, k0, K, cmask, stride_wk, stride_sk,
                QUANT: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """acc [BM, BN] + a [BM, BK] @ W[e].T[k0:k0+BK, columns at w_off/s_off [1, BN]], W stored as is (QUANT 0),
    int8 (8: values as they are; the per-channel scale is the caller's, on the accumulator) or int4 (4)."""
    if QUANT == 4:  # a byte holds rows 2j (low nibble) and 2j+1; the tile lies in one group (BLOCK_K <= GROUP)
        js = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        p = tl.load(w_ptr + w_off + js[:, None] * stride_wk, mask=(js < K // 2)[:, None] & cmask[None, :],
                    other=0)  # [BK/2, BN] packed bytes, contiguous along K
        g_off = s_off + (k0 // GROUP) * stride_sk
        s = tl.load(s_ptr + g_off, mask=cmask[None, :], other=0.0)  # [1, BN] the group's scales
        if HAS_ZERO:
            z = tl.load(z_ptr + g_off, mask=cmask[None, :], other=0).to(tl.float32)
        else:
            z = 8.0
        lo = ((p & 0xF).to(tl.float32) - z) * s  # rows 2j
        hi = ((p >> 4).to(tl.float32) - z) * s  # rows 2j+1
        a_even, a_odd = tl.split(tl.reshape(a, (a.shape[0], BLOCK_K // 2, 2)))  # a's columns 2j and 2j+1
        acc = tl.dot(a_even, lo.to(a.dtype), acc, input_precision="ieee" if IEEE else None)
        acc = tl.dot(a_odd, hi.to(a.dtype), acc, input_precision="ieee" if IEEE else None)
    else:
        ks = k0 + tl.arange(0, BLOCK_K)
        b = tl.load(w_ptr + w_off + ks[:, None] * stride_wk, mask=(ks < K)[:, None] & cmask[None, :], other=0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision="ieee" if IEEE else None)
    return acc


@triton.jit
def _gemm1_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, wts_ptr, h_ptr, sorted_ptr, block_expert_ptr, npad_ptr,
                  n_pairs, K, I, stride_x, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
                  stride_be, alpha, limit, gate0, up0,
                  TOP_K: tl.constexpr, ROW_STEP: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                  WEIGHT_ON_INPUT: tl.constexpr, QUANT: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP: tl.constexpr,
                  UPCAST: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(npad_ptr):
        return
    pair = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM] sentinel n_pairs = padding
    valid = pair < n_pairs
    token = pair // TOP_K
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < I
    gate_rows = gate0 + cols * ROW_STEP  # gate rows of W13[e] (all rows if not gated), in its row order
    up_rows = up0 + cols * ROW_STEP
    w_off = e * stride_we + gate_rows[None, :] * stride_wn
    s_off = e * stride_se + gate_rows[None, :] * stride_sn  # their scales (quantized weights)
    wu_off = e * stride_we + up_rows[None, :] * stride_wn
    su_off = e * stride_se + up_rows[None, :] * stride_sn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if WEIGHT_ON_INPUT:
        wt = tl.load(wts_ptr + pair, mask=valid, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(x_ptr + token[:, None].to(tl.int64) * stride_x + ks[None, :], mask=valid[:, None] & kmask[None, :],
                    other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        if WEIGHT_ON_INPUT:  # Llama4: the combine weight scales the input, rounded to its dtype
            a = (a.to(tl.float32) * wt[:, None]).to(x_ptr.dtype.element_ty)
            if UPCAST:
                a = a.to(tl.float32)
        acc_g = _weight_dot(acc_g, a, w_ptr, s_ptr, z_ptr, w_off, s_off, k0, K, cmask, stride_wk, stride_sk,
                            QUANT, HAS_ZERO, GROUP, IEEE, BLOCK_K)
        if GATED:  # up rows are the second half of W13[e]
            acc_u = _weight_dot(acc_u, a, w_ptr, s_ptr, z_ptr, wu_off, su_off, k0, K,
                                cmask, stride_wk, stride_sk, QUANT, HAS_ZERO, GROUP, IEEE, BLOCK_K)
    if QUANT == 8:  # per output channel scales
        acc_g *= tl.load(s_ptr + s_off, mask=cmask[None, :], other=0.0)
        if GATED:
            acc_u *= tl.load(s_ptr + su_off, mask=cmask[None, :], other=0.0)
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + e * stride_be + gate_rows, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_ptr + e * stride_be + up_rows, mask=cmask, other=0.0).to(tl.float32)[None, :]
    h = _activate(acc_g, acc_u, ACT, GATED, alpha, limit)
    tl.store(h_ptr + pair[:, None].to(tl.int64) * I + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=valid[:, None] & cmask[None, :])


@triton.jit
def _gemm2_kernel(h_ptr, w_ptr, s_ptr, z_ptr, b_ptr, wts_ptr, y_ptr, sorted_ptr, block_expert_ptr, npad_ptr,
                  n_pairs, K, N, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_be,
                  HAS_BIAS: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr, QUANT: tl.constexpr, HAS_ZERO: tl.constexpr,
                  GROUP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(npad_ptr):
        return
    pair = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pair < n_pairs
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    w_off = e * stride_we + cols[None, :] * stride_wn
    s_off = e * stride_se + cols[None, :] * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(h_ptr + pair[:, None].to(tl.int64) * K + ks[None, :], mask=valid[:, None] & kmask[None, :],
                    other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        acc = _weight_dot(acc, a, w_ptr, s_ptr, z_ptr, w_off, s_off, k0, K, cmask, stride_wk, stride_sk, QUANT,
                          HAS_ZERO, GROUP, IEEE, BLOCK_K)  # W2[e].T tile
    if QUANT == 8:
        acc *= tl.load(s_ptr + s_off, mask=cmask[None, :], other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e * stride_be + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if not WEIGHT_ON_INPUT:
        acc *= tl.load(wts_ptr + pair, mask=valid, other=0.0)[:, None]
    tl.store(y_ptr + pair[:, None].to(tl.int64) * N + cols[None, :], acc, mask=valid[:, None] & cmask[None, :])


def _interpreting() -> bool:
    return isinstance(_gemm1_kernel, InterpretedFunction)


def _scale_strides(s: torch.Tensor | None) -> tuple[int, int, int]:
    """(expert, channel, group) strides of a scale tensor: [E, N] (int8) or [E, N, K/g] (int4); zeros if none."""
    return (0, 0, 0) if s is None else (s.stride(0), s.stride(1), s.stride(2) if s.dim() == 3 else 0)


def _experts(x, ids, weights, *args, **kw):
    """[T, H] -> [T, H]: expert_pairs' outputs summed over each token's k slots, in token order."""
    T, k = ids.shape
    return expert_pairs(x, ids, weights, *args, **kw).view(T, k, -1).sum(dim=1).to(x.dtype)


def expert_pairs(x, ids, weights, w13, b13, w2, b2, activation, gated, alpha, limit, weight_on_input, gate_up,
                 quant=0, s13=None, z13=None, s2=None, z2=None, group=0, shape=None):
    """Both GEMMs on weights as stored: W13 [E, N1, H] / W2 [E, H, I] in x's dtype (quant 0), int8 (8) or
    int4-packed (4: [E, N, K/2] bytes) with moec.quant's scales s [E, N(, K/g)] and zero points z (or None)
    -> each (token, slot) pair's weighted expert output [T*k, H] fp32. shape: the (T, E, k) whose tile
    configuration runs (default: this call's; the offload pool runs a block's pairs on its slots with the block's
    own, so that each pair's numbers are the resident kernel's)."""
    T, k = ids.shape
    E, N1, H = w13.shape[0], w13.shape[1], x.shape[1]
    I = N1 // 2 if gated else N1
    x = x.contiguous()  # weights are read through their strides: no per-call copies
    qkey = {0: "", 8: "w8", 4: f"w4g{group}"}[quant]
    tiles_T, tiles_E, tiles_k = shape or (T, E, k)
    cfg = config_for(tiles_T, tiles_E, N1, H, tiles_k, x.dtype, x.device, qkey)
    block_k = min(cfg.block_k, group) if quant == 4 else cfg.block_k  # an int4 K tile lies in one group
    sorted_ids, block_expert, n_padded = align_block_size(ids.reshape(-1).to(torch.int32), E, cfg.block_m)
    flat_w = weights.reshape(-1).float().contiguous()
    n_pairs = T * k
    h = torch.empty(n_pairs, I, dtype=x.dtype, device=x.device)  # [T*k, I] in pair order
    y = torch.empty(n_pairs, H, dtype=torch.float32, device=x.device)  # [T*k, H] weighted expert outputs
    upcast = _interpreting() and x.dtype == torch.bfloat16
    ieee = x.dtype == torch.float32
    m_blocks = block_expert.numel()
    step = 2 if gated and gate_up.startswith("interleave") else 1  # gate/up rows of W13 (moec.ir.GATE_UPS)
    gate0, up0 = (0, I) if step == 1 else (0, 1)
    if gated and gate_up.endswith("up_first"):
        gate0, up0 = up0, gate0
    b13 = None if b13 is None else b13.contiguous()  # [E, N1], read with unit stride along N1
    common = dict(QUANT=quant, GROUP=max(group, 1), UPCAST=upcast, IEEE=ieee, BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, BLOCK_K=block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _gemm1_kernel[(m_blocks, triton.cdiv(I, cfg.block_n))](
        x, w13, s13, z13, b13, flat_w, h, sorted_ids, block_expert, n_padded, n_pairs, H, I, x.stride(0),
        w13.stride(0), w13.stride(1), w13.stride(2), *_scale_strides(s13), 0 if b13 is None else b13.stride(0),
        float(alpha), float(limit), gate0, up0, TOP_K=k, ROW_STEP=step, ACT=ACTIVATIONS[activation], GATED=gated,
        HAS_BIAS=b13 is not None,
        WEIGHT_ON_INPUT=weight_on_input, HAS_ZERO=z13 is not None, **common)
    _gemm2_kernel[(m_blocks, triton.cdiv(H, cfg.block_n))](
        h, w2, s2, z2, b2, flat_w, y, sorted_ids, block_expert, n_padded, n_pairs, I, H,
        w2.stride(0), w2.stride(1), w2.stride(2), *_scale_strides(s2), 0 if b2 is None else b2.stride(0),
        HAS_BIAS=b2 is not None, WEIGHT_ON_INPUT=weight_on_input, HAS_ZERO=z2 is not None, **common)
    return y


@torch.library.custom_op("moec::triton_experts", mutates_args=())
def triton_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                   b13: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None, activation: str, gated: bool,
                   alpha: float, limit: float, weight_on_input: bool, gate_up: str) -> torch.Tensor:
    return _experts(x, ids, weights, w13, b13, w2, b2, activation, gated, alpha, limit, weight_on_input, gate_up)


@torch.library.custom_op("moec::triton_experts_int8", mutates_args=())
def triton_experts_int8(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, q13: torch.Tensor,
                        s13: torch.Tensor, b13: torch.Tensor | None, q2: torch.Tensor, s2: torch.Tensor,
                        b2: torch.Tensor | None, activation: str, gated: bool, alpha: float, limit: float,
                        weight_on_input: bool, gate_up: str) -> torch.Tensor:
    """int8 experts in moec's format: q [E, N, K] int8, s [E, N] fp32 (the arguments of moec::experts_int8)."""
    return _experts(x, ids, weights, q13, b13, q2, b2, activation, gated, alpha, limit, weight_on_input, gate_up,
                    quant=8, s13=s13.float(), s2=s2.float())


@torch.library.custom_op("moec::triton_experts_int4", mutates_args=())
def triton_experts_int4(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, q13: torch.Tensor,
                        s13: torch.Tensor, z13: torch.Tensor | None, b13: torch.Tensor | None, q2: torch.Tensor,
                        s2: torch.Tensor, z2: torch.Tensor | None, b2: torch.Tensor | None, group_size: int,
                        activation: str, gated: bool, alpha: float, limit: float,
                        weight_on_input: bool, gate_up: str) -> torch.Tensor:
    """int4 experts in moec's format: q [E, N, K/2] uint8, s [E, N, K/g] fp32, z [E, N, K/g] uint8 (None: symmetric)."""
    for name, q, s, z in (("w13", q13, s13, z13), ("w2", q2, s2, z2)):
        E, N, half = q.shape
        if q.dtype != torch.uint8 or s.shape != (E, N, 2 * half // group_size) or 2 * half % group_size or (
                z is not None and (z.shape != s.shape or z.stride() != s.stride())):
            raise ValueError(f"moec::triton_experts_int4: {name} is not in moec's int4 format for group size "
                             f"{group_size}: q {tuple(q.shape)} {q.dtype}, scale {tuple(s.shape)}, "
                             f"zero {None if z is None else tuple(z.shape)}")
    return _experts(x, ids, weights, q13, b13, q2, b2, activation, gated, alpha, limit, weight_on_input, gate_up,
                    quant=4, s13=s13.float(), z13=z13, s2=s2.float(), z2=z2, group=group_size)


@triton_experts.register_fake
@triton_experts_int8.register_fake
@triton_experts_int4.register_fake
def _(x, *args):
    return torch.empty_like(x)
