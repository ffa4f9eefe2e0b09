"""A zoo of hand-written Mixture-of-Experts blocks, plus look-alikes that are not MoE.

Test fixture for moec's MoE detector. Pure torch (hypothesis is imported lazily, only by
`specs()`); nothing here imports moec. The detector has to find these blocks from their
graphs, so the class names are deliberately neutral and the attribute names vary from one
dispatch style to the next (`gate`, `router`, `w_gate`, `score_proj`, `switch`, a raw
`router_weight` parameter; `experts`, `ffns`, `mlps`; `w1/w3/w2`, `gate_proj/up_proj/down_proj`,
`fc1/fc2`, `wi/wo`, stacked `gate_up_proj` ...).

API
---
    Spec                  frozen dataclass describing one block (router kind, activation,
                          weight layout, dispatch style, biases, shared expert, ...)
    is_valid(spec)        whether the combination makes sense; `check(spec)` raises ValueError
    make_block(spec, seed=0) -> nn.Module     forward(x [B,S,H] or [T,H]) -> same shape
                          (or (out, router_logits [T,E]) when spec.return_logits)
    init_weights(spec, seed=0) -> dict        the canonical weights a block is built from;
                          every layout/style of the same spec computes the same function
    expected_semantics(spec) -> dict          what a detector should report (router maths,
                          expert activation, shared expert) in moec.ir vocabulary
    PRESETS: dict[str, Spec]                  named blocks covering every option
    LOOKALIKES: dict[str, Callable[[int], nn.Module]]   NOT MoE; must be left alone
    TinyLM(vocab, hidden, n_layers, block_fn) a small LM wrapping any block, forward(ids)->logits
    specs()               hypothesis strategy of random valid Specs

All blocks are meant for eval-mode inference: no dropout, no noise, no capacity limits, no aux
losses; everything is deterministic. Weights are drawn from a torch.Generator seeded with
`seed`; router weights have std 3/sqrt(hidden) so top-k choices are decisive (no near-ties).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Spec", "ROUTERS", "ACTIVATIONS", "LAYOUTS", "STYLES", "SHARED", "is_valid", "check",
    "make_block", "init_weights", "expected_semantics", "PRESETS", "LOOKALIKES", "TinyLM",
    "specs", "route", "STYLE_CLASSES",
]

# ----------------------------------------------------------------------------------------
# Spec
# ----------------------------------------------------------------------------------------

ROUTERS = (
    "softmax_topk",           # softmax over E -> top-k -> renormalise to sum 1 (Mixtral)
    "softmax_topk_norenorm",  # softmax over E -> top-k, weights used as is (Qwen2-MoE, OLMoE)
    "topk_softmax",           # top-k on raw logits -> softmax over the k picked (GPT-OSS)
    "sigmoid_topk",           # sigmoid scores -> top-k -> renormalise to sum 1
    "sigmoid_bias_group",     # DeepSeek-V3: sigmoid, bias for selection, groups, renorm, scale
    "softmax_group_max",      # DeepSeek-V2: softmax, group score = max, top-k, scale, no renorm
    "argmax",                 # top-1 = argmax of softmax, weight = that probability (Switch)
    "top1_raw",               # top-1 = argmax of logits, weight 1 (output = chosen expert's)
    "gshard_top2",            # GShard: argmax of p, then argmax of the logits without it; p at both, renormalised
)
GROUP_ROUTERS = ("sigmoid_bias_group", "softmax_group_max")
TOP1_ROUTERS = ("argmax", "top1_raw")
TOP2_ROUTERS = ("gshard_top2",)

ACTIVATIONS = (
    "swiglu",  # silu(x W_gate) * (x W_up), then W_down
    "geglu",   # gelu_tanh(x W_gate) * (x W_up), then W_down   (tanh approximation of GELU)
    "gelu",    # plain 2-layer MLP with exact (erf) GELU
    "relu",    # plain 2-layer MLP with ReLU
)
GATED_ACTIVATIONS = ("swiglu", "geglu")

LAYOUTS = (
    "modulelist",           # nn.ModuleList of per-expert MLP modules (nn.Linear weights)
    "moduledict",           # nn.ModuleDict {"e0": mlp, "e1": mlp, ...}
    "stacked",              # 3-D params: w1/w3 [E,I,H], w2 [E,H,I]     (F.linear convention)
    "stacked_fused",        # gate_up_proj [E,2I,H] (gate rows, then up rows), down_proj [E,H,I]
    "stacked_t",            # transposed, used as x @ W: gate_up_proj [E,H,2I], down_proj [E,I,H]
    "stacked_interleaved",  # x @ W with gate/up interleaved columns: gate = [..., ::2], up = [..., 1::2]
)
STACKED_LAYOUTS = LAYOUTS[2:]
GATED_ONLY_LAYOUTS = ("stacked_fused", "stacked_interleaved")

STYLES = ("loop_mask", "loop_nonzero", "loop_where", "einsum_gather", "dense_scatter", "sorted")
SHARED = ("none", "plain", "gated")


@dataclass(frozen=True)
class Spec:
    hidden: int = 32
    inter: int = 48
    num_experts: int = 8
    top_k: int = 2
    router: str = "softmax_topk"
    activation: str = "swiglu"
    layout: str = "modulelist"
    style: str = "loop_mask"
    bias: bool = False            # biases in the experts' linear layers
    shared: str = "none"          # "none" | "plain" (shared MLP added) | "gated" (* sigmoid(x w_s))
    router_bias: bool = False     # bias in the router linear
    return_logits: bool = False   # forward returns (out, router_logits [T, E])
    n_group: int = 4              # group routers only
    topk_group: int = 2           # group routers only
    routed_scaling: float = 2.5   # group routers only: weights are multiplied by this

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS


def _problem(spec: Spec) -> str | None:
    """Why `spec` is not a valid combination, or None."""
    for name, allowed in (("router", ROUTERS), ("activation", ACTIVATIONS), ("layout", LAYOUTS),
                          ("style", STYLES), ("shared", SHARED)):
        if getattr(spec, name) not in allowed:
            return f"unknown {name} {getattr(spec, name)!r}"
    E, k = spec.num_experts, spec.top_k
    if spec.hidden < 1 or spec.inter < 1 or E < 2:
        return "need hidden >= 1, inter >= 1, num_experts >= 2"
    if not 1 <= k <= E:
        return f"top_k={k} out of range for {E} experts"
    if spec.router in TOP1_ROUTERS and k != 1:
        return f"router {spec.router} is top-1"
    if spec.router in TOP2_ROUTERS and k != 2:
        return f"router {spec.router} is top-2"
    if spec.router in GROUP_ROUTERS:
        G, kg = spec.n_group, spec.topk_group
        if G < 1 or E % G:
            return f"num_experts={E} not divisible by n_group={G}"
        if not 1 <= kg <= G:
            return f"topk_group={kg} out of range for n_group={G}"
        if spec.router == "sigmoid_bias_group" and E // G < 2:
            return "sigmoid_bias_group scores groups by their top-2: need >= 2 experts per group"
        if k > kg * (E // G):
            return f"top_k={k} > experts left after group masking ({kg * (E // G)})"
    if spec.layout in GATED_ONLY_LAYOUTS and not spec.gated:
        return f"layout {spec.layout} holds fused gate/up weights: needs a gated activation"
    if spec.style == "einsum_gather" and spec.layout not in STACKED_LAYOUTS:
        return "einsum_gather indexes stacked 3-D weights: needs a stacked layout"
    return None


def is_valid(spec: Spec) -> bool:
    return _problem(spec) is None


def check(spec: Spec) -> None:
    p = _problem(spec)
    if p is not None:
        raise ValueError(f"invalid Spec: {p}: {spec}")


def valid_styles(layout: str) -> tuple[str, ...]:
    return tuple(s for s in STYLES if s != "einsum_gather" or layout in STACKED_LAYOUTS)


def valid_layouts(activation: str) -> tuple[str, ...]:
    return tuple(l for l in LAYOUTS if activation in GATED_ACTIVATIONS or l not in GATED_ONLY_LAYOUTS)


# ----------------------------------------------------------------------------------------
# Canonical weights
# ----------------------------------------------------------------------------------------

def init_weights(spec: Spec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Canonical fp32 weights, in F.linear convention ([out, in]).

    Every tensor is always drawn, in a fixed order, so the values depend only on the sizes
    (hidden, inter, num_experts) and the seed: blocks of the same spec that differ only in
    layout / style / flags share their weights and compute the same function. Unused entries
    (e.g. "experts.gate" for a plain MLP) are simply ignored by the block.
    Plain (non-gated) experts are  down(act(up(x))).
    """
    H, I, E = spec.hidden, spec.inter, spec.num_experts
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std):
        return torch.randn(*shape, generator=g) * std

    return {
        "router.weight": randn(E, H, std=3.0 / math.sqrt(H)),
        "router.bias": randn(E, std=0.5),
        "correction_bias": randn(E, std=0.1),
        "experts.gate": randn(E, I, H, std=0.1),
        "experts.up": randn(E, I, H, std=0.1),
        "experts.down": randn(E, H, I, std=0.1),
        "experts.gate_bias": randn(E, I, std=0.1),
        "experts.up_bias": randn(E, I, std=0.1),
        "experts.down_bias": randn(E, H, std=0.1),
        "shared.gate": randn(I, H, std=0.1),
        "shared.up": randn(I, H, std=0.1),
        "shared.down": randn(H, I, std=0.1),
        "shared.coef": randn(1, H, std=1.0 / math.sqrt(H)),
    }


def _act(activation: str, x: torch.Tensor) -> torch.Tensor:
    if activation == "swiglu":
        return F.silu(x)
    if activation == "geglu":
        return F.gelu(x, approximate="tanh")
    if activation == "gelu":
        return F.gelu(x)
    return F.relu(x)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.clone().contiguous())


def _linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


# ----------------------------------------------------------------------------------------
# Expert MLP modules (modulelist / moduledict layouts, and shared experts)
# ----------------------------------------------------------------------------------------

class W13FFN(nn.Module):
    """Gated MLP with Mixtral names: w2(act(w1 x) * w3 x)."""

    def __init__(self, activation, gate, up, down, gate_b=None, up_b=None, down_b=None):
        super().__init__()
        self.activation = activation
        self.w1 = _linear(gate, gate_b)
        self.w3 = _linear(up, up_b)
        self.w2 = _linear(down, down_b)

    def forward(self, x):
        return self.w2(_act(self.activation, self.w1(x)) * self.w3(x))


class ProjFFN(nn.Module):
    """Gated MLP with Llama/Qwen/DeepSeek names: down_proj(act(gate_proj x) * up_proj x)."""

    def __init__(self, activation, gate, up, down, gate_b=None, up_b=None, down_b=None):
        super().__init__()
        self.activation = activation
        self.gate_proj = _linear(gate, gate_b)
        self.up_proj = _linear(up, up_b)
        self.down_proj = _linear(down, down_b)

    def forward(self, x):
        return self.down_proj(_act(self.activation, self.gate_proj(x)) * self.up_proj(x))


class FcMLP(nn.Module):
    """Plain MLP: fc2(act(fc1 x))."""

    def __init__(self, activation, up, down, up_b=None, down_b=None):
        super().__init__()
        self.activation = activation
        self.fc1 = _linear(up, up_b)
        self.fc2 = _linear(down, down_b)

    def forward(self, x):
        return self.fc2(_act(self.activation, self.fc1(x)))


class WiWoMLP(nn.Module):
    """Plain MLP with T5/Switch names: wo(act(wi x))."""

    def __init__(self, activation, up, down, up_b=None, down_b=None):
        super().__init__()
        self.activation = activation
        self.wi = _linear(up, up_b)
        self.wo = _linear(down, down_b)

    def forward(self, x):
        return self.wo(_act(self.activation, self.wi(x)))


def _mlp(spec: Spec, W: dict, e: int | None, gated_cls, plain_cls, bias: bool) -> nn.Module:
    """Expert `e` (or the shared MLP when e is None) as a module."""
    if e is None:
        gate, up, down = W["shared.gate"], W["shared.up"], W["shared.down"]
        gb = ub = db = None
    else:
        gate, up, down = W["experts.gate"][e], W["experts.up"][e], W["experts.down"][e]
        gb, ub, db = W["experts.gate_bias"][e], W["experts.up_bias"][e], W["experts.down_bias"][e]
    if not bias:
        gb = ub = db = None
    if spec.gated:
        return gated_cls(spec.activation, gate, up, down, gb, ub, db)
    return plain_cls(spec.activation, up, down, ub, db)


# ----------------------------------------------------------------------------------------
# Stacked expert weights (3-D parameters). Each container offers:
#   one(e, x [n,H]) -> [n,H]            expert e on some tokens
#   all(x [T,H]) -> [T,E,H]             every expert on every token
#   gathered(x [T,H], idx [T,k]) -> [T,k,H]   per-token gathered weights W[idx]
# ----------------------------------------------------------------------------------------

class StackedFFN(nn.Module):
    """w1/w3 [E,I,H], w2 [E,H,I] (+ b1/b3 [E,I], b2 [E,H]); plain MLPs use only w1/w2."""

    def __init__(self, spec: Spec, W: dict):
        super().__init__()
        self.activation, self.gated, self.has_bias = spec.activation, spec.gated, spec.bias
        self.w1 = _param(W["experts.gate"] if self.gated else W["experts.up"])
        self.w2 = _param(W["experts.down"])
        if self.gated:
            self.w3 = _param(W["experts.up"])
        if self.has_bias:
            self.b1 = _param(W["experts.gate_bias"] if self.gated else W["experts.up_bias"])
            self.b2 = _param(W["experts.down_bias"])
            if self.gated:
                self.b3 = _param(W["experts.up_bias"])

    def one(self, e, x):
        h = x @ self.w1[e].t()
        if self.has_bias:
            h = h + self.b1[e]
        h = _act(self.activation, h)
        if self.gated:
            u = x @ self.w3[e].t()
            if self.has_bias:
                u = u + self.b3[e]
            h = h * u
        y = h @ self.w2[e].t()
        return y + self.b2[e] if self.has_bias else y

    def all(self, x):
        h = torch.einsum("th,eih->tei", x, self.w1)
        if self.has_bias:
            h = h + self.b1
        h = _act(self.activation, h)
        if self.gated:
            u = torch.einsum("th,eih->tei", x, self.w3)
            h = h * (u + self.b3 if self.has_bias else u)
        y = torch.einsum("tei,ehi->teh", h, self.w2)
        return y + self.b2 if self.has_bias else y

    def gathered(self, x, idx):
        h = torch.einsum("th,tkih->tki", x, self.w1[idx])
        if self.has_bias:
            h = h + self.b1[idx]
        h = _act(self.activation, h)
        if self.gated:
            u = torch.einsum("th,tkih->tki", x, self.w3[idx])
            h = h * (u + self.b3[idx] if self.has_bias else u)
        y = torch.einsum("tki,tkhi->tkh", h, self.w2[idx])
        return y + self.b2[idx] if self.has_bias else y


class FusedStackedFFN(nn.Module):
    """gate_up_proj [E,2I,H] (gate rows then up rows), down_proj [E,H,I]; gated only."""

    def __init__(self, spec: Spec, W: dict):
        super().__init__()
        self.activation, self.has_bias = spec.activation, spec.bias
        self.gate_up_proj = _param(torch.cat([W["experts.gate"], W["experts.up"]], dim=1))
        self.down_proj = _param(W["experts.down"])
        if self.has_bias:
            self.gate_up_proj_bias = _param(torch.cat([W["experts.gate_bias"], W["experts.up_bias"]], dim=1))
            self.down_proj_bias = _param(W["experts.down_bias"])

    def _glu(self, h):
        gate, up = h.chunk(2, dim=-1)
        return _act(self.activation, gate) * up

    def one(self, e, x):
        h = F.linear(x, self.gate_up_proj[e], self.gate_up_proj_bias[e] if self.has_bias else None)
        return F.linear(self._glu(h), self.down_proj[e], self.down_proj_bias[e] if self.has_bias else None)

    def all(self, x):
        h = torch.einsum("th,enh->ten", x, self.gate_up_proj)
        if self.has_bias:
            h = h + self.gate_up_proj_bias
        y = torch.einsum("tei,ehi->teh", self._glu(h), self.down_proj)
        return y + self.down_proj_bias if self.has_bias else y

    def gathered(self, x, idx):
        h = torch.einsum("th,tknh->tkn", x, self.gate_up_proj[idx])
        if self.has_bias:
            h = h + self.gate_up_proj_bias[idx]
        y = torch.einsum("tki,tkhi->tkh", self._glu(h), self.down_proj[idx])
        return y + self.down_proj_bias[idx] if self.has_bias else y


class TransposedStackedFFN(nn.Module):
    """x @ W convention. Gated: gate_up_proj [E,H,2I] (gate columns then up columns);
    plain: up_proj [E,H,I]. down_proj [E,I,H]. Biases [E,2I] / [E,I] and [E,H]."""

    def __init__(self, spec: Spec, W: dict):
        super().__init__()
        self.activation, self.gated, self.has_bias = spec.activation, spec.gated, spec.bias
        if self.gated:
            self.gate_up_proj = _param(torch.cat([W["experts.gate"], W["experts.up"]], dim=1).transpose(1, 2))
            if self.has_bias:
                self.gate_up_proj_bias = _param(torch.cat([W["experts.gate_bias"], W["experts.up_bias"]], dim=1))
        else:
            self.up_proj = _param(W["experts.up"].transpose(1, 2))
            if self.has_bias:
                self.up_proj_bias = _param(W["experts.up_bias"])
        self.down_proj = _param(W["experts.down"].transpose(1, 2))
        if self.has_bias:
            self.down_proj_bias = _param(W["experts.down_bias"])

    def _in(self):
        if self.gated:
            return self.gate_up_proj, (self.gate_up_proj_bias if self.has_bias else None)
        return self.up_proj, (self.up_proj_bias if self.has_bias else None)

    def _mid(self, h):
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return _act(self.activation, gate) * up
        return _act(self.activation, h)

    def one(self, e, x):
        w, b = self._in()
        h = x @ w[e]
        if b is not None:
            h = h + b[e]
        y = self._mid(h) @ self.down_proj[e]
        return y + self.down_proj_bias[e] if self.has_bias else y

    def all(self, x):
        w, b = self._in()
        h = torch.einsum("th,ehn->ten", x, w)
        if b is not None:
            h = h + b
        y = torch.einsum("tei,eih->teh", self._mid(h), self.down_proj)
        return y + self.down_proj_bias if self.has_bias else y

    def gathered(self, x, idx):
        w, b = self._in()
        h = torch.einsum("th,tkhn->tkn", x, w[idx])
        if b is not None:
            h = h + b[idx]
        y = torch.einsum("tki,tkih->tkh", self._mid(h), self.down_proj[idx])
        return y + self.down_proj_bias[idx] if self.has_bias else y


class InterleavedStackedFFN(nn.Module):
    """GPT-OSS-like storage: gate_up_proj [E,H,2I] used as x @ W, gate = even columns,
    up = odd columns; down_proj [E,I,H]; biases interleaved the same way. Gated only."""

    def __init__(self, spec: Spec, W: dict):
        super().__init__()
        self.activation, self.has_bias = spec.activation, spec.bias
        E, I, H = W["experts.gate"].shape
        gu = torch.empty(E, H, 2 * I)
        gu[..., 0::2] = W["experts.gate"].transpose(1, 2)
        gu[..., 1::2] = W["experts.up"].transpose(1, 2)
        self.gate_up_proj = _param(gu)
        self.down_proj = _param(W["experts.down"].transpose(1, 2))
        if self.has_bias:
            gub = torch.empty(E, 2 * I)
            gub[:, 0::2] = W["experts.gate_bias"]
            gub[:, 1::2] = W["experts.up_bias"]
            self.gate_up_proj_bias = _param(gub)
            self.down_proj_bias = _param(W["experts.down_bias"])

    def _glu(self, h):
        gate, up = h[..., ::2], h[..., 1::2]
        return _act(self.activation, gate) * up

    def one(self, e, x):
        h = x @ self.gate_up_proj[e]
        if self.has_bias:
            h = h + self.gate_up_proj_bias[e]
        y = self._glu(h) @ self.down_proj[e]
        return y + self.down_proj_bias[e] if self.has_bias else y

    def all(self, x):
        h = torch.einsum("th,ehn->ten", x, self.gate_up_proj)
        if self.has_bias:
            h = h + self.gate_up_proj_bias
        y = torch.einsum("tei,eih->teh", self._glu(h), self.down_proj)
        return y + self.down_proj_bias if self.has_bias else y

    def gathered(self, x, idx):
        h = torch.einsum("th,tkhn->tkn", x, self.gate_up_proj[idx])
        if self.has_bias:
            h = h + self.gate_up_proj_bias[idx]
        y = torch.einsum("tki,tkih->tkh", self._glu(h), self.down_proj[idx])
        return y + self.down_proj_bias[idx] if self.has_bias else y


_STACKED_CLASSES = {
    "stacked": StackedFFN,
    "stacked_fused": FusedStackedFFN,
    "stacked_t": TransposedStackedFFN,
    "stacked_interleaved": InterleavedStackedFFN,
}


def _experts(spec: Spec, W: dict, gated_cls, plain_cls) -> nn.Module:
    E = spec.num_experts
    if spec.layout == "modulelist":
        return nn.ModuleList(_mlp(spec, W, e, gated_cls, plain_cls, spec.bias) for e in range(E))
    if spec.layout == "moduledict":
        return nn.ModuleDict({f"e{e}": _mlp(spec, W, e, gated_cls, plain_cls, spec.bias) for e in range(E)})
    return _STACKED_CLASSES[spec.layout](spec, W)


def _run_expert(spec: Spec, experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e on tokens x [n, H], whatever the layout."""
    if spec.layout == "modulelist":
        return experts[e](x)
    if spec.layout == "moduledict":
        return experts[f"e{e}"](x)
    return experts.one(e, x)


# ----------------------------------------------------------------------------------------
# Routers: logits [T, E] -> (weights [T, k] in x's dtype, expert ids [T, k] int64)
# ----------------------------------------------------------------------------------------

def _group_mask(choice: torch.Tensor, spec: Spec, group_score: str) -> torch.Tensor:
    """Boolean [T, E]: experts in the `topk_group` best of `n_group` contiguous groups."""
    T, E = choice.shape
    grouped = choice.view(T, spec.n_group, E // spec.n_group)
    if group_score == "top2_sum":
        gscore = grouped.topk(2, dim=-1).values.sum(dim=-1)          # [T, G]
    else:
        gscore = grouped.max(dim=-1).values                          # [T, G]
    gidx = gscore.topk(spec.topk_group, dim=-1).indices              # [T, kg]
    gmask = torch.zeros_like(gscore).scatter_(1, gidx, 1.0)          # [T, G]
    return gmask.unsqueeze(-1).expand(T, spec.n_group, E // spec.n_group).reshape(T, E).bool()


def route(spec: Spec, logits: torch.Tensor, correction_bias: torch.Tensor | None = None):
    """Eval-mode routing. Scores are computed in fp32; weights are cast back to logits' dtype."""
    k, kind = spec.top_k, spec.router
    lf = logits.float()
    if kind == "softmax_topk":
        # Mixtral: p = softmax(logits); keep top-k of p; w = p_topk / sum(p_topk)
        probs = F.softmax(lf, dim=-1)
        w, idx = torch.topk(probs, k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
    elif kind == "softmax_topk_norenorm":
        # Qwen2-MoE (norm_topk_prob=False): p = softmax(logits); w = top-k of p, not renormalised
        probs = F.softmax(lf, dim=-1)
        w, idx = torch.topk(probs, k, dim=-1)
    elif kind == "topk_softmax":
        # GPT-OSS: pick top-k logits, softmax over just those k
        vals, idx = torch.topk(lf, k, dim=-1)
        w = F.softmax(vals, dim=-1)
    elif kind == "sigmoid_topk":
        # s = sigmoid(logits); top-k of s; w = s_topk / sum(s_topk)
        scores = torch.sigmoid(lf)
        w, idx = torch.topk(scores, k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
    elif kind == "sigmoid_bias_group":
        # DeepSeek-V3 noaux_tc: s = sigmoid(logits); choice = s + correction_bias (selection
        # only); group score = sum of the group's top-2 choices; keep topk_group groups, mask
        # the rest to -inf; ids = top-k of choice; w = s[ids] / sum(s[ids]) * routed_scaling
        scores = torch.sigmoid(lf)
        choice = scores + correction_bias.float().unsqueeze(0)
        keep = _group_mask(choice, spec, "top2_sum")
        choice = choice.masked_fill(~keep, float("-inf"))
        idx = torch.topk(choice, k, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) * spec.routed_scaling
    elif kind == "softmax_group_max":
        # DeepSeek-V2 group_limited_greedy: p = softmax(logits); group score = max p in group;
        # keep topk_group groups (others zeroed); w, ids = top-k of p; w *= routed_scaling
        probs = F.softmax(lf, dim=-1)
        keep = _group_mask(probs, spec, "max")
        w, idx = torch.topk(probs.masked_fill(~keep, 0.0), k, dim=-1, sorted=False)
        w = w * spec.routed_scaling
    elif kind == "argmax":
        # Switch Transformer: p = softmax(logits); expert = argmax p; weight = max p
        probs = F.softmax(lf, dim=-1)
        idx = torch.argmax(probs, dim=-1, keepdim=True)
        w = probs.gather(-1, idx)
    elif kind == "top1_raw":
        # hard top-1: expert = argmax logits; weight 1 (output is the chosen expert's output)
        idx = lf.argmax(dim=-1, keepdim=True)
        w = torch.ones_like(idx, dtype=lf.dtype)
    elif kind == "gshard_top2":
        # GShard top-2: the first expert = argmax of p; the second = argmax of the logits with the first set to
        # -inf; gates = p at both, divided by their sum clamped at eps
        probs = F.softmax(lf, dim=-1)
        i1 = probs.argmax(dim=-1, keepdim=True)
        i2 = lf.scatter(1, i1, float("-inf")).argmax(dim=-1, keepdim=True)
        idx = torch.cat([i1, i2], dim=1)
        w = probs.gather(1, idx)
        w = w / w.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(w.dtype).eps)
    else:
        raise ValueError(kind)
    return w.to(logits.dtype), idx


# ----------------------------------------------------------------------------------------
# Dispatch styles
# ----------------------------------------------------------------------------------------

class _BlockBase(nn.Module):
    """Shared construction helpers. Each subclass names its own router / experts attributes
    and writes its own forward."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        self.num_experts = spec.num_experts
        self.top_k = spec.top_k

    def _extras(self, W: dict, shared_names=("shared_experts", "shared_expert", "shared_expert_gate")):
        spec = self.spec
        if spec.router == "sigmoid_bias_group":
            self.e_score_correction_bias = _param(W["correction_bias"])
        else:
            self.register_parameter("e_score_correction_bias", None)
        plain_name, gated_name, coef_name = shared_names
        self._shared_names = (plain_name, gated_name, coef_name)
        if spec.shared == "plain":
            setattr(self, plain_name, _mlp(spec, W, None, ProjFFN, FcMLP, bias=False))
        elif spec.shared == "gated":
            setattr(self, gated_name, _mlp(spec, W, None, ProjFFN, FcMLP, bias=False))
            setattr(self, coef_name, _linear(W["shared.coef"], None))

    def _finish(self, out, x2, logits, shape):
        """Add the shared expert, restore the input shape, optionally return the logits."""
        if self.spec.shared == "plain":
            out = out + getattr(self, self._shared_names[0])(x2)
        elif self.spec.shared == "gated":
            shared = getattr(self, self._shared_names[1])(x2)
            out = out + torch.sigmoid(getattr(self, self._shared_names[2])(x2)) * shared
        out = out.reshape(shape)
        if self.spec.return_logits:
            return out, logits
        return out


class LoopMaskBlock(_BlockBase):
    """Imitates the classic Mixtral / fairseq loop: for each expert, a boolean mask of the
    tokens that picked it (`idx == e`), `mask.any(-1)` rows, the combined weight of those
    rows, then `index_add_` into the output. Router `gate`, experts `experts` (w1/w3/w2)."""

    def __init__(self, spec: Spec, W: dict):
        super().__init__(spec)
        self.gate = _linear(W["router.weight"], W["router.bias"] if spec.router_bias else None)
        self.experts = _experts(spec, W, W13FFN, FcMLP)
        self._extras(W)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        router_logits = self.gate(x2)
        routing_weights, selected = route(self.spec, router_logits, self.e_score_correction_bias)
        out = torch.zeros_like(x2)
        for e in range(self.num_experts):
            mask = selected == e                                   # [T, k]
            rows = mask.any(dim=-1)                                # [T]
            token_ids = rows.nonzero(as_tuple=True)[0]
            coef = (routing_weights * mask).sum(dim=-1)[token_ids]  # [n]
            y = _run_expert(self.spec, self.experts, e, x2[token_ids])
            out.index_add_(0, token_ids, y * coef.unsqueeze(-1))
        return self._finish(out, x2, router_logits, shape)


class LoopNonzeroBlock(_BlockBase):
    """Imitates HF transformers' Mixtral/Qwen-MoE loop: `torch.where(idx == e)` gives
    (token, slot) pairs; the weights are gathered with them; results `index_add_`-ed.
    Router `router`, experts `experts` (gate_proj/up_proj/down_proj, or wi/wo)."""

    def __init__(self, spec: Spec, W: dict):
        super().__init__(spec)
        self.router = _linear(W["router.weight"], W["router.bias"] if spec.router_bias else None)
        self.experts = _experts(spec, W, ProjFFN, WiWoMLP)
        self._extras(W, ("shared_mlp", "shared_expert", "shared_expert_gate"))

    def forward(self, x):
        shape = x.shape
        hidden_states = x.reshape(-1, shape[-1])
        logits = self.router(hidden_states)
        topk_weights, topk_ids = route(self.spec, logits, self.e_score_correction_bias)
        final = torch.zeros_like(hidden_states)
        for expert_idx in range(self.num_experts):
            token_idx, slot_idx = torch.where(topk_ids == expert_idx)
            current = hidden_states[token_idx]
            current = _run_expert(self.spec, self.experts, expert_idx, current)
            current = current * topk_weights[token_idx, slot_idx, None]
            final.index_add_(0, token_idx, current.to(final.dtype))
        return self._finish(final, hidden_states, logits, shape)


class LoopWhereBlock(_BlockBase):
    """Dense-ish loop (small-scale research code, TPU-friendly): every expert runs on ALL
    tokens; its output is scaled by a per-token coefficient built with `torch.where`, which
    is zero for tokens that did not pick it. Router `w_gate`, experts `ffns` (w1/w3/w2, wi/wo)."""

    def __init__(self, spec: Spec, W: dict):
        super().__init__(spec)
        self.w_gate = _linear(W["router.weight"], W["router.bias"] if spec.router_bias else None)
        self.ffns = _experts(spec, W, W13FFN, WiWoMLP)
        self._extras(W, ("shared_ffn", "shared_ffn", "shared_ffn_gate"))

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        scores = self.w_gate(h)
        weights, indices = route(self.spec, scores, self.e_score_correction_bias)
        out = torch.zeros_like(h)
        for e in range(self.num_experts):
            coef = torch.where(indices == e, weights, torch.zeros_like(weights)).sum(-1, keepdim=True)
            out = out + coef * _run_expert(self.spec, self.ffns, e, h)
        return self._finish(out, h, scores, shape)


class EinsumGatherBlock(_BlockBase):
    """Per-token weight gather (fast-decode / small-batch kernels written in torch): `W[idx]`
    gives [T,k,...] weights, einsums compute the k experts of every token, then a weighted
    sum over k. Stacked layouts only. Router `score_proj`, stacked weights `experts`."""

    def __init__(self, spec: Spec, W: dict):
        super().__init__(spec)
        self.score_proj = _linear(W["router.weight"], W["router.bias"] if spec.router_bias else None)
        self.experts = _experts(spec, W, None, None)
        self._extras(W)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        logits = self.score_proj(x2)
        w, idx = route(self.spec, logits, self.e_score_correction_bias)
        y = self.experts.gathered(x2, idx)                        # [T, k, H]
        out = torch.einsum("tk,tkh->th", w, y)
        return self._finish(out, x2, logits, shape)


class DenseScatterBlock(_BlockBase):
    """Dense compute, sparse gates (GShard/Mesh-TF style reference code): every expert runs
    on every token ([T,E,H], one einsum for stacked weights, else a stacked loop), a dense
    [T,E] gate matrix is built with `zeros.scatter(1, idx, w)` and contracted with
    einsum('te,teh->th'). Router `switch`, experts `mlps` (gate_proj/up_proj/down_proj, fc1/fc2)."""

    def __init__(self, spec: Spec, W: dict):
        super().__init__(spec)
        self.switch = _linear(W["router.weight"], W["router.bias"] if spec.router_bias else None)
        self.mlps = _experts(spec, W, ProjFFN, FcMLP)
        self._extras(W, ("shared_mlp", "shared_mlp", "shared_mlp_gate"))

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        logits = self.switch(x2)
        w, idx = route(self.spec, logits, self.e_score_correction_bias)
        gates = torch.zeros(x2.shape[0], self.num_experts, dtype=w.dtype, device=w.device)
        gates = gates.scatter(1, idx, w)                            # [T, E]
        if self.spec.layout in STACKED_LAYOUTS:
            y = self.mlps.all(x2)                                   # [T, E, H]
        else:
            y = torch.stack([_run_expert(self.spec, self.mlps, e, x2)
                             for e in range(self.num_experts)], dim=1)
        out = torch.einsum("te,teh->th", gates, y)
        return self._finish(out, x2, logits, shape)


class SortedDispatchBlock(_BlockBase):
    """Sort-based dispatch as in DeepSeek's `moe_infer` / optimised implementations: the T*k
    (token, expert) assignments are argsorted by expert, each expert processes a contiguous
    slice (sizes from a per-expert count, read on the host), results are un-sorted by
    scatter and combined with the weights. Router is a raw `router_weight` parameter
    (+ `router_bias`) used through F.linear; experts `experts`."""

    def __init__(self, spec: Spec, W: dict):
        super().__init__(spec)
        self.router_weight = _param(W["router.weight"])
        if spec.router_bias:
            self.router_bias = _param(W["router.bias"])
        else:
            self.register_parameter("router_bias", None)
        self.experts = _experts(spec, W, ProjFFN, FcMLP)
        self._extras(W)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        logits = F.linear(x2, self.router_weight, self.router_bias)
        topk_weight, topk_ids = route(self.spec, logits, self.e_score_correction_bias)
        cnts = topk_ids.new_zeros((topk_ids.shape[0], self.num_experts))
        cnts.scatter_(1, topk_ids, 1)
        tokens_per_expert = cnts.sum(dim=0).tolist()
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x2[idxs // topk_ids.shape[1]]
        outputs, start = [], 0
        for e, n in enumerate(tokens_per_expert):   # empty slices are fine: no data-dependent branch
            outputs.append(_run_expert(self.spec, self.experts, e, sorted_tokens[start:start + n]))
            start += n
        outs = torch.cat(outputs, dim=0)
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        out = (new_x.view(*topk_ids.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
        return self._finish(out, x2, logits, shape)


STYLE_CLASSES = {
    "loop_mask": LoopMaskBlock,
    "loop_nonzero": LoopNonzeroBlock,
    "loop_where": LoopWhereBlock,
    "einsum_gather": EinsumGatherBlock,
    "dense_scatter": DenseScatterBlock,
    "sorted": SortedDispatchBlock,
}


def make_block(spec: Spec, seed: int = 0) -> nn.Module:
    """Build the block described by `spec` (eval mode), weights from `init_weights(spec, seed)`."""
    check(spec)
    return STYLE_CLASSES[spec.style](spec, init_weights(spec, seed)).eval()


def expected_semantics(spec: Spec) -> dict:
    """What a detector should recover from a block, in moec.ir's vocabulary (plain dicts,
    no moec import). Equivalent descriptions exist (e.g. topk_softmax == softmax + renorm)."""
    check(spec)
    r = spec.router
    router = dict(top_k=spec.top_k, scoring="softmax", select_bias=False, n_group=1, topk_group=1,
                  group_score="max", weighting="scores", renorm=0.0, scale=1.0)
    if r in ("softmax_topk", "topk_softmax"):
        router.update(renorm=1.0)
    elif r == "sigmoid_topk":
        router.update(scoring="sigmoid", renorm=1.0)
    elif r == "sigmoid_bias_group":
        router.update(scoring="sigmoid", select_bias=True, n_group=spec.n_group, topk_group=spec.topk_group,
                      group_score="top2_sum", renorm=1.0, scale=spec.routed_scaling)
    elif r == "softmax_group_max":
        router.update(n_group=spec.n_group, topk_group=spec.topk_group, scale=spec.routed_scaling)
    elif r == "top1_raw":
        router.update(scoring="none", weighting="ones")
    elif r == "gshard_top2":
        router.update(renorm=1.0)
    act = {"swiglu": "silu", "geglu": "gelu_tanh", "gelu": "gelu", "relu": "relu"}[spec.activation]
    experts = dict(num_experts=spec.num_experts, hidden=spec.hidden, inter=spec.inter, activation=act,
                   gated=spec.gated, bias=spec.bias)
    return dict(router=router, experts=experts, shared=spec.shared,
                outputs=("out", "logits") if spec.return_logits else ("out",))


# ----------------------------------------------------------------------------------------
# Presets: every router, activation, layout, style, bias and shared kind appears at least once
# ----------------------------------------------------------------------------------------

PRESETS: dict[str, Spec] = {
    "mixtral_loop": Spec(),
    "mixtral_hf_where": Spec(style="loop_nonzero"),
    "returns_logits": Spec(style="loop_nonzero", return_logits=True),
    "deepseek_v3_groups": Spec(num_experts=16, top_k=4, router="sigmoid_bias_group", style="sorted",
                               shared="plain"),
    "deepseek_v3_stacked_dense": Spec(router="sigmoid_bias_group", layout="stacked_fused",
                                      style="dense_scatter", shared="gated", n_group=2, topk_group=1),
    "v2_group_max": Spec(router="softmax_group_max", style="loop_mask", shared="plain", routed_scaling=16.0),
    "switch_argmax": Spec(top_k=1, router="argmax", activation="relu", style="loop_nonzero"),
    "top1_raw_relu": Spec(top_k=1, router="top1_raw", activation="relu", layout="stacked", style="loop_where"),
    "gshard_top2_sorted": Spec(router="gshard_top2", layout="stacked_fused", style="sorted"),
    "qwen_shared_gated": Spec(num_experts=16, top_k=4, router="softmax_topk_norenorm", style="loop_nonzero",
                              shared="gated"),
    "biased_gelu_experts": Spec(activation="gelu", bias=True, router_bias=True, style="loop_mask"),
    "einsum_gather": Spec(layout="stacked", style="einsum_gather"),
    "einsum_gather_t_geglu": Spec(top_k=1, activation="geglu", layout="stacked_t", style="einsum_gather",
                                  bias=True),
    "dense_scatter_sigmoid": Spec(router="sigmoid_topk", layout="stacked_fused", style="dense_scatter"),
    "dense_scatter_modules": Spec(router="softmax_topk_norenorm", activation="gelu", style="dense_scatter",
                                  router_bias=True),
    "moduledict_geglu": Spec(router="topk_softmax", activation="geglu", layout="moduledict", style="loop_where"),
    "sorted_interleaved": Spec(num_experts=4, router="topk_softmax", layout="stacked_interleaved",
                               style="sorted", bias=True, router_bias=True),
    "stacked_t_relu_mask": Spec(router="sigmoid_topk", activation="relu", layout="stacked_t", style="loop_mask"),
    "moduledict_sorted_group_max": Spec(num_experts=12, top_k=3, router="softmax_group_max",
                                        layout="moduledict", style="sorted", n_group=3, topk_group=2),
}


# ----------------------------------------------------------------------------------------
# Look-alikes: NOT MoE
# ----------------------------------------------------------------------------------------

def _reinit(module: nn.Module, seed: int, std: float = 0.1, special: dict[str, float] | None = None) -> nn.Module:
    """Deterministically redraw every parameter (std per name in `special`, else `std`)."""
    g = torch.Generator().manual_seed(seed)
    special = special or {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * special.get(name, std))
    return module.eval()


class PlainMLP(nn.Module):
    """A single dense SwiGLU MLP."""

    def __init__(self, hidden: int, inter: int | None = None, seed: int = 0):
        super().__init__()
        inter = inter or hidden * 3 // 2
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        _reinit(self, seed)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MLPEnsemble(nn.Module):
    """E MLPs in a ModuleList, all run on every token, outputs averaged. No routing."""

    def __init__(self, hidden: int, n: int = 4, seed: int = 0):
        super().__init__()
        self.mlps = nn.ModuleList(PlainMLP(hidden) for _ in range(n))
        _reinit(self, seed)

    def forward(self, x):
        return torch.stack([m(x) for m in self.mlps], dim=0).mean(dim=0)


class SoftMixture(nn.Module):
    """Dense mixture: a learned softmax over E weights ALL experts' outputs, with no top-k
    selection. Looks like a router + experts, but has no sparsity: treated as not an MoE."""

    def __init__(self, hidden: int, n: int = 4, seed: int = 0):
        super().__init__()
        self.gate = nn.Linear(hidden, n, bias=False)
        self.experts = nn.ModuleList(PlainMLP(hidden) for _ in range(n))
        _reinit(self, seed, special={"gate.weight": 3.0 / math.sqrt(hidden)})

    def forward(self, x):
        probs = F.softmax(self.gate(x), dim=-1)                             # [..., E]
        ys = torch.stack([m(x) for m in self.experts], dim=-2)              # [..., E, H]
        return (probs.unsqueeze(-1) * ys).sum(dim=-2)


class TopKSparseAttention(nn.Module):
    """Single-head self-attention that keeps only the top-k keys per query (others -inf)."""

    def __init__(self, hidden: int, k: int = 4, seed: int = 0):
        super().__init__()
        self.k = k
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.kv = nn.Linear(hidden, 2 * hidden, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)
        _reinit(self, seed, std=1.0 / math.sqrt(hidden))

    def forward(self, x):                                                 # x [B, S, H]
        q = self.q(x)
        key, v = self.kv(x).chunk(2, dim=-1)
        scores = q @ key.transpose(-1, -2) / math.sqrt(x.shape[-1])       # [B, S, S]
        k = min(self.k, scores.shape[-1])
        top = scores.topk(k, dim=-1)
        sparse = torch.full_like(scores, float("-inf")).scatter(-1, top.indices, top.values)
        return self.o(F.softmax(sparse, dim=-1) @ v)


class TopKActivationMLP(nn.Module):
    """One MLP whose hidden activations are sparsified to the k largest per token
    (k-winners-take-all): topk + scatter like a router, but no experts."""

    def __init__(self, hidden: int, k: int = 8, seed: int = 0):
        super().__init__()
        self.k = k
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)
        _reinit(self, seed)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        vals, idx = h.topk(self.k, dim=-1)
        h = torch.zeros_like(h).scatter(-1, idx, vals)
        return self.fc2(h)


LOOKALIKES: dict[str, Callable[[int], nn.Module]] = {
    "plain_mlp": lambda hidden: PlainMLP(hidden),
    "mlp_ensemble": lambda hidden: MLPEnsemble(hidden),
    "soft_mixture": lambda hidden: SoftMixture(hidden),
    "topk_sparse_attention": lambda hidden: TopKSparseAttention(hidden),
    "topk_activation_mlp": lambda hidden: TopKActivationMLP(hidden),
}


# ----------------------------------------------------------------------------------------
# A tiny language model around any block
# ----------------------------------------------------------------------------------------

class _Layer(nn.Module):
    def __init__(self, norm: nn.Module, block: nn.Module):
        super().__init__()
        self.norm = norm
        self.block = block

    def forward(self, h):
        y = self.block(self.norm(h))
        if isinstance(y, tuple):  # blocks that also return router logits
            y = y[0]
        return h + y


class TinyLM(nn.Module):
    """embedding -> n_layers x (norm -> block, residual) -> final norm -> lm head.
    Layers alternate RMSNorm / LayerNorm. `block_fn()` is called once per layer."""

    def __init__(self, vocab: int = 64, hidden: int = 32, n_layers: int = 2,
                 block_fn: Callable[[], nn.Module] | None = None, seed: int = 0):
        super().__init__()
        block_fn = block_fn or (lambda: make_block(Spec(hidden=hidden)))
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            _Layer(nn.RMSNorm(hidden) if i % 2 == 0 else nn.LayerNorm(hidden), block_fn())
            for i in range(n_layers))
        self.norm = nn.RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, hidden, generator=g))
            self.lm_head.weight.copy_(torch.randn(vocab, hidden, generator=g) / math.sqrt(hidden))
        self.eval()

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


# ----------------------------------------------------------------------------------------
# Hypothesis strategy
# ----------------------------------------------------------------------------------------

def specs():
    """hypothesis strategy of random valid Specs."""
    from hypothesis import strategies as st

    @st.composite
    def _specs(draw):
        router = draw(st.sampled_from(ROUTERS))
        E = draw(st.integers(2, 16))
        n_group, topk_group = 4, 2
        if router in GROUP_ROUTERS:
            min_size = 2 if router == "sigmoid_bias_group" else 1
            n_group = draw(st.sampled_from([g for g in range(1, E + 1) if E % g == 0 and E // g >= min_size]))
            topk_group = draw(st.integers(1, n_group))
            k = draw(st.integers(1, min(4, topk_group * (E // n_group))))
        elif router in TOP1_ROUTERS:
            k = 1
        elif router in TOP2_ROUTERS:
            k = 2
        else:
            k = draw(st.integers(1, min(4, E)))
        activation = draw(st.sampled_from(ACTIVATIONS))
        layout = draw(st.sampled_from(valid_layouts(activation)))
        style = draw(st.sampled_from(valid_styles(layout)))
        spec = Spec(
            hidden=draw(st.sampled_from([8, 16, 32])),
            inter=draw(st.sampled_from([8, 16, 24, 48])),
            num_experts=E, top_k=k, router=router, activation=activation, layout=layout, style=style,
            bias=draw(st.booleans()), shared=draw(st.sampled_from(SHARED)),
            router_bias=draw(st.booleans()), return_logits=draw(st.booleans()),
            n_group=n_group, topk_group=topk_group,
            routed_scaling=draw(st.sampled_from([1.0, 2.5])) if router in GROUP_ROUTERS else 2.5,
        )
        assert is_valid(spec), spec
        return spec

    return _specs()
