"""batch_experts: the per-expert loop -> token sort + grouped expert GEMMs + one combine.

Matches

    y = moec.experts_loop(x[T,H], ids[T,k], w[T,k], W13[E,N1,H], b13?, W2[E,H,I], b2?, ...)   # [T, H]

(for e in experts: rows = where(ids == e); y[rows] += w * W2 act(W13 x[rows])) and leaves

    y = moec.experts(x, ids, w, W13, b13?, W2, b2?, ...)                                      # [T, H]

which sorts the T*k (token, slot) pairs by expert once, runs one GEMM pair per active
expert on a contiguous slice, and combines by un-sorting and summing over k. Same
arguments, same semantics. Requires detect_moe. The kernel changes path with the rows per
expert (`proof_tokens`: the final proof runs on both sides). Stats: batched.
"""

from __future__ import annotations

import torch

from moec.backends.torch_backend import GROUPED_MIN_ROWS
from moec.pass_manager import PassResult, register_pass
from moec.passes.detect.proof import kernel_tokens


def proof_tokens(spec) -> list[int]:
    """Token counts on both sides of the torch kernel's switch to grouped GEMMs (rows per expert)."""
    return [kernel_tokens(GROUPED_MIN_ROWS, spec) + 1]


@register_pass("batch_experts", requires=("detect_moe",), proof_tokens=proof_tokens)
def batch_experts(gm) -> PassResult:
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.moec.experts_loop:
            node.target = torch.ops.moec.experts
            n += 1
    return PassResult(gm, n > 0, {"batched": n})
