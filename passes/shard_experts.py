"""shard_experts: a block's routed experts split over the ranks of a group (compile(..., expert_parallel=...)).

Matches, after batch_experts (and quantize_experts / reduce_experts, if asked):

    y = moec.experts(x[T,H], ids[T,k], w[T,k], W13[E,N1,H], b13?, W2[E,H,I], b2?, ...)        # [T, H]
    y = moec.experts_int8(x, ids, w, Q13, S13, b13?, Q2, S2, b2?, ...)   /   moec.experts_int4(...)

and leaves, on rank r of N holding experts held_r = [lo, hi) (moec.distributed.shards) + copies of busy experts
(ExpertParallel(replicas=..., calibration=...); moec.distributed.placement):

    y = sharded(x, ids, w, W13[held_r], b13[held_r]?, W2[held_r], b2[held_r]?)                 # [T, H]

where `sharded` (moec.distributed.ShardedExperts) sends each (token, slot) pair's row to a rank holding its
expert (one of its copies, by token), runs the same experts op there on that rank's experts, and combines the
results it gets back in token order. The shard becomes persistent buffers of the block (`_moec_shard_<role>`);
once the block is proved and installed, compile empties the full expert tensors: each rank holds E/N experts
(+ its copies).
Requires batch_experts. Invariant: the same experts op on the same rows with the same weights, combined in
the same order (the final proof replays the exchange in one process, every shard taken from the full tensors).
Stats: sharded, experts (this rank's shard), copies (this rank's), of (E).
"""

from __future__ import annotations

import torch

from moec.canonical import add_buffer, drop_unused_roles, role_value
from moec.distributed import ShardedExperts, shards
from moec.pass_manager import PassResult, Rejected, register_pass
from moec.passes.offload_experts import FORMS


def _names(roles: tuple) -> list[str]:
    """The experts op's tensor arguments by role: the bias slots (None in FORMS) are b13 then b2."""
    biases = iter(("b13", "b2"))
    return [r if r is not None else next(biases) for r in roles]


@register_pass("shard_experts", requires=("batch_experts",))
def shard_experts(gm) -> PassResult:
    group = gm.meta.get("options", {}).get("expert_parallel")
    if group is None:
        raise Rejected("shard_experts needs a group: moec.compile(model, expert_parallel=moec.ExpertParallel())")
    path, spec = gm.meta["candidate"].path, gm.meta["moe_spec"]
    nodes = [n for n in gm.graph.nodes if n.target in FORMS]
    if len(nodes) != 1:
        raise Rejected(f"shard_experts: the block has {len(nodes)} experts ops (torch backend ops expected: one)")
    node = nodes[0]
    roles, _ = FORMS[node.target]
    x, ids, w = node.args[:3]
    args, act = node.args[3:3 + len(roles)], node.args[3 + len(roles):]
    full = [None if a is None else role_value(gm, a) for a in args]
    E = full[0].shape[0]
    held = group.placement(path, E)
    lo, hi = shards(E, group.world)[group.rank]
    copies = held[group.rank][hi - lo:]
    index = torch.tensor(held[group.rank], dtype=torch.long)
    with torch.no_grad():  # buffers without autograd history (deepcopy, save)
        mine = [None if t is None else add_buffer(gm, f"_moec_shard_{name}", t[index].clone())
                for name, t in zip(_names(roles), full)]
    gm.add_submodule("sharded", ShardedExperts(group, path, node.target, E, act, full, held))
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module("sharded", (x, ids, w, *mine))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    drop_unused_roles(gm)
    gm.recompile()
    where = f"experts {lo}..{hi - 1} of {E} on rank {group.rank}/{group.world}" if hi > lo else \
        f"no expert of {E} on rank {group.rank}/{group.world}"
    if copies:
        where += f", copies of {copies}"
    gm.meta["moe_spec"] = spec.with_(sharded=where)
    return PassResult(gm, True, {"sharded": 1, "experts": hi - lo, "copies": len(copies), "of": E})
