"""offload_experts: routed experts -> experts read from an expert cache (compile(..., offload=moec.Offload(...))).

Matches, after batch_experts (and quantize_experts, if asked):

    y = moec.experts(x[T,H], ids[T,k], w[T,k], W13[E,N1,H], b13?, W2[E,H,I], b2?, ...)        # [T, H]
    y = moec.experts_int8(x, ids, w, Q13, S13, b13?, Q2, S2, b2?, ...)                          # [T, H]
    y = moec.experts_int4(x, ids, w, Q13, S13, Z13?, b13?, Q2, S2, Z2?, b2?, ...)                # [T, H]

and leaves

    y = offloaded(x, ids, w, b13?, b2?)                                                       # [T, H]

where `offloaded` (moec.offload.OffloadedExperts, a submodule of the graph) runs each expert the call
needs from the slot of the model's expert pool that holds it, loading it from the store on a miss. The
block's expert tensors (fp, or quantized: a quantized store moves 2-4x fewer bytes than bf16) are written to
the store here; once the block is proved and installed, compile empties them (the model's memory holds the
pool, not the experts).
Requires batch_experts; runs before lower_triton, which points the OffloadedExperts at the Triton kernels (run on
the pool's slots, see OffloadedExperts._triton).
Invariant: the same experts with the same weights run on the same rows (the per-expert path of moec.experts,
or the quantized kernels, number for number); the final proof checks it with the pool as small as the blocks
compiled so far make it.
Stats: offloaded, experts, expert_bytes.
"""

from __future__ import annotations

import torch

from moec.bindings import first_source
from moec.canonical import drop_unused_roles, role_value
from moec.offload import OffloadedExperts
from moec.pass_manager import PassResult, Rejected, register_pass

# experts op -> (its weight arguments after x, ids, w: the store's roles, None for a bias), its format
FORMS = {
    torch.ops.moec.experts: (("w13", None, "w2", None), None),
    torch.ops.moec.experts_int8: (("q13", "s13", None, "q2", "s2", None), "int8"),
    torch.ops.moec.experts_int4: (("q13", "s13", "z13", None, "q2", "s2", "z2", None), "int4"),
}


@register_pass("offload_experts", requires=("batch_experts",))
def offload_experts(gm) -> PassResult:
    pool = gm.meta.get("options", {}).get("offload")
    if pool is None:
        raise Rejected("offload_experts needs an offload config: moec.compile(model, offload=moec.Offload())")
    path = gm.meta["candidate"].path
    stats = {"offloaded": 0, "experts": 0, "expert_bytes": 0}
    for node in [n for n in gm.graph.nodes if n.target in FORMS]:
        roles, quantized = FORMS[node.target]
        x, ids, w = node.args[:3]
        weights, act = node.args[3:3 + len(roles)], node.args[3 + len(roles):]
        tensors = {r: role_value(gm, a) for r, a in zip(roles, weights) if r is not None and a is not None}
        b13, b2 = (a for r, a in zip(roles, weights) if r is None)
        try:
            pool.register(path, tensors, quantized=quantized is not None)
        except ValueError as e:
            raise Rejected(str(e)) from None
        gm.meta.setdefault("undo", []).append(lambda: pool.unregister(path))
        like = {r: first_source(gm.meta["bindings"][a.target]) for r, a in zip(roles, weights)
                if r is not None and a is not None and tensors[r].is_floating_point()}  # the slots follow their dtypes
        gm.add_submodule("offloaded", OffloadedExperts(pool, path, tuple(act), quantized, like))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module("offloaded", (x, ids, w, b13, b2))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        stats["offloaded"] += 1
        stats["experts"] += len(tensors[roles[0]])
        stats["expert_bytes"] += sum(t.numel() * t.element_size() for t in tensors.values())
    gm.graph.eliminate_dead_code()
    drop_unused_roles(gm)
    gm.recompile()
    if stats["offloaded"]:
        gm.meta["moe_spec"] = gm.meta["moe_spec"].with_(offloaded=True)
    return PassResult(gm, stats["offloaded"] > 0, stats)
