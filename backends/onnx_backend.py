"""ONNX Runtime's contrib ops for moec (MoE, QMoE, GroupQueryAttention): their weight layouts, a torch
reference of what they compute, and their translation to ONNX nodes for torch.onnx.export.

    moec::ort_moe(x[T,H], router_probs[T,E], fc1[E,N1,H], fc1_bias?[E,N1], fc2[E,H,I], fc2_bias?[E,H], k, ...)
        w, ids = topk(softmax(router_probs), k); w /= sum(w)         # ORT's routing (normalize_routing_weights=1)
        y[t]   = sum_j w[t,j] * (fc2 act(fc1 x[t] + b1) + b2)[ids[t,j]]  # [T, H]
    moec::ort_qmoe(x, router_probs, fc1 u8, fc1_scales, b1?, fc2 u8, fc2_scales, b2?, fc1_zp?, fc2_zp?, bits,
                   block_size, int8_activations, k, ...)             # the same, quantized weights; int8_activations:
        each GEMM's input rows rounded to int8 per block (moec.quant.int8_rows; ORT's accuracy_level=4)
    moec::ort_gqa(q[B,S,H*D], k[B,S,KVH*D], v, past_k[B,KVH,P,D], past_v, bias[B|1,1,S,T], sinks?[H], H, KVH, scale)
        K, V = cat(past_k, k), cat(past_v, v)                              # present [B, KVH, T=P+S, D]
        p = softmax([q K^T * scale + bias | sinks])[..., :T]               # query head h reads kv head h // (H/KVH)
                                                                           # causal: query s never reads a key t > P+s;
                                                                           # 0 where every such key is masked
        out = p V                                                          # [B, S, H*D]

ORT's layouts (checked against ONNX Runtime 1.31.1 on CPU, tests/test_onnx.py):
- gated experts: fc1 rows interleaved (gate_0, up_0, gate_1, up_1, ...), swiglu_fusion=1: the only
  SwiGLU form the CPU kernel takes. swiglu = G * sigmoid(alpha * G) * (L + beta), G, L clamped by
  swiglu_limit: SwiGLU is alpha 1, beta 0, no limit; GPT-OSS's clamped SwiGLU is alpha, beta 1, limit.
- int8 (moec: int8 q [E,N,K], scale [E,N]): uint8 q + 128 (ORT's default zero point), same scales; with int8
  activations, block-wise (block_size 32, each row's scale repeated per block: ORT's 8-bit int8-activation path).
- int4 (moec: nibbles, even k low, scale [E,N,K/g], zero [E,N,K/g]): the same bytes, block_size=g,
  zero points packed two a byte (a row padded to a whole byte). Column-wise 4-bit zero points, which
  ORT gets wrong, are never produced (moec's int4 is always block-wise).
- `gelu` is the tanh approximation; there is no GeGLU/ReGLU; bf16 has no CPU kernel.
normalize_routing_weights=0 and use_sparse_mixer are never emitted (reported on ORT CPU: QMoE ignores 0,
fp16 MoE with 0 returned zeros, the sparse mixer is ignored): lower_onnx feeds routing the op cannot
express as log-weights instead.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import moec.ops  # noqa: F401  (defines the op schemas)
from moec.backends import ort_kernels, ort_mask, register_once
from moec.backends.torch_backend import activate
from moec.quant import (Int4Experts, Int8Experts, activation_group, dequantize, int8_rows, unpack_int4,
                        weight_only_active)

CONTRIB = "com.microsoft"


def ort_activation(activation: str, gated: bool, alpha: float, limit: float) -> dict | None:
    """ORT's attributes for moec's expert activation, or None when ORT's MoE has no exact equivalent."""
    if gated and activation == "silu":
        return dict(activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
    if gated and activation == "swiglu_oai":
        return dict(activation_type="swiglu", swiglu_fusion=1, activation_alpha=alpha, activation_beta=1.0,
                    swiglu_limit=limit)
    names = {"relu": "relu", "silu": "silu", "gelu_tanh": "gelu"}
    return None if gated or activation not in names else dict(activation_type=names[activation])


def interleave(t: torch.Tensor | None, gate_up: str = "halves") -> torch.Tensor | None:
    """[E, 2I, ...] gate and up rows in `gate_up` order (moec.ir.GATE_UPS) -> rows gate_0, up_0, gate_1, up_1, ..."""
    if t is None:
        return None
    n = t.shape[1] // 2
    a, b = (t[:, 0::2], t[:, 1::2]) if gate_up.startswith("interleave") else (t[:, :n], t[:, n:])
    gate, up = (b, a) if gate_up.endswith("up_first") else (a, b)
    return torch.stack([gate, up], dim=2).flatten(1, 2).contiguous()


def deinterleave(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)


def _pack_nibbles(z: torch.Tensor) -> torch.Tensor:
    """[..., n] values < 16 -> [..., ceil(n/2)] uint8, even index in the low nibble."""
    z = torch.nn.functional.pad(z, (0, z.shape[-1] % 2))
    return z[..., 0::2] | (z[..., 1::2] << 4)


def ort_quantized(cfg, t: dict[str, torch.Tensor], gated_fc1: bool, gate_up: str = "halves") -> dict[str, torch.Tensor]:
    """moec-format tensors of one matrix (moec.quant) -> {"q", "scales"[, "zero_points"]} in QMoE's layout."""
    rows = functools.partial(interleave, gate_up=gate_up) if gated_fc1 else (lambda v: v)
    q = t["q"] if isinstance(cfg, Int4Experts) else (t["q"].to(torch.int16) + 128).to(torch.uint8)
    scale = t["scale"]
    if isinstance(cfg, Int8Experts) and cfg.activations == "int8":  # block-wise 8-bit: ORT's int8-activation kernel
        scale = scale[..., None].expand(*scale.shape, q.shape[-1] // activation_group(cfg)).contiguous()
    out = {"q": rows(q), "scales": rows(scale)}
    if "zero" in t:
        out["zero_points"] = _pack_nibbles(rows(t["zero"]))
    return out


def _moec_format(q, scales, zero_points, bits, block_size, num_blocks):
    """QMoE layout -> (config, moec-format tensors): the inverse of ort_quantized (rows as given)."""
    if bits == 8:  # block-wise (scales [E, N, K/block]) only as ort_quantized writes it: one scale per row
        return Int8Experts(), {"q": (q.to(torch.int16) - 128).to(torch.int8),
                               "scale": scales[..., 0] if scales.dim() == 3 else scales}
    cfg = Int4Experts(block_size, symmetric=zero_points is None)
    t = {"q": q, "scale": scales}
    if zero_points is not None:
        t["zero"] = unpack_int4(zero_points)[..., :num_blocks]
    return cfg, t


def _ort_route(router_probs: torch.Tensor, k: int):
    w, ids = router_probs.float().softmax(dim=-1).topk(k, dim=-1)  # [T, k]
    return ids, w / w.sum(dim=-1, keepdim=True)


@torch.library.impl("moec::ort_moe", "CompositeExplicitAutograd")
def ort_moe(x, router_probs, fc1, fc1_bias, fc2, fc2_bias, k, activation, gated, alpha, limit):
    ids, w = _ort_route(router_probs, k)
    if gated:
        fc1, fc1_bias = deinterleave(fc1), deinterleave(fc1_bias)
    return torch.ops.moec.experts(x, ids, w, fc1, fc1_bias, fc2, fc2_bias, activation, gated, alpha, limit, False,
                                  "halves")


@torch.library.impl("moec::ort_qmoe", "CompositeExplicitAutograd")
def ort_qmoe(x, router_probs, fc1, fc1_scales, fc1_bias, fc2, fc2_scales, fc2_bias, fc1_zero_points,
             fc2_zero_points, bits, block_size, int8_activations, k, activation, gated, alpha, limit):
    w1 = dequantize(*_moec_format(fc1, fc1_scales, fc1_zero_points, bits, block_size, fc1_scales.shape[-1]), x.dtype)
    w2 = dequantize(*_moec_format(fc2, fc2_scales, fc2_zero_points, bits, block_size, fc2_scales.shape[-1]), x.dtype)
    if not int8_activations or weight_only_active():
        return torch.ops.moec.ort_moe(x, router_probs, w1, fc1_bias, w2, fc2_bias, k, activation, gated, alpha, limit)
    ids, w = _ort_route(router_probs, k)
    w1, b1 = (deinterleave(w1), deinterleave(fc1_bias)) if gated else (w1, fc1_bias)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        token, slot = torch.where(ids == e)
        h = F.linear(int8_rows(x[token], block_size), w1[e].float(), None if b1 is None else b1[e].float())
        a = activate(h, activation, gated, alpha, limit)  # [n, I]
        y = F.linear(int8_rows(a, block_size), w2[e].float(), None if fc2_bias is None else fc2_bias[e].float())
        out.index_add_(0, token, y * w[token, slot, None])
    return out.to(x.dtype)


@torch.library.impl("moec::ort_gqa", "CompositeExplicitAutograd")
def ort_gqa(query, key, value, past_key, past_value, bias, sinks, num_heads, kv_heads, scale):
    B, S, _ = query.shape
    D = past_key.shape[-1]
    q = query.view(B, S, num_heads, D).transpose(1, 2)  # [B, H, S, D]
    k = torch.cat([past_key, key.view(B, S, kv_heads, D).transpose(1, 2)], dim=2)  # [B, KVH, T, D]
    v = torch.cat([past_value, value.view(B, S, kv_heads, D).transpose(1, 2)], dim=2)
    rep = num_heads // kv_heads
    logits = (q @ k.repeat_interleave(rep, dim=1).transpose(2, 3)).float() * scale + bias.float()  # [B, H, S, T]
    T = k.shape[2]  # ORT's op is causal whatever the bias: query s (position P + s) never reads a key after it
    logits = logits.masked_fill(torch.arange(T, device=q.device) > torch.arange(T - S, T, device=q.device)[:, None],
                                float("-inf"))
    if sinks is not None:
        logits = torch.cat([logits, sinks.float().view(1, -1, 1, 1).expand(B, -1, S, 1)], dim=-1)
    p = logits.softmax(dim=-1)[..., :k.shape[2]].to(v.dtype)
    # a query whose every causal key is masked (a row of padding) gets zeros from ORT's op, not an even spread
    none = (bias.float() <= torch.finfo(torch.float32).min / 2).logical_or(logits[..., :T] == float("-inf")).all(-1)
    p = p.masked_fill(none[..., None], 0)
    out = (p @ v.repeat_interleave(rep, dim=1)).transpose(1, 2).reshape(B, S, num_heads * D)
    return out, k, v


@torch.library.impl("moec::causal_bias", "CompositeExplicitAutograd")
def causal_bias(attention_mask, batch_size, q_length, kv_length, dtype):
    if attention_mask.shape[0] < batch_size or attention_mask.shape[1] != kv_length:
        raise ValueError(f"moec::causal_bias: an attention mask of shape {tuple(attention_mask.shape)} for "
                         f"{batch_size} rows of {kv_length} positions (the past's and the new tokens')")
    pos = torch.arange(kv_length, device=attention_mask.device)
    rows = attention_mask[:batch_size].bool()[:, None, None, :]  # [B, 1, 1, T]
    allowed = (pos <= pos[kv_length - q_length:, None]) & rows  # [S, T] & [B, 1, 1, T]
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=pos.device), torch.finfo(dtype).min)


@torch.library.impl("moec::ort_linear_attention", "CompositeExplicitAutograd")
def ort_linear_attention(query, key, value, past_state, decay, beta, heads, scale, rule):
    """LinearAttention's rules token by token in fp32, with D = exp(decay) per head or per key dim:
    "gated_delta": S = D S; S += k (beta (v - S^T k))^T; "gated": S = D S + k v^T. Then o = scale q^T S."""
    if rule not in ("gated", "gated_delta"):
        raise ValueError(f"moec::ort_linear_attention: rule {rule!r} is not 'gated' or 'gated_delta'")
    B, S = query.shape[:2]
    q, k, v = (t.float().view(B, S, heads, -1) for t in (query, key, value))  # [B, S, H, d]
    decay = decay.float().view(B, S, heads, -1, 1)  # [B, S, H, 1 | dk, 1]
    state = past_state.float()  # [B, H, dk, dv]
    out = []
    for t in range(S):
        state = state * decay[:, t].exp()
        update = v[:, t]  # [B, H, dv]
        if rule == "gated_delta":
            update = (update - (state * k[:, t, ..., None]).sum(-2)) * beta[:, t].float()[..., None]
        state = state + k[:, t, ..., None] * update[..., None, :]
        out.append((state * q[:, t, ..., None]).sum(-2) * scale)
    return torch.stack(out, 1).reshape(B, S, -1).to(value.dtype), state.to(past_state.dtype)


# ---------------------------------------------------------------- ONNX translation

# outputs onnxscript gives a node (it makes one per schema output): GroupQueryAttention's 4th, output_qk, is
# rejected unless the node asks for it
_OUTPUTS = {"GroupQueryAttention": 3}


def register_ort_schemas(ops) -> None:
    """Register ORT's own schemas of (domain, op) pairs onnx does not know (its contrib ops, e.g. MoE, or
    SimplifiedLayerNormalization in the default domain) with onnx, so that onnxscript can build the nodes and
    onnx.checker can check them."""
    import onnx
    from onnx.defs import OpSchema
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    def param(p):
        return OpSchema.FormalParameter(p.name, p.typeStr,
                                        param_option=getattr(OpSchema.FormalParameterOption, p.option.name))

    for domain, name in ops:
        if onnx.defs.has(name, domain):
            continue
        src = next(s for s in ort_c.get_all_operator_schema() if s.name == name and s.domain == domain)
        register_once(OpSchema(
            name, domain, src.since_version, src.doc,
            inputs=[param(p) for p in src.inputs], outputs=[param(p) for p in src.outputs[:_OUTPUTS.get(name)]],
            type_constraints=[(c.type_param_str, list(c.allowed_type_strs), "") for c in src.type_constraints],
            attributes=[OpSchema.Attribute(a.name, getattr(OpSchema.AttrType, a.type.name), a.description,
                                           required=a.required) for a in src.attributes.values()]))


def ort_type_errors(graph) -> list[str]:
    """Nodes of ORT's own ops (contrib domain, or ops onnx does not know) in an onnx_ir graph whose inputs/outputs
    bound to one type parameter of ORT's schema have different element types (ORT refuses to load such a file;
    onnx.checker does not see it)."""
    import onnx
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    schemas = {(s.domain, s.name): s for s in ort_c.get_all_operator_schema()}
    errors = []
    for node in graph:
        if node.domain != CONTRIB and onnx.defs.has(node.op_type, node.domain):
            continue
        schema, bound = schemas.get((node.domain, node.op_type)), {}
        pairs = [*zip(schema.inputs, node.inputs), *zip(schema.outputs, node.outputs)] if schema else []
        for formal, value in pairs:
            if value is None or value.dtype is None:
                continue
            if bound.setdefault(formal.typeStr, value.dtype) != value.dtype:
                errors.append(f"{node.op_type} {node.name}: {formal.name} is {value.dtype}, "
                              f"{formal.typeStr} is {bound[formal.typeStr]}")
    return errors


@functools.cache
def translations() -> dict:
    """torch op -> ONNX translation, for torch.onnx.export(custom_translation_table=...), with ORT's schemas of
    com.microsoft::MoE / QMoE / GroupQueryAttention / LinearAttention and moec's ops registered with onnx."""
    import onnx
    import onnxscript

    register_ort_schemas((CONTRIB, name) for name in ("MoE", "QMoE", "GroupQueryAttention", "LinearAttention"))
    msft = onnxscript.values.Opset(CONTRIB, 1)
    op = onnxscript.opset18

    def moe(x, router_probs, fc1, fc1_bias, fc2, fc2_bias, k: int, activation: str, gated: bool, alpha: float,
            limit: float):
        return msft.MoE(x, router_probs, fc1, fc1_bias, fc2, fc2_bias, k=k, normalize_routing_weights=1,
                        **ort_activation(activation, gated, alpha, limit))

    def qmoe(x, router_probs, fc1, fc1_scales, fc1_bias, fc2, fc2_scales, fc2_bias, fc1_zero_points,
             fc2_zero_points, bits: int, block_size: int, int8_activations: bool, k: int, activation: str,
             gated: bool, alpha: float, limit: float):
        blocks = dict(block_size=block_size) if block_size else {}  # int8: per output channel
        level = dict(accuracy_level=4) if int8_activations else {}
        return msft.QMoE(x, router_probs, fc1, fc1_scales, fc1_bias, fc2, fc2_scales, fc2_bias, None, None, None,
                         fc1_zero_points, fc2_zero_points, k=k, normalize_routing_weights=1, expert_weight_bits=bits,
                         weights_prepacked=0, **blocks, **level, **ort_activation(activation, gated, alpha, limit))

    def gqa(query, key, value, past_key, past_value, bias, sinks, num_heads: int, kv_heads: int, scale: float):
        # every row holds past + new positions (padding is in the bias): seqlens_k = T - 1, T = bias.shape[3]
        total = op.Shape(bias, start=3, end=4)  # [1] int64
        seqlens = op.Cast(op.Expand(op.Sub(total, op.Constant(value_ints=[1])), op.Shape(query, start=0, end=1)),
                          to=onnx.TensorProto.INT32)  # [B]
        return msft.GroupQueryAttention(
            query, key, value, past_key, past_value, seqlens, op.Cast(op.Squeeze(total), to=onnx.TensorProto.INT32),
            None, None, None, bias, sinks, num_heads=num_heads, kv_num_heads=kv_heads, scale=scale)

    def causal_bias(attention_mask, batch_size, q_length, kv_length, dtype):
        # one node, which moec::CachedAttention takes as its mask or export_onnx expands (backends/ort_mask.py)
        return moec_ops.CausalBias(attention_mask, batch_size, q_length, kv_length, to=int(dtype))

    def linear_attention(query, key, value, past_state, decay, beta, heads: int, scale: float, rule: str):
        return msft.LinearAttention(query, key, value, past_state, decay, beta, q_num_heads=heads,
                                    kv_num_heads=heads, update_rule=rule, scale=scale)

    def int4_experts(x, ids, weights, q13, s13, z13, b13, q2, s2, z2, b2, activation: str, gated: bool,
                     alpha: float, limit: float, weight_on_input: bool, gate_up: str, int8_activations: bool = False):
        # only the blocks lower_onnx left for moec's kernels (gated SiLU, no biases) reach the export as this op
        inputs, attrs = ort_kernels.node_args(x, ids, weights, q13, s13, z13, q2, s2, z2, int8_activations, gate_up)
        return moec_ops.Int4Experts(*inputs, **attrs)

    def fp32_experts(x, ids, weights, w13, b13, w2, b2, activation: str, gated: bool, alpha: float, limit: float,
                     weight_on_input: bool, gate_up: str):
        # likewise fp32 (lower_onnx); the weights as the block holds them, laid out in panels after the export
        # (ort_layouts.panel_weights)
        return moec_ops.Experts(x, ids, weights, w13, w2, gate_up=ort_kernels.GATE_UP[gate_up])

    def int8_experts(x, ids, weights, q13, s13, b13, q2, s2, b2, activation: str, gated: bool, alpha: float,
                     limit: float, weight_on_input: bool, gate_up: str, int8_activations: bool = False):
        # int8 (lower_onnx), likewise laid out after the export (int8 activations: panels_a8)
        return moec_ops.ExpertsInt8(x, ids, weights, q13, q2, s13, s2, gate_up=ort_kernels.GATE_UP[gate_up],
                                    int8_activations=int(int8_activations))

    ort_kernels.register_schema()
    ort_mask.register_schema()
    moec_ops = onnxscript.values.Opset(ort_kernels.DOMAIN, 1)
    return {torch.ops.moec.ort_moe.default: moe, torch.ops.moec.ort_qmoe.default: qmoe,
            torch.ops.moec.experts_int4.default: int4_experts, torch.ops.moec.experts.default: fp32_experts,
            torch.ops.moec.experts_int8.default: int8_experts,
            torch.ops.moec.ort_gqa.default: gqa, torch.ops.moec.causal_bias.default: causal_bias,
            torch.ops.moec.ort_linear_attention.default: linear_attention}
