"""fuse_gate: router linear + scoring + selection + normalisation -> one moec::route op.

Matches, in a canonical graph (after detect_moe):

    logits = linear(x, router_weight, router_bias?)           # [T, E]
    scores = softmax(logits.float()) | sigmoid(...)            # [T, E] fp32
    choice = scores (+ select_bias), group view/topk/mask       # [T, E]
    ids    = topk(choice, k).indices                           # [T, k]
    w      = gather(scores, ids) / sum * scale                  # [T, k]
    ... = moec.experts*(x, ids, w, ...)

and leaves

    logits, ids, w = moec.route(x, router_weight, router_bias?, select_bias?, <RouterSpec>)

moec.capacity_kept, moec.capacity and split_identity (zero-compute experts) between the chain and the
experts op stay, reading the route's ids and w.
Requires detect_moe. Invariant: every experts op, and the graph's outputs, read logits, ids and
weights from one moec.route. Stats: fused.
"""

from __future__ import annotations

import operator

import torch

from moec.backends.torch_backend import split_identity
from moec.ops import route_args
from moec.pass_manager import PassResult, register_pass

EXPERT_OPS = (torch.ops.moec.experts_loop, torch.ops.moec.experts)
BETWEEN_OPS = (torch.ops.moec.capacity, torch.ops.moec.capacity_kept, split_identity)  # read the route's ids and w


def _input(graph, role: str):
    """The graph's input node of a tensor role (moec.canonical.build_graph), or None."""
    return next((n for n in graph.nodes if n.op == "placeholder" and n.target == role), None)


def _made_by(n, target):
    """The node whose output `n` takes an item of (getitem(node, i)), if its target is `target`."""
    src = n.args[0] if n.target == operator.getitem else None
    return src if getattr(src, "target", None) is target else None


def _uncast(n):
    """Through the router's fp32 cast (RouterSpec.upcast) to the tensor cast."""
    return n.args[0] if getattr(n, "op", None) == "call_method" and n.target == "float" else n


@register_pass("fuse_gate", requires=("detect_moe",))
def fuse_gate(gm) -> PassResult:
    spec, g = gm.meta["moe_spec"], gm.graph
    if _input(g, "router_weight") is None:  # an experts module: its caller routes
        return PassResult(gm, False, {"fused": 0})
    fused = 0
    for ex in [n for n in g.nodes if n.op == "call_function" and n.target in EXPERT_OPS]:
        weight = _input(g, "router_weight")
        linear = next(n for n in g.nodes if n.target is torch._C._nn.linear and _uncast(n.args[1]) is weight)
        x = linear.args[0].args[0] if spec.router.upcast else linear.args[0]  # route_math casts up itself
        split = _made_by(ex.args[1], split_identity)  # zero-compute experts: it reads the chain's ids and w
        chain_ids = split.args[0] if split else ex.args[1]
        if _made_by(chain_ids, torch.ops.moec.route):
            continue  # already fused
        cap = ex.args[2] if ex.args[2].target is torch.ops.moec.capacity else None  # reads the chain's w
        chain_w = cap.args[0] if cap else split.args[1] if split else ex.args[2]
        first = next(n for n in g.nodes if n.target in BETWEEN_OPS or n is ex)
        with g.inserting_before(first):  # after every input (get_attrs may follow the linear)
            route = g.call_function(torch.ops.moec.route, (
                x, weight, _input(g, "router_bias"), _input(g, "select_bias"), *route_args(spec.router)))
            logits, ids, w = (g.call_function(operator.getitem, (route, i)) for i in range(3))
        outside = {ex, g.output_node(), *(n for n in g.nodes if n.target in BETWEEN_OPS)}
        for old, new in ((chain_ids, ids), (chain_w, w), (linear, logits)):
            for user in [u for u in old.users if u in outside]:  # rewire the consumers outside the chain; it dies
                user.replace_input_with(old, new)
        fused += 1
    g.eliminate_dead_code()
    return PassResult(gm, fused > 0, {"fused": fused})
