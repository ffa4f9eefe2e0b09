"""lower_triton: moec's canonical ops -> the Triton backend's kernels (added by backend="triton").

Matches, after fuse_gate / batch_experts (/ quantize_experts):

    logits, ids, w = moec.route(x[T,H], W[E,H], b?, select_bias?, <RouterSpec>)
    y = moec.experts(x, ids, w, W13[E,N1,H], b13?, W2[E,H,I], b2?, ...)          # [T, H]
    y = moec.experts_int8(x, ids, w, Q13 int8[E,N1,H], S13[E,N1], b13?, Q2, S2, b2?, ...)
    y = moec.experts_int4(x, ids, w, Q13 u8[E,N1,H/2], S13[E,N1,H/g], Z13?, b13?, Q2, S2, Z2?, b2?, ...)

and leaves the same graph with moec.triton_route (one fused routing kernel) and
moec.triton_experts[_int8/_int4] (alignment + two fused grouped GEMMs that dequantize moec's
format in registers): same arguments (int4 also takes the group size g), same semantics.
A router the kernel does not handle keeps moec.route (plain torch ops on the device) and is
counted and logged with the reason.
Stats: routes, routes_kept, experts, experts_int8, experts_int4.
"""

from __future__ import annotations

import torch

from moec.log import log
from moec.pass_manager import PassResult, register_pass


@register_pass("lower_triton")
def lower_triton(gm) -> PassResult:
    from moec.backends import triton_experts, triton_route  # noqa: F401  (late: kernels defined, ops registered)

    spec = gm.meta["moe_spec"]
    stats = {"routes": 0, "routes_kept": 0, "experts": 0, "experts_int8": 0, "experts_int4": 0}
    for node in gm.graph.nodes:
        if node.target is torch.ops.moec.route:
            why = triton_route.supports(spec.experts.num_experts, spec.router.n_group, spec.router.scoring)
            if why:
                log.info(f"lower_triton: routing stays in torch ops: {why}")
                stats["routes_kept"] += 1
                continue
            node.target = torch.ops.moec.triton_route
            stats["routes"] += 1
        elif node.target in (torch.ops.moec.experts, torch.ops.moec.experts_loop):
            node.target = torch.ops.moec.triton_experts
            stats["experts"] += 1
        elif node.target is torch.ops.moec.experts_int8:  # its arguments are moec's int8 format already
            node.target = torch.ops.moec.triton_experts_int8
            stats["experts_int8"] += 1
        elif node.target is torch.ops.moec.experts_int4:
            node.target = torch.ops.moec.triton_experts_int4
            node.args = (*node.args[:11], spec.quant.group_size, *node.args[11:])
            stats["experts_int4"] += 1
    return PassResult(gm, sum(v for k, v in stats.items() if k != "routes_kept") > 0, stats)
