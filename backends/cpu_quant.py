"""CPU kernels (numba) for experts with few rows each: weight-only quantized experts on moec's format
(moec.quant) as stored, and fp32 and bf16 experts at decode (bf16 widened to fp32 in registers' reach).

    grouped_qmm(x [R, K], expert_rows(counts), q, scale?, zero?) -> [R, N] fp32
    out[r] = x[r] @ dequantize(W[e]).T   for the rows r of expert e (rows sorted by expert; fp32/bf16 W: as is)
    linear_rows(x [R, K], W [N, K]) -> [R, N] fp32         (fp32, one expert: a dense layer, cpu_linear)

The weights are dequantized inside the dot products, in registers: each packed byte is read
once per call and nothing the size of an expert is written. Threads split the output
channels (prange over chunks of CHUNK channels); every chunk visits each active expert, so
the threads get equal work whatever the routing. int4 takes an expert's rows two at a time,
so each unpacked byte feeds four FMAs (int8's conversion is cheap enough to repeat per row).
int8: out = s * sum_k x_k q_k (one scale per output channel). int4: per group,
s * sum_k x_k (q_k - z) = s * (sum_k x_k q_k - z * sum_k x_k), so the inner loop is a pure dot
and the zero point meets a per-row group sum of x computed once.
A byte b holds k even in its low nibble: x_lo lo + x_hi hi = x_lo b + (x_hi - 16 x_lo) hi with
hi = floor(b / 16), so x comes as (x_lo | x_d = x_hi - 16 x_lo), both contiguous, and each byte
costs one float conversion, one floor and two FMAs (numba widens integer ops to 64 bits,
which vectorizes worse). Where cpu_native's C kernel builds, int4 runs it instead (AVX-512: 1.2-4.9x faster,
every row: a table lookup per nibble gives the dequantized weight itself).

    dequantize_expert(e, q, scale, zero?, out) -> [N, K] fp32   (prefill: then MKL's GEMMs, torch_backend)

An expert with many rows (DEQUANT_MIN_ROWS in torch_backend) is dequantized once into a reused
buffer instead: the kernels above redo the dot products per row and fall behind MKL from about a
dozen rows. int4 comes out with its columns in even-odd order (`even_odd` reorders the inputs).

    plan(ids, E, min_rows) -> order, inverse, counts, rows;   combine(y, inverse, weights) -> [T, H]

The sort of the (token, slot) pairs by expert and the weighted sum over each token's slots are
numba too: at one token torch's half-dozen small ops for them cost more than the GEMM kernels' glue.

torch's weight-only GEMMs (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, one call per
expert) were slower than these kernels, and than fp32, at every token count measured (1, 8 and
64 tokens, benchmarks/bench_moe.py --quantized), so no path uses them. The kernels run inside
the moec::experts_int8 / experts_int4 ops (torch_backend; fake impls in moec.ops).

Compiled on first use (about 2 s a kernel) and cached on disk (numba's cache: __pycache__ beside
this file, or the user's cache directory where that is read-only; no cache where neither is writable).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

F32 = np.float32
CHUNK = 32  # output channels per parallel work item


def _jit(parallel: bool, fastmath: bool = True):
    """njit with numba's disk cache, or without it where no cache directory is writable
    (numba refuses cache=True at decoration then)."""
    def wrap(fn):
        try:
            return njit(parallel=parallel, fastmath=fastmath, cache=True)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return njit(parallel=parallel, fastmath=fastmath)(fn)
    return wrap


@_jit(parallel=True)
def _f32_kernel(x, first, last, w, out):
    """x [R, K] fp32, rows first[e]:last[e] of expert e, w [E, N, K] fp32 -> out [R, N] fp32."""
    E, N = w.shape[0], w.shape[1]
    for c in prange((N + CHUNK - 1) // CHUNK):
        for e in range(E):
            if first[e] == last[e]:
                continue
            for j in range(c * CHUNK, min(N, c * CHUNK + CHUNK)):
                wj = w[e, j]
                for r in range(first[e], last[e]):
                    a = F32(0)
                    for k in range(wj.shape[0]):
                        a += x[r, k] * wj[k]
                    out[r, j] = a


@_jit(parallel=True)
def _bf16_kernel(x, first, last, w, out):
    """_f32_kernel on bf16 weights w [E, N, K] as their uint16 bits: each weight row widened to fp32 (the bits
    shifted into a float's top half, exact) in a buffer that stays in L1, then the same dot products."""
    E, N, K = w.shape
    for c in prange((N + CHUNK - 1) // CHUNK):
        wide = np.empty(K, np.uint32)
        f = wide.view(np.float32)
        for e in range(E):
            if first[e] == last[e]:
                continue
            for j in range(c * CHUNK, min(N, c * CHUNK + CHUNK)):
                wj = w[e, j]
                for k in range(K):
                    wide[k] = np.uint32(wj[k]) << np.uint32(16)
                for r in range(first[e], last[e]):
                    a = F32(0)
                    for k in range(K):
                        a += x[r, k] * f[k]
                    out[r, j] = a


@_jit(parallel=True)
def _int8_kernel(x, first, last, q, s, rs, out):
    """x [R, K] fp32, rows first[e]:last[e] of expert e, q [E, N, K] int8, s [E, N] fp32, row scales rs [R]
    (int8 activations: each row's step; else empty) -> out [R, N] fp32."""
    E, N = s.shape
    scaled = rs.shape[0] > 0
    for c in prange((N + CHUNK - 1) // CHUNK):
        for e in range(E):
            for j in range(c * CHUNK, min(N, c * CHUNK + CHUNK)):
                qj = q[e, j]
                for r in range(first[e], last[e]):
                    a = F32(0)
                    for k in range(qj.shape[0]):
                        a += x[r, k] * F32(qj[k])
                    out[r, j] = a * s[e, j] * rs[r] if scaled else a * s[e, j]


@_jit(parallel=True)
def _int4_kernel(x, xsum, first, last, q, s, z, out):
    """x [R, K] fp32 as (x_lo | x_d), xsum [R, G] (sum of x over each group), rows first[e]:last[e]
    of expert e, q [E, N, K/2] uint8, s [E, N, G] fp32, z [E, N, G] uint8 or empty (symmetric: 8)
    -> out [R, N] fp32."""
    E, N, G = s.shape
    K2 = q.shape[2]
    g2 = K2 // G  # bytes per group
    for c in prange((N + CHUNK - 1) // CHUNK):
        for e in range(E):
            for j in range(c * CHUNK, min(N, c * CHUNK + CHUNK)):
                qj = q[e, j]
                for r in range(first[e], last[e]):
                    t = F32(0)
                    for gi in range(G):
                        b = gi * g2
                        qg, lo, d = qj[b:b + g2], x[r, b:b + g2], x[r, K2 + b:K2 + b + g2]
                        a = F32(0)
                        for i in range(g2):
                            f = F32(qg[i])
                            a += lo[i] * f + d[i] * np.floor(f * F32(0.0625))
                        zg = F32(8) if z.size == 0 else F32(z[e, j, gi])
                        t += s[e, j, gi] * (a - zg * xsum[r, gi])
                    out[r, j] = t


@_jit(parallel=True)
def _int4_kernel2(x, xsum, first, last, q, s, z, out):
    """_int4_kernel two rows at a time (last[e] - first[e] even): each unpacked byte feeds both.
    A kernel of its own: beside the one-row loop in one function, LLVM slows that loop down."""
    E, N, G = s.shape
    K2 = q.shape[2]
    g2 = K2 // G
    for c in prange((N + CHUNK - 1) // CHUNK):
        for e in range(E):
            for j in range(c * CHUNK, min(N, c * CHUNK + CHUNK)):
                qj = q[e, j]
                for r in range(first[e], last[e], 2):
                    t0 = F32(0)
                    t1 = F32(0)
                    for gi in range(G):
                        b = gi * g2
                        qg = qj[b:b + g2]
                        lo0, d0 = x[r, b:b + g2], x[r, K2 + b:K2 + b + g2]
                        lo1, d1 = x[r + 1, b:b + g2], x[r + 1, K2 + b:K2 + b + g2]
                        a0 = F32(0)
                        a1 = F32(0)
                        for i in range(g2):
                            f = F32(qg[i])
                            hi = np.floor(f * F32(0.0625))
                            a0 += lo0[i] * f + d0[i] * hi
                            a1 += lo1[i] * f + d1[i] * hi
                        zg = F32(8) if z.size == 0 else F32(z[e, j, gi])
                        t0 += s[e, j, gi] * (a0 - zg * xsum[r, gi])
                        t1 += s[e, j, gi] * (a1 - zg * xsum[r + 1, gi])
                    out[r, j], out[r + 1, j] = t0, t1


@_jit(parallel=False)
def _int4_rows(x, G):
    """x [R, K] -> (x_lo | x_d) [R, K] (see the module docstring), xsum [R, G]: the sum of x over each group."""
    R, K = x.shape
    K2, g = K // 2, K // G
    xp = np.empty((R, K), F32)
    xsum = np.zeros((R, G), F32)
    for r in range(R):
        for i in range(K2):
            xp[r, i] = x[r, 2 * i]
            xp[r, K2 + i] = x[r, 2 * i + 1] - F32(16) * x[r, 2 * i]
        for k in range(K):
            xsum[r, k // g] += x[r, k]
    return xp, xsum


_TINY = F32(np.finfo(np.float32).tiny)


@_jit(parallel=False, fastmath=False)  # NaN, inf and IEEE division as torch has them: the same numbers
def group_step(x, r, lo, hi):
    """The int8 step of x[r, lo:hi] (amax/127; NaN if it holds a NaN; 0 if subnormal or 0, where the reciprocal would
    overflow) and the reciprocal the inputs are multiplied by (moec.quant.int8_quantized_rows)."""
    m, nan = F32(0), False
    for k in range(lo, hi):
        a = abs(x[r, k])
        if a != a:
            nan = True
        elif a > m:
            m = a
    s = F32(np.nan) if nan else m / F32(127)
    if s < _TINY:
        s = F32(0)
    return s, F32(1) / s if s > 0 else F32(0)


@_jit(parallel=False, fastmath=False)
def round_int8(v):
    """An input times its group's reciprocal step -> the nearest integer in -127..127 (NaN stays NaN)."""
    v = np.rint(v)
    return F32(127) if v > 127 else F32(-127) if v < -127 else v


@_jit(parallel=True, fastmath=False)
def _round_rows(x, q, step, scaled):
    """x [R, K] fp32 -> q [R, K] (each group of K/G inputs of a row rounded to int8 at a step of its amax/127, as
    fp32; times the step if `scaled`), step [R, G]: moec.quant.int8_quantized_rows (int8_rows if scaled), in one
    pass over x instead of a dozen torch ops."""
    R, K = x.shape
    G = step.shape[1]
    g = K // G
    for r in prange(R):
        for gi in range(G):
            s, inverse = group_step(x, r, gi * g, gi * g + g)
            step[r, gi] = s
            for k in range(gi * g, gi * g + g):
                q[r, k] = round_int8(x[r, k] * inverse) * s if scaled else round_int8(x[r, k] * inverse)


@_jit(parallel=True)
def _dequant_int8(q, s, out):
    """One expert: q [N, K] int8, s [N] fp32 -> out [N, K] fp32."""
    for j in prange(q.shape[0]):
        qj, oj = q[j], out[j]
        for k in range(qj.shape[0]):
            oj[k] = F32(qj[k]) * s[j]


@_jit(parallel=True)
def _dequant_int4(q, s, z, out):
    """One expert: q [N, K/2] uint8 (k even in the low nibble), s [N, G] fp32, z [N, G] uint8 or empty
    (symmetric: 8) -> out [N, K] fp32 with its columns in EVEN_ODD order: (k = 0, 2, 4, ... | 1, 3, 5, ...),
    so that both stores of a byte are contiguous (interleaved ones do not vectorize: 7x slower)."""
    N, G = s.shape
    K2 = q.shape[1]
    g2 = K2 // G  # bytes per group
    for j in prange(N):
        for gi in range(G):
            zg = F32(8) if z.size == 0 else F32(z[j, gi])
            sg = s[j, gi]
            b = gi * g2
            qg, lo, hi = q[j, b:b + g2], out[j, b:b + g2], out[j, K2 + b:K2 + b + g2]  # slices vectorize, indices not
            for i in range(g2):
                f = F32(qg[i])
                h = np.floor(f * F32(0.0625))
                lo[i] = (f - F32(16) * h - zg) * sg
                hi[i] = (h - zg) * sg


@_jit(parallel=False)
def _rows(counts, min_rows):
    """counts [E] -> (first, paired, last) [E]: the rows of each expert among the expert-sorted rows; rows
    first:paired go two at a time (int4), paired:last one at a time. Experts with min_rows rows or more get
    none (first = last: the kernels leave theirs unwritten)."""
    last = np.cumsum(counts)
    first = np.where(counts >= min_rows, last, last - counts)
    return first, first + (last - first) // 2 * 2, last


@_jit(parallel=False)
def _plan(ids, num_experts, min_rows):
    """ids [T, k] -> order [T*k] (the flat (token, slot) pairs sorted by expert, stably), its inverse
    inv [T*k], counts [E] and the kernels' rows (`_rows`): a counting sort (torch's argsort + bincount +
    gathers, and numpy's cumsum/where, cost more than the kernels' own work at one token)."""
    flat = ids.ravel()
    counts = np.zeros(num_experts, np.int64)
    for p in range(flat.shape[0]):
        if flat[p] < 0 or flat[p] >= num_experts:  # numba does not check bounds: the writes below would go astray
            raise ValueError("moec: an expert id is out of range")
        counts[flat[p]] += 1
    pos = np.cumsum(counts) - counts
    order = np.empty(flat.shape[0], np.int64)
    inv = np.empty(flat.shape[0], np.int64)
    for p in range(flat.shape[0]):
        r = pos[flat[p]]
        order[r], inv[p] = p, r
        pos[flat[p]] = r + 1
    return order, inv, counts, _rows(counts, min_rows)


@_jit(parallel=False)
def _gather(x, ids, num_experts):
    """x [T, H] fp32, ids [T, k] -> (xs [T*k, H]: each (token, slot)'s input row, sorted by expert (`_plan`), inv,
    first, last: the rows of each expert)."""
    T, k = ids.shape
    order, inv, counts, rows = _plan(ids, num_experts, _EVERY)
    xs = np.empty((T * k, x.shape[1]), F32)
    for r in range(T * k):
        xs[r] = x[order[r] // k]
    return xs, inv, rows[0], rows[2]


def gather(x: torch.Tensor, ids: torch.Tensor, num_experts: int) -> tuple:
    """`_gather` of torch inputs (x in any float dtype, as fp32): (xs [T*k, H] fp32 torch, inv, first, last, the
    expert of each sorted row [T*k] torch)."""
    xs, inv, first, last = _gather(x.detach().float().contiguous().numpy(), ids.contiguous().numpy(), num_experts)
    return torch.from_numpy(xs), inv, first, last, torch.from_numpy(np.repeat(np.arange(num_experts), last - first))


@_jit(parallel=True)
def _combine(y, inv, w, out):
    """Expert-sorted outputs y [T*k, H], inv [T*k], slot weights w [T, k] (ones where the weights met
    the input) -> out [T, H] = sum over each token's slots, in slot order."""
    T, k = w.shape
    for t in prange(T):
        ot = out[t]
        ot[:] = 0
        for s in range(k):
            ys, ws = y[inv[t * k + s]], w[t, s]
            for h in range(ot.shape[0]):
                ot[h] += ws * ys[h]


_NO_ZERO = np.zeros((0, 0, 0), np.uint8)
_NO_ROW_SCALE = np.zeros(0, np.float32)
_NO_ZERO_2D = np.zeros((0, 0), np.uint8)
_EVERY = 2**62  # min_rows that no expert reaches: every expert's rows go to the kernels


def plan(ids: torch.Tensor, num_experts: int, min_rows: int = _EVERY) -> tuple:
    """ids [T, k] -> order [T*k] (torch: flat (token, slot) pairs sorted by expert), its inverse (for
    `combine`), counts per expert, and the rows for `grouped_qmm` (experts with min_rows rows or more
    get none: they take another path)."""
    order, inv, counts, rows = _plan(ids.contiguous().numpy(), num_experts, min_rows)
    return torch.from_numpy(order), inv, counts, rows


def combine(y: torch.Tensor, inv: np.ndarray, weights: torch.Tensor) -> torch.Tensor:
    """Expert-sorted fp32 outputs y [T*k, H] -> sum over each token's k slots weighted by weights [T, k]: [T, H] fp32."""
    if weights.dim() != 2 or y.shape[0] != weights.numel() or len(inv) != weights.numel():
        raise ValueError(f"moec: combine of {y.shape[0]} rows over slot weights {list(weights.shape)}: they do not "
                         f"match")
    out = torch.empty(weights.shape[0], y.shape[1], device="cpu")
    _combine(y.detach().numpy(), inv, weights.detach().float().contiguous().numpy(), out.numpy())
    return out


def round_rows(x: torch.Tensor, groups: int = 1, scaled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] -> (each group of K/groups inputs of a row rounded to int8 at a step of its amax/127, as fp32
    integers [R, K], or times their step if `scaled`; steps [R, groups]): the numbers of
    moec.quant.int8_quantized_rows(x, K // groups) (int8_rows if scaled)."""
    if x.dim() != 2 or x.shape[1] % groups:
        raise ValueError(f"moec: round_rows takes rows [R, K] with K a multiple of {groups} groups, got {list(x.shape)}")
    q, step = torch.empty(x.shape, dtype=torch.float32), torch.empty(x.shape[0], groups, dtype=torch.float32)
    _round_rows(x.detach().float().contiguous().numpy(), q.numpy(), step.numpy(), scaled)
    return q, step


def expert_rows(counts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of each expert among the expert-sorted rows, for `grouped_qmm`: (first, paired, last) [E] int64."""
    return _rows(np.asarray(counts, np.int64), _EVERY)


def grouped_qmm(x: torch.Tensor, rows: tuple, q: torch.Tensor, scale: torch.Tensor | None = None,
                zero: torch.Tensor | None = None, out: torch.Tensor | None = None,
                row_scale: torch.Tensor | None = None, int8_groups: bool = False) -> torch.Tensor:
    """Expert-sorted rows x [R, K] (any float dtype; `rows` = expert_rows(counts per expert)) times
    the experts (fp32 or bf16 [E, N, K] q, no scale; else moec's int8 format if q is int8, else int4) ->
    [R, N] fp32, written into `out` (contiguous fp32 [R, N]) if given; rows outside `rows` are left as they
    were. row_scale (int8 weights only): fp32 [R] or [R, 1], each row's output times it (`round_rows`' steps).
    int8_groups (int4 weights only): x's rows rounded to int8 per group of the weights' group size first
    (moec.quant.int8_quantized_rows), then int8 dot products (cpu_native), or, where that kernel is not
    built, the rounded rows times each expert's dequantized weights. Values only: nothing here records gradients."""
    first, paired, last = rows
    out = torch.empty(x.shape[0], q.shape[1], dtype=torch.float32, device="cpu") if out is None else out
    K = q.shape[2] * (2 if q.dtype == torch.uint8 else 1)  # int4: two columns a byte
    end = int(last.max(initial=0))  # past the last expert row (by slot: any order)
    if x.dim() != 2 or x.shape[1] != K or out.shape != (x.shape[0], q.shape[1]) or end > x.shape[0]:
        raise ValueError(f"moec: grouped_qmm of x {list(x.shape)} (rows up to {end}) and experts "
                         f"{list(q.shape)} ({q.dtype}) into {list(out.shape)}: shapes do not match")
    _check_format(q, scale, zero, out, rows)
    x, q = x.detach().float().contiguous().numpy(), q.detach()
    scale = None if scale is None else scale.detach().float()  # a model cast by .half()/.to(bf16) casts its scales
    if int8_groups and q.dtype != torch.uint8:
        raise ValueError(f"moec: grouped_qmm int8_groups takes int4 experts, not {q.dtype}")
    if row_scale is not None and (q.dtype != torch.int8 or row_scale.numel() != x.shape[0]):
        raise ValueError(f"moec: grouped_qmm row scales ({row_scale.numel()}) take int8 experts and one per row "
                         f"({x.shape[0]} rows, {q.dtype} experts)")
    if q.dtype == torch.float32:
        _f32_kernel(x, first, last, q.contiguous().numpy(), out.numpy())
        return out
    if q.dtype == torch.bfloat16:
        _bf16_kernel(x, first, last, q.contiguous().view(torch.int16).numpy().view(np.uint16), out.numpy())
        return out
    if q.dtype == torch.int8:
        rs = _NO_ROW_SCALE if row_scale is None else row_scale.detach().float().reshape(-1).numpy()
        _int8_kernel(x, first, last, q.numpy(), scale.numpy(), rs, out.numpy())
        return out
    if int8_groups:
        _int4_a8(x, scale.shape[-1], first, last, q, scale, zero, out)
        return out
    from moec.backends import cpu_native

    if cpu_native.library() is not None and K // scale.shape[-1] in (32, 64, 128) and out.is_contiguous():
        cpu_native.int4_f32(x, first, last, q.contiguous().numpy(), scale.contiguous().numpy(),
                            _NO_ZERO if zero is None else zero.contiguous().numpy(), out.numpy())
        return out
    x, xsum = _int4_rows(x, scale.shape[-1])
    args = (q.numpy(), scale.numpy(), _NO_ZERO if zero is None else zero.numpy(), out.numpy())
    if (paired > first).any():
        _int4_kernel2(x, xsum, first, paired, *args)
    _int4_kernel(x, xsum, paired, last, *args)
    return out


def _check_format(q, scale, zero, out, rows) -> None:
    """ValueError unless the experts are moec's format as the kernels read it (they take E, N and the groups from
    the scales, and read raw memory): scales [E, N] (int8) or [E, N, G] with G dividing K (int4), uint8 zero points
    of the scales' shape, an fp32 `out`, and the rows of each of the E experts."""
    E, N = q.shape[:2]
    if q.dtype in (torch.float32, torch.bfloat16):
        want = None
    elif q.dtype == torch.int8:
        want = (E, N)
    elif q.dtype == torch.uint8:
        want = (E, N, scale.shape[-1]) if scale is not None and scale.dim() == 3 else "[E, N, G]"
    else:
        raise ValueError(f"moec: grouped_qmm takes fp32, bf16, int8 or uint8 (int4) experts, not {q.dtype}")
    bad = []
    if want is not None and (scale is None or tuple(scale.shape) != want):
        bad.append(f"scales {None if scale is None else list(scale.shape)} (want {want})")
    if q.dtype == torch.uint8 and scale is not None and scale.dim() == 3 and (2 * q.shape[2]) % scale.shape[-1]:
        bad.append(f"{scale.shape[-1]} groups of {2 * q.shape[2]} inputs")
    if zero is not None and (q.dtype != torch.uint8 or zero.dtype != torch.uint8 or zero.shape != scale.shape):
        bad.append(f"zero points {zero.dtype} {list(zero.shape)} (want uint8 of the scales' shape)")
    if out.dtype != torch.float32:
        bad.append(f"out {out.dtype} (want fp32)")
    if any(len(r) != E for r in rows):
        bad.append(f"rows for {[len(r) for r in rows]} experts (want {E})")
    if bad:
        raise ValueError(f"moec: grouped_qmm of experts {list(q.shape)} ({q.dtype}): " + "; ".join(bad))


def _int4_a8(x, G, first, last, q, scale, zero, out):
    """grouped_qmm's int8_groups: the rows x [R, K] rounded per group (G groups a row), multiplied by the native
    kernel, or, where it is not built, by each expert's dequantized weights (fp32 GEMMs)."""
    from moec.backends import cpu_native

    R, K = x.shape
    if cpu_native.library() is not None and out.is_contiguous() and K // G in (32, 64, 128):
        cpu_native.int4_a8(x, first, last, q.contiguous().numpy(), scale.contiguous().numpy(),
                           _NO_ZERO if zero is None else zero.contiguous().numpy(), out.numpy())
        return
    xr = even_odd(round_rows(torch.from_numpy(x), G, scaled=True)[0], q)  # in the dequantized columns' order
    w = None
    for e in np.flatnonzero(last > first):
        w = dequantize_expert(int(e), q, scale, zero, out=w)
        torch.mm(xr[first[e]:last[e]], w.T, out=out[first[e]:last[e]])


_FIRST = np.zeros(1, np.int64)


def int4_rows(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              int8_groups: bool) -> torch.Tensor:
    """x [R, K] @ one int4 weight (q [1, N, K/2], scale [1, N, G], zero [1, N, G] or None)^T -> [R, N] fp32 on
    cpu_native's kernels, which the caller found built (torch_backend.min_rows), with less glue than `grouped_qmm`
    (a decode step makes dozens of these calls under compile(dense=)). int8_groups: as grouped_qmm's."""
    from moec.backends import cpu_native

    out = torch.empty(x.shape[0], q.shape[1], dtype=torch.float32, device="cpu")
    _check_format(q, scale, zero, out, (_FIRST,))
    K = 2 * q.shape[2]
    if x.dim() != 2 or x.shape[1] != K or q.shape[0] != 1 or K // scale.shape[-1] not in (32, 64, 128):
        raise ValueError(f"moec: int4_rows of x {list(x.shape)} and one weight {list(q.shape)} in groups of "
                         f"{K // scale.shape[-1]}: shapes do not match (groups of 32, 64 or 128)")
    args = (x.detach().float().contiguous().numpy(), _FIRST, np.array([x.shape[0]], np.int64), q.contiguous().numpy(),
            scale.detach().float().contiguous().numpy(), _NO_ZERO if zero is None else zero.contiguous().numpy(),
            out.numpy())
    (cpu_native.int4_a8 if int8_groups else cpu_native.int4_f32)(*args)
    return out


def linear_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [R, K] @ w [N, K]^T, fp32 -> [R, N] fp32: `_f32_kernel` on one expert (a dense layer, cpu_linear), with less
    glue than `grouped_qmm` (a decode step makes dozens of these calls)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or w.dtype != torch.float32:
        raise ValueError(f"moec: linear_rows of x {list(x.shape)} and w {list(w.shape)} ({w.dtype}): shapes or dtype "
                         f"do not match (fp32 weights)")
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32, device="cpu")
    _f32_kernel(x.detach().float().contiguous().numpy(), _FIRST, np.array([x.shape[0]], np.int64),
                w.detach().contiguous().numpy()[None], out.numpy())
    return out


def dequantize_expert(e: int, q: torch.Tensor, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Expert e of moec's quantized format as fp32 [N, K], written into `out` (reused across experts); fp32
    experts: q[e] itself (bf16: widened to fp32 into `out`). int4 columns come in even-odd order: multiply them
    with `even_odd(x)`, not x."""
    if q.dtype == torch.float32:
        return q[e]
    if q.dtype == torch.bfloat16:
        return q[e].float() if out is None else out.copy_(q[e])
    N, K = q.shape[1], q.shape[2] * (1 if q.dtype == torch.int8 else 2)
    out = torch.empty(N, K, device="cpu") if out is None else out
    if out.shape != (N, K) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"dequantize_expert: out must be a contiguous fp32 [{N}, {K}], got {out.dtype} {list(out.shape)}")
    if q.dtype == torch.int8:
        _dequant_int8(q[e].numpy(), scale[e].float().numpy(), out.numpy())
    else:
        _dequant_int4(q[e].numpy(), scale[e].float().numpy(), _NO_ZERO_2D if zero is None else zero[e].numpy(),
                      out.numpy())
    return out


def even_odd(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x [n, K] with its columns in the order of `dequantize_expert`'s output for q's format."""
    return x if q.dtype in (torch.int8, torch.float32, torch.bfloat16) else torch.cat([x[:, 0::2], x[:, 1::2]], dim=1)


def set_threads() -> None:
    """Run the kernels on as many threads as torch uses."""
    n = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
