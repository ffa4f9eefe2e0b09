"""Plain-torch kernels for moec's canonical ops (any device; the fast path on CPU).

`route` is one vectorised pass (linear, scoring, grouped selection, normalisation).
`experts` sorts the (token, slot) pairs by expert once, runs one GEMM pair per *active*
expert over a contiguous slice of the sorted rows (expert weights are used in place, never
copied per call; the GEMMs are shaped for MKL's small-row kernels, see `_expert_ffn`) or, with
many rows per expert, two `torch._grouped_mm` calls over all of them (`_grouped_ffn`), and
combines by un-sorting and summing over the k slots: no per-token Python work. On CPU with fp32 or
bf16 row-major weights and few rows per expert (decode; `_numba_route`), the experts run as the quantized
ones do below: one numba call per GEMM over all of them.
`experts_int8` / `experts_int4` (quantized experts, CPU) sort the same way and run
the numba kernels of `cpu_quant` on moec's quantized format, one call per GEMM; an expert with
many rows (prefill) is dequantized into a reused buffer and runs MKL's GEMMs instead. int4 experts
on cpu_native's C kernels (int8 activations or weight-only) run them on every row, with
less glue (`_native_int4`).
`capacity` drops assignments past an expert's capacity with one cumsum over one-hot positions.
`experts_loop` is the naive reference the rewrites are checked against.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

import moec.ops  # noqa: F401  (defines the op schemas)
from moec.backends.cpu_linear import values_only
from moec.ir import RouterSpec
from moec.quant import int8_rows, weight_only_active


def split_gate_up(h: torch.Tensor, gate_up: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N1] in W13's row order (moec.ir.GATE_UPS) -> gate, up [..., I] (views)."""
    if gate_up.startswith("interleave"):
        first, second = h[..., 0::2], h[..., 1::2]
    else:
        first, second = h.chunk(2, dim=-1)
    return (second, first) if gate_up.endswith("up_first") else (first, second)


def activate(h: torch.Tensor, activation: str, gated: bool, alpha: float, limit: float,
             gate_up: str = "halves") -> torch.Tensor:
    """[n, N1] -> [n, I]: the expert's activation; gated: act(gate) * up, rows split by `gate_up`."""
    if not gated:
        return _act(h, activation)
    gate, up = split_gate_up(h, gate_up)
    if activation == "swiglu_oai":  # GPT-OSS: clamped, (up + 1) * gate * sigmoid(alpha * gate)
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    return _act(gate, activation) * up


def _act(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "relu":
        return F.relu(h)
    raise ValueError(f"unknown activation {activation!r}")


def route_math(x, weight, bias, select_bias, router: str, num_experts):
    """The routing math in plain torch (fx-traceable: no shape unpacking), see RouterSpec (`router`: its JSON).
    The same torch ops as the blocks it stands for, so on the same device the same experts are chosen, ties
    included."""
    r = RouterSpec.from_json(router)
    top_k, scoring, select_on, selection = r.top_k, r.scoring, r.select_on, r.selection
    n_group, topk_group, weighting, renorm = r.n_group, r.topk_group, r.weighting, r.renorm
    if r.upcast:
        x, weight, bias = x.float(), weight.float(), None if bias is None else bias.float()
    logits = F.linear(x, weight, bias)  # [T, E]
    s = logits.float()
    if scoring == "sparsemixer":
        return (logits, *sparsemixer(s, top_k, r.jitter_eps))
    if scoring == "softmax":
        scores = s.softmax(dim=-1)
    elif scoring == "sigmoid":
        scores = s.sigmoid()
    else:
        scores = s
    if selection == "argmax" and top_k > 1:  # sequential picks, each over the values with the earlier ones masked
        ids = _argmax_picks(scores, s, select_on.split(","), top_k, r.pick_mask)
    else:
        choice = scores if select_on == "scores" else s
        if select_bias is not None:
            choice = choice + select_bias.float()
        if n_group > 1:
            grouped = choice.view(-1, n_group, num_experts // n_group)  # [T, G, E/G]
            if r.group_score == "max":
                gscore = grouped.amax(dim=-1)  # [T, G]
            else:
                gscore = grouped.topk(2, dim=-1).values.sum(dim=-1)
            keep = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, gscore.topk(topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(num_experts // n_group, dim=1), float("-inf"))
        # [T, k]; argmax takes the first of tied experts, topk an order of its own: the block's op decides
        ids = choice.argmax(dim=-1, keepdim=True) if selection == "argmax" else choice.topk(top_k, dim=-1).indices
    chosen_softmax = select_on == "logits" and scoring == "softmax" and renorm == 1.0
    if weighting == "ones":
        weights = torch.ones_like(ids, dtype=torch.float32)
    elif chosen_softmax:  # the softmax over the chosen logits, computed as the block computes it
        weights = s.gather(1, ids).softmax(dim=-1)  # [T, k]
    else:
        weights = scores.gather(1, ids)  # [T, k]
    if r.top_p:
        ids, weights = top_p(ids, weights, r.top_p, r.min_k, ranked=select_bias is None and selection == "topk")
        if chosen_softmax:  # the softmax over the chosen logits that are kept
            weights = weights / weights.sum(-1, keepdim=True)
    if not r.renorm_after_drop:  # else moec::capacity does, around the drop
        weights = _renorm_scale(weights, r)
    return logits, ids, weights


def top_p(ids, weights, p: float, min_k: int, ranked: bool):
    """Top-p routing over a token's k pairs [T, k]: keep the fewest heaviest pairs whose weights hold at least p of
    the k weights' sum (at least min_k); a dropped pair gets weight 0 and the id of the token's heaviest expert, so
    the experts op loads no expert for it (one more row of an expert the token runs anyway). ranked: the pairs come
    heaviest first (top-k over the scores themselves, no selection bias), so no sort is needed."""
    share = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)  # fp32 [T, k]
    order = None if ranked else share.sort(dim=-1, descending=True, stable=True).indices
    if order is not None:
        share = share.gather(1, order)
    rank = torch.ones_like(share, dtype=torch.long).cumsum(-1)  # 1..k
    keep = ((share.cumsum(-1) - share) < p) | (rank <= min_k)  # the heavier ones hold less than p yet
    if order is not None:
        keep = torch.zeros_like(keep).scatter(1, order, keep)  # back to slot order
    heaviest = ids[:, :1] if order is None else ids.gather(1, order[:, :1])  # [T, 1]
    return torch.where(keep, ids, heaviest), weights * keep


def _renorm_scale(weights, r: RouterSpec):
    """The chosen weights [T, k] renormalised (RouterSpec.renorm, with its epsilon and floor), then scaled."""
    chosen_softmax = r.select_on == "logits" and r.scoring == "softmax" and r.renorm == 1.0
    if r.renorm and not chosen_softmax:
        denom = weights.sum(-1, keepdim=True) if r.renorm == 1.0 else weights.norm(p=r.renorm, dim=-1, keepdim=True)
        denom = denom + r.renorm_eps if r.renorm_eps else denom
        weights = weights / (denom.clamp(min=r.renorm_floor) if r.renorm_floor else denom)
    return weights * r.scale if r.scale != 1.0 else weights


def _argmax_picks(scores, logits, on: list[str], k: int, mask: float):
    """k argmax picks [T, k]: pick j over the scores or the logits (on[j]), earlier picks set to `mask` (GShard)."""
    picks = []
    for j in range(k):
        v = scores if on[min(j, len(on) - 1)] == "scores" else logits
        for p in picks:
            v = v.scatter(1, p, mask)
        picks.append(v.argmax(dim=-1, keepdim=True))
    return torch.cat(picks, dim=1)


def sparsemixer(s, top_k, jitter_eps):
    """PhiMoE's eval-mode routing (HF `sparsemixer`, which makes k=2 picks) on fp32 logits [T, E]:
    each pick takes the best logit m not picked yet and weights it by a softmax over the logits
    not picked yet, masked where (m - l) / max(|l|, m) > 2 * jitter_eps. -> ids, weights [T, k]."""
    ids, weights = [], []
    left = s  # logits with earlier picks set to -inf
    for _ in range(top_k):
        m, i = left.max(dim=-1, keepdim=True)  # [T, 1]
        far = (m - s) / s.abs().clamp(min=m) > 2 * jitter_eps
        weights.append(left.masked_fill(far, float("-inf")).softmax(dim=-1).gather(1, i))
        ids.append(i)
        left = left.scatter(1, i, float("-inf"))
    return torch.cat(ids, dim=1), torch.cat(weights, dim=1)


@torch.library.impl("moec::route", "CompositeExplicitAutograd")
def route(x, weight, bias, select_bias, router):
    return route_math(x, weight, bias, select_bias, router, num_experts=weight.shape[0])


def _expert_ffn(xe, w13, b13, w2, b2, activation, gated, alpha, limit, gate_up, cols=None, cols2=None):
    """One expert on its n sorted rows: [n, H] -> [n, H]. `cols` reorders each GEMM input's
    columns to the weights' column order (dequantized int4 weights, see cpu_quant.dequantize_expert);
    `cols2`, if given, does for the second GEMM's input (int4 with int8 activations: each rounds its own groups).

    Written as W @ X^T (weights as the GEMM's left operand): MKL's small-n kernels stream the
    weights 2-4x faster that way than as X @ W^T, and one row is padded to two because the
    single-row path (GEMV) is the slowest of all. The activation is made contiguous for
    few rows, which MKL also prefers as the second GEMM's right operand.
    """
    n = xe.shape[0]
    cols = cols or (lambda t: t)
    xe = cols(xe)
    if n == 1:
        xe = xe.expand(2, -1).contiguous()
    h = _gemm(xe, w13, b13)  # [n, N1]
    a = (cols2 or cols)(activate(h, activation, gated, alpha, limit, gate_up))  # [n, I]
    if n <= 4:
        a = a.contiguous()
    return _gemm(a, w2, b2)[:n]  # [n, H]


def _gemm(x, w, b):
    """x [n, K] @ w[N, K]^T (+ b) -> [n, N], as W @ X^T for a row-major w (see _expert_ffn). A w stored
    transposed (GPT-OSS keeps [E, K, N], read in place) is a row-major w^T: x @ w^T is then the contiguous GEMM
    (the W @ X^T form on it measured 30x slower at n = 2)."""
    if w.stride(-1) != 1:
        return torch.mm(x, w.T) if b is None else torch.addmm(b, x, w.T)
    return (torch.mm(w, x.T) if b is None else torch.addmm(b.unsqueeze(1), w, x.T)).T  # a view


# average sorted rows per active expert from which one torch._grouped_mm call beats the per-expert loop
# (measured on the CPU machine: benchmarks/bench_moe.py, docs/benchmarks.md)
GROUPED_MIN_ROWS = 8


def _grouped_mm_takes(*tensors) -> bool:
    """torch._grouped_mm's constraints: fp32/bf16/fp16, 16-byte aligned data and strides (else the per-expert
    path runs: e.g. an expert hidden size that is not a multiple of 4 fp32 values, or fp64)."""
    return hasattr(torch, "_grouped_mm") and all(
        t.dtype in (torch.float32, torch.bfloat16, torch.float16) and t.data_ptr() % 16 == 0 and t.stride(-1) == 1
        and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1]) for t in tensors)


def _grouped_ffn(xs, counts, row_expert, w13, b13, w2, b2, activation, gated, alpha, limit, gate_up):
    """All experts on the expert-sorted rows in two grouped GEMMs: [T*k, H] -> [T*k, H]."""
    offs = torch.tensor(counts, dtype=torch.int32, device=xs.device).cumsum(0, dtype=torch.int32)
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)  # [T*k, N1]
    if b13 is not None:
        h += b13[row_expert]
    h = activate(h, activation, gated, alpha, limit, gate_up)  # [T*k, I]
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)  # [T*k, H]
    if b2 is not None:
        y += b2[row_expert]
    return y


def _sort(x, ids, weights, num_experts, weight_on_input):
    """Group the T*k (token, slot) pairs by expert: order [T*k], counts per expert, rows xs [T*k, H], ws [T*k, 1]."""
    k = ids.shape[1]
    flat = ids.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    xs = x.index_select(0, order // k)  # [T*k, H] the source token of each sorted row
    ws = weights.reshape(-1)[order].unsqueeze(1)  # [T*k, 1] fp32
    if weight_on_input:
        xs = (xs * ws).to(x.dtype)
    return flat, order, counts, xs, ws


def _per_expert(xs, counts, ffn):
    """ys[rows of e] = ffn(e, xs[rows of e]) for every active expert e."""
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n:
            ys[start:start + n] = ffn(e, xs[start:start + n])
            start += n
    return ys


def _combine(ys, order, ws, ids, weight_on_input, dtype):
    """Sorted expert outputs [T*k, H] -> weighted sum over each token's k slots [T, H]."""
    T, k = ids.shape
    ys = ys.float() if weight_on_input else ys * ws
    unsorted = torch.empty_like(ys)
    unsorted[order] = ys  # back to (token, slot) order: a plain copy, faster than scatter-add on CPU
    return unsorted.view(T, k, -1).sum(dim=1).to(dtype)


def _numba_route(x, ids, num_experts: int, dtype: torch.dtype, *tensors) -> bool:
    """Whether an fp32 or bf16 experts call of dtype `dtype` (its weights' row-major layout checked by the caller)
    runs like the quantized ones: the numba kernels, one call per GEMM over all experts (cpu_quant), which beat a
    pair of MKL calls per expert at few rows each (fp32: 1.7-2x at one token, measured on the CPU machine with the
    weights out of cache). fp32: fewer rows than GROUPED_MIN_ROWS per expert on average over all experts (an
    expert that still gets DEQUANT_MIN_ROWS rows runs MKL on its weights in place). bf16: fewer rows in all than
    DEQUANT_MIN_ROWS, so that no expert leaves the kernels (MKL's bf16 GEMMs take many rows). Not when autograd
    records x or `tensors`, nor under forward-mode AD or a torch mode (the kernels compute values only: torch's ops
    keep the graph, the tangents, what a mode sees; cpu_linear.values_only), nor on one thread: there
    MKL wakes no threads, and numba's OpenMP pool would make a process forked afterwards (a server's workers)
    terminate at its first parallel kernel."""
    if (x.device.type != "cpu" or x.dtype != dtype or dtype not in (torch.float32, torch.bfloat16)
            or torch.get_num_threads() < 2):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors)) or not values_only():
        return False
    return ids.numel() < (GROUPED_MIN_ROWS * num_experts if dtype == torch.float32 else DEQUANT_MIN_ROWS)


@torch.library.impl("moec::experts", "CompositeExplicitAutograd")
def experts(x, ids, weights, w13, b13, w2, b2, activation, gated, alpha, limit, weight_on_input, gate_up):
    if (w13.dtype == w2.dtype and w13.is_contiguous() and w2.is_contiguous()
            and _numba_route(x, ids, w13.shape[0], w13.dtype, weights, w13, b13, w2, b2)):
        # few rows per expert: see quantized_group (the weights read as they are)
        return _quantized_experts(x, ids, weights, (w13,), b13, (w2,), b2, activation, gated, alpha, limit,
                                  weight_on_input, gate_up)
    flat, order, counts, xs, ws = _sort(x, ids, weights, w13.shape[0], weight_on_input)
    active = sum(1 for n in counts if n)
    if flat.numel() >= GROUPED_MIN_ROWS * active and _grouped_mm_takes(xs, w13, w2):  # many rows per expert
        row_expert = None if b13 is None and b2 is None else flat[order]
        ys = _grouped_ffn(xs, counts, row_expert, w13, b13, w2, b2, activation, gated, alpha, limit, gate_up)
    else:  # few rows per expert: MKL's small-row kernels, one expert at a time
        ys = _per_expert(xs, counts, lambda e, xe: _expert_ffn(
            xe, w13[e], None if b13 is None else b13[e], w2[e], None if b2 is None else b2[e],
            activation, gated, alpha, limit, gate_up))
    return _combine(ys, order, ws, ids, weight_on_input, x.dtype)


# rows of one expert from which dequantizing it (into a reused fp32 buffer) and running MKL's GEMMs
# beats the numba kernels (measured on the CPU machine: 12-16 rows for int8 and int4 g128, 4-8 for g32)
DEQUANT_MIN_ROWS = 12
# the same for int4 experts on the native kernels (int8 activations, or weight-only): never. Alone
# they keep pace with dequantize + MKL up to ~32-128 rows (Mixtral-style FC1, int8 activations, 32 rows: 1.4 vs
# 2.0 ms; 128: 5.4 vs 5.9 ms), and in a whole forward they are faster at 64 to 512 tokens, MKL's and numba's
# threads no longer taking turns (mix, 512 tokens: int8 activations 274 vs 394 ms, weight-only 235 vs 296 ms;
# docs/benchmarks.md)
EVERY_ROW = 2**62  # a min_rows no expert reaches
NATIVE_MIN_ROWS = EVERY_ROW


def min_rows(int4: bool, int8_activations: bool) -> int:
    """Rows of one expert from which its quantized weights are dequantized for MKL's GEMMs (see above)."""
    from moec.backends import cpu_native

    native = int4 and cpu_native.library() is not None
    return NATIVE_MIN_ROWS if native else DEQUANT_MIN_ROWS


def quantized_plan(x, ids, weights, num_experts, weight_on_input, min_rows=None):
    """The expert-sorted rows of a quantized (or `_numba_route`) experts call: (inv, counts, rows, row_expert,
    xs fp32 [T*k, H]). rows: the kernels' rows per expert (cpu_quant.plan; none for experts with
    min_rows (default DEQUANT_MIN_ROWS) rows or more)."""
    if x.device.type != "cpu":
        raise NotImplementedError(f"moec: quantized experts in the torch backend run on CPU only, not {x.device.type}")
    from moec.backends import cpu_quant  # numba: imported by the first quantized call, not by `import moec`

    cpu_quant.set_threads()
    k = ids.shape[1]
    order, inv, counts, rows = cpu_quant.plan(ids, num_experts, DEQUANT_MIN_ROWS if min_rows is None else min_rows)
    xs = x.detach().index_select(0, order // k).float()  # [T*k, H] the source token of each sorted row
    if weight_on_input:
        xs *= weights.detach().reshape(-1)[order].unsqueeze(1)
    return inv, counts, rows, ids.reshape(-1)[order], xs


def quantized_group(xs, y, counts, rows, row_expert, experts, t13, b13, t2, b2, activation, gated, alpha, limit,
                    gate_up, slot=None, a8=False):
    """y[rows of e] = expert e on xs[rows of e], for each e in `experts`, its weights t = (q, scale[, zero]) or
    (w,) (fp32/bf16) at index slot[e] of t13/t2 (the offload pool's slots; None: at index e). Experts with few
    rows: the numba kernels of `cpu_quant` (dequantizing in registers), one call per GEMM over all of them; an
    expert with `min_rows` rows or more (prefill; none in `rows`) is dequantized into a buffer reused for every such expert
    (fp32: read in place) and runs `_expert_ffn`. a8, int8 weights: each GEMM's input rows are rounded to int8,
    one scale per row (`_int8_rows`); the kernels multiply those integers, and an expert with many rows runs
    `_int8_ffn` instead of dequantizing. a8, int4 weights: rounded per group of the weights' group size (ORT's
    numbers), int8 dot products (cpu_native) on every row (NATIVE_MIN_ROWS), or, without that kernel, the rounded
    rows on dequantized weights. Weight-only int4: cpu_native's fp32 kernel on every row as well.
    Each row's numbers do not depend on which other experts the group holds."""
    from moec.backends import cpu_quant

    first, paired, last = rows
    if slot is not None:  # the kernels' rows by slot: the group's experts only
        n = t13[0].shape[0]
        at = np.fromiter((slot[e] for e in experts), np.int64, len(experts))
        idx = np.asarray(experts, np.int64)
        first, paired, last = (np.zeros(n, np.int64) for _ in range(3))
        first[at], paired[at], last[at] = rows[0][idx], rows[1][idx], rows[2][idx]
    a4 = a8 and t13[0].dtype == torch.uint8  # int4 weights: rows rounded per group, inside grouped_qmm
    a8 = a8 and not a4
    xq = _int8_rows(xs) if a8 else None  # every row rounded once: (integers as fp32 [T*k, H], steps [T*k, 1])
    if (first != last).any():
        h = cpu_quant.grouped_qmm(xs if xq is None else xq[0], (first, paired, last), *t13,
                                  row_scale=None if xq is None else xq[1], int8_groups=a4)  # [T*k, N1] fp32
        if b13 is not None:
            h += b13[row_expert]
        a = activate(h, activation, gated, alpha, limit, gate_up)  # [T*k, I]
        a, sa = _int8_rows(a) if a8 else (a, None)
        out = y if slot is None else torch.empty_like(y)  # every expert: straight into y
        cpu_quant.grouped_qmm(a, (first, paired, last), *t2, out=out, row_scale=sa, int8_groups=a4)  # [T*k, H]
        if b2 is not None:
            out += b2[row_expert]
        if slot is not None:
            for e in experts:
                y[rows[0][e]:rows[2][e]] = out[rows[0][e]:rows[2][e]]
    w13 = w2 = None  # [N1, H], [H, I] fp32, allocated by the first big expert
    cols = functools.partial(cpu_quant.even_odd, q=t13[0])  # GEMM inputs in the dequantized weights' column order
    cols2 = cols
    if a4:  # each GEMM input rounded per group of its weights first (moec.quant.int8_rows), then reordered
        cols, cols2 = (lambda v, G=w[1].shape[-1], q=w[0]: cpu_quant.even_odd(cpu_quant.round_rows(v, G, scaled=True)[0], q)
                       for w in (t13, t2))
    for e in (e for e in experts if counts[e] and rows[0][e] == rows[2][e]):  # the experts the kernels left
        s = e if slot is None else slot[e]
        n = counts[e]
        start = rows[2][e] - n
        if a8:
            x8 = xq[0][start:start + n].to(torch.int8), xq[1][start:start + n]
            y[start:start + n] = _int8_ffn(x8, (t13[0][s], t13[1][s]), b13, (t2[0][s], t2[1][s]), b2, e, activation,
                                           gated, alpha, limit, gate_up)
            continue
        w13, w2 = cpu_quant.dequantize_expert(s, *t13, out=w13), cpu_quant.dequantize_expert(s, *t2, out=w2)
        y[start:start + n] = _expert_ffn(
            xs[start:start + n], w13, None if b13 is None else b13[e].float(), w2,
            None if b2 is None else b2[e].float(), activation, gated, alpha, limit, gate_up, cols=cols, cols2=cols2)


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, K] -> (its rows rounded to int8 at a step of their amax/127, as fp32 integers [n, K]; steps [n, 1]):
    moec.quant.int8_quantized_rows(x, K), in one numba pass."""
    from moec.backends import cpu_quant

    return cpu_quant.round_rows(x)


@functools.cache
def int_mm_has_vnni() -> bool:
    """Whether this CPU has VNNI, which oneDNN's int8 GEMM (torch._int_mm) needs to be fast: without it (AVX2 only)
    it ran 27x slower than an fp32 GEMM of the same size (Zen 3, 128 x 512 x 3584: 216 against 8 ms)."""
    caps = getattr(torch.cpu, "get_capabilities", dict)()
    return not caps or bool(caps.get("avx512_vnni") or caps.get("avx_vnni"))


def int8_sums(x8: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x8 [n, K] int8 @ q [N, K] int8 ^T in exact int32 sums -> [n, N], by fp32 GEMMs over 1024 inputs at a time:
    every partial sum is an integer of magnitude <= 1024 * 128 * 128 = 2^24, which fp32 holds exactly, so each part
    is exact in any summation order (then summed in int32, as torch._int_mm sums)."""
    y = torch.zeros(x8.shape[0], q.shape[0], dtype=torch.int32)
    for k in range(0, x8.shape[1], 1024):
        y += (x8[:, k:k + 1024].float() @ q[:, k:k + 1024].float().t()).to(torch.int32)
    return y


def _int8_gemm(x8, step, q, scale, b):
    """int8 rows x8 [n, K] (steps [n, 1]) @ q [N, K] int8 ^T in exact int32 (torch._int_mm: oneDNN, where the CPU
    has VNNI; else int8_sums), then x scale [N] x each row's step (the kernels' order) (+ b) -> [n, N] fp32."""
    if x8.shape[1] == 1:  # torch._int_mm's CPU sums are wrong for K = 1 (torch 2.13)
        y = (x8.to(torch.int32) * q.t().to(torch.int32)).float() * scale
    elif int_mm_has_vnni():
        y = torch._int_mm(x8, q.t()).float() * scale
    else:
        y = int8_sums(x8, q).float() * scale
    y *= step
    return y if b is None else y + b.float()


def _int8_ffn(x8, t13, b13, t2, b2, e, activation, gated, alpha, limit, gate_up):
    """One int8 expert (t = (q [N, K], scale [N])) on its rows x8 = (int8 [n, H], steps [n, 1]) -> [n, H] fp32."""
    h = _int8_gemm(*x8, *t13, None if b13 is None else b13[e])  # [n, N1]
    a, step = _int8_rows(activate(h, activation, gated, alpha, limit, gate_up))  # [n, I]
    return _int8_gemm(a.to(torch.int8), step, *t2, None if b2 is None else b2[e])


def quantized_linear(x: torch.Tensor, t: tuple, a8: bool) -> torch.Tensor:
    """x [R, K] (any float dtype) @ one quantized weight t = (q [1, N, K or K/2], scale, zero or None)^T -> [R, N] fp32
    (moec.quant.QuantLinear), on the experts' paths for one expert: `quantized_group`'s kernels below `min_rows`
    rows, else one GEMM (torch._int_mm for int8 weights and activations, else the dequantized weight in MKL).
    a8: the rows rounded to int8 first, per group of the weights' group size (int4) or per row (int8)."""
    from moec.backends import cpu_quant

    cpu_quant.set_threads()
    int4 = t[0].dtype == torch.uint8
    R = x.shape[0]
    if int4 and min_rows(True, a8) == EVERY_ROW:  # cpu_native's kernels, every row
        return cpu_quant.int4_rows(x, *t, int8_groups=a8)
    if R < min_rows(int4, a8):
        rows = cpu_quant.expert_rows([R])
        if int4 or not a8:
            return cpu_quant.grouped_qmm(x, rows, *t, int8_groups=a8)
        xq, step = _int8_rows(x)
        return cpu_quant.grouped_qmm(xq, rows, *t, row_scale=step)
    if a8 and not int4:
        xq, step = _int8_rows(x)
        return _int8_gemm(xq.to(torch.int8), step, t[0][0], t[1][0], None)
    if a8:
        x = int8_rows(x.float(), x.shape[1] // t[1].shape[-1])  # per group of the weights'
    w = cpu_quant.dequantize_expert(0, *t)  # [N, K] fp32, int4 columns in even-odd order
    return F.linear(cpu_quant.even_odd(x.float(), q=t[0]), w)


def quantized_combine(y, inv, weights, weight_on_input, dtype):
    """Expert-sorted fp32 outputs [T*k, H] -> each token's weighted sum over its k slots [T, H] in `dtype`."""
    from moec.backends import cpu_quant

    return cpu_quant.combine(y, inv, torch.ones_like(weights) if weight_on_input else weights).to(dtype)


def _quantized_experts(x, ids, weights, t13, b13, t2, b2, activation, gated, alpha, limit, weight_on_input,
                       gate_up, int8_activations=False):
    """The routed experts on quantized weights t = (q, scale[, zero]) in moec's format, or fp32/bf16 weights
    t = (w,), in fp32 whatever the activations' dtype (see quantized_group). int8_activations: the GEMM inputs in
    int8 (int8 weights: one scale per row; int4: per group), unless moec.quant.weight_only() is on (the proofs)."""
    a8 = int8_activations and not weight_only_active()
    if t13[0].dtype == torch.uint8 and not weight_on_input and min_rows(True, a8) == EVERY_ROW:
        return _native_int4(x, ids, weights, t13, b13, t2, b2, activation, gated, alpha, limit, gate_up, a8)
    inv, counts, rows, row_expert, xs = quantized_plan(x, ids, weights, t13[0].shape[0], weight_on_input,
                                                       min_rows(t13[0].dtype == torch.uint8, a8))
    y = torch.empty_like(xs)
    quantized_group(xs, y, counts, rows, row_expert, np.flatnonzero(counts), t13, b13, t2, b2, activation, gated,
                    alpha, limit, gate_up, a8=a8)
    return quantized_combine(y, inv, weights, weight_on_input, x.dtype)


def _native_int4(x, ids, weights, t13, b13, t2, b2, activation, gated, alpha, limit, gate_up, a8):
    """`_quantized_experts` where cpu_native's kernels take every row of int4 experts: the same kernels, activation
    and combine, so the same numbers to the bit, with less glue: the plan and gather in one numba call, no
    per-expert bookkeeping (at one token, a Mixtral-style layer: ~50-65 us less, of 470-710 us)."""
    from moec.backends import cpu_quant

    if x.device.type != "cpu":
        raise NotImplementedError(f"moec: quantized experts in the torch backend run on CPU only, not {x.device.type}")
    cpu_quant.set_threads()
    xs, inv, first, last, row_expert = cpu_quant.gather(x, ids, t13[0].shape[0])  # [T*k, H] sorted by expert
    rows = (first, first, last)
    h = cpu_quant.grouped_qmm(xs, rows, *t13, int8_groups=a8)  # [T*k, N1]
    if b13 is not None:
        h += b13[row_expert]
    a = activate(h, activation, gated, alpha, limit, gate_up)  # [T*k, I]
    y = cpu_quant.grouped_qmm(a, rows, *t2, int8_groups=a8)  # [T*k, H]
    if b2 is not None:
        y += b2[row_expert]
    return quantized_combine(y, inv, weights, False, x.dtype)


@torch.library.impl("moec::experts_int8", "CompositeExplicitAutograd")
def experts_int8(x, ids, weights, q13, s13, b13, q2, s2, b2, *args):
    return _quantized_experts(x, ids, weights, (q13, s13), b13, (q2, s2), b2, *args)


@torch.library.impl("moec::experts_int4", "CompositeExplicitAutograd")
def experts_int4(x, ids, weights, q13, s13, z13, b13, q2, s2, z2, b2, *args):
    return _quantized_experts(x, ids, weights, (q13, s13, z13), b13, (q2, s2, z2), b2, *args)


@torch.library.impl("moec::experts_loop", "CompositeExplicitAutograd")
def experts_loop(x, ids, weights, w13, b13, w2, b2, activation, gated, alpha, limit, weight_on_input, gate_up):
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        token, slot = torch.where(ids == e)
        if token.numel() == 0:
            continue
        w = weights[token, slot].unsqueeze(1)
        xe = x[token]
        if weight_on_input:
            xe = (xe * w).to(x.dtype)
        h = activate(F.linear(xe, w13[e], None if b13 is None else b13[e]), activation, gated, alpha, limit, gate_up)
        y = F.linear(h, w2[e], None if b2 is None else b2[e]).float()
        out.index_add_(0, token, y if weight_on_input else y * w)
    return out.to(x.dtype)


def capacity_kept(ids, weights, rows, num_experts, rank_dtype, router: str):
    """Which (token, slot) pairs [T, k] stay within their expert's capacity. The T tokens form `rows`
    equal groups (batch rows), each counted on its own, with the capacity RouterSpec.capacity_for gives.
    Priority "order": first come first served, every token's slot 0 before any slot 1 (GShard/NLLB order),
    then token order. Priority "score": each expert keeps its pairs with the highest weights, ranked by a
    top-k over the tokens of the [rows, S, E] weights as the block ranks them: in `rank_dtype` (the block's
    dtype) where it scores in its own dtype (RouterSpec.capacity_rank), ties broken by that op."""
    r = RouterSpec.from_json(router)
    T, k = ids.shape
    S = T // rows
    capacity = r.capacity_for(S, num_experts)
    if r.capacity_priority == "score":
        by_row = ids.reshape(rows, S, k)
        w = weights.to(rank_dtype) if r.capacity_rank == "block" else weights
        dense = torch.zeros(rows, S, num_experts, dtype=w.dtype, device=w.device)
        dense = dense.scatter(2, by_row, w.reshape(rows, S, k))  # [rows, S, E], 0 where not chosen
        top = dense.topk(min(capacity, S), dim=1).indices  # [rows, C, E]: each expert's best tokens
        kept = torch.zeros_like(dense, dtype=torch.bool).scatter(1, top, True)
        return kept.gather(2, by_row).reshape(T, k)
    queue = ids.reshape(rows, -1, k).transpose(1, 2).reshape(rows, -1)  # [rows, k*S] slot-major
    onehot = F.one_hot(queue, num_experts)  # [rows, k*S, E]
    place = (onehot.cumsum(1) * onehot).sum(-1)  # 1-based place of each pair in its expert's queue
    return (place <= capacity).reshape(rows, k, -1).transpose(1, 2).reshape(T, k)


def capacity(weights, kept, router: str):
    """The weights [T, k] with the pairs past their expert's capacity (not `kept`, see capacity_kept) set
    to 0. Where the spec says so (RouterSpec.renorm_after_drop) the route left the weights unnormalised:
    they are renormalised and scaled here, over the kept pairs (capacity_renorm) or over all k first."""
    r = RouterSpec.from_json(router)
    if not r.renorm_after_drop:
        return weights * kept
    return _renorm_scale(weights * kept, r) if r.capacity_renorm else _renorm_scale(weights, r) * kept


def split_identity(ids, weights, num_experts: int):
    """Zero-compute experts (ExpertsSpec.identity): a pair choosing id >= num_experts adds the token itself.
    -> the pairs the experts op runs: ids [T, k] < E (such a pair runs an expert the token chose anyway, or expert
    0, at weight 0) and their weights [T, k]; the token's own weight [T, 1] (its zero-compute pairs' sum); and
    whether it chose a real expert [T, 1] (if not, the experts op's output, weight-0 pairs only, is dropped: exact
    even where an expert overflows)."""
    zero = ids >= num_experts
    w_x = torch.where(zero, weights, 0).sum(-1, keepdim=True)  # [T, 1]
    some = ids.masked_fill(zero, -1).amax(-1, keepdim=True)  # [T, 1]: a real expert of the token's, or -1
    return torch.where(zero, some.clamp(min=0), ids), torch.where(zero, 0, weights), w_x, some >= 0


# the functions stay callable (lower_onnx puts them in the graph as plain torch math)
torch.library.impl("moec::capacity", "CompositeExplicitAutograd")(capacity)
torch.library.impl("moec::capacity_kept", "CompositeExplicitAutograd")(capacity_kept)


def all_experts(x, w13, b13, w2, b2, activation, gated, alpha, limit, gate_up="halves") -> torch.Tensor:
    """Every expert on every token: x [T, H] (or one input per expert, [E, T, H]) -> [E, T, H]."""
    h = torch.einsum("th,enh->etn" if x.dim() == 2 else "eth,enh->etn", x, w13)  # [E, T, N1]
    if b13 is not None:
        h = h + b13[:, None]
    y = torch.einsum("eti,ehi->eth", activate(h, activation, gated, alpha, limit, gate_up), w2)  # [E, T, H]
    return y + b2[:, None] if b2 is not None else y


def experts_dense(x, ids, weights, w13, b13, w2, b2, activation, gated, alpha, limit, weight_on_input, gate_up):
    """moec::experts without data-dependent shapes (exportable to standard ONNX ops): every expert on
    every token, combined with the routing weights scattered to [T, E]. Exact; E/k times the work."""
    dense = torch.zeros(ids.shape[0], w13.shape[0], dtype=torch.float32, device=x.device).scatter(1, ids, weights)
    if not weight_on_input:
        y = all_experts(x, w13, b13, w2, b2, activation, gated, alpha, limit, gate_up).float()  # [E, T, H]
        return torch.einsum("te,eth->th", dense, y).to(x.dtype)
    xe = (dense.T[:, :, None] * x).to(x.dtype)  # [E, T, H]: each expert's input scaled by its weight
    y = all_experts(xe, w13, b13, w2, b2, activation, gated, alpha, limit, gate_up).float()
    chosen = torch.zeros_like(dense).scatter(1, ids, 1.0)  # [T, E]: unchosen experts add nothing
    return torch.einsum("te,eth->th", chosen, y).to(x.dtype)
