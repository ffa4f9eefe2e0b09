"""lower_onnx: moec's canonical ops -> ops that export to ONNX (used by moec.export_onnx).

Matches, after batch_experts (and quantize_experts):

    logits, ids, w = moec.route(x[T,H], W[E,H], b?, select_bias?, <RouterSpec>)      # [T,E], [T,k], [T,k]
    w = moec.capacity(w, moec.capacity_kept(ids, w, rows, E, dtype))                  # only with capacity
    y = moec.experts(x, ids, w, W13[E,N1,H], b13?, W2[E,H,I], b2?, ...)              # or experts_int8/int4

and leaves the routing as its plain torch math (route_math, capacity: ordinary ONNX ops) and the
experts as ONE op that exports to ONNX Runtime's contrib node, weights in ORT's layout (onnx_backend):

    native router (softmax -> top-k -> renormalise, no bias/groups/capacity; "top-k then softmax" too):
        y = moec.ort_moe(x, logits, FC1, b1, W2, b2, k, ...) * scale                   # ORT does the routing
    any other router with weights >= 0 (sigmoid, bias, groups, p-norm, sparsemixer, capacity, weight 1):
        probs = log(w / max w) at ids, -1e4 elsewhere                                 # [T, E]
        y = moec.ort_moe(x, probs, FC1, ...) * sum(w)                                # softmax+renorm gives w/sum(w)
    quantized experts: moec.ort_qmoe(x, probs, FC1 u8, scales, b1, FC2 u8, scales, b2, zero points, ...)
    sliced (export's expert_slices=s > 1, fp experts): FC1/FC2 [E, ..] -> [s*E, ..], slice j of expert e at
        j*E + e holding intermediate units [j*I/s, (j+1)*I/s) (b2 on slice 0); probs repeated s times, k*s,
        log-weights routing, x s*sum(w) after: the block is the sum of its slices
    input-side weighting, top-1 (Llama 4): x * w [T, H] into the op, log-weights of weight 1

moec's kernels (backend="onnxruntime" asks for them, export_onnx's files never hold them): int4, int8 (weight-only,
or with int8 activations where the CPU has AVX512-VNNI: a step a row, the torch backend's numbers) and fp32 experts
of gated SiLU without biases stay `moec.experts_int4` / `experts_int8` / `experts`, exported as
moec::Int4Experts / ExpertsInt8 / Experts (backends/ort_kernels.py, custom ops the session registers), ids and w
from the graph's routing:

        y = moec.experts_int4(x, ids, w, Q13, S13, Z13?, None, Q2, S2, Z2?, None, ...)   # unchanged
        y = moec.experts(x, ids, w, W13, None, W2, None, ...)                            # (experts_loop -> experts)

A block ORT's op cannot compute exactly falls back to `experts_dense` (every expert on every token
in standard ops, quantized weights dequantized in the graph), with the reason: an activation ORT
lacks (exact GELU, GeGLU, ReGLU), input-side weighting of k > 1 experts, or routing weights that can
be negative (raw logits). Invariant: the graph computes the block (to rounding) and exports with
torch.export; `meta["onnx"]` says which op each block became and why. Stats: contrib, fallback, moec.
"""

from __future__ import annotations

import operator

import torch

from moec.backends.onnx_backend import ort_activation, ort_quantized, interleave
from moec.backends.torch_backend import capacity, capacity_kept, experts_dense, route_math
from moec.bindings import Const, Param
from moec.canonical import add_role, drop_unused_roles, role_value
from moec.pass_manager import PassResult, register_pass
from moec.passes.quantize_experts import quantized_tensors
from moec.quant import activation_group, dequantized

EXPERTS = (torch.ops.moec.experts, torch.ops.moec.experts_loop, torch.ops.moec.experts_int8,
           torch.ops.moec.experts_int4)
NEG = -1e4  # router_probs of experts not chosen: exp(NEG - 0) underflows to 0 in fp16 and fp32


def log_weights(ids: torch.Tensor, w: torch.Tensor, num_experts: int, dtype: torch.dtype, slices: int = 1):
    """Routing weights [T, k] (>= 0) -> router_probs [T, slices*E] that ORT's softmax -> top-(k*slices) ->
    renormalise turns back into ids (each of its slices, see slice_experts) and w / (slices * sum(w)), and
    slices * sum(w) [T, 1] to rescale by. Weights 0 (dropped by capacity) get NEG: a token with all weights 0
    still gets some experts, times sum(w) = 0. An id twice (a weight-0 pair on an expert the token chose: top-p,
    zero-compute experts) keeps its largest weight's log."""
    top = w.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    logw = torch.where(w > 0, torch.log(w / top), NEG)  # the largest is 0: exact in fp16 too
    probs = torch.full((ids.shape[0], num_experts), NEG, dtype=torch.float32, device=w.device).scatter_reduce(
        1, ids, logw, "amax")
    return probs.repeat(1, slices).to(dtype), w.sum(dim=-1, keepdim=True) * slices


def slice_experts(fc1: torch.Tensor, b1, fc2: torch.Tensor, b2, slices: int):
    """ORT-layout experts fc1 [E, r*I, H] (r rows per intermediate unit: 2 interleaved gate/up, else 1), b1 [E, r*I],
    fc2 [E, H, I], b2 [E, H] -> slices*E experts, slice j of expert e at j*E + e with units [j*I/s, (j+1)*I/s).
    ORT's CPU MoE runs each expert on one thread and gives each thread a contiguous range of experts: at decode
    a token's k experts kept one or two of the threads busy; sliced, each thread holds one slice of every expert."""
    E, H, I = fc2.shape
    n = I // slices
    fc1 = fc1.reshape(E, slices, -1, fc1.shape[-1]).transpose(0, 1).reshape(slices * E, -1, fc1.shape[-1])
    b1 = None if b1 is None else b1.reshape(E, slices, -1).transpose(0, 1).reshape(slices * E, -1)
    fc2 = fc2.reshape(E, H, slices, n).permute(2, 0, 1, 3).reshape(slices * E, H, n)
    b2 = None if b2 is None else torch.cat([b2, b2.new_zeros((slices - 1) * E, H)])  # added once per expert
    return fc1.contiguous(), b1, fc2.contiguous(), b2


def weighted_input(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, H] scaled by each token's one routing weight w [T, 1], as moec.experts does with weight_on_input."""
    return (x * w).to(x.dtype)


def rescale(y: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    return (y.float() * s).to(y.dtype)


def native_routing(r) -> bool:
    """ORT's own routing (softmax over E -> top-k -> renormalise) computes this router; a scale is applied after.
    (Not a top-k of the logits: ORT selects on its softmax, which saturates and ties where logits do not.)"""
    return (r.scoring == "softmax" and r.select_on == "scores" and not r.select_bias and r.n_group == 1
            and r.weighting == "scores" and r.renorm == 1.0 and not r.capacity)


def fallback_reason(spec) -> str | None:
    """Why ORT's MoE/QMoE cannot compute this block exactly (None: it can)."""
    e, r = spec.experts, spec.router
    if ort_activation(e.activation, e.gated, e.alpha, e.limit) is None:
        what = {"gelu": "GeGLU", "gelu_tanh": "GeGLU (tanh)", "relu": "ReGLU"}.get(e.activation, e.activation) \
            if e.gated else {"gelu": "exact (erf) GELU"}.get(e.activation, e.activation)
        return f"ORT's MoE has no {what} experts (it has SwiGLU, ReLU, SiLU, tanh-GELU)"
    if e.weight_on_input and r.top_k > 1:
        return "routing weights scale the input of k > 1 experts: ORT's MoE weights outputs"
    if r.scoring == "none" and r.weighting == "scores" and not (r.top_k == 1 and r.renorm == 1.0):  # else l/l = 1
        return "routing weights are raw logits (may be negative): ORT's MoE weights by a softmax"
    return None


@register_pass("lower_onnx", requires=("fuse_gate", "batch_experts"))
def lower_onnx(gm) -> PassResult:
    spec, g = gm.meta["moe_spec"], gm.graph
    block = gm.meta["block"]
    E = spec.experts.num_experts
    stats = {"contrib": 0, "fallback": 0, "moec": 0}
    for node in list(g.nodes):
        if node.target is torch.ops.moec.route:
            node.target, node.kwargs = route_math, {"num_experts": spec.router_width}
        elif node.target is torch.ops.moec.capacity:
            node.target = capacity
        elif node.target is torch.ops.moec.capacity_kept:
            node.target = capacity_kept
    for node in [n for n in g.nodes if n.target in EXPERTS]:
        x, ids, w = node.args[:3]
        act = _activation_args(node)
        quant = node.target in (torch.ops.moec.experts_int8, torch.ops.moec.experts_int4)
        dtype = next(block.parameters()).dtype if quant else role_value(gm, node.args[3]).dtype  # x's dtype
        reason = fallback_reason(spec)
        kept = None if reason else moec_kernel_reason(gm, node, spec, dtype)
        if kept == "":  # moec's kernels in ORT: the node stays, exported as moec::Int4Experts / Experts (onnx_backend)
            stats["moec"] += 1
            fp32 = node.target in (torch.ops.moec.experts, torch.ops.moec.experts_loop)
            if fp32:  # experts_loop: the same numbers; weights the graph computes (Derived) as constants of the
                node.target = torch.ops.moec.experts  # file, which panel_weights lays out
                args = list(node.args)
                for i, role in ((3, "w13"), (5, "w2")):
                    if not isinstance(gm.meta["bindings"][args[i].target], (Param, Const)):
                        args[i] = _const(gm, f"_moec_ort_{role}", role_value(gm, args[i]))
                node.args = tuple(args)
            kind = "fp32" if fp32 else "int8" if node.target is torch.ops.moec.experts_int8 else "int4"
            gm.meta["onnx"] = {"op": {"fp32": "moec::Experts", "int8": "moec::ExpertsInt8",
                                      "int4": "moec::Int4Experts"}[kind],
                               "why": f"moec's {kind} kernels in ONNX Runtime (custom op, backends/ort_kernels.py); "
                                      "routing in ONNX ops"}
            continue
        with g.inserting_before(node):
            if reason:
                stats["fallback"] += 1
                w13, w2 = (_dequantized_node(gm, role, spec.quant, dtype) for role in ("w13", "w2")) \
                    if quant else (node.args[3], node.args[5])
                b13, b2 = _biases(node)
                new = g.call_function(experts_dense, (x, ids, w, w13, b13, w2, b2, *act))
                gm.meta["onnx"] = {"op": "fallback", "why": reason}
            else:
                stats["contrib"] += 1
                new = _contrib_node(gm, node, spec, quant, dtype)
                if kept:
                    gm.meta["onnx"]["why"] += f"; not moec's kernels: {kept}"
        node.replace_all_uses_with(new)
        g.erase_node(node)
    g.eliminate_dead_code()
    drop_unused_roles(gm)
    return PassResult(gm, sum(stats.values()) > 0, stats)


def moec_kernel_reason(gm, node, spec, dtype) -> str | None:
    """None: moec's kernels were not asked for (export_onnx's files run on any ONNX Runtime); "": this int4 or fp32
    block runs them (the backend="onnxruntime" session registers backends/ort_kernels.py); else why it does not."""
    if not gm.meta["options"].get("onnx", {}).get("moec_kernels"):
        return None
    from moec.backends import cpu_native, ort_kernels

    e, cfg = spec.experts, spec.quant
    int4, int8 = node.target is torch.ops.moec.experts_int4, node.target is torch.ops.moec.experts_int8
    b13, b2 = _biases(node)
    if not (e.gated and e.activation == "silu") or e.weight_on_input or b13 is not None or b2 is not None:
        return "they take gated SiLU experts without biases"
    if dtype != torch.float32 or int4 and cfg.group_size not in (32, 64, 128):
        return "they take fp32 activations" + " and groups of 32, 64 or 128" * int4
    if not (int4 or int8) and (role_value(gm, node.args[3]).dtype, role_value(gm, node.args[5]).dtype) != (dtype,
                                                                                                          dtype):
        return "they take fp32 weights"
    if ort_kernels.library() is None:
        return "the library is not built (see the log)"
    if int8 and cfg.activations == "int8":  # int32 sums of int8 rows: H and I multiples of 32 (check_shape)
        if not cpu_native.has_vnni512():
            return "their int8 rows on int8 weights need an AVX512-VNNI CPU (QMoE rounds the activations as asked)"
        if max(spec.experts.hidden, spec.experts.inter) > 65536:
            return "their int8 rows take H and I up to 65536 (int32 sums)"
    return ""


def _const(gm, name: str, tensor: torch.Tensor):
    """A new input of the graph holding a tensor in ORT's layout, made from the block's weights now (export
    compiles a copy of the model: these are constants of the exported file)."""
    return add_role(gm, name, Const(tensor))


def _dequantized_node(gm, role, cfg, dtype):
    inputs = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    t = {k: inputs[f"_moec_{role}_{k}"] for k in quantized_tensors(gm.meta["block"], role)}
    return gm.graph.call_function(dequantized, (t["q"], t["scale"], t.get("zero"), cfg.bits,
                                                getattr(cfg, "group_size", 0), dtype))


def _contrib_node(gm, node, spec, quant: bool, dtype):
    g, block, r, e = gm.graph, gm.meta["block"], spec.router, spec.experts
    x, ids, w = node.args[:3]
    route = ids.args[0]  # ids = getitem(route_math(...), 1)
    asked = 1 if quant else gm.meta["options"].get("onnx", {}).get("expert_slices", 1)  # QMoE: never sliced
    slices = asked if e.inter % asked == 0 and e.inter // asked >= 2 else 1
    unsliced = f"; not sliced: I={e.inter} has no {asked} equal slices of 2 units or more" if slices < asked else ""
    if e.weight_on_input:  # top-1 (fallback_reason): its weight scales the token, the op weights the output by 1
        x = g.call_function(weighted_input, (x, w))
        w = g.call_function(torch.ones_like, (w,))
    if native_routing(r) and slices == 1 and not (e.weight_on_input or e.identity):  # ids, w: the route's own
        logits = g.call_function(operator.getitem, (route, 0))
        probs, scale = g.call_method("to", (logits, dtype)), r.scale
        routing = "native (ORT routes the logits)" + (f", x{r.scale:g} after" if r.scale != 1.0 else "") + unsliced
    else:
        pair = g.call_function(log_weights, (ids, w, e.num_experts, dtype, slices))
        probs, scale = (g.call_function(operator.getitem, (pair, i)) for i in (0, 1))
        routing = f"log-weights (router computed in ONNX ops), x {f'{slices}*' if slices > 1 else ''}sum(w) after" + \
            unsliced + \
            (f"; experts in {slices} slices of {e.inter // slices} units (ORT's CPU kernel runs an expert on one "
             f"thread)" if slices > 1 else "") + \
            ("; the top-1 weight scales the expert input (Llama 4), the op weights by 1" if e.weight_on_input else "")
    tail = (r.top_k * slices, e.activation, e.gated, float(e.alpha), float(e.limit))
    if quant:
        cfg = spec.quant
        t13 = ort_quantized(cfg, quantized_tensors(block, "w13"), e.gated, e.gate_up)
        t2 = ort_quantized(cfg, quantized_tensors(block, "w2"), False)
        a = {f"{role}_{k}": _const(gm, f"_moec_ort_{role}_{k}", v) for role, t in (("fc1", t13), ("fc2", t2))
             for k, v in t.items()}
        b13, b2 = _biases(node)
        out = g.call_function(torch.ops.moec.ort_qmoe, (
            x, probs, a["fc1_q"], a["fc1_scales"], _bias(gm, b13, e), a["fc2_q"], a["fc2_scales"], b2,
            a.get("fc1_zero_points"), a.get("fc2_zero_points"), cfg.bits, _block_size(cfg), cfg.activations == "int8",
            *tail))
        op = "QMoE"
    else:
        w13, b13, w2, b2 = node.args[3:7]
        if slices > 1:
            value = lambda n: None if n is None else role_value(gm, n)  # noqa: E731
            t = slice_experts(interleave(value(w13), e.gate_up) if e.gated else value(w13),
                              interleave(value(b13), e.gate_up) if e.gated else value(b13), value(w2), value(b2),
                              slices)
            fc1, b13, w2, b2 = (None if v is None else _const(gm, f"_moec_ort_{name}", v)
                                for name, v in zip(("fc1", "fc1_bias", "fc2", "fc2_bias"), t))
        else:
            fc1 = _const(gm, "_moec_ort_fc1", interleave(role_value(gm, w13), e.gate_up)) if e.gated else w13
            b13 = _bias(gm, b13, e)
        out = g.call_function(torch.ops.moec.ort_moe, (x, probs, fc1, b13, w2, b2, *tail))
        op = "MoE"
    gm.meta["onnx"] = {"op": op, "why": routing}
    return out if isinstance(scale, float) and scale == 1.0 else g.call_function(rescale, (out, scale))


def _block_size(cfg) -> int:
    """QMoE's block_size: int4's group; int8 per output channel (0), or blocks of 32 with int8 activations."""
    return cfg.group_size if cfg.bits == 4 else activation_group(cfg) if cfg.activations == "int8" else 0


def _biases(node) -> tuple:
    """(b13, b2) arguments of an experts node (their positions differ per op, see moec/ops.py)."""
    at = {torch.ops.moec.experts_int8: (5, 8), torch.ops.moec.experts_int4: (6, 10)}.get(node.target, (4, 6))
    return node.args[at[0]], node.args[at[1]]


def _activation_args(node) -> tuple:
    """(activation, gated, alpha, limit, weight_on_input, gate_up) of an experts node: after its tensors, and before
    the int8 experts' int8_activations flag (which this lowering reads from the config)."""
    at = {torch.ops.moec.experts_int8: 9, torch.ops.moec.experts_int4: 11}.get(node.target, 7)
    return tuple(node.args[at:at + 6])


def _bias(gm, b13, e):
    return _const(gm, "_moec_ort_fc1_bias", interleave(role_value(gm, b13), e.gate_up)) if e.gated and b13 is not None \
        else b13
