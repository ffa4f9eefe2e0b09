"""CPU kernels (numba) for weight-only quantized experts, on moec's format (moec.quant) as stored.

    grouped_qmm(x [R, K], starts [E+1], q, scale, zero?) -> [R, N] fp32
    out[r] = x[r] @ dequantize(W[e]).T   for the rows r in starts[e]:starts[e+1] (rows sorted by expert)

The weights are dequantized inside the dot products, in registers: each packed byte is read
once per call and nothing the size of an expert is written. Threads split the output
channels (prange over chunks of CHUNK channels); every chunk visits each active expert, so
the threads get equal work whatever the routing. An expert's rows are taken two at a time,
so each unpacked weight feeds two FMAs. int8: out = s * sum_k x_k q_k (one scale per output
channel). int4: per group, s * sum_k x_k (q_k - z) = s * (sum_k x_k q_k - z * sum_k x_k), so the
inner loop is a pure dot and the zero point meets a per-row group sum of x computed once;
x's columns come as (even k | odd k), so a byte's low and high nibbles (k even in the low
nibble) meet contiguous x. Nibbles are unpacked in float (hi = floor(b / 16), lo = b - 16 hi):
numba widens integer ops to 64 bits, which vectorizes worse.

Compiled on first use and cached on disk (numba's cache: __pycache__ beside this file, or the
user's cache directory where that is read-only).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

F32 = np.float32
CHUNK = 32  # output channels per parallel work item


@njit(inline="always", fastmath=True)
def _nibbles(b):
    """uint8 byte -> (low nibble, high nibble) as float32."""
    f = F32(b)
    hi = np.floor(f * F32(0.0625))
    return f - F32(16) * hi, hi


@njit(inline="always", fastmath=True)
def _int8_dot(q, x, r):
    """x[r] . q (q: one output channel's int8 weights [K])."""
    a = F32(0)
    for k in range(q.shape[0]):
        a += x[r, k] * F32(q[k])
    return a


@njit(inline="always", fastmath=True)
def _int8_dot2(q, x, r):
    """(x[r] . q, x[r + 1] . q), converting each weight once."""
    a0 = F32(0)
    a1 = F32(0)
    for k in range(q.shape[0]):
        w = F32(q[k])
        a0 += x[r, k] * w
        a1 += x[r + 1, k] * w
    return a0, a1


@njit(inline="always", fastmath=True)
def _int4_dot(q, x, r, b, g2):
    """sum_k x[r, k] q_k over the group of bytes b:b+g2 (x as (even | odd) halves of K/2 each)."""
    K2 = x.shape[1] // 2
    qg, lo, hi = q[b:b + g2], x[r, b:b + g2], x[r, K2 + b:K2 + b + g2]
    a = F32(0)
    for i in range(g2):
        wl, wh = _nibbles(qg[i])
        a += lo[i] * wl + hi[i] * wh
    return a


@njit(inline="always", fastmath=True)
def _int4_dot2(q, x, r, b, g2):
    """_int4_dot for rows r and r + 1, unpacking each byte once."""
    K2 = x.shape[1] // 2
    qg, lo0, hi0 = q[b:b + g2], x[r, b:b + g2], x[r, K2 + b:K2 + b + g2]
    lo1, hi1 = x[r + 1, b:b + g2], x[r + 1, K2 + b:K2 + b + g2]
    a0 = F32(0)
    a1 = F32(0)
    for i in range(g2):
        wl, wh = _nibbles(qg[i])
        a0 += lo0[i] * wl + hi0[i] * wh
        a1 += lo1[i] * wl + hi1[i] * wh
    return a0, a1


@njit(parallel=True, fastmath=True, cache=True)
def _int8_kernel(x, starts, q, s, out):
    """x [R, K] fp32, starts [E+1] int64, q [E, N, K] int8, s [E, N] fp32 -> out [R, N] fp32."""
    E, N = s.shape
    for c in prange((N + CHUNK - 1) // CHUNK):
        for e in range(E):
            r0, r1 = starts[e], starts[e + 1]
            for j in range(c * CHUNK, min(N, c * CHUNK + CHUNK)):
                for r in range(r0, r1 - 1, 2):
                    a0, a1 = _int8_dot2(q[e, j], x, r)
                    out[r, j], out[r + 1, j] = a0 * s[e, j], a1 * s[e, j]
                if (r1 - r0) % 2:
                    out[r1 - 1, j] = _int8_dot(q[e, j], x, r1 - 1) * s[e, j]


@njit(parallel=True, fastmath=True, cache=True)
def _int4_kernel(x, xsum, starts, q, s, z, out):
    """x [R, K] fp32 as (even k | odd k), xsum [R, G] (sum of x over each group), starts [E+1] int64,
    q [E, N, K/2] uint8, s [E, N, G] fp32, z [E, N, G] uint8 or empty (symmetric: 8) -> out [R, N] fp32."""
    E, N, G = s.shape
    g2 = q.shape[2] // G  # bytes per group
    symmetric = z.size == 0
    for c in prange((N + CHUNK - 1) // CHUNK):
        for e in range(E):
            r0, r1 = starts[e], starts[e + 1]
            for j in range(c * CHUNK, min(N, c * CHUNK + CHUNK)):
                qj = q[e, j]
                for r in range(r0, r1 - 1, 2):
                    t0 = F32(0)
                    t1 = F32(0)
                    for gi in range(G):
                        a0, a1 = _int4_dot2(qj, x, r, gi * g2, g2)
                        zg = F32(8) if symmetric else F32(z[e, j, gi])
                        t0 += s[e, j, gi] * (a0 - zg * xsum[r, gi])
                        t1 += s[e, j, gi] * (a1 - zg * xsum[r + 1, gi])
                    out[r, j], out[r + 1, j] = t0, t1
                if (r1 - r0) % 2:
                    r = r1 - 1
                    t0 = F32(0)
                    for gi in range(G):
                        zg = F32(8) if symmetric else F32(z[e, j, gi])
                        t0 += s[e, j, gi] * (_int4_dot(qj, x, r, gi * g2, g2) - zg * xsum[r, gi])
                    out[r, j] = t0


_NO_ZERO = np.zeros((0, 0, 0), np.uint8)


def grouped_qmm(x: torch.Tensor, counts: list[int], q: torch.Tensor, scale: torch.Tensor,
                zero: torch.Tensor | None = None) -> torch.Tensor:
    """Expert-sorted rows x [R, K] (any float dtype; `counts[e]` rows of expert e) times the
    quantized experts (moec's int8 format if q is int8, else int4) -> [R, N] fp32."""
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    R, K = x.shape
    N = q.shape[1]
    starts = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    out = torch.empty(R, N, dtype=torch.float32)
    x = x.float()
    if q.dtype == torch.int8:
        _int8_kernel(x.contiguous().numpy(), starts, q.numpy(), scale.numpy(), out.numpy())
        return out
    G = scale.shape[-1]
    xsum = x.view(R, G, K // G).sum(-1)  # [R, G]
    x = torch.cat([x[:, 0::2], x[:, 1::2]], dim=1)  # [R, K] (even | odd): meets low | high nibbles
    _int4_kernel(x.numpy(), xsum.numpy(), starts, q.numpy(), scale.numpy(),
                 _NO_ZERO if zero is None else zero.numpy(), out.numpy())
    return out
