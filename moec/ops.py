"""Canonical MoE ops, registered with torch.library so rewritten graphs stay traceable by
torch.export and torch.compile (each op has a fake implementation giving output shapes).

    moec::route(x[T,H], W[E,H], b?, select_bias?, router) -> logits[T,E], ids[T,k] int64, weights[T,k] fp32
    moec::experts(x[T,H], ids[T,k], weights[T,k], W13[E,N1,H], b13?, W2[E,H,I], b2?, ...) -> [T,H]
    moec::experts_loop(...same...)                   -> [T,H]   (naive per-expert reference)
    moec::experts_int8 / experts_int4(x, ids, weights, <packed W13, W2 + scales>, ...) -> [T,H]  (moec.quant)
    moec::capacity_kept(ids[T,k], weights[T,k], rows, E, rank_dtype, router) -> bool[T,k] (pairs within capacity)
    moec::capacity(weights[T,k], kept[T,k], router) -> weights[T,k] (0 where not kept; renormalised if so)
    moec::no_backward(grad, like, why) -> like's gradient: raises `why` (a traced backward of moec's outputs)
    moec::ort_moe(x[T,H], router_probs[T,E], fc1[E,N1,H], fc1_bias?, fc2[E,H,I], fc2_bias?, k, ...)  -> [T,H]
    moec::ort_qmoe(x, router_probs, fc1 u8, fc1_scales, fc1_bias?, fc2 u8, fc2_scales, fc2_bias?, zero points?, ...)
        ONNX Runtime's com.microsoft::MoE / QMoE in its layouts (softmax over router_probs -> top-k ->
        normalise; gated fc1 rows interleaved gate/up); exported as those nodes (moec.backends.onnx_backend)
    moec::ort_gqa(q[B,S,H*D], k[B,S,KVH*D], v, past_k[B,KVH,P,D], past_v, bias[B|1,1,S,P+S], sinks?[H], H, KVH, scale)
        -> out[B,S,H*D], present_k[B,KVH,P+S,D], present_v: causal attention over past + new keys with an additive
        bias (and per-head sink logits; zeros for a query with every key masked, as ORT's op), exported as
        com.microsoft::GroupQueryAttention (moec.export_gqa)
    moec::causal_bias(attention_mask[>=B,T] bool, B, S, T, dtype) -> bias[B,1,S,T]: 0 where key t is a real token
        (the mask set) at or before query s (position T - S + s), else dtype's minimum: HF's causal mask over a
        padding mask as eager attention adds it (the mask's first B rows; an error unless it is T wide); exported as
        one moec::CausalBias node (backends/ort_mask.py)
    moec::ort_linear_attention(q[B,S,H*dk], k[B,S,H*dk], v[B,S,H*dv], past_state[B,H,dk,dv], decay[B,S,H|H*dk],
        beta?[B,S,H], H, scale, rule) -> out[B,S,H*dv], present_state: rule "gated_delta" (Qwen3-Next) or "gated"
        (Mamba: a decay per key dim) token by token, exported as com.microsoft::LinearAttention (moec.export_state)

Backends register the real kernels (`moec.backends.torch_backend` for every device).
"""

from __future__ import annotations

import torch

from moec.ir import ExpertsSpec, RouterSpec

_EXPERTS_ARGS = (
    "Tensor x, Tensor ids, Tensor weights, Tensor w13, Tensor? b13, Tensor w2, Tensor? b2, "
    "str activation, bool gated, float alpha, float limit, bool weight_on_input, str gate_up"
)
torch.library.define(  # router: a RouterSpec as JSON (RouterSpec.to_json)
    "moec::route", "(Tensor x, Tensor weight, Tensor? bias, Tensor? select_bias, str router) -> (Tensor, Tensor, Tensor)")
torch.library.define("moec::experts", f"({_EXPERTS_ARGS}) -> Tensor")
torch.library.define("moec::experts_loop", f"({_EXPERTS_ARGS}) -> Tensor")
_ACT_ARGS = ("str activation, bool gated, float alpha, float limit, bool weight_on_input, str gate_up, "
             "bool int8_activations=False")  # int8 experts, torch backend: GEMM inputs in int8, a scale per row
torch.library.define(  # int8 experts (moec.quant format): q [E,N,K] int8, s [E,N]
    "moec::experts_int8",
    f"(Tensor x, Tensor ids, Tensor weights, Tensor q13, Tensor s13, Tensor? b13, Tensor q2, Tensor s2, Tensor? b2, "
    f"{_ACT_ARGS}) -> Tensor")
torch.library.define(  # int4 experts (moec.quant format): q [E,N,K/2] uint8, s [E,N,K/g], z [E,N,K/g] uint8 or None
    "moec::experts_int4",
    f"(Tensor x, Tensor ids, Tensor weights, Tensor q13, Tensor s13, Tensor? z13, Tensor? b13, Tensor q2, Tensor s2, "
    f"Tensor? z2, Tensor? b2, {_ACT_ARGS}) -> Tensor")
_ORT_ARGS = "int k, str activation, bool gated, float alpha, float limit"
torch.library.define(
    "moec::ort_moe",
    f"(Tensor x, Tensor router_probs, Tensor fc1, Tensor? fc1_bias, Tensor fc2, Tensor? fc2_bias, {_ORT_ARGS}) -> Tensor")
torch.library.define(  # bits 8: u8 [E,N,K], scales [E,N]; bits 4: u8 [E,N,K/2], scales [E,N,K/block]
    "moec::ort_qmoe",  # int8_activations: GEMM inputs in int8 per block (ORT's accuracy_level=4)
    "(Tensor x, Tensor router_probs, Tensor fc1, Tensor fc1_scales, Tensor? fc1_bias, Tensor fc2, Tensor fc2_scales, "
    f"Tensor? fc2_bias, Tensor? fc1_zero_points, Tensor? fc2_zero_points, int bits, int block_size, "
    f"bool int8_activations, {_ORT_ARGS}) -> Tensor")
torch.library.define(
    "moec::ort_gqa",
    "(Tensor query, Tensor key, Tensor value, Tensor past_key, Tensor past_value, Tensor bias, Tensor? sinks, "
    "int num_heads, int kv_heads, float scale) -> (Tensor, Tensor, Tensor)")
torch.library.define("moec::causal_bias", "(Tensor attention_mask, SymInt batch_size, SymInt q_length, "
                                          "SymInt kv_length, ScalarType dtype) -> Tensor")
torch.library.define(
    "moec::ort_linear_attention",
    "(Tensor query, Tensor key, Tensor value, Tensor past_state, Tensor decay, Tensor? beta, int heads, float scale, "
    "str rule) -> (Tensor, Tensor)")
torch.library.define(  # router: the RouterSpec as JSON (its capacity rule)
    "moec::capacity", "(Tensor weights, Tensor kept, str router) -> Tensor")
torch.library.define("moec::no_backward", "(Tensor grad, Tensor like, str why) -> Tensor")


@torch.library.impl("moec::no_backward", "CompositeExplicitAutograd")
def _no_backward(grad, like, why):
    """The backward of an output computed for inference (bindings.NoBackward), as torch.compile traces it ahead:
    raises `why` on the host when it runs (an assert in the graph would be a device-side assert on a GPU)."""
    raise RuntimeError(why)
torch.library.define(
    "moec::capacity_kept",
    "(Tensor ids, Tensor weights, SymInt rows, int num_experts, ScalarType rank_dtype, str router) -> Tensor")


@torch.library.register_fake("moec::route")
def _route_fake(x, weight, bias, select_bias, router):
    T, E, top_k = x.shape[0], weight.shape[0], RouterSpec.from_json(router).top_k
    return (
        x.new_empty(T, E),
        x.new_empty(T, top_k, dtype=torch.int64),
        x.new_empty(T, top_k, dtype=torch.float32),
    )


def _experts_fake(x, *args):
    return torch.empty_like(x)


torch.library.register_fake("moec::experts")(_experts_fake)
torch.library.register_fake("moec::experts_loop")(_experts_fake)
torch.library.register_fake("moec::experts_int8")(_experts_fake)
torch.library.register_fake("moec::experts_int4")(_experts_fake)
torch.library.register_fake("moec::ort_moe")(_experts_fake)
torch.library.register_fake("moec::ort_qmoe")(_experts_fake)


@torch.library.register_fake("moec::ort_gqa")
def _gqa_fake(query, key, value, past_key, past_value, bias, sinks, num_heads, kv_heads, scale):
    B, KVH, P, D = past_key.shape
    present = past_key.new_empty(B, KVH, P + key.shape[1], D)
    return torch.empty_like(query), present, torch.empty_like(present)


@torch.library.register_fake("moec::causal_bias")
def _causal_bias_fake(attention_mask, batch_size, q_length, kv_length, dtype):
    return attention_mask.new_empty(batch_size, 1, q_length, kv_length, dtype=dtype)


@torch.library.register_fake("moec::ort_linear_attention")
def _linear_attention_fake(query, key, value, past_state, decay, beta, heads, scale, rule):
    return torch.empty_like(value), torch.empty_like(past_state)


@torch.library.register_fake("moec::no_backward")
def _no_backward_fake(grad, like, why):
    return torch.empty_like(like)


@torch.library.register_fake("moec::capacity")
def _capacity_fake(weights, *args):
    return torch.empty_like(weights)


@torch.library.register_fake("moec::capacity_kept")
def _capacity_kept_fake(ids, weights, *args):
    return torch.empty_like(weights, dtype=torch.bool)


def route_args(r: RouterSpec) -> tuple:
    """The non-tensor arguments of moec::route: the RouterSpec as JSON."""
    return (r.to_json(),)


def experts_args(e: ExpertsSpec) -> tuple:
    """The non-tensor arguments of moec::experts / experts_loop, in schema order."""
    return (e.activation, e.gated, float(e.alpha), float(e.limit), e.weight_on_input, e.gate_up)
