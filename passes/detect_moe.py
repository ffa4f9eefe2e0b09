"""detect_moe: recover an MoE block's semantics from its captured graph and prove them.

Input: the captured graph of a *candidate* (a module holding an E-way router weight and E
experts, found structurally by `find_candidates`, never by class name). It matches

    x            : [T, H]                        (block input, any leading dims)
    logits       = x @ Wr.T (+ br)               : [T, E]    Wr a parameter, E = #experts
    ... softmax | sigmoid | + bias | group view/topk/mask | sparsemixer's relative-threshold masks ...
    ids          = topk(..., k) | argmax(...)    : [T, k]    a selection over the E scores
                   (sparsemixer: k sequential max picks, each masking the one before)
    ... expert FFNs over stacked [E, ., .] tensors (in one module or one per sibling module),
        2-D [E*n, .] tensors viewed per expert, or a ModuleList/Dict of E MLPs ...
    out          = sum_k w[t, k] * expert[ids[t, k]](x[t]) (+ shared(x) [* sigmoid(g(x))]) (+ bias[H])

The ops in between (loops, masks, nonzero, einsum, scatter) are not pattern-matched: moec
reads the *features* of the graph (which scoring, bias, groups, scale and norm ops feed the
selection; which activation ops run; which tensors hold the experts), enumerates the few
canonical forms those features allow, and checks each against the values the run
produced: expert ids by set equality, expert layouts by least squares of the block output
on the chosen experts' outputs (which also recovers the combine weights), router weighting
by comparison with those. Expert capacity (a cumsum of the one-hot choices compared with a
constant c: each expert keeps its first c pairs, per batch row or over all tokens) is read the
same way. Sparsemixer routing is only matched in eval mode (in training it samples experts):
a block in training mode is rejected. The survivor is then proved on fresh random inputs of
several token counts (1 included; with capacity, 2 rows that overflow it) against the
original module. Anything that fails is rejected with the reason; nothing unproved is rewritten.

Output: the canonical graph (moec.canonical) with `meta["moe_spec"]`. Statistics:
candidates, detected, rejected.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field, replace

import networkx as nx
import torch
import torch.nn.functional as F
from torch import nn

from moec.backends.torch_backend import all_experts, route_math
from moec.canonical import build_graph, resolve
from moec.capture import Capture, capture, target_name
from moec.ir import ExpertsSpec, MoESpec, RouterSpec, SharedSpec
from moec.pass_manager import PassResult, Rejected, register_pass

SELECTIONS = {"topk", "argmax", "max"}
COMPARISONS = {"le", "lt", "__le__", "__lt__"}
REL_TOL = {"fit": 1e-3, "proof": 1e-4}
PROOF_TOKENS = (1, 3, 16)


@dataclass
class Candidate:
    """A module with an E-way router weight next to E experts (structure only, unproved)."""

    path: str
    module: nn.Module
    num_experts: int
    hidden: int
    router: str  # path (inside the block) of the router weight
    experts: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)  # name -> [E, ...]
    container: str | None = None  # ModuleList/ModuleDict path when experts are modules


# ---------------------------------------------------------------- structural candidates


def _expert_groups(m: nn.Module):
    """Yield (E, container path or None, {name: [E, ...] tensor}) for each expert group in m."""
    for path, sub in m.named_modules():
        if isinstance(sub, (nn.ModuleList, nn.ModuleDict)) and len(sub) >= 2:
            children = _members(sub)
            sig = [tuple((n, tuple(p.shape)) for n, p in c.named_parameters()) for c in children]
            if len(sig) >= 2 and sig[0] and all(s == sig[0] for s in sig) and sum(len(s) == 2 for _, s in sig[0]) >= 2:
                yield len(children), path, {n: None for n, _ in sig[0]}
    stacked: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for name, t in itertools.chain(m.named_parameters(), m.named_buffers()):
        if t.dim() == 3 and t.shape[0] >= 2:
            stacked.setdefault((name.rpartition(".")[0], t.shape[0]), {})[name] = t
    for (parent, E), mats in list(stacked.items()):
        if len(mats) == 1 and parent:  # one matrix per module (JetMoE input_linear, output_linear):
            del stacked[(parent, E)]  # pair sibling modules, keyed "<their parent>/*"
            stacked.setdefault((parent.rpartition(".")[0] + "/*", E), {}).update(mats)
    for (_, E), mats in stacked.items():
        if len(mats) >= 2:
            parents = {n.rpartition(".")[0] for n in mats}
            for name, t in itertools.chain(m.named_parameters(), m.named_buffers()):
                if name.rpartition(".")[0] in parents and t.dim() == 2 and t.shape[0] == E:
                    mats[name] = t  # per-expert biases beside the matrices
            yield E, None, mats
    yield from _flat_expert_groups(m, {n.rpartition(".")[0] for mats in stacked.values() for n in mats})


def _flat_expert_groups(m: nn.Module, stacked_parents: set[str]):
    """Experts as same-shape 2-D [E*n, D] matrices in one module (DBRX w1, v1, w2), viewed as
    [E, n, D] at run time; E is read off a 2-D [E, D] tensor (the router) elsewhere in m."""
    params = dict(itertools.chain(m.named_parameters(), m.named_buffers()))
    flat: dict[tuple[str, tuple[int, ...]], dict[str, torch.Tensor]] = {}
    for name, t in params.items():
        parent = name.rpartition(".")[0]
        if t.dim() == 2 and parent not in stacked_parents:
            flat.setdefault((parent, tuple(t.shape)), {})[name] = t
    for (parent, (N, D)), mats in flat.items():
        if len(mats) >= 2:
            routers = {t.shape[0] for n, t in params.items() if t.dim() == 2 and n.rpartition(".")[0] != parent
                       and t.shape[1] == D and 2 <= t.shape[0] < N and N % t.shape[0] == 0}
            for E in sorted(routers):
                yield E, None, mats


def find_candidates(model: nn.Module) -> list[Candidate]:
    found = []
    for path, m in model.named_modules():
        for E, container, tensors in _expert_groups(m):
            inside = (container + ".") if container else None
            dims = {d for n, t in tensors.items() if t is not None for d in t.shape[1:]}
            if container:
                dims = {d for c in resolve(m, container).children() for p in c.parameters() for d in p.shape}
            for name, t in itertools.chain(m.named_parameters(), m.named_buffers()):
                if t.dim() != 2 or (inside and name.startswith(inside)) or name in tensors or E not in t.shape:
                    continue
                other = t.shape[1] if t.shape[0] == E else t.shape[0]
                if other in dims and other != E or (t.shape == (E, E) and E in dims):
                    found.append(Candidate(path, m, E, other, name, tensors, container))
                    break
            else:
                continue
            break
    # the innermost module holding router + experts is the block
    return [c for c in found if not any(o.path.startswith(c.path + ".") or (c.path == "" and o.path)
                                        for o in found if o is not c)]


# ---------------------------------------------------------------- expert layouts


@dataclass(frozen=True)
class _Layout:
    """Where the canonical W13/b13/W2/b2 come from in the block."""

    ins: tuple[tuple[str, bool], ...]  # (name, transposed): (fused or plain,) or (gate, up)
    down: tuple[str, bool]
    split: str | None = None  # fused gate/up: "halves", "halves_up_first", "interleave", "interleave_up_first"
    in_bias: tuple[str | None, ...] = ()
    down_bias: str | None = None

    @property
    def gated(self) -> bool:
        return len(self.ins) == 2 or self.split is not None


def _stacked(block: nn.Module, cand: Candidate, name: str) -> torch.Tensor:
    if cand.container is None:
        t = resolve(block, name)
        return t if t.shape[0] == cand.num_experts else t.unflatten(0, (cand.num_experts, -1))  # [E*n, D] -> [E, n, D]
    group = resolve(block, cand.container)
    return torch.stack([resolve(e, name) for e in _members(group)])


def _members(group: nn.ModuleList | nn.ModuleDict) -> list[nn.Module]:
    """The experts of a container: its children holding parameters (NLLB-MoE keeps a dropout there too)."""
    children = group.values() if isinstance(group, nn.ModuleDict) else group
    return [c for c in children if next(c.parameters(), None) is not None]


def materialize(block: nn.Module, cand: Candidate, lay: _Layout) -> dict[str, torch.Tensor]:
    """Canonical expert tensors: w13 [E, N1, H] (gate rows, then up rows), w2 [E, H, I]."""
    get = lambda name, t: _stacked(block, cand, name).transpose(1, 2) if t else _stacked(block, cand, name)  # noqa: E731
    ins = [get(*i) for i in lay.ins]
    biases = [_stacked(block, cand, b) if b else None for b in lay.in_bias]
    if lay.split:
        w, b = ins[0], biases[0] if biases else None
        first, second = (slice(None, None, 2), slice(1, None, 2)) if "interleave" in lay.split else (
            slice(None, w.shape[1] // 2), slice(w.shape[1] // 2, None))
        if lay.split.endswith("up_first"):
            first, second = second, first
        ins = [w[:, first], w[:, second]]
        biases = [b[:, first], b[:, second]] if b is not None else []
    out = {"w13": ins[0] if len(ins) == 1 else torch.cat(ins, dim=1), "w2": get(*lay.down)}
    if any(b is not None for b in biases):  # a projection without bias gets zeros beside one with
        biases = [b if b is not None else w.new_zeros(w.shape[:2]) for b, w in zip(biases, ins)]
        out["b13"] = biases[0] if len(biases) == 1 else torch.cat(biases, dim=1)
    if lay.down_bias:
        out["b2"] = _stacked(block, cand, lay.down_bias)
    return out


def _layouts(block: nn.Module, cand: Candidate):
    """Every assignment of the expert tensors to (gate, up, down) that the shapes allow."""
    H = cand.hidden
    tensors = {n: _stacked(block, cand, n) for n in cand.experts}
    mats = [n for n, t in tensors.items() if t.dim() == 3]
    vecs = [n for n, t in tensors.items() if t.dim() == 2]

    def orient(name, role):  # (transposed, n) pairs giving [E, n, H] ("in") or [E, H, n] ("out")
        a, b = tensors[name].shape[1:]
        want_last = role == "in"
        return [(t, n) for t, (x, n) in ((False, (b, a) if want_last else (a, b)),
                                         (True, (a, b) if want_last else (b, a))) if x == H]

    def biases(name, n):  # the bias named after the matrix, else every vector that fits (the fit decides)
        stem = name.removesuffix("weight")
        named = [v for v in vecs if v.startswith(stem) and tensors[v].shape[1] == n]
        return named or [v for v in vecs if tensors[v].shape[1] == n] + [None] if vecs else [None]

    def with_biases(ins, down, split, n_in, inter):
        for bs in itertools.product(*(biases(m, n_in) for m, _ in ins), biases(down[0], H)):
            used = [b for b in bs if b]
            if len(used) == len(set(used)):
                yield _Layout(ins, down, split, bs[:-1], bs[-1])

    for down in mats:
        for dt, inter in orient(down, "out"):
            rest = [m for m in mats if m != down]
            if len(rest) == 2:
                for g, u in (rest, rest[::-1]):
                    for (gt, gn), (ut, un) in itertools.product(orient(g, "in"), orient(u, "in")):
                        if gn == un == inter:
                            yield from with_biases(((g, gt), (u, ut)), (down, dt), None, inter, inter)
            elif len(rest) == 1:
                for it, n in orient(rest[0], "in"):
                    if n == 2 * inter:
                        for split in ("halves", "interleave", "halves_up_first", "interleave_up_first"):
                            yield from with_biases(((rest[0], it),), (down, dt), split, n, inter)
                    if n == inter:
                        yield from with_biases(((rest[0], it),), (down, dt), None, n, inter)


# ---------------------------------------------------------------- graph features


def _features(cap: Capture, logits_node, sel_node) -> dict:
    df = cap.dataflow()
    after = nx.descendants(df, logits_node)
    eps = _relative_threshold(after)
    if eps is not None:  # sparsemixer: its picks and weights are the whole router
        return {"scoring": "sparsemixer", "jitter_eps": eps, "renorm_first": False, "scales": [1.0], "norms": [0.0],
                "select_bias": None, "n_group": 1, "topk_group": 1, "group_score": "max"}
    before = (nx.ancestors(df, sel_node) & after) | {logits_node}
    names_before = {target_name(n) for n in before}
    names_after = {target_name(n) for n in after - before}
    feats = {"scoring": "none", "renorm_first": False, "scales": [1.0], "norms": [0.0, 1.0], "select_bias": None,
             "n_group": 1, "topk_group": 1, "group_score": "max"}
    for fn, scoring in (("softmax", "softmax"), ("sigmoid", "sigmoid")):
        if fn in names_before or ("none" == feats["scoring"] and fn in names_after and "softmax" not in names_before):
            feats["scoring"] = scoring
            break
    if feats["scoring"] == "softmax" and "softmax" not in names_before:
        feats["renorm_first"] = True  # top-k on logits, softmax after: softmax + renorm
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
        if name in ("sum", "div", "__truediv__", "div_", "__itruediv__") and n in after - before:
            feats["renorm_first"] = feats["renorm_first"] or name != "sum"
        if n in before and name in ("add", "__add__", "add_", "__radd__"):
            for a in map(_source, n.all_input_nodes):
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


def _relative_threshold(nodes) -> float | None:
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


def _source(n):
    """Follow single-input ops (casts, unsqueeze, views) back to where a tensor came from."""
    while n.op == "call_function" and len(n.all_input_nodes) == 1:
        n = n.all_input_nodes[0]
    return n


def _leaf_kind(leaf, x, out_main, logits, ids, weights) -> str:
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


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


# ---------------------------------------------------------------- the analysis


def analyze(block: nn.Module, cand: Candidate) -> MoESpec:
    """Recover and prove the block's MoESpec; canonical copies of tensors whose layout differs
    from moec's are registered on the block as `_moec_*` buffers. Raises Rejected with the reason."""
    E, H = cand.num_experts, cand.hidden
    work = block if all(p.dtype == torch.float32 for p in block.parameters()) else copy.deepcopy(block).float()
    dev = next(work.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 5, H, generator=gen, device="cpu").to(dev)
    try:
        cap = capture(work, x)
    except Exception:  # some blocks take [T, H]
        x = x.reshape(-1, H)
        try:
            cap = capture(work, x)
        except Exception as e:
            raise Rejected(f"calling the block with hidden states failed: {type(e).__name__}: {e}") from e
    xf = x.reshape(-1, H)

    # router: the first op reading the router weight yields the logits [T, E]
    W = resolve(work, cand.router)
    wnode = next(n for n in cap.graph.nodes if n.op == "get_attr" and n.target == cand.router)
    logits_node = next((n for n in cap.graph.nodes if wnode in _inputs_through_views(n) and
                        isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].shape[-1] == E
                        and n.meta["val"].numel() == xf.shape[0] * E), None)
    if logits_node is None:
        raise Rejected("the router weight is not applied to the tokens")
    logits = logits_node.meta["val"].reshape(-1, E)
    router_t = W.shape != (E, H)
    bias_arg = logits_node.args[2] if len(logits_node.args) > 2 else logits_node.kwargs.get("bias")
    router_bias = bias_arg.target if isinstance(bias_arg, torch.fx.Node) and bias_arg.op == "get_attr" else None
    Wc = W.t() if router_t else W
    if _rel_err(F.linear(xf, Wc, resolve(work, router_bias) if router_bias else None), logits) > REL_TOL["fit"]:
        raise Rejected("router logits are not a linear map of the block input")

    # selection: a top-k / argmax over the E scores, downstream of the logits;
    df = cap.dataflow()
    after = nx.descendants(df, logits_node)
    # the last one: a group top-k over [T, G] comes first (and has E columns when groups hold one expert)
    sels = [n for n in cap.graph.nodes if n in after and target_name(n) in SELECTIONS and n.args
            and isinstance(n.args[0], torch.fx.Node) and n.args[0].meta["val"].is_floating_point()
            and n.args[0].meta["val"].shape[-1] == E and n.args[0].meta["val"].dim() == logits_node.meta["val"].dim()
            and (target_name(n) != "max" or len(n.args) > 1 or "dim" in n.kwargs)]
    if not sels:
        raise Rejected("no top-k/argmax selection over the router's scores: a dense mixture, not a sparse MoE")
    sel = sels[-1]
    name = target_name(sel)
    k = (sel.args[1] if len(sel.args) > 1 else sel.kwargs.get("k")) if name == "topk" else 1
    ids_node = sel if name == "argmax" else next(u for u in sel.users if u.args[1] == 1)
    rec_ids = ids_node.meta["val"].reshape(-1, k)

    f = _features(cap, logits_node, sel)
    if f["scoring"] == "sparsemixer":  # one top-1 pick per selection, in order
        if any(m.training for m in work.modules()):
            raise Rejected("sparsemixer routing in training mode samples its experts (Gumbel noise): "
                           "moec compiles eval mode only (call model.eval())")
        k = len(sels)
        rec_ids = torch.cat([next(u for u in n.users if u.args[1] == 1).meta["val"].reshape(-1, 1) for n in sels], 1)
    base = RouterSpec(top_k=k, scoring=f["scoring"], select_bias=f["select_bias"] is not None,
                      n_group=f["n_group"], topk_group=f["topk_group"], group_score=f["group_score"],
                      jitter_eps=f.get("jitter_eps", 0.0))
    sb = resolve(work, f["select_bias"]) if f["select_bias"] else None
    rargs = lambda r: (xf, Wc, resolve(work, router_bias) if router_bias else None, sb, r.top_k, r.scoring,  # noqa: E731
                       r.n_group, r.topk_group, r.group_score, r.weighting, r.renorm, r.scale, r.jitter_eps)
    _, ids, _ = route_math(*rargs(base), num_experts=E)
    if not torch.equal(ids.sort(-1).values, rec_ids.sort(-1).values):
        raise Rejected(f"could not reproduce the router's choice of experts ({base.describe()})")

    # outputs: the main output and which leaves are router logits
    leaves = list(cap.output) if isinstance(cap.output, tuple) else [cap.output]
    out_main = next((o for o in leaves if isinstance(o, torch.Tensor) and o.shape in (x.shape, xf.shape)), None)
    if out_main is None or any(isinstance(o, (tuple, list, dict)) for o in leaves):
        raise Rejected("no output of the block has the input's shape" if out_main is None else "nested outputs")

    def outputs(r: RouterSpec) -> tuple[str, ...]:
        _, ids, w = route_math(*rargs(r), num_experts=E)
        return tuple(_leaf_kind(o, x, out_main, logits, ids, w) for o in leaves)

    R = out_main.reshape(-1, H).float()

    shared = _shared(cap, cand, xf)
    if shared:
        sh = resolve(work, shared.module)(xf)
        R = R - (sh * torch.sigmoid(resolve(work, shared.gate)(xf)) if shared.gate else sh).float()
    out_bias = _output_bias(cap, sel, out_main, H)
    if out_bias:
        R = R - resolve(work, out_bias).float()
    params = {"out_bias": out_bias} if out_bias else {}

    # experts: a layout and activation whose outputs explain the block's output on the chosen
    # experts by least squares; the solution is the combine weights
    seen = {target_name(n) for n in cap.graph.nodes}
    acts = sorted(("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai"),
                  key=lambda a: (a.split("_")[0] not in seen and not (a == "swiglu_oai" and "clamp" in seen), a))
    alpha, limit = _oai_constants(cap)
    T = xf.shape[0]
    fits = []
    for lay, act in itertools.product(list(_layouts(work, cand)), acts):
        if act == "swiglu_oai" and not lay.gated:
            continue
        w = materialize(work, cand, lay)
        Y = all_experts(xf, w["w13"], w.get("b13"), w["w2"], w.get("b2"), act, lay.gated, alpha, limit)  # [E, T, H]
        A = Y[rec_ids, torch.arange(T, device=dev)[:, None]]  # [T, k, H]
        sol = torch.linalg.lstsq(A.transpose(1, 2), R.unsqueeze(-1)).solution  # [T, k, 1]
        err = _rel_err((A.transpose(1, 2) @ sol).squeeze(-1), R)
        if err < REL_TOL["fit"]:
            fits.append((err, lay, act, w, A))
    if fits:  # the best fit wins (gelu vs its tanh approximation differ by ~1e-3)
        _, lay, act, w, A = min(fits, key=lambda f: f[0])
        espec = ExpertsSpec(E, H, w["w2"].shape[2], act, lay.gated, "b13" in w or "b2" in w, alpha, limit)
        failures = []
        for capacity, per_row in _capacities(cap, logits_node):  # the proof settles the capacity
            router = _fit_router(replace(base, capacity=capacity, capacity_per_row=per_row), f, rargs, A, rec_ids, R,
                                 E, x.shape[0] if per_row else 1)
            if router is None:
                continue
            try:
                return _prove(block, work, cand, lay, w, MoESpec(router, espec, shared, params, outputs(router)),
                              router_bias, router_t, f["select_bias"], x.dim())
            except Rejected as e:
                failures.append(e)
        raise failures[0] if failures else Rejected(
            f"experts found ({espec.describe()}) but no router weighting reproduces the combine "
            f"weights ({base.describe()})")
    # Llama 4 style: the combine weight scales the expert's input; not linear, so search directly
    for lay, act, r in itertools.product(list(_layouts(work, cand)), acts, _router_grid(base, f)):
        if act == "swiglu_oai" and not lay.gated:
            continue
        w = materialize(work, cand, lay)
        espec = ExpertsSpec(E, H, w["w2"].shape[2], act, lay.gated, "b13" in w or "b2" in w, alpha, limit, True)
        _, ids, rw = route_math(*rargs(r), num_experts=E)
        y = torch.ops.moec.experts(xf, ids, rw, w["w13"], w.get("b13"), w["w2"], w.get("b2"), act, lay.gated,
                                   alpha, limit, True)
        if _rel_err(y, R) < REL_TOL["fit"]:
            return _prove(block, work, cand, lay, w, MoESpec(r, espec, shared, params, outputs(r)), router_bias,
                          router_t, f["select_bias"], x.dim())
    raise Rejected(f"no expert layout/activation reproduces the block output with router {base.describe()} "
                   f"(expert capacity or an unsupported expert form?)")


def _inputs_through_views(n) -> set:
    """n's inputs, looking through unary ops on a weight (W.t(), W.float(), W.type(...))."""
    out = set()
    for a in n.all_input_nodes:
        out.add(a)
        if len(a.all_input_nodes) == 1 and a.all_input_nodes[0].op == "get_attr":
            out.update(a.all_input_nodes)
    return out


def _oai_constants(cap: Capture) -> tuple[float, float]:
    alpha, limit = 1.702, 7.0
    for n in cap.graph.nodes:
        if target_name(n) == "clamp" and n.kwargs.get("max") is not None and n.kwargs.get("min") is None:
            limit = float(n.kwargs["max"])
        if target_name(n) in ("mul", "__mul__") and any(target_name(u) == "sigmoid" for u in n.users):
            alpha = next((float(a) for a in n.args if isinstance(a, float)), alpha)
    return alpha, limit


def _router_grid(base: RouterSpec, f: dict):
    norms = ([1.0] if f["renorm_first"] else []) + [p for p in dict.fromkeys(f["norms"]) if p != 1.0 or not f["renorm_first"]]
    for weighting, renorm, scale in itertools.product(("scores", "ones"), norms, dict.fromkeys(f["scales"])):
        if weighting == "ones" and renorm:
            continue
        yield RouterSpec(**{**base.__dict__, "weighting": weighting, "renorm": renorm, "scale": scale})


def _fit_router(base: RouterSpec, f: dict, rargs, A: torch.Tensor, rec_ids: torch.Tensor, R: torch.Tensor, E: int,
                rows: int = 1) -> RouterSpec | None:
    """The first router weighting whose combine weights, applied to the chosen experts' outputs A [T, k, H],
    reproduce the block's output R [T, H]. (Outputs, not the least-squares weights themselves: a token whose
    chosen experts' outputs are (nearly) collinear, e.g. dead ReLUs, leaves its weights undetermined.)"""
    for r in _router_grid(base, f):
        _, ids, w = route_math(*rargs(r), num_experts=E)
        if r.capacity:
            w = torch.ops.moec.capacity(ids, w, rows, r.capacity, E)
        dense = torch.zeros(w.shape[0], E, dtype=A.dtype, device=A.device).scatter(1, ids, w.to(A.dtype))
        if _rel_err((A * dense.gather(1, rec_ids)[..., None]).sum(1), R) < REL_TOL["fit"]:
            return r
    return None


def _capacities(cap: Capture, logits_node) -> list[tuple[int, bool]]:
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


def _shared(cap: Capture, cand: Candidate, xf: torch.Tensor) -> SharedSpec | None:
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


def _output_bias(cap: Capture, sel, out_main: torch.Tensor, H: int) -> str | None:
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


def _prove(block, work, cand, lay, w, spec: MoESpec, router_bias, router_t, select_bias, in_dim):
    """Name each canonical tensor (the block's own where the layout matches, else a moec
    buffer), then check the canonical graph against the original on fresh inputs."""
    params = {**spec.params, "router_weight": "_moec_router_weight" if router_t else cand.router}
    if router_bias:
        params["router_bias"] = router_bias
    if select_bias:
        params["select_bias"] = select_bias
    in_place = cand.container is None and all(resolve(work, n).shape[0] == cand.num_experts for n in cand.experts)
    own = {"w13": in_place and len(lay.ins) == 1 and not lay.ins[0][1] and lay.split in (None, "halves") and lay.ins[0][0],
           "w2": in_place and not lay.down[1] and lay.down[0],
           "b13": in_place and len(lay.ins) == 1 and lay.split in (None, "halves") and lay.in_bias and lay.in_bias[0],
           "b2": in_place and lay.down_bias}
    for role in w:
        params[role] = own[role] or f"_moec_{role}"
    spec = spec.with_(params=params)

    def copies(m: nn.Module) -> dict[str, torch.Tensor]:
        t = {r: v.contiguous() for r, v in materialize(m, cand, lay).items() if params[r].startswith("_moec_")}
        if router_t:
            t["router_weight"] = resolve(m, cand.router).t().contiguous()
        return t

    def attach(m: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        for role, t in tensors.items():
            m.register_buffer(f"_moec_{role}", t.detach(), persistent=False)  # a constant copy, no autograd history

    attach(work, copies(work))
    gm = build_graph(work, spec)
    gen = torch.Generator(device="cpu").manual_seed(1)
    dev = next(work.parameters()).device
    overflow = [(2, spec.experts.num_experts * spec.router.capacity + 1)] if spec.router.capacity else []  # every row
    for B, T in [(1, t) for t in PROOF_TOKENS] + overflow:
        shape = (B, T, spec.experts.hidden) if in_dim == 3 else (B * T, spec.experts.hidden)
        x = torch.randn(shape, generator=gen, device="cpu").to(dev)
        with torch.no_grad():
            ref = work(x)
            got = gm(x)[0]
        ref = ref[0] if isinstance(ref, tuple) else ref
        err = _rel_err(got, ref)
        if err > REL_TOL["proof"]:
            for role in copies_names(params):
                delattr(work, role)
            raise Rejected(f"proof failed at {B}x{T} tokens: relative error {err:.2e} ({spec.router.describe()}; "
                           f"{spec.experts.describe()})")
    if work is not block:
        attach(block, copies(block))
    return spec


def copies_names(params: dict[str, str]) -> list[str]:
    return [p for p in params.values() if p.startswith("_moec_")]


@register_pass("detect_moe")
def detect_moe(gm) -> PassResult:
    """Captured block -> canonical graph (see module docstring)."""
    block, cand = gm.meta["block"], gm.meta["candidate"]
    spec = analyze(block, cand)
    out = build_graph(block, spec, cand.path)
    out.meta.update(gm.meta)
    return PassResult(out, True, {"detected": 1})
