"""lower_triton: moec's canonical ops -> the Triton backend's kernels (added by backend="triton").

Matches, after fuse_gate / batch_experts (/ quantize_experts):

    logits, ids, w = moec.route(x[T,H], W[E,H], b?, select_bias?, <RouterSpec>)
    y = moec.experts(x, ids, w, W13[E,N1,H], b13?, W2[E,H,I], b2?, ...)          # [T, H]
    y = moec.experts_int8(x, ids, w, Q13 int8[E,N1,H], S13[E,N1], b13?, Q2, S2, b2?, ...)
    y = moec.experts_int4(x, ids, w, <torch's int4 layout of W13>, b13?, <of W2>, b2?, g, ...)

and leaves the same graph with moec.triton_route (one fused routing kernel) and
moec.triton_experts[_int8] (alignment + two fused grouped GEMMs): same arguments, same
semantics. experts_int4 becomes

    y = moec.triton_experts_int4(x, ids, w, Q13 u8[E,N1,H/2], S13[E,N1,H/g], Z13?, b13?, Q2, S2, Z2?, b2?, g, ...)

reading the block's moec-format buffers (`_moec_w13_q`, `_scale`[, `_zero`], same for w2) in
place of the torch backend's layout. A router the kernel does not handle keeps moec.route
(plain torch ops on the device) and is counted and logged with the reason.
Stats: routes, routes_kept, experts, experts_int8, experts_int4.
"""

from __future__ import annotations

import torch

from moec.log import log
from moec.pass_manager import PassResult, register_pass
from moec.passes.quantize_experts import quantized_tensors


def _format_args(gm, node, role: str) -> tuple:
    """get_attr nodes of the block's moec-format int4 tensors of `role`: (q, scale, zero or None)."""
    t = quantized_tensors(gm.block, role)
    with gm.graph.inserting_before(node):
        return tuple(gm.graph.get_attr(f"block._moec_{role}_{k}") if k in t else None for k in ("q", "scale", "zero"))


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
            x, ids, w, _, _, b13, _, _, b2, group_size, *rest = node.args
            node.target = torch.ops.moec.triton_experts_int4
            node.args = (x, ids, w, *_format_args(gm, node, "w13"), b13, *_format_args(gm, node, "w2"), b2,
                         group_size, *rest)
            stats["experts_int4"] += 1
    gm.graph.eliminate_dead_code()  # the torch int4 layout's get_attrs
    return PassResult(gm, sum(v for k, v in stats.items() if k != "routes_kept") > 0, stats)
