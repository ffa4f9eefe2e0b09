"""lower_triton: moec's experts ops -> the Triton backend's kernels (added by backend="triton").

Requires batch_experts (and quantize_experts, when quantizing). Matches

    y = moec.experts(x[T,H], ids[T,k], w[T,k], W13[E,N1,H], b13?, W2[E,H,I], b2?, ...)          # [T, H]
    y = moec.experts_int8(x, ids, w, Q13 int8[E,N1,H], S13[E,N1], b13?, Q2, S2, b2?, ...)
    y = moec.experts_int4(x, ids, w, Q13 u8[E,N1,H/2], S13[E,N1,H/g], Z13?, b13?, Q2, S2, Z2?, b2?, ...)

(or the op shard_experts' ShardedExperts calls, or offload_experts' OffloadedExperts) and leaves moec.triton_experts[_int8/_int4] (alignment +
two fused grouped GEMMs that read the weights through their strides and dequantize moec's format in
registers): same arguments (int4 also takes the group size g), same semantics. The routing stays moec.route, torch's own ops on
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

    from moec.distributed import ShardedExperts
    from moec.offload import OffloadedExperts

    spec = gm.meta["moe_spec"]
    ops = {torch.ops.moec.experts: ("experts", torch.ops.moec.triton_experts, ()),
           torch.ops.moec.experts_int8: ("experts_int8", torch.ops.moec.triton_experts_int8, ()),  # moec's format
           torch.ops.moec.experts_int4: ("experts_int4", torch.ops.moec.triton_experts_int4,
                                         (getattr(spec.quant, "group_size", None),))}
    stats = {"experts": 0, "experts_int8": 0, "experts_int4": 0}
    for node in gm.graph.nodes:
        if node.target in ops:
            name, node.target, extra = ops[node.target]
            n = 11 if extra else len(node.args)  # int4: the group size after its 11 tensor arguments
            node.args = (*node.args[:n], *extra, *node.args[n:])
            stats[name] += 1
    for m in gm.modules():  # shard_experts' op (expert parallelism): the same kernels on this rank's experts
        if isinstance(m, ShardedExperts) and m.op in ops:
            name, m.op, m.extra = ops[m.op]
            stats[name] += 1
        if isinstance(m, OffloadedExperts):  # offload_experts' op: the same kernels on the pool's slots
            m.triton = getattr(spec.quant, "group_size", 0) if m.quantized == "int4" else 0
            stats[f"experts_{m.quantized}" if m.quantized else "experts"] += 1
    return PassResult(gm, sum(stats.values()) > 0, stats)
