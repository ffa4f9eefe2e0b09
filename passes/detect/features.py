"""What a candidate's captured graph says: the router's features (scoring, selection bias, groups,
scale, norms, what the top-k reads), expert capacity, shared experts, an output bias, GPT-OSS's
activation constants, and the canonical router weightings those features allow.

These read the graph; they decide nothing alone: detect_moe enumerates the forms they allow and
keeps the one the block's values confirm, then proves it.
"""

from __future__ import annotations

import itertools

import networkx as nx
import torch

from moec.backends.torch_backend import route_math
from moec.capture import Capture, target_name
from moec.ir import RouterSpec, SharedSpec
from moec.passes.detect.candidates import Candidate
from moec.passes.detect.proof import rel_err
from moec.pass_manager import Rejected

COMPARISONS = {"le", "lt", "__le__", "__lt__"}
FIT_TOL = 1e-3


def features(cap: Capture, logits_node, sel_node) -> dict:
    d = logits_node.meta["val"].dim()  # [T, E] or [B, S, E]: group ops have one dim more (per-group) or G last
    df = cap.dataflow()
    after = nx.descendants(df, logits_node)
    eps = relative_threshold(after)
    if eps is not None:  # sparsemixer: its picks and weights are the whole router
        return {"scoring": "sparsemixer", "select_on": "logits", "jitter_eps": eps, "renorm_first": False,
                "scales": [1.0], "norms": [0.0], "select_bias": None, "n_group": 1, "topk_group": 1,
                "group_score": "max", "renorm_eps": 0.0, "renorm_floor": 0.0}
    before = (nx.ancestors(df, sel_node) & after) | {logits_node}
    names_before = {target_name(n) for n in before}
    names_after = {target_name(n) for n in after - before}
    feats = {"scoring": "none", "select_on": "logits", "renorm_first": False, "scales": [1.0], "norms": [0.0],
             "select_bias": None, "n_group": 1, "topk_group": 1, "group_score": "max", "renorm_eps": 0.0,
             "renorm_floor": 0.0}
    for fn, scoring in (("softmax", "softmax"), ("sigmoid", "sigmoid")):
        if fn in names_before or ("none" == feats["scoring"] and fn in names_after and "softmax" not in names_before):
            feats["scoring"] = scoring
            feats["select_on"] = "scores" if fn in names_before else "logits"  # what the top-k compares
            break
    if feats["scoring"] == "softmax" and "softmax" not in names_before:
        feats["renorm_first"] = True  # top-k on logits, softmax after: softmax + renorm
        feats["norms"].append(1.0)
    for n in after:
        name = target_name(n)
        scalars = [a for a in n.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if name in ("mul", "__mul__", "mul_", "__rmul__", "__imul__") and scalars and scalars[0] != 1:
            feats["scales"].append(float(scalars[0]))
        if name in ("div", "__truediv__", "div_", "__itruediv__") and scalars and scalars[0] != 1:
            feats["scales"].append(1.0 / float(scalars[0]))
        if name == "norm":
            p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 2)
            if isinstance(p, (int, float)):
                feats["norms"].append(float(p))
        if name in ("sum", "div", "__truediv__", "div_", "__itruediv__") and n in after - before and not scalars:
            feats["renorm_first"] = feats["renorm_first"] or name != "sum"
            feats["norms"].append(1.0)  # a sum or a division of the weights: renormalisation is a candidate
        if n in after - before and name in ("add", "__add__", "__radd__") and scalars and any(
                target_name(a) == "sum" for a in n.all_input_nodes):  # sum(w) + eps: the renormalisation's epsilon
            feats["renorm_eps"] = float(scalars[0])
        if n in after - before and name in ("clamp", "clamp_min", "clamp_") and any(
                target_name(a) in ("sum", "add", "__add__") for a in n.all_input_nodes):  # clamp(sum(w), min=eps)
            floor = n.kwargs.get("min", n.args[1] if len(n.args) > 1 else None)
            if isinstance(floor, (int, float)):
                feats["renorm_floor"] = float(floor)
        if n in before and name in ("add", "__add__", "add_", "__radd__"):
            for a in map(source, n.all_input_nodes):
                v = a.meta["val"] if a.op == "get_attr" else None  # [E], or [1, E] (ERNIE 4.5's moe_statics)
                if v is not None and v.dim() >= 1 and v.numel() == v.shape[-1] == logits_node.meta["val"].shape[-1]:
                    feats["select_bias"] = a.target
        if n in before and name == "topk" and n is not sel_node:
            v = n.args[0].meta["val"]
            k = n.args[1] if len(n.args) > 1 else n.kwargs.get("k")
            if v.dim() == d + 1 and k == 2:
                feats["group_score"] = "top2_sum"
            elif v.dim() == d:
                feats["n_group"], feats["topk_group"] = v.shape[-1], k
    return feats


def argmax_picks(cap: Capture, sels) -> dict:
    """Sequential argmax picks (GShard's top-2): what each pick compares ("scores" when a softmax/sigmoid is on its
    value path, else "logits"; the earlier picks' masks are not its value path) and the value the block puts at
    the earlier picks (masked_fill's value; 0 for a multiplication by 1 - mask)."""
    df = cap.dataflow()
    on, mask = [], float("-inf")
    for j, s in enumerate(sels):
        earlier = set().union(*(nx.descendants(df, p) | {p} for p in sels[:j]))
        cut = df.subgraph([n for n in df if n not in earlier or n is s.args[0]])  # the paths around earlier picks
        values = nx.ancestors(cut, s.args[0]) | {s.args[0]}
        on.append("scores" if {target_name(n) for n in values} & {"softmax", "sigmoid"} else "logits")
        for n in nx.ancestors(df, s.args[0]) & earlier:
            name = target_name(n)
            if name in ("masked_fill", "masked_fill_") and isinstance(n.args[-1], (int, float)):
                mask = float(n.args[-1])
            elif name in ("mul", "__mul__") and any(target_name(a) in ("sub", "__rsub__", "logical_not", "__invert__")
                                                   for a in n.all_input_nodes):
                mask = 0.0
    return {"select_on": ",".join(on), "pick_mask": mask}


def upcasts(logits_node) -> bool:
    """The router GEMM's activation input is cast to fp32 first (DeepSeek's routers compute in fp32)."""
    n = logits_node.args[0] if logits_node.args else None
    if not isinstance(n, torch.fx.Node) or n.op != "call_function":
        return False
    name = target_name(n)
    return name in ("float", "to", "type") and (name == "float" or torch.float32 in (*n.args[1:], *n.kwargs.values()))


def relative_threshold(nodes) -> float | None:
    """PhiMoE's sparsemixer mask: masked_fill(l, (m - l) / clamp(|l|, min=m) > 2 * eps, -inf) -> eps."""
    for n in nodes:
        mask = n.args[1] if target_name(n) == "masked_fill" and len(n.args) > 1 else None
        if not (isinstance(mask, torch.fx.Node) and target_name(mask) in ("gt", "__gt__")
                and isinstance(mask.args[1], float) and target_name(mask.args[0]) in ("div", "__truediv__")):
            continue
        denom = mask.args[0].args[1]
        if isinstance(denom, torch.fx.Node) and target_name(denom) == "clamp" and \
                target_name(denom.args[0]) == "abs":
            return mask.args[1] / 2
    return None


def source(n):
    """Follow single-input ops (casts, unsqueeze, views) back to where a tensor came from."""
    while n.op == "call_function" and len(n.all_input_nodes) == 1:
        n = n.all_input_nodes[0]
    return n


def leaf_kind(leaf, x, out_main, logits, ids, weights) -> str:
    """Which canonical value an output of the block is (see canonical.CompiledForward)."""
    if leaf is None:
        return "none"
    if leaf is out_main:
        return "out" if leaf.shape == x.shape else "out_1d" if leaf.dim() == 1 else "out_flat"
    same = lambda a, b: a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6)  # noqa: E731
    for kind, val in (("logits", logits), ("logits_bse", logits.reshape(*x.shape[:-1], -1)),
                      ("logits_1d", logits.reshape(-1)), ("ids", ids), ("weights", weights)):
        if same(leaf, val):
            return kind
    raise extra_output(leaf)


def extra_output(leaf: torch.Tensor) -> Rejected:
    return Rejected(f"returns an extra output moec does not compute (shape {tuple(leaf.shape)}: an aux loss, expert "
                    "counts?); computing it from moec's routing is not supported yet")


def inputs_through_views(n) -> set:
    """n's inputs, looking through chains of unary ops on a weight (W.t(), W.T, W.float(), W.view(E, -1).T)."""
    out = set()
    for a in n.all_input_nodes:
        out.add(a)
        if source(a).op == "get_attr":
            out.add(source(a))
    return out


def oai_constants(cap: Capture) -> tuple[float, float]:
    alpha, limit = 1.702, 7.0
    for n in cap.graph.nodes:
        if target_name(n) == "clamp" and n.kwargs.get("max") is not None and n.kwargs.get("min") is None:
            limit = float(n.kwargs["max"])
        if target_name(n) in ("mul", "__mul__") and any(target_name(u) == "sigmoid" for u in n.users):
            alpha = next((float(a) for a in n.args if isinstance(a, float)), alpha)
    return alpha, limit


def router_grid(base: RouterSpec, f: dict):
    norms = ([1.0] if f["renorm_first"] else []) + [p for p in dict.fromkeys(f["norms"]) if p != 1.0 or not f["renorm_first"]]
    for weighting, renorm, scale in itertools.product(("scores", "ones"), norms, dict.fromkeys(f["scales"])):
        if weighting == "ones" and renorm:
            continue
        yield RouterSpec(**{**base.__dict__, "weighting": weighting, "renorm": renorm, "scale": scale})


def fit_routers(base: RouterSpec, f: dict, rargs, A: torch.Tensor, rec_ids: torch.Tensor, R: torch.Tensor, E: int,
                rows: int = 1):
    """Every router weighting whose combine weights, applied to the chosen experts' outputs A [T, k, H],
    reproduce the block's output R [T, H] (several can: l / l and 1 agree except where l = 0; the proof
    decides). Outputs, not the least-squares weights themselves: a token whose chosen experts' outputs are
    (nearly) collinear, e.g. dead ReLUs, leaves its weights undetermined."""
    for r in router_grid(base, f):
        x, _, _, _, router = rargs(r)
        _, ids, w = route_math(*rargs(r), num_experts=E)
        if r.capacity:
            kept = torch.ops.moec.capacity_kept(ids, w, rows, E, x.dtype, router)
            w = torch.ops.moec.capacity(w, kept, router)
        dense = torch.zeros(w.shape[0], E, dtype=A.dtype, device=A.device).scatter(1, ids, w.to(A.dtype))
        y = (A * dense.gather(1, rec_ids)[..., None]).sum(1)
        if r.dropped == "input":
            y = torch.where(kept.any(-1, keepdim=True), y, x.to(y.dtype))
        if rel_err(y, R) < FIT_TOL:
            yield r


def capacity_constants(cap: Capture, logits_node) -> list[tuple[int, bool, str]]:
    """(c, per_row, priority) of each expert-capacity rule in the run, the count per batch row when it runs
    over the sequence dim of a [B, S, E] tensor. Capacity shows in the graph as
      "order": a cumsum after the router (each pair's place in its expert's queue) compared with an int c;
      "score": a top-c over the token dim of [.., S, E] scores (each expert keeps its best c tokens); a c
               as large as the tokens keeps them all and says nothing about c."""
    df = cap.dataflow()
    after = nx.descendants(df, logits_node)
    found = []
    for cs in (n for n in cap.graph.nodes if n in after and target_name(n) == "cumsum"):
        dim = cs.kwargs.get("dim", cs.args[1] if len(cs.args) > 1 else None)
        per_row = cs.meta["val"].dim() == 3 and dim in (1, -2)
        below = nx.descendants(df, cs)
        found += [(c, per_row, "order") for n in cap.graph.nodes if n in below and target_name(n) in COMPARISONS
                  and len(n.args) == 2 and (c := _int_constant(n.args[1])) is not None]
    for tk in (n for n in cap.graph.nodes if n in after and target_name(n) == "topk"):
        v, dim = tk.args[0].meta["val"], sel_dim(tk) % tk.args[0].meta["val"].dim()
        c = _int_constant(tk.args[1] if len(tk.args) > 1 else tk.kwargs.get("k"))
        if dim != v.dim() - 1 and c is not None and c < v.shape[dim]:
            found.append((c, v.dim() == 3 and dim == 1, "score"))
    return list(dict.fromkeys(found))


def sel_dim(sel) -> int:
    """The dim a selection op reduces over (topk, argmax, max: positional or keyword; topk's default -1)."""
    pos = 2 if target_name(sel) == "topk" else 1
    return sel.kwargs.get("dim", sel.args[pos] if len(sel.args) > pos else -1)


def _int_constant(a) -> int | None:
    """A capacity the code compares with: a Python int, or a 0-d integer tensor computed from numbers alone."""
    if type(a) is int:
        return a
    v = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
    if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point() and v.dtype != torch.bool:
        return int(v)
    return None


# capacity factors tried, the round ones first: a capacity formula is fitted to a few token counts
FACTORS = sorted({round(i * s, 2) for s, n in ((0.25, 64), (0.05, 320)) for i in range(1, n + 1)},
                 key=lambda f: (f % 0.25 > 1e-9, f % 0.05 > 1e-9, f))


def capacity_candidates(samples: dict[int, list[tuple[int, bool, str]]], num_experts: int) -> list[dict]:
    """RouterSpec capacity fields that reproduce the capacity constants seen at each token count, then none.
    samples: tokens counted (per row or in all) -> the run's (c, per_row, priority). A constant c gives c
    and c -+ 1 (places 0- or 1-based, compared with < or <=); constants that change with the tokens give
    the first factor of each form (RouterSpec.capacity_for) that fits them all, with those offsets. Each
    with dropped tokens zeroed, then passed through."""
    out = []
    seen = {c for cs in samples.values() for c in cs}
    if len(seen) == 1:
        (c, per_row, priority), = seen
        out = [dict(capacity=c + d, capacity_per_row=per_row, capacity_priority=priority)
               for d in ((0,) if priority == "score" else (0, -1, 1)) if c + d > 0]
    elif all(len(cs) == 1 for cs in samples.values()) and len({cs[0][1:] for cs in samples.values()}) == 1:
        _, per_row, priority = next(iter(samples.values()))[0]
        pts = [(n, cs[0][0]) for n, cs in samples.items()]
        for form in ("ceil", "ceil_per_expert", "floor"):
            for f in FACTORS:
                r = RouterSpec(top_k=1, capacity=1, capacity_factor=f, capacity_form=form)
                grown = [r.capacity_for(n, num_experts) for n, _ in pts]  # max(1, ...)
                floors = {c for (n, c), g in zip(pts, grown) if c != g}
                if any(c < g for (n, c), g in zip(pts, grown)) or len(floors) > 1:
                    continue
                m = floors.pop() if floors else 1
                if all(max(m, g) == c for (n, c), g in zip(pts, grown)):
                    out += [dict(capacity=m, capacity_factor=f, capacity_form=form, capacity_offset=d,
                                 capacity_per_row=per_row, capacity_priority=priority) for d in (0, -1, 1)]
                    break
    ranks = lambda c: ("block", "fp32") if c["capacity_priority"] == "score" else ("block",)  # noqa: E731
    return [{**c, "dropped": d, "capacity_rank": rank} for d in ("zero", "input") for c in out for rank in ranks(c)] \
        + [dict(capacity=0)]


def shared_experts(cap: Capture, cand: Candidate, xf: torch.Tensor) -> SharedSpec | None:
    """Submodules run on the whole input that hold no router/expert tensor: shared experts
    ([T, H] out) and their sigmoid gate ([T, 1] out)."""
    owned = [cand.router] + ([cand.container] if cand.container else list(cand.experts))
    H, mlps, gates = xf.shape[1], [], []
    for call in cap.calls:
        if any(o == call.path or o.startswith(call.path + ".") or call.path.startswith(o + ".") for o in owned) \
                or not call.args:
            continue
        a, o = call.args[0], call.output
        if not (isinstance(a, torch.Tensor) and isinstance(o, torch.Tensor) and a.numel() == xf.numel()
                and torch.equal(a.reshape(-1, H), xf)):
            continue
        (mlps if o.shape[-1] == H else gates if o.shape[-1] == 1 else []).append(call.path)
    # the outermost of nested ones (calls are listed as they return: a wrapper's inner Linear, e.g. a LoRA layer's
    # base_layer, or a dropout inside it, comes first; the wrapper is what the block calls)
    outer = lambda paths: [p for p in paths if not any(p.startswith(q + ".") for q in mlps + gates)]  # noqa: E731
    mlps, gates = outer(mlps), outer(gates)
    return SharedSpec(mlps[0], gates[0] if gates else None) if mlps else None


def output_bias(cap: Capture, sel, out_main: torch.Tensor, H: int) -> str | None:
    """A [H] tensor of the block added to the combined expert output (JetMoE's MoE bias)."""
    df = cap.dataflow()
    out_node = next((n for n in cap.graph.nodes if n.meta.get("val") is out_main), None)
    if out_node is None:
        return None
    for n in (nx.ancestors(df, out_node) | {out_node}) & nx.descendants(df, sel):
        if target_name(n) in ("add", "__add__", "add_", "__iadd__", "__radd__"):
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a.meta["val"].shape == (H,):
                    return a.target
    return None


