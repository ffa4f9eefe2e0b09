"""The canonical graph of a proved MoE block, and how it replaces the block's forward.

`build_graph(block, spec)` traces moec's reference form of the block into an fx
GraphModule whose `get_attr` nodes point at the block's own tensors (no copies):

    x                = hidden_states.reshape(-1, H)                   # [T, H]
    logits           = linear(x, router_weight, router_bias)          # [T, E]
    scores, ids, w   = softmax/sigmoid, group mask, topk, gather ...  # [T, k]
    w                = moec.capacity(ids, w, rows, capacity, E)       # only with expert capacity
    y                = moec.experts_loop(x, ids, w, w13, b13, w2, b2) # [T, H]
    y                = y + shared(x) [* sigmoid(shared_gate(x))]
    y                = y + out_bias                                    # if the block adds one
    return y.reshape(hidden_states.shape), logits, ids, w

fuse_gate and batch_experts then rewrite this graph; `install` makes the block run it.
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx
from torch import nn

from moec.backends.torch_backend import route_math
from moec.ir import MoESpec
from moec.ops import experts_args, route_args


def resolve(module: nn.Module, path: str):
    return functools.reduce(getattr, path.split("."), module) if path else module


class _Reference(nn.Module):
    def __init__(self, block: nn.Module, spec: MoESpec):
        super().__init__()
        self.block, self.spec = block, spec

    def forward(self, hidden_states):
        s, b = self.spec, self.block
        p = {role: resolve(b, path) for role, path in s.params.items()}
        x = hidden_states.reshape(-1, s.experts.hidden)  # [T, H]
        xr = x.to(p["router_weight"].dtype)  # a router kept in fp32 (Switch casts its own on first use)
        logits, ids, w = route_math(xr, p["router_weight"], p.get("router_bias"), p.get("select_bias"),
                                    *route_args(s.router), num_experts=s.experts.num_experts)
        if s.router.capacity:  # pairs past an expert's capacity are dropped (weight 0)
            rows = hidden_states.shape[0] if s.router.capacity_per_row else 1
            w = torch.ops.moec.capacity(ids, w, rows, s.router.capacity, s.experts.num_experts)
        y = torch.ops.moec.experts_loop(x, ids, w, p["w13"], p.get("b13"), p["w2"], p.get("b2"),
                                        *experts_args(s.experts))  # [T, H]
        if s.shared:
            shared = resolve(b, s.shared.module)(x)
            if s.shared.gate:
                shared = shared * torch.sigmoid(resolve(b, s.shared.gate)(x))
            y = y + shared
        if "out_bias" in p:
            y = y + p["out_bias"]
        return y.reshape(hidden_states.shape), logits, ids, w


class _Tracer(fx.Tracer):
    """Keeps the shared experts as single call_module nodes."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m, qualname):
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def build_graph(block: nn.Module, spec: MoESpec, name: str = "moe") -> fx.GraphModule:
    root = _Reference(block, spec)
    leaves = {f"block.{p}" for p in (spec.shared.module, spec.shared.gate) if p} if spec.shared else set()
    graph = _Tracer(leaves).trace(root)
    gm = fx.GraphModule(root, graph, class_name=f"MoE_{name.replace('.', '_')}")
    gm.meta["moe_spec"] = spec
    return gm


class CompiledForward:
    """Replaces `block.forward`: runs the block's final graph and rebuilds the block's own
    return structure. Extra non-None inputs (e.g. a padding mask) go to the original."""

    def __init__(self, gm: fx.GraphModule, outputs: tuple[str, ...], original):
        self.gm, self.outputs, self.original = gm, outputs, original

    def __call__(self, hidden_states, *args, **kwargs):
        if any(a is not None for a in args) or any(v is not None for v in kwargs.values()):
            if self.gm.meta["moe_spec"].quant is not None:
                raise NotImplementedError(
                    f"moec: block {self.gm.meta['candidate'].path!r} runs quantized experts and its original "
                    f"expert weights were released, so its original forward (taken for extra inputs such as a "
                    f"padding mask: {len(args)} positional, {sorted(kwargs)}) cannot run")
            return self.original(hidden_states, *args, **kwargs)
        out, logits, ids, weights = self.gm(hidden_states)
        if self.outputs == ("out",):
            return out
        leaves = {"out": out, "out_flat": out.reshape(-1, out.shape[-1]), "logits": logits,
                  "logits_bse": logits.reshape(*hidden_states.shape[:-1], -1), "ids": ids, "weights": weights,
                  "none": None}
        return tuple(leaves[o] for o in self.outputs)


def install(block: nn.Module, gm: fx.GraphModule) -> None:
    """Make `block` run `gm`; its parameters, state_dict and class stay as they were."""
    original = block.__dict__.get("_moec_original_forward", block.forward)
    block.__dict__["_moec_original_forward"] = original
    block.__dict__["_moec_graph"] = gm  # kept out of _modules: state_dict and named_modules are unchanged
    block.forward = CompiledForward(gm, gm.meta["moe_spec"].outputs, original)
    own = type(block).extra_repr(block)
    d = gm.meta["moe_spec"].describe()
    line = f"moec: {d['router']}; experts {d['experts']}" + (f"; shared {d['shared']}" if d["shared"] != "-" else "")
    block.extra_repr = lambda: f"{own}\n{line}" if own else line  # print(model) shows the rewrite
