"""detect_moe: recover an MoE block's semantics from its captured graph and prove them.

Input: the captured graph of a *candidate* (a module holding an E-way router weight and E
experts, found structurally by `detect.candidates.find_candidates`, never by class name). It matches

    x            : [T, H]                        (block input, any leading dims; or [T*H], returned flattened)
    logits       = x @ Wr.T (+ br)               : [T, E]    Wr a parameter, E = #experts
    ... softmax | sigmoid | + bias | group view/topk/mask | sparsemixer's relative-threshold masks ...
    ids          = topk(..., k) | argmax(...)    : [T, k]    a selection over the E scores (or logits)
                   (sparsemixer: k sequential max picks, each masking the one before)
    ... expert FFNs over stacked [E, ., .] tensors (in one module or one per sibling module),
        2-D [E*n, .] tensors viewed per expert, or a ModuleList/Dict of E MLPs ...
    out          = sum_k w[t, k] * expert[ids[t, k]](x[t]) (+ shared(x) [* sigmoid(g(x))]) (+ bias[H])
                   (or c * (routed + shared): c a scalar of the graph, e.g. Cohere2-MoE's average's 1/2)
                   (ids >= E: zero-compute experts, expert[id](x) = x, when the router has E + Z outputs)

The ops in between (loops, masks, nonzero, einsum, scatter) are not pattern-matched: moec
reads the *features* of the graph (detect.features: which scoring, bias, groups, scale and norm
ops feed the selection, and whether it compares scores or logits; which activation ops run;
which tensors hold the experts), enumerates the few canonical forms those features allow, and
checks each against the values the run produced: expert ids by set equality, expert layouts
(detect.layouts) by least squares of the block output on the chosen experts' outputs (which also
recovers the combine weights), router weighting by comparison with those. Expert capacity (a
cumsum of the one-hot choices compared with a constant c) is read the same way.

What the run does not show is refused, not guessed: a block whose Python code reads tensor values
other than its expert choices (a branch or loop on data), runs other ops at 1, 10 and 300 tokens
(a branch on the token count), uses another capacity at another token count, or changes its own
state in forward (counters, statistics: the compiled block would not) is rejected with that reason.
The block is analysed in eval mode on a copy of its state (moec.capture.untouched: compile leaves it
bit-identical). The survivor's canonical graph is proved against the original on the probes of
detect.proof (token counts, ties, saturation, every expert); the graph the pipeline finally
produces is proved again on the same probes (moec.api). Anything that fails is rejected with the
reason; nothing unproved is rewritten.

Output: the canonical graph (moec.canonical) with `meta["moe_spec"]`, `meta["bindings"]` (where each
tensor comes from: moec.bindings) and `meta["proof"]`. Statistics: detected, experts_reached.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import re
from dataclasses import replace

import networkx as nx
import torch
import torch.nn.functional as F
from torch import nn

from moec.backends.torch_backend import all_experts, route_math
from moec.bindings import Binding, Derived, Param, Part, resolve
from moec.canonical import add_counts, build_graph, call, original_forward, runner
from moec.capture import Capture, capture, target_name, untouched
from moec.ir import ExpertsSpec, MoESpec, RouterSpec
from moec.ops import route_args
from moec.log import status
from moec.pass_manager import PassResult, Rejected, register_pass
from moec.passes.detect import experts_only
from moec.passes.detect import features as feat
from moec.passes.detect.candidates import Candidate, find_candidates, member_names, members  # noqa: F401
from moec.passes.detect.layouts import bindings as layout_bindings
from moec.passes.detect.layouts import layouts, materialize
from moec.passes.detect.proof import Proof, check_expert_modules, probes, reached, rel_err

SELECTIONS = {"topk", "argmax", "max"}
RANDOM_OPS = {"rand", "randn", "rand_like", "randn_like", "randint", "uniform_", "normal_", "exponential_",
              "bernoulli", "bernoulli_", "multinomial", "gumbel_softmax"}  # (dropout in eval mode is the identity)
FIT_TOL = feat.FIT_TOL
NEAR_FIT = 0.03  # a fit this close but past FIT_TOL: the right form computed at a lower precision, likely
COUNTS = "updates buffer "  # moec.capture.untouched's words for a buffer the forward changed
SIGNATURE_TOKENS = (1, 64, 300)  # token counts captured beside the 10 of the analysis: the code run, capacities


def analyze(block: nn.Module, cand: Candidate) -> tuple[list[MoESpec], dict[str, Binding], dict]:
    """(candidate specs, bindings, facts) of the block, or Rejected with the reason: the specs the block's
    values allow, the most likely first (the proof picks). Any failure inside the analysis of an odd
    candidate is a rejection, never an error of compile. The block is left as it was."""
    try:  # a block not in fp32 is analysed on an fp32 copy: what its forward changes shows there
        work = block if all(p.dtype == torch.float32 for p in block.parameters()) else copy.deepcopy(block).float()
        with untouched(block) as changes, untouched(work) if work is not block else contextlib.nullcontext([]) as more:
            result = _analyze(block, cand, work)
        changes += more
    except Rejected:
        raise
    except Exception as e:  # noqa: BLE001  one odd candidate must not fail the compile
        raise Rejected(f"moec could not analyse it ({type(e).__name__}: {e})") from e
    counters = sorted({c.removeprefix(COUNTS) for c in changes if c.startswith(COUNTS)})
    if any(not c.startswith(COUNTS) for c in changes) or any(
            resolve(block, n).shape != (cand.num_experts,) or cand.width for n in counters):
        raise Rejected(f"its forward changes the block's own state ({'; '.join(sorted(set(changes))[:3])}): the "
                       "compiled block would not, so moec leaves it")
    result[2]["counters"] = tuple(counters)  # [E] buffers it may count its tokens per expert into: the proof checks
    return result


def _check_counters(block: nn.Module, gm, probes) -> None:
    """What the block's forward does to each of its [E] counter buffers is what the compiled block will do: add the
    number of (token, expert) pairs its routing chose for each expert (torchtitan's tokens_per_expert; fp32 counts,
    added in the buffer's dtype), on every probe (those that overflow a capacity included), each from distinct
    non-zero values (a forward that decays or overwrites the buffer adds the counts to zeros); else Rejected."""
    spec, dtype = gm.meta["moe_spec"], _dtype(block)
    for p in probes:
        with untouched(block), torch.no_grad():
            want = {}
            for n in spec.counters:
                buf = resolve(block, n)
                buf.copy_(torch.arange(len(buf)) % 5 + 1)  # 1..5: exact in every dtype
                want[n] = buf.clone()
            original_forward(block)(p.x.to(dtype))
            got = {n: resolve(block, n).clone() for n in spec.counters}
            ids = call(gm, block, p.x.to(dtype))[2]
        for n, t in want.items():
            add_counts(t, ids, spec.experts.num_experts)
        if bad := [n for n in spec.counters if not torch.equal(got[n], want[n])]:
            raise Rejected(f"its forward changes the block's own state (updates buffer {bad[0]} by other than the "
                           f"number of tokens routed to each expert): the compiled block would not, so moec leaves it")


def _dtype(block: nn.Module) -> torch.dtype:
    """The block's own dtype: its largest floating-point parameter's."""
    return max((p for p in block.parameters() if p.is_floating_point()), key=torch.Tensor.numel).dtype


def _capture(work: nn.Module, H: int, T: int, gen) -> tuple[torch.Tensor, Capture]:
    """One captured run on [B, S, H] random hidden states (B = 2 when T is even), else [T, H]."""
    dev = next(work.parameters()).device
    B = 2 if T % 2 == 0 else 1
    x = torch.randn(B, T // B, H, generator=gen, device="cpu").to(dev)
    try:
        return x, capture(work, x)
    except Exception as e:  # noqa: BLE001  some blocks take [T, H]
        first = f"on {list(x.shape)}: {type(e).__name__}: {str(e)[:200]}"
    x = x.reshape(-1, H)
    try:
        return x, capture(work, x)
    except Exception as e:  # noqa: BLE001
        raise Rejected(f"calling the block with hidden states failed ({first}; on {list(x.shape)}: "
                       f"{type(e).__name__}: {str(e)[:200]})") from e


def _analyze(block: nn.Module, cand: Candidate, work: nn.Module):
    E, H = cand.num_experts, cand.hidden
    Er = cand.width or E  # the router's outputs: E experts, then zero-compute ones (ExpertsSpec.identity)
    dev = next(work.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(0)
    x, cap = _capture(work, H, 10, gen)
    xf = x.reshape(-1, H)

    # router: the first op reading the router weight yields the logits [T, E]
    W = resolve(work, cand.router)
    wnode = next((n for n in cap.graph.nodes if n.op == "get_attr" and n.target == cand.router), None)
    logits_node = None if wnode is None else next((
        n for n in cap.graph.nodes if wnode in feat.inputs_through_views(n) and isinstance(n.meta.get("val"), torch.Tensor)
        and n.meta["val"].shape[-1] == Er and n.meta["val"].numel() == xf.shape[0] * Er), None)
    computed = (": other ops make the weight the router applies (e.g. a parametrization, a pruning mask or an "
                "adapter: compile the model with them merged or removed)")
    if logits_node is None:
        raise Rejected(f"the router weight {cand.router} is not applied to the tokens" + (
            "" if wnode is None else f" as it is{computed}"))
    logits = logits_node.meta["val"].reshape(-1, Er)
    flat, router_t = W.dim() == 1, W.shape == (H, Er) and H != Er  # [E*H] viewed; [H, E] used as x @ W
    bias_arg = None
    if target_name(logits_node) == "linear":  # F.linear(x, W, b): a bias; x @ W.T, matmul, einsum: none
        bias_arg = logits_node.args[2] if len(logits_node.args) > 2 else logits_node.kwargs.get("bias")
    router_bias = bias_arg.target if isinstance(bias_arg, torch.fx.Node) and bias_arg.op == "get_attr" else None
    Wc = W.view(Er, H) if flat else W.t() if router_t else W
    if rel_err(F.linear(xf, Wc, resolve(work, router_bias) if router_bias else None), logits) > FIT_TOL:
        read = feat.source(next(a for a in logits_node.all_input_nodes if feat.source(a).op != "get_attr"))
        if read.op != "placeholder":  # e.g. a layer that runs attention and a norm, then routes, in one forward
            raise Rejected(f"its router reads a value the block computes ({target_name(read)} in "
                           f"{read.meta.get('module') or 'its forward'}), not the block's input: moec rewrites a "
                           "module whose input is what the router reads (an MoE module of its own, or an experts "
                           "module called with the routing)")
        raise Rejected(f"the router logits are not the block input times the router weight {cand.router}"
                       + (computed if ".parametrizations." in cand.router else ""))

    # selection: a top-k / argmax over the E scores, downstream of the logits;
    df = cap.dataflow()
    after = nx.descendants(df, logits_node)
    # the last one: a group top-k over [T, G] comes first (and has E columns when groups hold one expert)
    sels = [n for n in cap.graph.nodes if n in after and target_name(n) in SELECTIONS and n.args
            and isinstance(n.args[0], torch.fx.Node) and n.args[0].meta["val"].is_floating_point()
            and n.args[0].meta["val"].shape[-1] == Er and n.args[0].meta["val"].dim() == logits_node.meta["val"].dim()
            and (target_name(n) != "max" or len(n.args) > 1 or "dim" in n.kwargs)]
    over_tokens = [n for n in sels if feat.sel_dim(n) not in (-1, n.args[0].meta["val"].dim() - 1)]
    sels = [n for n in sels if n not in over_tokens]  # a top-k over the tokens is a capacity rule, not the choice
    if not sels:
        raise Rejected("expert-choice routing (each expert picks its top tokens; no per-token choice of experts) is "
                       "not supported" if over_tokens else
                       "no top-k/argmax selection over the router's scores: a dense mixture, not a sparse MoE")
    sel = sels[-1]
    name = target_name(sel)
    k = (sel.args[1] if len(sel.args) > 1 else sel.kwargs.get("k")) if name == "topk" else 1
    rec_ids = _pick_ids(sel).meta["val"].reshape(-1, k)

    drawn = sorted({target_name(n) for n in after if target_name(n) in RANDOM_OPS})
    if drawn:
        raise Rejected(f"its routing draws random numbers in eval mode ({', '.join(drawn)}): moec compiles "
                       "deterministic routers (a router that samples in training runs its original forward there)")
    scalar = next((o for o in (cap.output if isinstance(cap.output, tuple) else [cap.output])
                   if isinstance(o, torch.Tensor) and o.dim() == 0), None)
    if scalar is not None:  # (said before a misreading of its router for its aux loss's ops)
        raise feat.extra_output(scalar)
    f = feat.features(cap, logits_node, sel)
    picks = {}  # k > 1 argmax/max picks in turn (sparsemixer, GShard's top-2): each masks the ones before
    chain = [sels[0]]  # (an argmax and a max of the same scores, as Switch takes index and weight, are one pick)
    for n in sels[1:]:
        if n in nx.descendants(df, chain[-1]):
            chain.append(n)
    if len(chain) > 1 and all(target_name(n) in ("argmax", "max") for n in chain):
        k = len(chain)
        rec_ids = torch.cat([_pick_ids(n).meta["val"].reshape(-1, 1) for n in chain], 1)
        if f["scoring"] != "sparsemixer":
            picks = feat.argmax_picks(cap, chain)
    _check_reads(cap, {_pick_ids(s) for s in sels})
    base = RouterSpec(top_k=k, scoring=f["scoring"], select_bias=f["select_bias"] is not None,
                      n_group=f["n_group"], topk_group=f["topk_group"], group_score=f["group_score"],
                      jitter_eps=f.get("jitter_eps", 0.0), select_on=picks.get("select_on", f["select_on"]),
                      upcast=feat.upcasts(logits_node), selection="argmax" if name in ("argmax", "max") else "topk",
                      renorm_eps=f["renorm_eps"], renorm_floor=f["renorm_floor"],
                      pick_mask=picks.get("pick_mask", float("-inf")))
    sb = resolve(work, f["select_bias"]) if f["select_bias"] else None
    rargs = lambda r: (xf, Wc, resolve(work, router_bias) if router_bias else None, sb,  # noqa: E731
                       *route_args(r))
    _, ids, _ = route_math(*rargs(base), num_experts=Er)
    if not torch.equal(ids.sort(-1).values, rec_ids.sort(-1).values):
        raise Rejected(f"could not reproduce the router's choice of experts ({base.describe()})")
    caps = feat.capacity_candidates(_check_token_paths(work, cand, cap, logits_node, gen), E)
    if Er > E and any(c["capacity"] for c in caps):
        raise Rejected("zero-compute experts beside an expert capacity: not supported")

    # outputs: the main output and which leaves are router logits
    leaves = list(cap.output) if isinstance(cap.output, tuple) else [cap.output]
    shapes = (x.shape, xf.shape, (x.numel(),))  # the input's, [T, H], or flattened (ERNIE-4.5-VL's)
    out_main = next((o for s in shapes for o in leaves if isinstance(o, torch.Tensor) and o.shape == s), None)
    if out_main is None or any(isinstance(o, (tuple, list, dict)) for o in leaves):
        raise Rejected("no output of the block has the input's shape" if out_main is None else "nested outputs")

    def outputs(r: RouterSpec) -> tuple[str, ...]:
        _, ids, w = route_math(*rargs(r), num_experts=Er)
        return tuple(feat.leaf_kind(o, x, out_main, logits, ids, w) for o in leaves)

    R = out_main.reshape(-1, H).float()
    shared = feat.shared_experts(cap, cand, xf)
    out_bias = feat.output_bias(cap, sel, out_main, H)
    if out_bias:
        R = R - resolve(work, out_bias).float()
    routed = {1.0: R}  # the routed experts' part of the output, for each scale of the shared one
    if shared:  # a block may scale the sum of both (Cohere2-MoE's "average": / 2): the graph's scalars
        sh = resolve(work, shared.module)(xf)
        sh = (sh * torch.sigmoid(resolve(work, shared.gate)(xf)) if shared.gate else sh).float()
        routed = {c: R - c * sh for c in dict.fromkeys(f["scales"])}
    R = routed[1.0]

    roles: dict[str, Binding] = {"router_weight": Derived((Part(cand.router, unflatten=Er),)) if flat else
                                 Derived((Part(cand.router, transposed=True),)) if router_t else Param(cand.router)}
    if router_bias:
        roles["router_bias"] = Param(router_bias)
    if f["select_bias"]:
        roles["select_bias"] = Param(f["select_bias"])
    if out_bias:
        roles["out_bias"] = Param(out_bias)

    # experts: a layout and activation whose outputs explain the block's output on the chosen experts
    # by least squares; the solution is the combine weights. Each hypothesis is screened on one token (its
    # k experts only), the survivors fitted on all tokens (only the experts the run chose are built).
    seen = {target_name(n) for n in cap.graph.nodes}
    acts = sorted(("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai"),
                  key=lambda a: (a.split("_")[0] not in seen and not (a == "swiglu_oai" and "clamp" in seen), a))
    alpha, limit = feat.oai_constants(cap)
    dropped = any(c["capacity"] for c in caps)  # a token all of whose pairs are dropped may pass through: x

    def fit(lay, act, lb, rows, c=1.0):
        out = routed[c]
        chosen, local = rec_ids[rows].unique(return_inverse=True)  # local: the ids as indices into `chosen`
        real = chosen[chosen < E]  # (sorted: the zero-compute experts chosen come last)
        w = materialize(work, lb, real)
        Y = all_experts(xf[rows], w["w13"], w.get("b13"), w["w2"], w.get("b2"), act, lay.gated, alpha, limit,
                        lay.gate_up)  # [E', T', H]
        Y = torch.cat([Y, xf[rows].to(Y.dtype).expand(len(chosen) - len(real), -1, -1)])  # a zero-compute one: x
        A = Y[local, torch.arange(len(xf[rows]), device=dev)[:, None]]  # [T', k, H]
        B = torch.cat([A, xf[rows, None].to(A.dtype)], 1) if dropped else A  # [T', k (+1), H]
        # (two zero-compute experts of a token are equal columns: an SVD solves that rank-deficient system)
        sol = torch.linalg.lstsq(B.transpose(1, 2), out[rows].unsqueeze(-1),
                                 driver="gelsd" if Er > E else None).solution  # [T', k (+1), 1]
        return rel_err((B.transpose(1, 2) @ sol).squeeze(-1), out[rows]), w, A

    if (rec_ids >= E).all():
        raise Rejected("every token of the analysis chose zero-compute experts only: the experts' form is not seen")
    t = int((rec_ids < E).any(-1).nonzero()[0])  # the first token that chose a real expert screens
    tried = [(fit(lay, act, lb, slice(t, t + 1), c)[0], lay, act, lb, c) for lay in layouts(work, cand)
             for lb in [layout_bindings(work, cand, lay)] for act in acts for c in routed
             if act != "swiglu_oai" or lay.gated]
    screened = [(lay, act, lb, c) for err, lay, act, lb, c in tried if err < FIT_TOL]
    fits = []
    for lay, act, lb, c in screened:
        err, w, A = fit(lay, act, lb, slice(None), c)
        if err < FIT_TOL:
            fits.append((err, lay, act, lb, w, A, c))
    facts = {"in_dim": x.dim(), "work": work, "reads": cap.tensors_read()}
    if fits:  # the best fit wins (gelu vs its tanh approximation differ by ~1e-3)
        _, lay, act, lb, w, A, c = min(fits, key=lambda f: f[0])
        R, shared = routed[c], shared and replace(shared, scale=c)
        espec = ExpertsSpec(E, H, w["w2"].shape[2], act, lay.gated, "b13" in w or "b2" in w, alpha, limit,
                            gate_up=lay.gate_up, identity=Er - E)
        specs = [MoESpec(router, espec, shared, {}, outputs(router))  # the proof settles capacity and weighting
                 for c in caps for after in ((False, True) if c["capacity"] else (False,))
                 for router in feat.fit_routers(RouterSpec(**{**base.__dict__, **c, "capacity_renorm": after}), f,
                                                rargs, A, rec_ids, R, Er, x.shape[0] if c.get("capacity_per_row") else 1)
                 if not (after and router.renorm != 1.0)]
        if specs:
            return specs, {**roles, **lb}, facts
        raise Rejected(f"experts found ({espec.describe()}) but no router weighting reproduces the combine "
                       f"weights ({base.describe()})")
    # Llama 4 style: the combine weight scales the expert's input; not linear, so search directly
    for lay, act, r in itertools.product(list(layouts(work, cand)), acts, feat.router_grid(base, f)):
        if act == "swiglu_oai" and not lay.gated or Er > E:  # (no zero-compute experts beside it)
            continue
        lb = layout_bindings(work, cand, lay)
        w = materialize(work, lb)
        espec = ExpertsSpec(E, H, w["w2"].shape[2], act, lay.gated, "b13" in w or "b2" in w, alpha, limit, True,
                            lay.gate_up)
        _, ids, rw = route_math(*rargs(r), num_experts=E)
        y = torch.ops.moec.experts(xf, ids, rw, w["w13"], w.get("b13"), w["w2"], w.get("b2"), act, lay.gated,
                                   alpha, limit, True, lay.gate_up)
        if rel_err(y, R) < FIT_TOL:
            return [MoESpec(r, espec, shared, {}, outputs(r))], {**roles, **lb}, facts
    err, _, act, _, _ = min(tried, key=lambda f: f[0], default=(float("inf"), None, None, None, None))
    raise Rejected(f"no expert layout/activation reproduces the block output with router {base.describe()} " + (
        f"(the closest, {act} experts, is {err:.1e} off: do the experts compute in a lower precision than the block, "
        f"e.g. cast to bf16?)" if err < NEAR_FIT else "(expert capacity or an unsupported expert form?)"))


def _pick_ids(sel):
    """The node of a selection's expert indices: argmax itself, or topk(...)[1] / max(...)[1]."""
    return sel if target_name(sel) == "argmax" else next(u for u in sel.users if u.args[1] == 1)


def _check_reads(cap: Capture, choice: set) -> None:
    """Python reads of tensor values (branches, loops, .item()) are explained only when they read the expert
    choice (`choice`: the nodes of the selected indices; dispatch loops over the experts hit): anything else
    computed from the input or the weights could take another path on inputs the proof does not try."""
    df = cap.dataflow()
    cut = df.subgraph([n for n in df if n not in choice])
    sources = [n for n in cut if n.op == "get_attr" or (n.op == "placeholder" and not n.name.startswith("const_"))]
    tainted = set(sources).union(*(nx.descendants(cut, s) for s in sources))
    for how, node in cap.reads:
        if node in tainted:
            where = node.meta.get("module") or "the block"
            raise Rejected(f"its Python code reads tensor values ({how} of {target_name(node)} in {where}), "
                           "so it may branch on data in ways one run does not show")


def _signature(cap: Capture, cand: Candidate) -> frozenset:
    """The ops a run made (name, module; expert modules of a container as one)."""
    pattern = re.compile(rf"^{re.escape(cand.container)}\.[^.]+") if cand.container else None
    return frozenset((target_name(n), pattern.sub(f"{cand.container}.*", n.meta.get("module", "")) if pattern
                      else n.meta.get("module", "")) for n in cap.graph.nodes if n.op == "call_function")


def _counted(x: torch.Tensor, per_row: bool) -> int:
    """Tokens counted together by a capacity: a row's ([B, S, H] input), or all of them."""
    return x.shape[-2] if per_row and x.dim() == 3 else x.numel() // x.shape[-1]


def _check_token_paths(work, cand: Candidate, cap: Capture, logits_node, gen) -> dict:
    """The block must run the same code at 1, 64 and 300 tokens as at 10: a path taken only from some token
    count on is not explained by the canonical form. Returns the capacity constants seen at each count
    (tokens counted -> [(c, per_row)]), for capacity_candidates."""
    ops = _signature(cap, cand)
    samples = {}

    def note(x, c):
        consts = feat.capacity_constants(c, _first_router_use(c, cand) if c is not cap else logits_node)
        for const in consts:
            samples.setdefault(_counted(x, const[1]), []).append(const)

    note(cap.inputs[0], cap)
    for T in SIGNATURE_TOKENS:
        x, other = _capture(work, cand.hidden, T, gen)
        note(x, other)
        if (oops := _signature(other, cand)) != ops:
            diff = sorted(f"{n} in {m or 'the block'}" for n, m in oops ^ ops)
            raise Rejected(f"it runs other code at {T} tokens than at 10 ({', '.join(diff[:3])}"
                           f"{', ...' if len(diff) > 3 else ''}): a branch on the token count")
    return {n: list(dict.fromkeys(cs)) for n, cs in samples.items()}


def _first_router_use(cap: Capture, cand: Candidate):
    """The op that applies the router weight (the analysis found it in the first capture)."""
    wnode = next(n for n in cap.graph.nodes if n.op == "get_attr" and n.target == cand.router)
    return next(n for n in cap.graph.nodes if wnode in feat.inputs_through_views(n))


def prove(block: nn.Module, cand: Candidate, spec: MoESpec, roles: dict[str, Binding], facts: dict, gm) -> Proof:
    """Check the canonical graph against the original block on the probes (detect.proof), in fp32;
    return the probes with the original's outputs, for the final graph's proof."""
    if cand.call:  # an experts module: probes are routings
        forward = original_forward(block)
        proof = Proof(block, lambda x, ids, w: experts_only.call_module(forward, cand, x, ids, w),
                      experts_only.probes(spec, next(block.parameters()).device))
        proof.check(runner(gm, block), torch.float32, "the canonical form", 1e-4)
        proof.reached = set(range(spec.experts.num_experts))
        return proof
    work = facts["work"]
    fp32 = work is block
    dev = next(block.parameters()).device
    router = {r: roles[r].get(work) if r in roles else None for r in ("router_weight", "router_bias", "select_bias")}
    ps = probes(spec, facts["in_dim"], router, dev)
    proof = Proof(block, original_forward(block), ps)
    canonical = proof if fp32 else Proof(work, original_forward(work), ps)
    if cand.container is not None:
        group = resolve(work, cand.container)
        w = {r: roles[r].get(work) for r in ("w13", "w2", "b13", "b2") if r in roles}
        check_expert_modules(spec, members(group), w)
    gm_work = gm if fp32 else build_graph(work, spec, roles)  # its shared modules are the fp32 copy's
    canonical.check(runner(gm_work, work), torch.float32, "the canonical form", 1e-4)
    if not fp32:  # in the block's own dtype too: what its rounding decides (ties, ranks) picks among the forms
        dtype = _dtype(block)
        proof.check(runner(gm, block), dtype, f"the canonical form in {str(dtype).removeprefix('torch.')}")
    canonical.add_other_rank(runner(gm_work, work), flat="out_1d" in spec.outputs)
    proof.ranks = canonical.ranks
    if proof is not canonical:
        proof.probes = canonical.probes
    proof.reached = reached(spec, router, next(p.x for p in ps if p.name == "one token routed to each expert"))
    return proof


@register_pass("detect_moe")
def detect_moe(gm) -> PassResult:
    """Captured block -> canonical graph (see module docstring)."""
    block, cand = gm.meta["block"], gm.meta["candidate"]
    if any(t.is_meta for t in itertools.chain(block.parameters(), block.buffers())):
        raise Rejected("its weights are on the meta device (not loaded: init_empty_weights, accelerate's offload "
                       "hooks): moec proves a block on its weights; load them first (moec.load_offloaded compiles "
                       "a model too big for memory)")
    specs, roles, facts = experts_only.analyze(block, cand) if cand.call else analyze(block, cand)
    failures = []
    for i, spec in enumerate(specs):  # the first candidate form that the proof confirms
        status(f"proving the canonical form ({i + 1}/{len(specs)})")
        out = build_graph(block, spec.with_(params={r: b.describe() for r, b in roles.items()}), roles, cand.path)
        if facts.get("counters"):
            out.meta["moe_spec"] = out.meta["moe_spec"].with_(counters=facts["counters"])
        try:
            proof = prove(block, cand, out.meta["moe_spec"], roles, facts, out)
            if facts.get("counters"):
                _check_counters(block, out, proof.probes)
        except Rejected as e:
            failures.append(e)
            continue
        except Exception as e:  # noqa: BLE001  e.g. non-finite weights: the block is left alone, with the reason
            failures.append(Rejected(f"its proof could not run ({type(e).__name__}: {e})"))
            continue
        out.meta.update(gm.meta)
        out.meta["call"] = cand.call
        out.meta["canonical_bindings"] = dict(roles)  # the reference of later proofs (quantized: dequantized)
        out.meta["proof"] = proof
        out.meta["ranks"] = proof.ranks
        out.meta["reads"] = facts["reads"]  # what the block's forward reads (a CompiledForward watches what the graph
        # does not)
        return PassResult(out, True, {"detected": 1, "experts_reached": len(proof.reached)})
    raise failures[0]
