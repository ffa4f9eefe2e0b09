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
    df = cap.dataflow()
    after = nx.descendants(df, logits_node)
    eps = relative_threshold(after)
    if eps is not None:  # sparsemixer: its picks and weights are the whole router
        return {"scoring": "sparsemixer", "select_on": "logits", "jitter_eps": eps, "renorm_first": False,
                "scales": [1.0], "norms": [0.0], "select_bias": None, "n_group": 1, "topk_group": 1,
                "group_score": "max", "renorm_eps": 0.0}
    before = (nx.ancestors(df, sel_node) & after) | {logits_node}
    names_before = {target_name(n) for n in before}
    names_after = {target_name(n) for n in after - before}
    feats = {"scoring": "none", "select_on": "logits", "renorm_first": False, "scales": [1.0], "norms": [0.0],
             "select_bias": None, "n_group": 1, "topk_group": 1, "group_score": "max", "renorm_eps": 0.0}
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
        if n in before and name in ("add", "__add__", "add_", "__radd__"):
            for a in map(source, n.all_input_nodes):
                if a.op == "get_attr" and a.meta["val"].dim() == 1:
                    feats["select_bias"] = a.target
        if n in before and name == "topk" and n is not sel_node:
            v = n.args[0].meta["val"]
            k = n.args[1] if len(n.args) > 1 else n.kwargs.get("k")
            if v.dim() == 3 and k == 2:
                feats["group_score"] = "top2_sum"
            elif v.dim() == 2:
                feats["n_group"], feats["topk_group"] = v.shape[-1], k
    return feats


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
        return "out" if leaf.shape == x.shape else "out_flat"
    same = lambda a, b: a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6)  # noqa: E731
    for kind, val in (("logits", logits), ("logits_bse", logits.reshape(*x.shape[:-1], -1)), ("ids", ids),
                      ("weights", weights)):
        if same(leaf, val):
            return kind
    raise Rejected(f"returns an extra output moec cannot reproduce (shape {tuple(leaf.shape)})")


def inputs_through_views(n) -> set:
    """n's inputs, looking through unary ops on a weight (W.t(), W.float(), W.type(...))."""
    out = set()
    for a in n.all_input_nodes:
        out.add(a)
        if len(a.all_input_nodes) == 1 and a.all_input_nodes[0].op == "get_attr":
            out.update(a.all_input_nodes)
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
        _, ids, w = route_math(*rargs(r), num_experts=E)
        if r.capacity:
            w = torch.ops.moec.capacity(ids, w, rows, r.capacity, E)
        dense = torch.zeros(w.shape[0], E, dtype=A.dtype, device=A.device).scatter(1, ids, w.to(A.dtype))
        if rel_err((A * dense.gather(1, rec_ids)[..., None]).sum(1), R) < FIT_TOL:
            yield r


def capacities(cap: Capture, logits_node) -> list[tuple[int, bool]]:
    """(capacity, per_row) candidates, then (0, False) for none. Expert capacity shows in the graph
    as a cumsum after the router (each pair's place in its expert's queue) compared with an int
    c; places may be 0- or 1-based and compared with < or <=, so c-1 and c+1 are candidates too.
    The count is per batch row when the cumsum runs over the sequence dim of a [B, S, E] tensor."""
    df = cap.dataflow()
    after = nx.descendants(df, logits_node)
    found = []
    for cs in (n for n in cap.graph.nodes if n in after and target_name(n) == "cumsum"):
        dim = cs.kwargs.get("dim", cs.args[1] if len(cs.args) > 1 else None)
        per_row = cs.meta["val"].dim() == 3 and dim in (1, -2)
        below = nx.descendants(df, cs)
        for n in cap.graph.nodes:
            if n in below and target_name(n) in COMPARISONS and len(n.args) == 2 and type(n.args[1]) is int:
                found += [(c, per_row) for c in (n.args[1], n.args[1] - 1, n.args[1] + 1) if c > 0]
    return [*dict.fromkeys(found), (0, False)]


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
        if any(call.path.startswith(p + ".") for p in mlps + gates):
            continue
        (mlps if o.shape[-1] == H else gates if o.shape[-1] == 1 else []).append(call.path)
    mlps = [p for p in mlps if not any(p.startswith(q + ".") for q in mlps)]
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


