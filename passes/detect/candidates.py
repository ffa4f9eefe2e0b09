"""Structural MoE candidates: a module holding an E-way router weight next to E experts.

Found from the module tree alone (shapes, never class names), unproved: detect_moe analyses and
proves each. Experts are a ModuleList/ModuleDict of E identical MLPs, stacked [E, ., .] tensors
(in one module, or one per sibling module), or same-shape 2-D [E*n, D] tensors viewed per expert.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from moec.bindings import resolve


@dataclass
class Candidate:
    """A module with an E-way router weight next to E experts (structure only, unproved)."""

    path: str
    module: nn.Module
    num_experts: int
    hidden: int
    router: str  # path (inside the block) of the router weight
    experts: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)  # name -> [E, ...]
    container: str | None = None  # ModuleList/ModuleDict path when experts are modules
    width: int = 0  # the router's outputs when more than E: E experts, then zero-compute ones (LongCat-Flash)
    call: dict | None = None  # an experts module called with the routing (detect.experts_only): how it is called


def _expert_groups(m: nn.Module):
    """Yield (E, container path or None, {name: [E, ...] tensor}, width) for each expert group in m; width: the
    router's outputs it may have beside E (E + zero-compute experts: nn.Identity members, or rows of a fused gate/up
    tensor beyond the down tensor's E), else 0."""
    for path, sub in m.named_modules():
        if isinstance(sub, (nn.ModuleList, nn.ModuleDict)) and len(sub) >= 2:
            children = members(sub)
            sig = [tuple((n, tuple(p.shape)) for n, p in c.named_parameters()) for c in children]
            if len(sig) >= 2 and sig[0] and all(s == sig[0] for s in sig) and sum(len(s) == 2 for _, s in sig[0]) >= 2:
                yield len(children), path, {n: None for n, _ in sig[0]}, len(sub) if len(sub) > len(children) else 0
    stacked: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for name, t in itertools.chain(m.named_parameters(), m.named_buffers()):
        if t.dim() == 3 and t.shape[0] >= 2:
            stacked.setdefault((name.rpartition(".")[0], t.shape[0]), {})[name] = t
    for (parent, E), mats in list(stacked.items()):
        if len(mats) == 1 and parent:  # one matrix per module (JetMoE input_linear, output_linear):
            del stacked[(parent, E)]  # pair sibling modules, keyed "<their parent>/*"
            stacked.setdefault((parent.rpartition(".")[0] + "/*", E), {}).update(mats)
    widths = {}
    for parent in {p for p, _ in stacked}:  # one [E+Z, N1, H] tensor, one [E, H, I]: Z zero-compute experts
        sizes = sorted(E for p, E in stacked if p == parent)
        if len(sizes) == 2 and len(stacked[(parent, sizes[0])]) == len(stacked[(parent, sizes[1])]) == 1:
            stacked[(parent, sizes[0])].update(stacked.pop((parent, sizes[1])))
            widths[(parent, sizes[0])] = sizes[1]
    for (parent, E), mats in stacked.items():
        if len(mats) >= 2:
            parents = {n.rpartition(".")[0] for n in mats}
            for name, t in itertools.chain(m.named_parameters(), m.named_buffers()):
                if name.rpartition(".")[0] in parents and t.dim() == 2 and t.shape[0] == E:
                    mats[name] = t  # per-expert biases beside the matrices
            yield E, None, mats, widths.get((parent, E), 0)
    yield from _flat_expert_groups(m, {n.rpartition(".")[0] for mats in stacked.values() for n in mats})


def _flat_expert_groups(m: nn.Module, stacked_parents: set[str]):
    """Experts as same-shape 2-D [E*n, D] matrices in one module (DBRX w1, v1, w2), viewed as
    [E, n, D] at run time; E is read off a 2-D [E, D] tensor (the router) elsewhere in m."""
    params = dict(itertools.chain(m.named_parameters(), m.named_buffers()))
    flat: dict[tuple[str, tuple[int, ...]], dict[str, torch.Tensor]] = {}
    for name, t in params.items():
        parent = name.rpartition(".")[0]
        if t.dim() == 2 and parent not in stacked_parents:
            flat.setdefault((parent, tuple(t.shape)), {})[name] = t
    for (parent, (N, D)), mats in flat.items():
        if len(mats) >= 2:
            routers = {t.shape[0] for n, t in params.items() if t.dim() == 2 and n.rpartition(".")[0] != parent
                       and t.shape[1] == D and 2 <= t.shape[0] < N and N % t.shape[0] == 0}
            for E in sorted(routers):
                yield E, None, mats, 0


def find_candidates(model: nn.Module) -> list[Candidate]:
    found = []
    for path, m in model.named_modules():
        gm = m.__dict__.get("_moec_graph")
        if gm is not None and gm.meta["moe_spec"].kept:  # compiled with fewer experts (reduce_experts): its tensors
            spec = gm.meta["moe_spec"]  # no longer show E experts; the candidate only names it (moec.api refuses a recompile)
            found.append(Candidate(path, m, spec.experts.num_experts, spec.experts.hidden, spec.params.get("router_weight", "")))
            continue
        for E, container, tensors, width in _expert_groups(m):
            inside = (container + ".") if container else None
            dims = {d for n, t in tensors.items() if t is not None for d in t.shape[1:]}
            if container:
                dims = {d for c in resolve(m, container).children() for p in c.parameters() for d in p.shape}
            outside = [(n, t) for n, t in itertools.chain(m.named_parameters(), m.named_buffers())
                       if not ((inside and n.startswith(inside)) or n in tensors)]
            # an E-way router first; a wider one only where the experts show zero-compute ones
            cand = next((Candidate(path, m, E, *router, tensors, container, R if R != E else 0)
                         for R in dict.fromkeys((E, width or E)) if (router := _router(outside, R, dims))), None)
            if cand:
                found.append(cand)
                break
    # the innermost module holding router + experts is the block
    return [c for c in found if not any(o.path.startswith(c.path + ".") or (c.path == "" and o.path)
                                        for o in found if o is not c)]


def _router(tensors: list[tuple[str, torch.Tensor]], E: int, dims: set[int]) -> tuple[int, str] | None:
    """(H, name) of the first tensor that can be an E-way router over the experts' dims: [E, H], [H, E] or [E*H]."""
    for name, t in tensors:
        if t.dim() == 1:  # a router stored flattened [E*H], viewed at run time
            other = next((d for d in sorted(dims) if d != E and t.numel() == E * d), None)
            if other is not None:
                return other, name
            continue
        if t.dim() != 2 or E not in t.shape:
            continue
        other = t.shape[1] if t.shape[0] == E else t.shape[0]
        if other in dims and other != E or (t.shape == (E, E) and E in dims):
            return other, name
    return None


def member_names(group: nn.ModuleList | nn.ModuleDict) -> list[str]:
    """The experts of a container: its children holding parameters (NLLB-MoE keeps a dropout there too)."""
    return [n for n, c in group.named_children() if next(c.parameters(), None) is not None]


def members(group: nn.ModuleList | nn.ModuleDict) -> list[nn.Module]:
    return [getattr(group, n) for n in member_names(group)]
