"""lower_triton: moec's experts ops -> the Triton backend's kernels (added by backend="triton").

Requires batch_experts (and quantize_experts, when quantizing). Matches

    y = moec.experts(x[T,H], ids[T,k], w[T,k], W13[E,N1,H], b13?, W2[E,H,I], b2?, ...)          # [T, H]
    y = moec.experts_int8(x, ids, w, Q13 int8[E,N1,H], S13[E,N1], b13?, Q2, S2, b2?, ...)
    y = moec.experts_int4(x, ids, w, Q13 u8[E,N1,H/2], S13[E,N1,H/g], Z13?, b13?, Q2, S2, Z2?, b2?, ...)

and leaves moec.triton_experts[_int8/_int4] (alignment + two fused grouped GEMMs that read the
weights through their strides and dequantize moec's format in registers): same arguments (int4
also takes the group size g), same semantics. The routing stays moec.route, torch's own ops on
the device: its expert choice is the original's bit for bit, ties included (a fused routing
kernel would break ties and round softmax its own way, and pick other experts at ties).
Stats: experts, experts_int8, experts_int4.
"""

from __future__ import annotations

import torch

from moec.pass_manager import PassResult, register_pass


@register_pass("lower_triton", requires=("batch_experts",))
def lower_triton(gm) -> PassResult:
    from moec.backends import triton_experts  # noqa: F401  (late: kernels defined, ops registered)

    spec = gm.meta["moe_spec"]
    stats = {"experts": 0, "experts_int8": 0, "experts_int4": 0}
    for node in gm.graph.nodes:
        if node.target is torch.ops.moec.experts:
            node.target = torch.ops.moec.triton_experts
            stats["experts"] += 1
        elif node.target is torch.ops.moec.experts_int8:  # its arguments are moec's int8 format already
            node.target = torch.ops.moec.triton_experts_int8
            stats["experts_int8"] += 1
        elif node.target is torch.ops.moec.experts_int4:
            node.target = torch.ops.moec.triton_experts_int4
            node.args = (*node.args[:11], spec.quant.group_size, *node.args[11:])
            stats["experts_int4"] += 1
    return PassResult(gm, sum(stats.values()) > 0, stats)
