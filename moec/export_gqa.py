"""KV-cache export of an HF decoder LM with its attention as com.microsoft::GroupQueryAttention.

moec.export_onnx(kv_cache=True, attention="gqa") traces the model with an attention function of its own
(registered with transformers' AttentionInterface) and a cache that hands each layer's new keys/values to it
instead of concatenating them:

    q [B,H,S,D], k, v [B,KVH,S,D] (new, rotated) ; past_k, past_v [B,KVH,P,D] ; mask [B,1,S,P+S] additive (HF's,
    causal + padding + sliding window) ; sinks [H] (GPT-OSS's s_aux)
      -> moec::ort_gqa(q [B,S,H*D], k, v [B,S,KVH*D], past_k, past_v, mask, sinks, H, KVH, scaling)
      -> out [B,S,H,D], present_k, present_v [B,KVH,P+S,D]

HF's plain causal mask over the padding mask is made by moec::causal_bias (`mask`): one node in the export, which
moec::CachedAttention reads as the 2-D mask (backends/ort_mask.py), where torch.onnx traced ~33 small ones.
One ORT node per layer replaces ~20 small ones (repeat_kv, matmuls, softmax, sinks, concat). Each
layer is proved before the trace: the model runs once on the example with real tensors, and a layer whose fused
attention differs from what the model ran (its family's `eager_attention_forward`, or transformers' sdpa; any
other implementation is not fused), or whose call the op cannot express (head sizes of q/k and v differ, softcap,
an argument it does not know), keeps that eager attention, with the reason.

MLA (DeepSeek-V2/V3) caches latents and expands them after the update; its attention is fused in the absorbed
form (one kv head over the latents, see _latent), all layers or none. A model whose attention neither takes the
cache's keys as they came nor expands its latents so, has no eager_attention_forward, or fails a proof is refused
as a whole (GQAUnfit): export_onnx then traces its attention as ordinary ops.

ORT's kernel refuses one input pattern: several new tokens after a past with batch > 1 (it says so, it is
never wrong); backend="onnxruntime" runs such a call row by row.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, eager_mask

from moec import export_state

NAME = "moec_gqa"
# arguments HF modules pass to their attention function that the fused op accounts for, or that change nothing
# (with output_* flags: what the model returns)
_KNOWN = {"sliding_window", "s_aux", "position_ids", "cache_position", "use_cache", "return_dict"}
# max |fused - eager| / max |eager| of a layer's attention on the example, per dtype
CHECK_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


class GQAUnfit(Exception):
    """The model's attention cannot be traced through the fused op at all (export_onnx traces ordinary ops)."""


class _Run:
    """One forward of the export wrapper: each layer's past, the new keys/values the cache handed out, and the
    presents and decisions of the attention function. `check`: real tensors, decide per layer; else trace."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], check: bool, why: dict[int, str | None],
                 reference: str):
        self.past, self.check, self.why, self.reference = past, check, why, reference
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


_RUN: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("moec_gqa_run", default=None)


class _Cache(DynamicCache):
    """The past as HF's DynamicCache holds it (so masks and positions count it), whose update hands the new
    keys/values to the attention function unconcatenated; linear-attention layers hold their states
    (moec.export_state)."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], states: set[int]):
        super().__init__()
        # full layers: a sliding-window layer would count the re-fed past as new tokens
        self.layers = export_state.filled(past, states).layers

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        _RUN.get().new[layer_idx] = (key_states, value_states)
        return key_states, value_states


def _why_not(module, query, key, value, mask, dropout, scaling, kwargs) -> str | None:
    """Why this attention call is not the fused op's computation (None: it is, up to the numeric check)."""
    B, H, S, D = query.shape
    if key.shape[-1] != D or value.shape[-1] != D:
        return f"head sizes differ (q/k {D}, k {key.shape[-1]}, v {value.shape[-1]})"
    if H % key.shape[1]:
        return f"{H} query heads do not share {key.shape[1]} kv heads evenly"
    if dropout and module.training:
        return "attention dropout in training mode"
    if scaling is None:
        return "no scaling given"
    T = key.shape[2] + _RUN.get().past[module.layer_idx][0].shape[2]
    if (mask is None or mask.dim() != 4 or mask.shape[0] not in (1, B) or tuple(mask.shape[1:]) != (1, S, T)
            or not mask.is_floating_point()):
        return f"no additive [B, 1, S, {T}] mask"
    other = sorted(k for k, v in kwargs.items() if v is not None and k not in _KNOWN and not k.startswith("output_"))
    if other:
        return f"attention takes {', '.join(other)}"
    sinks = kwargs.get("s_aux")
    if sinks is not None and tuple(sinks.shape) != (H,):
        return f"sinks of shape {tuple(sinks.shape)}, not one per head"
    return None


def _eager(module, reference: str):
    """The attention function the model ran: what each layer is proved against and falls back on."""
    if reference == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:  # nothing to prove the fused op against, nor to fall back on
        raise GQAUnfit(f"{type(module).__name__}'s module has no eager_attention_forward")
    return eager


def _proved(run: _Run, i: int, module, mask, out, want) -> None:
    """The proof of layer i on the example: its fused output [B,S,H,D] against what the model computes, on rows
    with a key to attend to (a fully masked row is padding); run.why[i] says why not when they differ."""
    rows = (mask > torch.finfo(mask.dtype).min / 2).any(-1)[:, 0].expand(*want.shape[:2])
    err = _rel(out[rows], want[rows])
    if not err <= CHECK_TOL.get(want.dtype, 1e-5):  # NaN too
        run.why[i] = f"fused attention differs from {type(module).__name__}'s by {err:.1e}"


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: query [B,H,S,D], key/value [B,KVH,S,D] -> ([B,S,H,D], None)."""
    run, i = _RUN.get(), getattr(module, "layer_idx", None)
    if run is None or i not in run.new:
        raise GQAUnfit(f"{type(module).__name__} (layer {i}) attends without updating the cache first")
    eager = _eager(module, run.reference)
    if run.new[i][0] is not key or run.new[i][1] is not value:
        return _latent(module, run, i, eager, query, key, value, attention_mask, dropout, scaling, kwargs)
    past_k, past_v = run.past[i]
    if run.check:
        run.why[i] = _why_not(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    B, H, S, D = query.shape
    if run.why[i] is None:
        out, k, v = torch.ops.moec.ort_gqa(
            query.transpose(1, 2).reshape(B, S, H * D), key.transpose(1, 2).reshape(B, S, -1),
            value.transpose(1, 2).reshape(B, S, -1), past_k, past_v, attention_mask, kwargs.get("s_aux"), H,
            key.shape[1], float(scaling))
        out = out.view(B, S, H, D)
    if run.check or run.why[i] is not None:
        k, v = torch.cat([past_k, key], dim=2), torch.cat([past_v, value], dim=2)
        want = eager(module, query, k, v, attention_mask, dropout=dropout, scaling=scaling, **kwargs)[0]
        if run.why[i] is None:
            _proved(run, i, module, attention_mask, out, want)
        if run.why[i] is not None:
            out = want
    run.present[i] = (k, v)
    return out, None


def _latent(module, run: _Run, i: int, eager, query, key, value, mask, dropout, scaling, kwargs):
    """MLA (DeepSeek-V2/V3): the cache holds a latent c [B,1,T,R] and a rotated key r [B,1,T,Dr] per token, and
    the model attends over their expansion by one bias-free linear W [H*(Dn+Dv), R] (kv_b_proj):
        key_h = [c W_k,h^T | r]   [B,H,T,Dn+Dr]        value_h = c W_v,h^T   [B,H,T,Dv]
    which is attention of one kv head over the latents themselves ("absorbed"):
        q'_h = [q_nope,h W_k,h | q_rot,h]   [B,H,S,R+Dr] ;  keys = values = [c | r]   [B,1,T,R+Dr]
        out_h = (GroupQueryAttention(q', keys, values)[..., :R]) W_v,h^T   [B,S,H,Dv]
    so each decode step reads the latents once instead of expanding all T of them (a long prompt pays instead:
    its attention runs at width R+Dr, not Dn+Dr). On the example (run.check) the model's keys/values must be the
    new latents so expanded, and the layer's output must equal eager attention over the expanded past + new;
    else GQAUnfit (the export traces MLA's own ops)."""
    c, r = run.new[i]
    B, H, S, Dk = query.shape
    R, Dr, Dv = c.shape[-1], r.shape[-1], value.shape[-1]
    Dn = Dk - Dr
    where = f"{type(module).__name__} (layer {i})"
    if c.dim() != 4 or r.dim() != 4 or c.shape[1] != 1 or r.shape[1] != 1 or Dn <= 0 or tuple(key.shape) != (
            B, H, S, Dk):
        raise GQAUnfit(f"{where} does not attend over the cache's keys as they came")
    linears = [m for m in module.children() if isinstance(m, torch.nn.Linear) and m.bias is None
               and tuple(m.weight.shape) == (H * (Dn + Dv), R)]
    if len(linears) != 1:  # none: not MLA; several (e.g. q_b_proj of the same shape): which one is not proved
        raise GQAUnfit(f"{where} attends over keys that are not the cache's, and {len(linears)} bias-free linears "
                       f"[{H * (Dn + Dv)}, {R}] could expand its latents, not one")
    w = linears[0].weight.view(H, Dn + Dv, R)
    w_k, w_v = w[:, :Dn], w[:, Dn:]  # [H, Dn, R], [H, Dv, R]

    def expand(c, r):  # latents [B,1,T,R], [B,1,T,Dr] -> keys [B,H,T,Dn+Dr], values [B,H,T,Dv]
        return torch.cat([c @ w_k.transpose(1, 2), r.expand(-1, H, -1, -1)], -1), c @ w_v.transpose(1, 2)

    past_c, past_r = run.past[i]
    q = torch.cat([query[..., :Dn] @ w_k, query[..., Dn:]], -1)  # [B, H, S, R+Dr]
    keys, past = torch.cat([c, r], -1), torch.cat([past_c, past_r], -1)  # [B, 1, S|P, R+Dr]
    if run.check:
        new_k, new_v = expand(c, r)
        tol = CHECK_TOL.get(query.dtype, 1e-5)
        if not (_rel(key, new_k) <= tol and _rel(value, new_v) <= tol):  # NaN too
            raise GQAUnfit(f"{where} attends over keys that are not its cached latents expanded per head")
        run.why[i] = _why_not(module, q, keys, keys, mask, dropout, scaling, kwargs)
        if run.why[i] is not None:
            raise GQAUnfit(f"{where}, absorbed: {run.why[i]}")
    flat = keys.transpose(1, 2).reshape(B, S, -1)  # [B, S, R+Dr]: the keys are the values too
    out, both, _ = torch.ops.moec.ort_gqa(q.transpose(1, 2).reshape(B, S, -1), flat, flat, past, past, mask, None,
                                          H, 1, float(scaling))
    out = (out.view(B, S, H, R + Dr)[..., :R].transpose(1, 2) @ w_v.transpose(1, 2)).transpose(1, 2)  # [B,S,H,Dv]
    if run.check:
        past_k, past_v = expand(past_c, past_r)
        want = eager(module, query, torch.cat([past_k, key], 2), torch.cat([past_v, value], 2), mask,
                     dropout=dropout, scaling=scaling, **kwargs)[0]
        _proved(run, i, module, mask, out, want)
        if run.why[i] is not None:
            raise GQAUnfit(f"{where}, absorbed: {run.why[i]}")
    run.present[i] = (both[..., :R], both[..., R:])
    return out, None


def mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
         attention_mask=None, dtype=torch.float32, use_vmap=False, **kwargs):
    """transformers' mask-function signature: HF's eager mask [B, 1, S, T] (additive: the op's bias). Where it is
    HF's plain causal mask over a 2-D padding mask, the queries the last S of the T positions, it is made by
    moec::causal_bias (one node in the export, which moec::CachedAttention reads as its mask: backends/ort_mask.py)
    and, on the example, checked equal to HF's."""
    plain = (mask_function is causal_mask_function and not use_vmap and kv_offset == 0
             and isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool
             and tuple(attention_mask.shape) == (batch_size, kv_length) and q_offset == kv_length - q_length)
    def hf(padding):
        return eager_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, padding, dtype,
                          use_vmap=use_vmap, **kwargs)

    if not plain:
        return hf(attention_mask)
    run = _RUN.get()
    if run is None or run.check:  # the example's mask, and with padding: left (row 0), a hole (the last row)
        padded = attention_mask.clone()
        padded[0, :kv_length // 2] = False
        padded[-1, kv_length // 3] = False
        for padding in (attention_mask, padded):
            if not torch.equal(torch.ops.moec.causal_bias(padding, batch_size, q_length, kv_length, dtype),
                               hf(padding)):
                raise GQAUnfit("moec::causal_bias differs from HF's causal mask on the example")
    return torch.ops.moec.causal_bias(attention_mask, batch_size, q_length, kv_length, dtype)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|"""
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@contextlib.contextmanager
def fused(past: list[tuple[torch.Tensor, torch.Tensor]], check: bool, why: dict[int, str | None], reference: str,
          states: set[int] = frozenset()):
    """A forward of a model switched by `use` from attention implementation `reference` ("eager" or "sdpa": what
    each layer is proved against and falls back on), with the past in a _Cache (`states`: the linear-attention
    layers, whose pairs are their states): yields (cache, run)."""
    run = _Run(past, check, why, reference)
    token = _RUN.set(run)
    try:
        yield _Cache(past, states), run
    finally:
        _RUN.reset(token)


def use(model) -> str:
    """Switch `model` (a copy being exported) to the fused attention function; returns the one it had. Only from
    transformers' eager or sdpa attention: another implementation (the user's own, flex, flash) computes what moec
    does not prove against, and is exported as it is."""
    was = model.config._attn_implementation
    if was not in ("eager", "sdpa"):
        raise GQAUnfit(f"the model runs attention implementation {was!r}; moec fuses only transformers' eager or "
                       f"sdpa attention")
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, mask)  # additive float masks: the op's bias
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        raise GQAUnfit(f"{type(model).__name__} does not take an attention function from transformers' "
                       f"AttentionInterface")
    return was


def summary(why: dict[int, str | None] | str) -> str:
    """The export report's line on attention: fused layers, and why the others are not."""
    if isinstance(why, str):
        return f"ordinary ONNX ops: {why}"
    fused_layers = [i for i, w in sorted(why.items()) if w is None]
    text = f"com.microsoft::GroupQueryAttention in {len(fused_layers)}/{len(why)} layers"
    reasons = {}
    for i, w in sorted(why.items()):
        if w is not None:
            reasons.setdefault(w, []).append(str(i))
    return text + "".join(f"; layers {', '.join(ls)} in ordinary ops: {w}" for w, ls in reasons.items())
