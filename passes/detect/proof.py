"""The proof: a candidate's compiled graph against the original block, on inputs chosen to reach
what random inputs miss, and on the graph that will actually run.

Probes (fixed seeds, built on the CPU then moved):
    tokens     N(0,1) inputs of 1, 2, 3, 16 and 300 tokens, plus the token counts where the passes'
               kernels change path (each lowering pass lists them: pass.proof_tokens(spec))
    batch      2 rows of 7 tokens (row-wise capacity: 2 rows that overflow it)
    zeros      all-zero tokens: every logit equals the router bias, a tie between all experts
    x100       inputs 100x larger: saturated scores (ties the block itself makes, e.g. softmax -> 0)
    experts    one token per expert, made to route to it (least squares through the router weight),
               so every expert runs at least once; with expert modules (a ModuleList), each module is
               also called directly against its canonical weights
The original block's outputs are computed once per dtype (under moec.capture.untouched: the block
is left as it was) and every graph is compared with them: the canonical graph in fp32 at 1e-4, the
final graph in the block's dtype at the dtype's tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moec.backends.torch_backend import activate, route_math
from moec.capture import untouched
from moec.ir import MoESpec
from moec.ops import route_args
from moec.pass_manager import Rejected

TOKENS = (1, 2, 3, 16, 300)
TOL = {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class Probe:
    name: str
    x: torch.Tensor  # fp32, in the block's input layout ([B, S, H] or [T, H])
    extra: tuple = ()  # further inputs (an experts module's ids and weights)


@dataclass
class Proof:
    """The probes of one block and the original's outputs on them (computed once per dtype)."""

    block: nn.Module
    forward: object  # the block's original forward (callable)
    probes: list[Probe]
    reached: set = field(default_factory=set)  # the experts the probes route to
    ranks: tuple = ()  # the input ranks proved ([T, H]: 2, [B, S, H]: 3); a call with another runs the original
    _refs: dict = field(default_factory=dict)

    def describe(self) -> str:
        tokens = sorted({p.x.shape[-2] if p.x.dim() == 3 else p.x.shape[0] for p in self.probes
                         if p.name.endswith("token(s)")})
        others = [p.name for p in self.probes if not p.name.endswith("token(s)")]
        return f"{len(self.probes)} probes: {', '.join(map(str, tokens))} tokens; {'; '.join(others)}"

    def add_tokens(self, thresholds, in_dim: int) -> None:
        """N(0,1) probes on both sides of each token count where the final graph's kernels change path
        (the probes already there count: 16 and 300 tokens cross a threshold of 257). An experts module's probes
        (routings: 1-300 tokens, 40 pairs on the same experts) cross them already."""
        if self.probes[0].extra:
            return
        have = {p.x.shape[-2] if p.x.dim() == 3 else p.x.shape[0] for p in self.probes if p.name.endswith("token(s)")}
        gen = torch.Generator(device="cpu").manual_seed(4)
        H, dev = self.probes[0].x.shape[-1], self.probes[0].x.device
        for T in sorted(t for t in set(thresholds) if not (any(h < t for h in have) and any(h >= t for h in have))):
            x = torch.randn((1, T, H) if in_dim == 3 else (T, H), generator=gen, device="cpu").to(dev)
            self.probes.append(Probe(f"{T} token(s)", x))

    def add_other_rank(self, run, flat: bool = False) -> None:
        """Prove the other input layout too where the block takes it: the 300-token and the 2-row probes as
        [T, H] for a block analysed on [B, S, H] inputs (rows merged into one sequence), or as [1, T, H] the
        other way round; with `flat` (a block that returns its output flattened, as ERNIE-4.5-VL's, which is called
        on the selected tokens' flattened states) also as [T*H]. A block that raises on a layout, or computes
        something else there (a rule per row on [B, S, H] but another on [T, H]), is not proved for it."""
        in_dim = self.probes[0].x.dim()
        base = [p for p in self.probes if p.name in ("300 token(s)", ) or " rows of " in p.name]
        layouts = [(2, "[T, H]", lambda x: x.reshape(-1, x.shape[-1])) if in_dim == 3 else
                   (3, "[1, T, H]", lambda x: x.unsqueeze(0))] + ([(1, "[T*H]", lambda x: x.reshape(-1))] if flat else [])
        ranks = [in_dim]
        for rank, name, layout in layouts:
            other = [Probe(f"{p.name} as {name}", layout(p.x)) for p in base]
            alt = Proof(self.block, self.forward, other)
            try:
                alt.check(run, torch.float32, "the canonical form", 1e-4)
            except Exception:  # noqa: BLE001  the block raises on that layout, or differs there
                continue
            self._refs.update({(len(self.probes) + i, d): v for (i, d), v in alt._refs.items()})
            self.probes += other
            ranks.append(rank)
        self.ranks = tuple(sorted(ranks))

    def reference(self, i: int, dtype: torch.dtype):
        key = (i, dtype)
        if key not in self._refs:
            x = self.probes[i].x.to(dtype)
            with torch.no_grad(), untouched(self.block):
                self._refs[key] = self.forward(x, *self.probes[i].extra)
        return self._refs[key]

    def check(self, run, dtype: torch.dtype, what: str, tol: float | None = None, error=Rejected,
              reference=None) -> None:
        """Raise `error` unless run(x) equals the original (or `reference(x)`) on every probe: the main output
        and router logits/weights at `tol` (the dtype's by default), the expert ids exactly."""
        tol = TOL.get(dtype, 1e-4) if tol is None else tol
        for i, p in enumerate(self.probes):
            x = p.x.to(dtype)
            with torch.no_grad():
                ref = self.reference(i, dtype) if reference is None else reference(x, *p.extra)
                got = run(x, *p.extra)
            for j, (a, b) in enumerate(zip(_leaves(got), _leaves(ref))):
                if a is None or b is None:
                    continue
                if a.shape != b.shape:
                    raise error(f"{what} returns output {j} of shape {tuple(a.shape)} on {p.name}, the block "
                                   f"{tuple(b.shape)}")
                if not a.is_floating_point():
                    if not torch.equal(a.sort(-1).values, b.sort(-1).values):
                        raise error(f"{what} picks other experts than the block on {p.name}")
                    continue
                err = rel_err(a, b)
                if not err <= tol:  # nan fails too
                    raise error(f"{what} differs from the block on {p.name}: relative error {err:.2e} > {tol:.0e}")


    def error(self, run, dtype: torch.dtype) -> float:
        """The largest relative error of run's main output against the original's over the probes (what an
        approximating pass costs; `check` is for the graphs that must equal a reference)."""
        worst = 0.0
        for i, p in enumerate(self.probes):
            with torch.no_grad():
                got, ref = _leaves(run(p.x.to(dtype), *p.extra))[0], _leaves(self.reference(i, dtype))[0]
            worst = max(worst, rel_err(got, ref))
        return worst


def _leaves(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| over the finite entries; inf if a and b are not finite at the same places
    (or not the same inf/nan there)."""
    a, b = a.double(), b.double()
    fa, fb = a.isfinite(), b.isfinite()
    if not torch.equal(fa, fb) or not torch.equal(a[~fa].nan_to_num(0.0, 1.0, -1.0), b[~fb].nan_to_num(0.0, 1.0, -1.0)):
        return math.inf
    if not fa.any():
        return 0.0
    return ((a[fa] - b[fa]).abs().max() / b[fa].abs().max().clamp_min(1e-6)).item()


def probes(spec: MoESpec, in_dim: int, router: dict[str, torch.Tensor | None], device, extra_tokens=()) -> list[Probe]:
    """The probe inputs of a block (see the module docstring). `router`: weight, bias, select_bias."""
    H, E = spec.experts.hidden, spec.experts.num_experts
    gen = torch.Generator(device="cpu").manual_seed(1)
    shape = (lambda B, T: (B, T, H)) if in_dim == 3 else (lambda B, T: (B * T, H))
    out = [Probe(f"{T} token(s)", torch.randn(shape(1, T), generator=gen, device="cpu"))
           for T in sorted({*TOKENS, *extra_tokens})]
    B, S = (2, E * spec.router.capacity + 1) if spec.router.capacity else (2, 7)
    out.append(Probe(f"{B} rows of {S} tokens", torch.randn(shape(B, S), generator=gen, device="cpu")))
    out.append(Probe("zero tokens (all experts tied)", torch.zeros(shape(1, 4), device="cpu")))
    out.append(Probe("inputs x100 (saturated scores)", 100 * torch.randn(shape(1, 8), generator=gen, device="cpu")))
    eye = torch.eye(spec.router_width, dtype=torch.float64, device="cpu")
    out.append(Probe("one token routed to each expert", _expert_tokens(router, eye).reshape(shape(1, -1))))
    if spec.experts.identity:  # zero-compute experts only: no real expert's output counts
        out.append(Probe("tokens routed to zero-compute experts", _expert_tokens(router, eye[E:].sum(0, keepdim=True))
                         .expand(3, -1).reshape(shape(1, 3))))
    for p in out:
        p.x = p.x.to(device)
    return out


def _expert_tokens(router: dict, favour: torch.Tensor) -> torch.Tensor:
    """[n, H] tokens, token i made so that the router's logits favour the experts of `favour`'s row i ([n, E], 0/1)
    (least squares through the router weight: exact when H >= E). Which experts they reach is measured by
    `reached`."""
    W = router["router_weight"].detach().double().cpu()  # [E, H]
    target = 8.0 * favour  # logits: +8 on the experts favoured, 0 elsewhere
    if router.get("router_bias") is not None:
        target = target - router["router_bias"].detach().double().cpu()
    if router.get("select_bias") is not None:  # selection uses scores + bias: outweigh the bias
        target = target - 4.0 * router["select_bias"].detach().double().cpu().clamp(-2, 2)
    return torch.linalg.lstsq(W, target.T, driver="gelsd").solution.T.float()  # [E, H]


def reached(spec: MoESpec, router: dict, tokens: torch.Tensor) -> set[int]:
    """The experts the routing chooses for `tokens` [T, H]."""
    x = tokens.reshape(-1, spec.experts.hidden).to(router["router_weight"])
    _, ids, _ = route_math(x, router["router_weight"], router.get("router_bias"), router.get("select_bias"),
                           *route_args(spec.router), num_experts=spec.router_width)
    return set(ids.unique().tolist())


def check_expert_modules(spec: MoESpec, members: list[nn.Module], w: dict[str, torch.Tensor]) -> None:
    """Call each expert module on random tokens against its canonical weights: an expert whose module
    computes something else (another activation, another layout) is found even if no token reaches it."""
    e = spec.experts
    gen = torch.Generator(device="cpu").manual_seed(3)
    x = torch.randn(5, e.hidden, generator=gen, device="cpu").to(w["w13"])
    for i, m in enumerate(members):
        try:
            with torch.no_grad(), untouched(m):
                got = m(x)
        except Exception:  # noqa: BLE001  an expert module that cannot be called alone: the routed probes decide
            return
        if not isinstance(got, torch.Tensor) or got.shape != x.shape:
            return
        h = F.linear(x, w["w13"][i], None if "b13" not in w else w["b13"][i])
        a = activate(h, e.activation, e.gated, e.alpha, e.limit, e.gate_up)
        ref = F.linear(a, w["w2"][i], None if "b2" not in w else w["b2"][i])
        if e.weight_on_input:
            continue  # Llama 4 scales the input: the module alone computes the unweighted expert
        err = rel_err(got, ref)
        if not err <= 1e-4:
            raise Rejected(f"expert {i}'s module does not compute {e.describe()} with its weights (relative error "
                           f"{err:.1e}): experts that differ from one another are not supported")


def kernel_tokens(rows_per_expert: float, spec: MoESpec) -> int:
    """The token count at which every expert gets `rows_per_expert` rows on average (routing uniform)."""
    return max(1, math.ceil(rows_per_expert * spec.experts.num_experts / spec.router.top_k))
