"""Fused routing in one Triton kernel: router logits -> scores -> (group-limited) top-k -> weights.

    moec::triton_route(x[T,H], W[E,H], b?, select_bias?, <RouterSpec>) -> logits[T,E], ids[T,k] int64, w[T,k] fp32

(same schema as moec::route; sparsemixer routing has no kernel and stays moec::route, see `supports`)

The router GEMM itself stays a library GEMM (cuBLAS; it is tiny); everything after it runs in
`_route_kernel`, one program per BLOCK_T tokens with the whole E-row in registers. Same
semantics as `torch_backend.route_math` (the reference the tests compare against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SCORING = {"none": 0, "softmax": 1, "sigmoid": 2}


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, ids_ptr, w_ptr, T, E, stride_t,
                  TOP_K: tl.constexpr, SCORING: tl.constexpr, HAS_BIAS: tl.constexpr,
                  N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOP2: tl.constexpr,
                  ONES: tl.constexpr, RENORM: tl.constexpr, scale,
                  BLOCK_T: tl.constexpr, E_PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    rmask, cmask = rows < T, cols < E
    s = tl.load(logits_ptr + rows[:, None] * stride_t + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)  # [BT, EP]
    s = tl.where(cmask[None, :], s, float("-inf"))  # padding experts never win
    if SCORING == 1:
        s = tl.exp(s - tl.max(s, axis=1)[:, None])
        s = s / tl.sum(s, axis=1)[:, None]
    elif SCORING == 2:
        s = tl.sigmoid(s)
    choice = s
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(cmask[None, :], choice, float("-inf"))
    if N_GROUP > 1:  # keep the TOPK_GROUP best groups (E_PAD == E here: the launcher checks)
        grouped = tl.reshape(choice, (BLOCK_T, N_GROUP, E_PAD // N_GROUP))
        gscore = tl.max(grouped, axis=2)  # [BT, G]
        if GROUP_TOP2:  # sum of the two best experts of each group
            inner = tl.arange(0, E_PAD // N_GROUP)[None, None, :]
            first = tl.argmax(grouped, axis=2)[:, :, None]
            gscore += tl.max(tl.where(inner == first, float("-inf"), grouped), axis=2)
        g = tl.arange(0, N_GROUP)[None, :]
        keep = tl.zeros((BLOCK_T, N_GROUP), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.argmax(gscore, axis=1)[:, None]
            keep = keep | (g == best)
            gscore = tl.where(g == best, float("-inf"), gscore)
        grouped = tl.where(keep[:, :, None], grouped, float("-inf"))
        choice = tl.reshape(grouped, (BLOCK_T, E_PAD))
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)  # sum of |w|^p for the renormalisation
    for j in tl.static_range(TOP_K):  # k rounds of argmax (ties -> lowest index, as torch.topk)
        best = tl.argmax(choice, axis=1)
        hit = cols[None, :] == best[:, None]
        wj = tl.sum(tl.where(hit, s, 0.0), axis=1)
        if ONES:
            wj = tl.full((BLOCK_T,), 1.0, tl.float32)
        if RENORM == 1.0:
            total += wj
        elif RENORM != 0.0:
            total += tl.exp2(RENORM * tl.log2(tl.abs(wj)))
        tl.store(ids_ptr + rows * TOP_K + j, best.to(tl.int64), mask=rmask)
        tl.store(w_ptr + rows * TOP_K + j, wj, mask=rmask)
        choice = tl.where(hit, float("-inf"), choice)
    if RENORM != 0.0:
        denom = total if RENORM == 1.0 else tl.exp2(tl.log2(total) / RENORM)
    for j in tl.static_range(TOP_K):  # second sweep over the k weights this program wrote
        wj = tl.load(w_ptr + rows * TOP_K + j, mask=rmask)
        if RENORM != 0.0:
            wj = wj / denom
        tl.store(w_ptr + rows * TOP_K + j, wj * scale, mask=rmask)


def supports(n_experts: int, n_group: int, scoring: str) -> str | None:
    """None if the kernel handles this router, else why not (the torch route then runs)."""
    if scoring not in SCORING:
        return f"scoring {scoring!r} has no Triton routing kernel"
    if n_group > 1 and (n_experts & (n_experts - 1) or n_group & (n_group - 1)):
        return "group-limited routing needs power-of-two experts and groups in the Triton kernel"
    return None


@torch.library.custom_op("moec::triton_route", mutates_args=())
def triton_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, select_bias: torch.Tensor | None,
                 top_k: int, scoring: str, n_group: int, topk_group: int, group_score: str, weighting: str,
                 renorm: float, scale: float, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = F.linear(x, weight, bias)  # [T, E]
    T, E = logits.shape
    ids = torch.empty(T, top_k, dtype=torch.int64, device=x.device)
    w = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    e_pad = triton.next_power_of_2(E)
    block_t = max(1, min(16, 4096 // e_pad))
    _route_kernel[(triton.cdiv(T, block_t),)](
        logits, select_bias, ids, w, T, E, logits.stride(0),
        TOP_K=top_k, SCORING=SCORING[scoring], HAS_BIAS=select_bias is not None,
        N_GROUP=n_group, TOPK_GROUP=topk_group, GROUP_TOP2=group_score == "top2_sum",
        ONES=weighting == "ones", RENORM=float(renorm), scale=float(scale), BLOCK_T=block_t, E_PAD=e_pad)
    return logits, ids, w


@triton_route.register_fake
def _(x, weight, bias, select_bias, top_k, *args):
    T, E = x.shape[0], weight.shape[0]
    return (x.new_empty(T, E), x.new_empty(T, top_k, dtype=torch.int64), x.new_empty(T, top_k, dtype=torch.float32))
