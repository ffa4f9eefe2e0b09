"""reduce_experts: each block keeps fewer experts (compile(..., experts=moec.expert_plan(cal, keep=n), approximate=True)).

An approximating pass: the block's outputs change. Matches, after fuse_gate (and reduce_topk, if asked):

    logits, ids, w = moec.route(x[T,H], Wr[E,H], b?, select_bias?, <RouterSpec>)                   # [T,E], [T,k], [T,k]
    y = moec.experts_loop(x, ids, w, W13[E,N1,H], b13?, W2[E,H,I], b2?, ...)                       # [T, H]

and leaves, with the E' experts the plan keeps (moec.ExpertPlan):

    prune:  logits, ids, w = moec.route(x, Wr, b? + mask, select_bias? + mask, ...)   # mask [E]: 0 kept, -inf dropped
    merge:  logits, ids, w = moec.route(x, Wr, b?, select_bias?, ...)                 # unchanged
            y = moec.experts_loop(x, take(expert_map, ids), w, W13'[E',N1,H], b13'?, W2'[E',H,I], b2'?, ...)

expert_map [E] sends each expert id to its row of the E' experts (a pruned expert is never chosen: row 0).
prune: W' = W[kept]; tokens route among the kept experts (a dropped expert's logit is -inf, so its softmax
share is 0 and the others renormalise; the block's returned logits show -inf there).
merge: each dropped expert joins the kept expert whose flattened [W13, W2] is the most similar (cosine); the
group's weights are averaged, each expert weighted by its calibration load + 1. The router is unchanged: a
token routed to a dropped expert runs its group's merged expert.
The E' experts become persistent buffers of the block (`_moec_w13_kept`, ...; what moec.save writes and
moec.load fills) and the original expert tensors are emptied once the block is installed: the model shrinks.
Requires fuse_gate (one moec.route per block; prune only). Refused: prune with a capacity router (capacity
depends on E) or a group-limited one (DeepSeek's n_group: a -inf in a group's top-2 sum sinks the group),
sparsemixer routing, or fewer experts kept than the block's k; a block with offloaded experts or zero-compute
experts.
Invariant: the graph computes the canonical block whose experts are W'[expert_map] (and, pruned, whose router
adds the mask): the final proof checks it against that reference and measures the error against the
original block. Stats: experts_before, experts_after, bytes_freed.
"""

from __future__ import annotations

import torch

from moec.bindings import Const
from moec.canonical import add_buffer, drop_unused_roles, role_value
from moec.pass_manager import PassResult, Rejected, register_pass

EXPERT_OPS = (torch.ops.moec.experts_loop, torch.ops.moec.experts)


def merge_groups(w13: torch.Tensor, w2: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """expert_map [E]: each kept expert's own row; each dropped expert the row of the kept expert whose flattened
    [W13, W2] is the most similar (cosine)."""
    flat = torch.cat([w13.flatten(1), w2.flatten(1)], dim=1).float()  # [E, N1*H + H*I]
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    nearest = (flat @ flat[kept].T).argmax(dim=1)  # [E] a row of kept
    nearest[kept] = torch.arange(len(kept))
    return nearest


def merged(t: torch.Tensor | None, expert_map: torch.Tensor, weight: torch.Tensor, rows: int):
    """[E, ...] -> [E', ...]: each row the `weight`-weighted mean of the experts mapped to it."""
    if t is None:
        return None
    acc = torch.zeros((rows, *t.shape[1:]), dtype=torch.float32).index_add_(
        0, expert_map, t.float() * weight.view(-1, *[1] * (t.dim() - 1)))
    total = torch.zeros(rows, dtype=torch.float32).index_add_(0, expert_map, weight)
    return (acc / total.view(-1, *[1] * (t.dim() - 1))).to(t.dtype)


@register_pass("reduce_experts", requires=("fuse_gate",), approximate=True)
def reduce_experts(gm) -> PassResult:
    with torch.no_grad():  # the kept experts are buffers (no autograd history: deepcopy, save)
        return _reduce(gm)


def _reduce(gm) -> PassResult:
    plan = gm.meta.get("options", {}).get("experts")
    path, spec = gm.meta["candidate"].path, gm.meta["moe_spec"]
    E, r = spec.experts.num_experts, spec.router
    if plan is None or path not in plan.keep:
        return PassResult(gm, False, {"experts_before": E, "experts_after": E})
    if spec.experts.identity:
        raise Rejected("reduce_experts: the block has zero-compute experts (its router's ids past E are not experts "
                       "a plan can keep or merge)")
    kept = list(plan.keep[path])
    if max(kept) >= E:
        raise Rejected(f"reduce_experts: the plan keeps expert {max(kept)} of a block with {E} experts")
    if len(kept) == E:
        return PassResult(gm, False, {"experts_before": E, "experts_after": E})
    if spec.offloaded:
        raise Rejected("reduce_experts: the block's experts are offloaded (reduce them before offload_experts)")
    if r.scoring == "sparsemixer":
        raise Rejected("reduce_experts: sparsemixer routing (its masked softmax is not defined over fewer experts)")
    prune = plan.mode == "prune"
    if prune and r.n_group > 1:
        raise Rejected("reduce_experts: pruning a group-limited router (a pruned expert's -inf would sink its "
                       "group's score, so kept experts could become unreachable): use mode='merge'")
    if prune and r.capacity:
        raise Rejected("reduce_experts: pruning a router with an expert capacity (the capacity depends on E)")
    if prune and len(kept) < r.top_k:
        raise Rejected(f"reduce_experts: the plan keeps {len(kept)} experts, fewer than the block's k={r.top_k}")
    nodes = [n for n in gm.graph.nodes if n.target in EXPERT_OPS]
    routes = [n for n in gm.graph.nodes if n.target is torch.ops.moec.route]
    if len(nodes) != 1 or (prune and len(routes) != 1):
        raise Rejected("reduce_experts: the block is not one moec.route and one experts op")
    node = nodes[0]
    x, ids, w, w13, b13, w2, b2, *rest = node.args
    full = {role: None if a is None else role_value(gm, a) for role, a in
            (("w13", w13), ("b13", b13), ("w2", w2), ("b2", b2))}
    if prune:
        expert_map = torch.zeros(E, dtype=torch.long)
        expert_map[kept] = torch.arange(len(kept))
        new = {role: None if t is None else t[kept] for role, t in full.items()}
    else:
        expert_map = merge_groups(full["w13"], full["w2"], kept)
        usage = torch.tensor(plan.usage.get(path, [0] * E), dtype=torch.float32)
        if usage.numel() != E:
            raise Rejected(f"reduce_experts: the plan's usage has {usage.numel()} experts, the block {E}")
        new = {role: merged(t, expert_map, usage + 1, len(kept)) for role, t in full.items()}
    reference = {role: Const(t[expert_map]) for role, t in new.items() if t is not None}
    args = {role: None if t is None else add_buffer(gm, f"_moec_{role}_kept", t) for role, t in new.items()}
    with gm.graph.inserting_before(node):
        mapped = gm.graph.call_function(torch.take, (add_buffer(gm, "_moec_expert_map", expert_map), ids))
    node.args = (x, mapped, w, args["w13"], args["b13"], args["w2"], args["b2"], *rest)
    if prune:
        reference |= _mask_router(gm, routes[0], kept, E)
    drop_unused_roles(gm)
    gm.recompile()
    freed = sum(t.numel() * t.element_size() for t in full.values() if t is not None) \
        - sum(t.numel() * t.element_size() for t in new.values() if t is not None)
    gm.meta["expert_map"], gm.meta["reference_roles"] = expert_map, reference
    gm.meta["moe_spec"] = spec.with_(kept=len(kept))
    gm.meta.setdefault("approximate", []).append(f"{plan.describe(path, E)}, {freed / 2**20:.2f} MiB less")
    return PassResult(gm, True, {"experts_before": E, "experts_after": len(kept), "bytes_freed": freed})


def _mask_router(gm, route, kept: list[int], E: int) -> dict:
    """The route's bias (and select bias) + mask (-inf at the dropped experts); their values for the reference."""
    x, weight, bias, select_bias, *spec = route.args
    wr = role_value(gm, weight)
    mask = torch.full((E,), float("-inf"), dtype=wr.dtype)
    mask[kept] = 0
    mask_node = add_buffer(gm, "_moec_router_mask", mask)
    reference = {}
    with gm.graph.inserting_before(route):
        new_bias = mask_node if bias is None else gm.graph.call_function(torch.add, (bias, mask_node))
        new_select = None if select_bias is None else gm.graph.call_function(torch.add, (select_bias, mask_node))
    reference["router_bias"] = Const(mask if bias is None else role_value(gm, bias) + mask)
    if select_bias is not None:
        reference["select_bias"] = Const(role_value(gm, select_bias) + mask.to(role_value(gm, select_bias).dtype))
    route.args = (x, weight, new_bias, new_select, *spec)
    return reference
