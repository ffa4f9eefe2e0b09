"""moec as a transformers experts implementation:

    import moec.hf                                  # registers "moec" (not done by `import moec`: it would
    model.set_experts_implementation("moec")        #   import transformers, 2.4 s)
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moec")

transformers' experts modules (the families that use `use_experts_implementation`: Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V3, GPT-OSS, ...) then call `experts_forward`, which runs moec's experts op (the torch backend's
kernels) on the module's own weights, read in place at each call:

    y = moec.experts(x [T, H], top_k_index [T, k], top_k_weights [T, k], W13 [E, N1, H], b13?, W2 [E, H, I], b2?)

Proved first: at the module's first call, moec's op is compared with the module's own (eager) forward on
that call's inputs and on tokens routed to every expert, for each form of expert moec knows (activation x
gate/up row order); the form that equals it is kept. A module no form matches (an expert moec does not
know) keeps running its own forward, with a warning saying why. The module's own forward also runs in
training mode and when gradients are needed (moec's op computes none).
"""

from __future__ import annotations

import itertools
import warnings

import torch
from torch import nn

from moec.ir import GATE_UPS
from moec.passes.detect.proof import TOL, rel_err

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")


def register() -> None:
    """Add "moec" to transformers' experts implementations (a no-op without transformers)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return
    ALL_EXPERTS_FUNCTIONS.register("moec", experts_forward)


def _weights(m: nn.Module):
    """(W13 [E, N1, H], b13, W2 [E, H, I], b2) as views of the module's tensors, or None if it has another layout."""
    w13 = getattr(m, "gate_up_proj", None) if getattr(m, "has_gate", True) else getattr(m, "up_proj", None)
    w2 = getattr(m, "down_proj", None)
    if not isinstance(w13, torch.Tensor) or not isinstance(w2, torch.Tensor) or w13.dim() != 3:
        return None
    if getattr(m, "is_transposed", False):  # stored [E, H, N1] and [E, I, H]
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    bias = getattr(m, "has_bias", False)
    b13 = getattr(m, "gate_up_proj_bias" if getattr(m, "has_gate", True) else "up_proj_bias", None) if bias else None
    return w13, b13, w2, getattr(m, "down_proj_bias", None) if bias else None


def _run(m: nn.Module, form: tuple, x, ids, w):
    w13, b13, w2, b2 = _weights(m)
    activation, gate_up = form
    gated = getattr(m, "has_gate", True)
    return torch.ops.moec.experts(x, ids, w.to(torch.float32), w13, b13, w2, b2, activation, gated,
                                  float(getattr(m, "alpha", 1.702)), float(getattr(m, "limit", 7.0)), False,
                                  gate_up).to(x.dtype)


def _prove(m: nn.Module, eager, x, ids, w) -> tuple | str:
    """The form (activation, gate_up) whose moec op equals the module's forward, or why none does."""
    if getattr(m, "has_post_expert_norm", False):
        return "its experts apply a norm after each expert"
    if _weights(m) is None:
        return "its expert weights are not gate_up_proj/up_proj and down_proj of [E, ...] tensors"
    E, k = _weights(m)[0].shape[0], ids.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(5)
    T = -(-E // k)  # every expert reached
    xs = [x, torch.randn(T, x.shape[1], generator=gen).to(x) * 3]
    idss = [ids, (torch.arange(T * k) % E).reshape(T, k).to(ids)]
    ws = [w, torch.rand(T, k, generator=gen).to(w)]
    with torch.no_grad():
        refs = [eager(m, a, b, c) for a, b, c in zip(xs, idss, ws)]
        gated = getattr(m, "has_gate", True)
        for form in itertools.product(ACTIVATIONS if gated else ACTIVATIONS[:4], GATE_UPS if gated else GATE_UPS[:1]):
            try:
                ok = all(rel_err(_run(m, form, a, b, c), r) <= TOL.get(x.dtype, 1e-4)
                         for a, b, c, r in zip(xs, idss, ws, refs))
            except (RuntimeError, ValueError):
                continue
            if ok:
                return form
    return "moec's experts op equals its forward in no form moec knows (activation, gate/up order)"


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' ExpertsInterface entry "moec" (see the module docstring)."""
    eager = type(self).forward.__wrapped__  # the module's own forward, under use_experts_implementation
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden_states, top_k_weights, *self.parameters()))
    if self.training or needs_grad or hidden_states.numel() == 0:
        return eager(self, hidden_states, top_k_index, top_k_weights)
    form = self.__dict__.get("_moec_form")
    if form is None:
        form = self.__dict__["_moec_form"] = _prove(self, eager, hidden_states, top_k_index, top_k_weights)
        if isinstance(form, str):
            warnings.warn(f"moec: {type(self).__name__} keeps its own forward ({form})", stacklevel=2)
    if isinstance(form, str):
        return eager(self, hidden_states, top_k_index, top_k_weights)
    return _run(self, form, hidden_states, top_k_index, top_k_weights)


register()
