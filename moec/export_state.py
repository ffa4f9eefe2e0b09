"""KV-cache export of hybrid decoder LMs: linear-attention and Mamba layers exported with their states.

A gated-delta-net layer (Qwen3-Next's linear attention) or a Mamba layer (Jamba) caches no keys and values but two
states, which moec.export_onnx(kv_cache=True) takes and returns beside the other layers' key/value pairs, as HF's
LinearAttentionLayer holds them:

    past_key_values.{i}.conv_state [B, C, K]  (the last K inputs of the short convolution)
    past_key_values.{i}.recurrent_state [B, Hv, dk, dv] (gated delta net) | [B, I, N] (Mamba's SSM state)
      ->  present.{i}.conv_state, present.{i}.recurrent_state

The convolution over past + new columns traces as ordinary ops (Concat, depthwise Conv, SiLU) for any number of
new tokens. The recurrence does not: transformers runs a prompt through a scan (Qwen3-Next: a Python loop over
chunks of 64 tokens; Mamba: over tokens, from a zero state) and a step through another function, chosen in Python,
which one traced graph cannot hold. While the model is traced, each layer's scan runs as one
moec::ort_linear_attention, exported as com.microsoft::LinearAttention:

    gated delta rule (_gated_delta): q, k [B,S,Hk,dk] l2-normalized, heads repeated to Hv ; v [B,S,Hv,dv] ;
      g, beta [B,S,Hv] ; state [B,Hv,dk,dv]  -> rule "gated_delta", scale 1/sqrt(dk) -> out [B,S,Hv,dv], state
    selective scan (_selective_scan): a head per channel, the SSM state as the key dim, a value dim of 1
      -> rule "gated" with a decay per key dim, scale 1 -> y [B,I,S], state [B,I,N]

Each layer is proved first: the model runs once on the example with real tensors, and each layer's output and new
state are compared with what transformers' own functions compute (the scan from the past state against its decode
step token by token, and from a zero state against its prompt scan). A layer whose state another computation
updates, or whose scan differs, refuses the cached export with the reason.

Padding (attention mask 0 among the new tokens) leaves a row's state as it was: the recurrence neither decays nor
updates on a pad, and the convolution keeps the K columns up to the row's last real token. Under left padding (HF's
generate) the pads precede a zero state, which transformers leaves at zero too; a row padded on the right and
continued after its pads (onnxruntime-genai's batches) steps as if it ran alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin, LinearAttentionLayer

# arguments that pack several sequences in one row (the substitute runs each row as one sequence); the model's
# other keyword arguments reach the rule and change nothing in it
_PACKED = ("cu_seqlens", "seq_idx")
# max |substitute - transformers| / max |transformers| of a layer's output and state on the example, per model
# dtype (transformers rounds Mamba's state and output to an fp16 model's dtype; moec's substitute keeps fp32)
CHECK_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


class StateUnfit(Exception):
    """A layer's recurrent state cannot be exported through moec's substitute (the message says why)."""


class _Run:
    """One forward of the export wrapper: `check` (real tensors: prove each layer) or trace; the state the
    substitute returned last, and each state layer's proof (None: proved)."""

    def __init__(self, check: bool, mask: torch.Tensor | None, why: dict[int, str | None]):
        self.check, self.mask, self.why = check, mask, why  # mask [B, S]: the new columns' attention mask
        self.proofs: list[str | None] = []  # each substitute call's proof, in call order (check)
        self.last: tuple[torch.Tensor, str | None] | None = None  # (state out, why not) of the last rule call
        self.current: StateLayer | None = None  # the layer whose convolution ran last: the one now running


_RUN: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("moec_state_run", default=None)


class StateLayer(LinearAttentionLayer):
    """HF's LinearAttentionLayer holding a given past; its updates assign the new states instead of copying them
    into the past's storage (the exported graph then returns them rather than mutating its inputs)."""

    def __init__(self, layer_idx: int, conv: torch.Tensor, recurrent: torch.Tensor):
        super().__init__()
        self.layer_idx = layer_idx
        hold(self, conv, recurrent)

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        # [B, C, K] + [B, C, S] -> [B, C, K+S]: the convolution's left context and the new columns
        full = torch.cat([self.conv_states[state_idx], conv_states.to(self.dtype)], dim=-1)
        K, mask = self.conv_kernel_size[state_idx], _RUN.get().mask
        # keeps the K columns up to the row's last real token: the last K under left padding, HF's; a row padded on
        # the right keeps its own tokens' columns, as if it ran alone
        S = mask.shape[1]
        last = torch.where(mask.bool(), torch.arange(1, S + 1, device=mask.device), 0).amax(-1)  # [B]
        cols = (last[:, None] + torch.arange(K, device=mask.device))[:, None, :]  # [B, 1, K]
        self.conv_states[state_idx] = full.gather(2, cols.expand(full.shape[0], full.shape[1], K))
        _RUN.get().current = self  # Mamba's scan, next, finds its past state here
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        run = _RUN.get()
        if run.check:
            last, why = run.last or (None, None)
            if last is not recurrent_states:
                why = ("its recurrent state is not computed by a function moec substitutes (transformers' gated delta "
                       "rule, Mamba's selective scan)")
            run.why[self.layer_idx] = why
        run.last = None
        self.recurrent_states[state_idx] = recurrent_states
        return recurrent_states


def hold(layer: LinearAttentionCacheLayerMixin, conv: torch.Tensor, recurrent: torch.Tensor) -> None:
    """Make an HF linear-attention cache layer hold these states, as after a forward."""
    layer.dtype, layer.device = conv.dtype, conv.device
    layer.conv_states[0], layer.recurrent_states[0] = conv, recurrent
    layer.conv_kernel_size[0] = conv.shape[-1]
    layer.is_conv_states_initialized[0] = layer.is_recurrent_states_initialized[0] = True
    layer.has_previous_state[0] = True


def substitutable(model: torch.nn.Module) -> bool:
    """Whether some module of `model` comes from a modeling file with a function the export substitutes
    (transformers' gated delta rule, Mamba's selective scan; each layer is still proved when exported)."""
    return any(callable(getattr(sys.modules.get(type(m).__module__), name, None))
               for m in model.modules() for name in _SUBSTITUTES)


def layout(cache) -> dict[int, tuple[tuple[int, ...], tuple[int, ...], tuple[torch.dtype, torch.dtype]]]:
    """layer -> (conv_state shape [C, K], recurrent_state shape [H, dk, dv], their dtypes) of the linear-attention
    layers of a cache HF filled (transformers keeps the recurrent state in fp32 under an fp16 model); raises
    StateUnfit for a layer holding more than one state of each."""
    found = {}
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, LinearAttentionCacheLayerMixin):
            continue
        if layer.number_of_states != 1 or layer.conv_states[0] is None or layer.recurrent_states[0] is None:
            raise StateUnfit(f"layer {i} ({type(layer).__name__}) holds {layer.number_of_states} conv/recurrent "
                             f"states, not one of each")
        conv, rec = layer.conv_states[0], layer.recurrent_states[0]
        found[i] = (tuple(conv.shape[1:]), tuple(rec.shape[1:]), (conv.dtype, rec.dtype))
    return found


def filled(pairs: list[tuple[torch.Tensor, torch.Tensor]], states: set[int]):
    """A DynamicCache holding the past: a StateLayer (conv, recurrent) for each layer in `states`, a full
    DynamicLayer (keys, values) for the others."""
    from transformers import DynamicCache

    cache = DynamicCache()
    layers = []
    for i, (a, b) in enumerate(pairs):
        if i in states:
            layers.append(StateLayer(i, a, b))
        else:
            layers.append(DynamicLayer())
            layers[-1].lazy_initialization(a, b)
            layers[-1].keys, layers[-1].values = a, b  # the past itself (update would cat it to an empty tensor)
    cache.layers = layers
    return cache


def present(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """What a cache layer holds: (keys, values) or (conv_state, recurrent_state)."""
    if isinstance(layer, LinearAttentionCacheLayerMixin):
        return layer.conv_states[0], layer.recurrent_states[0]
    return layer.keys, layer.values


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def _gated_delta(original):
    """transformers' gated delta rule (prompt or step form) as moec::ort_linear_attention, proved on real tensors
    against `original`."""

    def rule(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
             use_qk_l2norm_in_kernel=False, **kwargs):
        run = _RUN.get()
        extra = sorted(k for k in _PACKED if kwargs.get(k) is not None)
        B, S, Hk, dk = query.shape
        Hv, dv = value.shape[2:]
        why = (f"sequences packed in one row ({', '.join(extra)})" if extra else
               f"{Hv} value heads do not share {Hk} key heads evenly" if Hv % Hk else None)
        if why is not None:
            raise StateUnfit(why)
        q, k = query.float(), key.float()
        if use_qk_l2norm_in_kernel:
            q, k = _l2norm(q), _l2norm(k)
        q, k = (t.repeat_interleave(Hv // Hk, dim=2).reshape(B, S, Hv * dk) for t in (q, k))  # [B, S, Hv*dk]
        real = _real(run, 3)  # [B, S, 1]: a pad neither decays nor updates the state
        past = value.new_zeros(B, Hv, dk, dv, dtype=torch.float32) if initial_state is None else initial_state
        out, state = torch.ops.moec.ort_linear_attention(
            q, k, value.float().reshape(B, S, Hv * dv), past.float(), g.float() * real, beta.float() * real,
            Hv, dk ** -0.5, "gated_delta")
        out = out.view(B, S, Hv, dv).to(query.dtype)  # [B, S, Hv*dv] -> [B, S, Hv, dv]
        if run.check:
            want, want_state = original(query, key, value, g=g, beta=beta, initial_state=initial_state,
                                        output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
            why = _differs("gated delta rule", (out, state), (want, want_state), query.dtype)
            run.proofs.append(why)
        run.last = (state, why)
        return out, state if output_final_state else None

    return rule


def _selective_scan(original, step):
    """Mamba's selective scan (transformers' `mamba_selective_scan`, which starts from a zero state) from the
    layer's past state, as moec::ort_linear_attention's "gated" rule: a head per channel c, the SSM state as the key
    dim n, a value dim of 1:

        u, dt, z [B,I,S] ; A [I,N] ; B, C [B,N,S] ; state [B,I,N]
        decay[c,n] = A[c,n] dt[c] ; k[c,n] = dt[c] B[n] ; v[c] = u[c] ; q[c,n] = C[n] ; scale 1
        y = out + u D, times silu(z) -> [B,I,S], state

    Proved on real tensors against transformers' own decode step (`step`, mamba_selective_state_update, token by
    token from the past state) and, from a zero state, against `original`."""

    def scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
             return_last_state=False, **kwargs):
        run = _RUN.get()
        layer = run.current  # None without a cache: the scan starts from a zero state, as transformers' does
        batch, I, S = hidden_states.shape
        N = A.shape[-1]
        t = dt if delta_bias is None else dt + delta_bias.to(dt.dtype)[..., None]
        t = (nn.functional.softplus(t) if delta_softplus else t).float().transpose(1, 2)  # [B, S, I]
        real = _real(run, 4)  # [B, S, 1, 1]: a pad neither decays nor updates the state
        decay = (A.float() * t[..., None] * real).reshape(batch, S, I * N)
        k = (t[..., None] * B.float().transpose(1, 2)[:, :, None, :] * real).reshape(batch, S, I * N)
        q = C.float().transpose(1, 2)[:, :, None, :].expand(batch, S, I, N).reshape(batch, S, I * N)
        u = hidden_states.float().transpose(1, 2)  # [B, S, I]
        past = hidden_states.new_zeros(batch, I, N) if layer is None else layer.recurrent_states[0]  # [B, I, N]
        y, state = torch.ops.moec.ort_linear_attention(q, k, u, past.float()[..., None], decay, None, I, 1.0, "gated")
        y = y.transpose(1, 2)  # [B, S, I] -> [B, I, S]
        if D is not None:
            y = y + hidden_states * D[None, :, None]
        if z is not None:
            y = y * nn.functional.silu(z)
        state = state[..., 0].to(past.dtype)  # [B, I, N, 1] -> [B, I, N]
        why = None
        if run.check:
            steps, was = [], past.clone()
            for i in range(S):  # transformers' decode step, token by token, updates `was` in place
                steps.append(step(was, hidden_states[..., i], dt[..., i], A, B[..., i], C[..., i], D, z=z[..., i]
                                  if z is not None else None, dt_bias=delta_bias, dt_softplus=delta_softplus))
            why = _differs("selective scan", (y, state), (torch.stack(steps, -1), was), hidden_states.dtype)
            want = original(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, True)  # a prompt's scan
            run.check, run.current = False, None
            try:
                got = scan(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, True)
            finally:
                run.check, run.current = True, layer
            why = why or _differs("selective scan from a zero state", got, want, hidden_states.dtype)
            run.proofs.append(why)
        run.last = (state, why)
        return (y, state) if return_last_state else y

    return scan


def _real(run: _Run, dims: int) -> torch.Tensor | float:
    """The new tokens' mask [B, S] as floats of `dims` dims (1: not a pad), or 1.0 where no mask is known."""
    return 1.0 if run.mask is None else run.mask.float().view(*run.mask.shape, *([1] * (dims - 2)))


def _differs(what: str, got: tuple, want: tuple, dtype: torch.dtype) -> str | None:
    """Why the substitute's (output, state) is not transformers' (None: within CHECK_TOL of the model's dtype)."""
    tol = CHECK_TOL.get(dtype, 1e-5)
    err = next((e for e in (_rel(a, b) for a, b in zip(got, want)) if not e <= tol), None)  # NaN too
    return None if err is None else f"the substituted {what} differs from transformers' by {err:.1e}"


# transformers' functions (module-level, in the model's modeling file) -> moec's substitute, given the module
_SUBSTITUTES = {
    "torch_chunk_gated_delta_rule": lambda mod: _gated_delta(mod.torch_chunk_gated_delta_rule),
    "torch_recurrent_gated_delta_rule": lambda mod: _gated_delta(mod.torch_recurrent_gated_delta_rule),
    "mamba_selective_scan": lambda mod: _selective_scan(mod.mamba_selective_scan, mod.mamba_selective_state_update),
}


@contextlib.contextmanager
def substituted(model: torch.nn.Module, mask: torch.Tensor, check: bool, why: dict[int, str | None]):
    """While the model runs on new columns with attention mask `mask` [B, S]: transformers' gated delta rules in
    the modeling modules of `model`'s submodules replaced by moec's substitute; yields the run (check: prove each
    layer on real tensors into `why`)."""
    if check:
        why.clear()
    run = _Run(check, mask, why)
    modules = {sys.modules.get(type(m).__module__) for m in model.modules()}
    saved = [(mod, name, getattr(mod, name)) for mod in modules if mod is not None for name in _SUBSTITUTES
             if callable(getattr(mod, name, None))]
    token = _RUN.set(run)
    substitutes = [(mod, name, _SUBSTITUTES[name](mod)) for mod, name, _ in saved]
    for mod, name, substitute in substitutes:
        setattr(mod, name, substitute)
    try:
        yield run
    finally:
        for mod, name, original in saved:
            setattr(mod, name, original)
        _RUN.reset(token)
