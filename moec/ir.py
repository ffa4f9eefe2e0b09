"""moec's canonical description of an MoE block.

Every MoE block moec rewrites, whatever code it was written in, is described by one
`MoESpec`: how the router turns a token into (expert ids, combine weights), what each
expert computes, and what is added beside the routed experts. The canonical ops in
`moec.ops` take exactly this description.

Legend used in shape comments across moec: T = tokens, H = hidden size, E = experts,
k = experts per token, I = expert intermediate size, N1 = 2*I for gated experts else I.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field, replace

SCORINGS = ("softmax", "sigmoid", "none", "sparsemixer")
GROUP_SCORES = ("max", "top2_sum")
WEIGHTINGS = ("scores", "ones")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")
# how a gated expert's W13 rows hold gate and up: gate rows then up rows, the reverse, or alternating
GATE_UPS = ("halves", "halves_up_first", "interleave", "interleave_up_first")


@dataclass(frozen=True)
class RouterSpec:
    """logits = x @ W.T + b  ->  ids, weights.   (upcast: x, W, b cast to fp32 first, as the block does)

    scores  = scoring(logits)                          # [T, E], fp32
    choice  = scores (or the logits) + select_bias     # what the block's top-k compares; bias steers selection only
    choice  = keep the `topk_group` best of `n_group` groups (group score: max or top-2 sum)
    ids     = topk(choice, top_k)                      # [T, k]
    weights = scores[ids] (or 1) / (renorm-norm + eps) * scale # [T, k]
    weights = 0 where past capacity                    # see moec::capacity

    "top-k on logits then softmax over the k" is select_on="logits", softmax, renorm=1: the weights are
    the softmax of the chosen logits, computed that way (the same numbers, not just the same math:
    a softmax over all E saturates and ties where the logits do not).

    scoring="sparsemixer" (PhiMoE, eval mode) replaces scoring, selection and weights: k
    sequential picks, pick j taking the best logit m_j not picked yet, weighted by the softmax
    over the not-yet-picked logits l with (m_j - l) / max(|l|, m_j) <= 2 * jitter_eps.
    """

    top_k: int
    scoring: str = "softmax"
    select_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    weighting: str = "scores"
    renorm: float = 0.0  # 0: none; p > 0: divide by the p-norm of the k weights (p=1: their sum)
    scale: float = 1.0
    capacity: int = 0  # 0: none; c > 0: each expert takes at most c (token, slot) pairs, later ones dropped
    capacity_per_row: bool = False  # count capacity per batch row of the block input (Switch), else over all tokens
    # a capacity that follows the n tokens counted (capacity_for): max(capacity, form(factor, n, E)) + offset
    capacity_factor: float = 0.0  # 0: the constant `capacity`
    capacity_form: str = "ceil"  # "ceil": ceil(f*n/E); "ceil_per_expert": floor(f*ceil(n/E)); "floor": floor(f*n/E)
    capacity_offset: int = 0
    capacity_renorm: bool = False  # the kept weights are renormalised after the drop (GShard), not before
    capacity_priority: str = "order"  # "order": first come first served (slot-major, then token order);
    # "score": each expert keeps its top-capacity pairs by routing score (a top-k over the tokens)
    capacity_rank: str = "block"  # priority "score" ranks the weights rounded to the block's dtype, or in "fp32"
    dropped: str = "zero"  # a token whose every pair is dropped outputs "zero" or its "input" (passed through)
    jitter_eps: float = 0.0  # sparsemixer only: relative threshold of the masked softmax
    select_on: str = "scores"  # "scores" or "logits": the values the block's selection compares (sequential
    # argmax picks: one per pick, comma-separated, e.g. GShard's "scores,logits")
    upcast: bool = False  # the router GEMM runs in fp32 (the block casts its input and weight up first)
    selection: str = "topk"  # "topk" or "argmax": the op the block selects with (they break ties apart); argmax
    # with k > 1 is k sequential picks (GShard's top-2), each over the values with the earlier picks set to pick_mask
    pick_mask: float = float("-inf")
    renorm_eps: float = 0.0  # added to the renormalisation's sum (DeepSeek: + 1e-20, so all-zero weights stay 0)
    renorm_floor: float = 0.0  # the renormalisation's sum clamped to at least this (GShard: clamp(min=eps))
    # top-p routing (reduce_topk with moec.TopP, an approximation): a token keeps its fewest heaviest experts
    # holding top_p of its k weights (at least min_k); a dropped pair gets weight 0 and the heaviest expert's id
    top_p: float = 0.0
    min_k: int = 1

    @property
    def renorm_after_drop(self) -> bool:
        """moec::capacity, not the route, renormalises and scales: the weights it ranks or renormalises after
        the drop are the scores as chosen."""
        return bool(self.capacity) and (self.capacity_renorm or self.capacity_priority == "score")

    def capacity_for(self, n: int, num_experts: int) -> int:
        """Pairs each expert keeps when n tokens are counted together (a row, or all of them)."""
        if not self.capacity_factor:
            return self.capacity
        f, E = self.capacity_factor, num_experts
        grown = {"ceil": lambda: math.ceil(f * n / E - 1e-9), "ceil_per_expert": lambda: math.floor(f * -(-n // E) + 1e-9),
                 "floor": lambda: math.floor(f * n / E + 1e-9)}[self.capacity_form]()
        return max(self.capacity, grown) + self.capacity_offset

    def to_json(self) -> str:
        """The spec as moec::route's `router` argument (a string: op schemas take no objects), in single quotes:
        Inductor's C++ wrapper writes string arguments into C++ literals unescaped."""
        return json.dumps(asdict(self), sort_keys=True).replace('"', "'")

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def from_json(text: str) -> "RouterSpec":
        return RouterSpec(**json.loads(text.replace("'", '"')))

    def describe(self) -> str:
        if self.scoring == "external":  # an experts module: the block around it routes
            return f"top-{self.top_k} chosen by the caller (experts module rewritten alone)"
        parts = [f"{self.scoring}" if self.scoring != "none" else "logits"]
        if self.select_on.split(",")[0] == "logits" and self.scoring in ("softmax", "sigmoid"):
            parts = ["logits"]
        if self.scoring == "sparsemixer":
            parts = [f"sparsemixer(eps={self.jitter_eps:g})"]
        if self.select_bias:
            parts.append("+bias(select)")
        if self.n_group > 1:
            parts.append(f"group-limited {self.topk_group}/{self.n_group} ({self.group_score})")
        if self.scoring == "sparsemixer":
            parts.append(f"top-{self.top_k}")
        elif self.selection == "argmax" and self.top_k > 1:
            parts.append(f"{self.top_k} argmax picks ({self.select_on}; earlier picks -> {self.pick_mask:g})")
        else:
            parts.append(f"top-{self.top_k}" + (f" top-p {self.top_p:g} (>= {self.min_k})" if self.top_p else ""))
        if self.select_on.split(",")[0] == "logits" and self.scoring in ("softmax", "sigmoid"):
            parts.append(f"{self.scoring} of the chosen" if self.renorm == 1.0 and self.scoring == "softmax"
                         else self.scoring)
        if self.weighting == "ones":
            parts.append("weight 1")
        chosen_softmax = self.select_on == "logits" and self.scoring == "softmax" and self.renorm == 1.0
        if self.renorm and not chosen_softmax and not (self.capacity and self.capacity_renorm):
            parts.append("renorm" if self.renorm == 1.0 else f"renorm p={self.renorm:g}")
        if self.scale != 1.0:
            parts.append(f"x{self.scale:g}")
        if self.capacity:
            c = (f"capacity max({self.capacity}, {self.capacity_form}({self.capacity_factor:g} n/E))"
                 + (f"{self.capacity_offset:+d}" if self.capacity_offset else "")) if self.capacity_factor \
                else f"capacity {self.capacity}"
            parts.append(c + ("/row" if self.capacity_per_row else "") + (" by score" if self.capacity_priority == "score"
                                                                            else "")
                         + (" -> renorm" if self.capacity_renorm and self.renorm else "")
                         + (", dropped tokens pass through" if self.dropped == "input" else ""))
        return " -> ".join(parts)


@dataclass(frozen=True)
class ExpertsSpec:
    """Each expert: y = W2 @ act(W13 @ x + b13) + b2, with W13 [N1, H] holding the gate and up rows
    when gated (act(gate) * up), in the order `gate_up` says (GATE_UPS: the block's own order, so its
    weights are read in place). `weight_on_input` scales the expert's input by the combine weight
    instead of its output (Llama 4). `identity` zero-compute experts follow the E real ones in the router's
    choice: a pair choosing one adds the token times its weight (LongCat-Flash)."""

    num_experts: int
    hidden: int
    inter: int
    activation: str = "silu"
    gated: bool = True
    bias: bool = False
    alpha: float = 1.702  # swiglu_oai only: gate * sigmoid(alpha * gate)
    limit: float = 7.0  # swiglu_oai only: clamp bound
    weight_on_input: bool = False
    gate_up: str = "halves"
    identity: int = 0  # zero-compute experts (LongCat-Flash): router ids E..E+identity-1 return the token itself

    def describe(self) -> str:
        act = {"silu": "SwiGLU", "gelu": "GeGLU", "gelu_tanh": "GeGLU(tanh)", "relu": "ReGLU",
               "swiglu_oai": f"clamped SwiGLU(alpha={self.alpha:g}, limit={self.limit:g})"}
        name = act[self.activation] if self.gated else f"{self.activation.upper()} MLP"
        extra = (" +bias" if self.bias else "") + (" (weight on input)" if self.weight_on_input else "") + (
            f" [{self.gate_up.replace('_', ' ')} rows]" if self.gated and self.gate_up != "halves" else "")
        extra += f" + {self.identity} zero-compute (identity) experts" if self.identity else ""
        return f"{self.num_experts} x {name} {self.hidden}->{self.inter}->{self.hidden}{extra}"


@dataclass(frozen=True)
class SharedSpec:
    """Dense experts added to the routed output: module(x) [* sigmoid(gate(x))] [* scale]. A block that scales
    the sum, (routed + shared) * c (Cohere2-MoE's "average": c = 1/2), has scale c here and c in its router's
    scale."""

    module: str  # path of the shared MLP inside the block
    gate: str | None = None  # path of a Linear(H, 1) whose sigmoid scales the shared output
    scale: float = 1.0

    def describe(self) -> str:
        return f"{self.module}" + (f" * sigmoid({self.gate})" if self.gate else "") + (
            f" x{self.scale:g}" if self.scale != 1.0 else "")


@dataclass(frozen=True)
class MoESpec:
    """A proved MoE block. `params` says, for each canonical role, where its tensor comes from in the
    block (the graph's inputs; moec.bindings gets them at call time)."""

    router: RouterSpec
    experts: ExpertsSpec
    shared: SharedSpec | None = None
    params: dict[str, str] = field(default_factory=dict)
    # roles: router_weight, router_bias, select_bias, w13, b13, w2, b2, out_bias ([H], added after the combine)
    outputs: tuple[str, ...] = ("out",)  # the block's return structure, e.g. ("out", "logits")
    quant: object = None  # a moec.quant config once quantize_experts ran (Int8Experts / Int4Experts)
    offloaded: bool = False  # offload_experts ran: the experts live in the model's expert pool (moec.offload)
    kept: int = 0  # reduce_experts ran: the block holds this many experts (its router still names E)
    sharded: str = ""  # shard_experts ran: which experts this rank holds (moec.distributed)
    counters: tuple[str, ...] = ()  # [E] buffers the block's forward adds its tokens per expert to (torchtitan's
    # tokens_per_expert, for load balancing): the compiled block adds them too (canonical.CompiledForward)

    @property
    def router_width(self) -> int:
        """The router's outputs: the experts, then the zero-compute ones."""
        return self.experts.num_experts + self.experts.identity

    def with_(self, **kw) -> "MoESpec":
        return replace(self, **kw)

    def describe(self) -> dict[str, str]:
        return {
            "router": self.router.describe(),
            "experts": self.experts.describe() + (" +output bias" if "out_bias" in self.params else "")
            + (f" [{self.quant.describe()}]" if self.quant else "") + (" [offloaded]" if self.offloaded else "")
            + (f" [{self.kept} kept]" if self.kept else "") + (f" [{self.sharded}]" if self.sharded else "")
            + (f" [tokens counted into {', '.join(self.counters)}]" if self.counters else ""),
            "shared": self.shared.describe() if self.shared else "-",
        }
