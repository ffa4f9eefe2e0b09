"""offload_experts: routed experts -> experts read from an expert cache (compile(..., offload=moec.Offload(...))).

Matches, after batch_experts:

    y = moec.experts(x[T,H], ids[T,k], w[T,k], W13[E,N1,H], b13?, W2[E,H,I], b2?, ...)        # [T, H]

and leaves

    y = offloaded(x, ids, w, b13?, b2?)                                                       # [T, H]

where `offloaded` (moec.offload.OffloadedExperts, a submodule of the graph) runs each expert the call
needs from the slot of the model's expert pool that holds it, loading it from the store on a miss. The
block's W13/W2 are written to the store here; once the block is proved and installed, compile empties
them (the model's memory holds the pool, not the experts).
Requires batch_experts (not quantize_experts or lower_triton: the pool holds fp experts, run by the torch
backend's per-expert path). Invariant: the same experts with the same weights run on the same rows (the
per-expert path of moec.experts, number for number); the final proof checks it with the pool as small as
the blocks compiled so far make it.
Stats: offloaded, experts, expert_bytes.
"""

from __future__ import annotations

import torch

from moec.canonical import drop_unused_roles, role_value
from moec.offload import OffloadedExperts
from moec.pass_manager import PassResult, Rejected, register_pass


@register_pass("offload_experts", requires=("batch_experts",))
def offload_experts(gm) -> PassResult:
    pool = gm.meta.get("options", {}).get("offload")
    if pool is None:
        raise Rejected("offload_experts needs an offload config: moec.compile(model, offload=moec.Offload())")
    if any(n.target in (torch.ops.moec.experts_int8, torch.ops.moec.experts_int4) for n in gm.graph.nodes):
        raise Rejected("offload_experts runs fp experts: quantized experts are not offloaded yet")
    path = gm.meta["candidate"].path
    stats = {"offloaded": 0, "experts": 0, "expert_bytes": 0}
    for node in [n for n in gm.graph.nodes if n.target is torch.ops.moec.experts]:
        x, ids, w, w13, b13, w2, b2, *act = node.args
        tensors = {"w13": role_value(gm, w13), "w2": role_value(gm, w2)}
        try:
            pool.register(path, tensors)
        except ValueError as e:
            raise Rejected(str(e)) from None
        gm.meta.setdefault("undo", []).append(lambda: pool.unregister(path))
        gm.add_submodule("offloaded", OffloadedExperts(pool, path, tuple(act)))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module("offloaded", (x, ids, w, b13, b2))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        stats["offloaded"] += 1
        stats["experts"] += len(tensors["w13"])
        stats["expert_bytes"] += sum(t.numel() * t.element_size() for t in tensors.values())
    gm.graph.eliminate_dead_code()
    drop_unused_roles(gm)
    gm.recompile()
    if stats["offloaded"]:
        gm.meta["moe_spec"] = gm.meta["moe_spec"].with_(offloaded=True)
    return PassResult(gm, stats["offloaded"] > 0, stats)
