"""reduce_topk: each block routes to fewer experts (compile(..., topk=k or {block: k}, approximate=True)).

An approximating pass: the block's outputs change. Matches, after fuse_gate:

    logits, ids, w = moec.route(x[T,H], W[E,H], b?, select_bias?, <RouterSpec top_k=k>)    # [T,E], [T,k], [T,k]

and leaves

    logits, ids, w = moec.route(x, W, b?, select_bias?, <RouterSpec top_k=k'>)                # [T,E], [T,k'], [T,k']

with k' < k (a k' at or above the block's own k leaves the block as it is), or, for moec.TopP(p, min_k, max_k),

    logits, ids, w = moec.route(x, W, b?, select_bias?, <RouterSpec top_k=k', top_p=p, min_k>)   # [T,E], [T,k'], [T,k']

with k' = max_k (the block's k if None): each token keeps its fewest heaviest pairs holding p of its k' weights;
a dropped pair has weight 0 and the id of the token's heaviest expert (torch_backend.top_p), so the experts
op loads no expert for it. The combine weights follow the router's own rule at k' (RouterSpec): a router that
renormalises its top-k weights (Mixtral, Qwen3-MoE, DeepSeek-V3's norm_topk_prob) renormalises the k' it
keeps; one that does not (Qwen2-MoE, OLMoE, DeepSeek-V2 without norm_topk_prob) keeps the k' weights as
the router computed them, so the output loses the dropped experts' share. Scaling the kept weights back
to the k experts' sum was measured as the alternative (docs/model_passes.md).
Requires fuse_gate (one moec.route per block). Refused for routers with a capacity (the dropped pairs
depend on k), sequential-pick selection (sparsemixer, argmax picks), blocks that return the expert
ids or weights (their shape or meaning would change), and, for top-p, experts that take the weight on their
input (a weight-0 pair would still add the expert's output at zero input).
Invariant: the graph computes the canonical block with top_k = k' (the final proof checks it against
that reference and measures the error against the original block, reported as the approximation's
error instead of failing). Stats: reduced, k_before, k_after.
"""

from __future__ import annotations

import dataclasses

import torch

from moec.approx import TopP
from moec.ir import RouterSpec
from moec.ops import route_args
from moec.pass_manager import PassResult, Rejected, register_pass


def new_topk(topk, path: str) -> int | TopP | None:
    """The k (or TopP) asked for the block at `path`: one for every block, or a dict {block path: k or TopP}
    (None: unchanged)."""
    return topk.get(path) if isinstance(topk, dict) else topk


def _reduced(r: RouterSpec, ask, spec) -> RouterSpec | None:
    """The router at the k (or TopP) asked; None where that leaves the block as it is."""
    if isinstance(ask, TopP):
        k = min(r.top_k, ask.max_k or r.top_k)  # a max_k above the block's k: its own k, as an int k would
        min_k = min(ask.min_k, k)
        if k == r.top_k and (ask.p >= 1 or min_k == k):  # every pair kept: the block as it is
            return None
        if spec.experts.weight_on_input:
            raise Rejected("reduce_topk: top-p with experts that take the combine weight on their input")
        if r.scoring not in ("softmax", "sigmoid") and r.weighting != "ones":
            raise Rejected("reduce_topk: top-p needs non-negative combine weights (softmax or sigmoid scores); this "
                           "router weights its experts by raw logits")
        return dataclasses.replace(r, top_k=k, top_p=float(ask.p) if ask.p < 1 else 0.0, min_k=min_k)
    if ask < 1:
        raise Rejected(f"reduce_topk: k={ask} is below 1")
    return dataclasses.replace(r, top_k=ask) if ask < r.top_k else None  # k >= the block's own: exact


@register_pass("reduce_topk", requires=("fuse_gate",), approximate=True)
def reduce_topk(gm) -> PassResult:
    spec = gm.meta["moe_spec"]
    r = spec.router
    ask = new_topk(gm.meta.get("options", {}).get("topk"), gm.meta["candidate"].path)
    reduced = None if ask is None else _reduced(r, ask, spec)
    if reduced is None:
        return PassResult(gm, False, {"reduced": 0})
    if r.capacity:
        raise Rejected("reduce_topk: the router drops pairs past an expert's capacity, which depends on k")
    if r.scoring == "sparsemixer" or r.selection == "argmax":
        raise Rejected("reduce_topk: the router picks its experts one after the other (sequential picks)")
    if {"ids", "weights"} & set(spec.outputs):
        raise Rejected("reduce_topk: the block returns its expert ids or weights, whose shape would change")
    routes = [n for n in gm.graph.nodes if n.target is torch.ops.moec.route]
    if not routes:
        raise Rejected("reduce_topk: the block's router is not one moec.route (an experts module routed by its caller)")
    for node in routes:
        if RouterSpec.from_json(node.args[-1]) != r:
            raise Rejected("reduce_topk: a moec.route of the graph is not the block's router")
        node.args = (*node.args[:-1], *route_args(reduced))
    gm.meta["moe_spec"] = spec.with_(router=reduced)
    gm.meta.setdefault("approximate", []).append(
        ask.describe(reduced.top_k) + f" of top-{r.top_k}" if isinstance(ask, TopP) else f"top-{ask} of {r.top_k}")
    gm.recompile()
    return PassResult(gm, True, {"reduced": 1, "k_before": r.top_k, "k_after": reduced.top_k})
