"""Expert layouts: which of a candidate's expert tensors are gate, up and down, how they are stored,
and the bindings (moec.bindings) that give moec's canonical W13 [E, N1, H] / W2 [E, H, I] from them.

A layout is only a hypothesis: detect_moe keeps the one whose expert outputs explain the block's
output. Canonical tensors are views of the block's own wherever possible (transposed, unflattened,
a fused gate/up tensor in its own row order: ExpertsSpec.gate_up); stacking a ModuleList's experts
or concatenating separate gate and up tensors copies, once (moec.bindings.Derived).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from torch import nn

from moec.bindings import Binding, Derived, Param, Part, resolve
from moec.passes.detect.candidates import Candidate, member_names


@dataclass(frozen=True)
class Layout:
    """Where the canonical W13/b13/W2/b2 come from in the block."""

    ins: tuple[tuple[str, bool], ...]  # (name, transposed): (fused or plain,) or (gate, up)
    down: tuple[str, bool]
    split: str | None = None  # a fused gate/up tensor's row order (moec.ir.GATE_UPS)
    in_bias: tuple[str | None, ...] = ()
    down_bias: str | None = None

    @property
    def gated(self) -> bool:
        return len(self.ins) == 2 or self.split is not None

    @property
    def gate_up(self) -> str:
        return self.split or "halves"


def _shape(block: nn.Module, cand: Candidate, name: str) -> tuple[int, ...]:
    """Shape of a canonical-stacked expert tensor [E, ...] without building it."""
    E = cand.num_experts
    if cand.container is not None:
        group = resolve(block, cand.container)
        return (E, *resolve(getattr(group, member_names(group)[0]), name).shape)
    t = resolve(block, name)
    if t.shape[0] == E or t.dim() == 3:  # [E, ...], or [E + zero-compute experts, ...]: the first E
        return (E, *t.shape[1:])
    return (E, t.shape[0] // E, *t.shape[1:])  # 2-D [E*n, D]


def layouts(block: nn.Module, cand: Candidate):
    """Every assignment of the expert tensors to (gate, up, down) that the shapes allow."""
    H = cand.hidden
    shapes = {n: _shape(block, cand, n) for n in cand.experts}
    mats = [n for n, s in shapes.items() if len(s) == 3]
    vecs = [n for n, s in shapes.items() if len(s) == 2]

    def orient(name, role):  # (transposed, n) pairs giving [E, n, H] ("in") or [E, H, n] ("out")
        a, b = shapes[name][1:]
        want_last = role == "in"
        return [(t, n) for t, (x, n) in ((False, (b, a) if want_last else (a, b)),
                                         (True, (a, b) if want_last else (b, a))) if x == H]

    def biases(name, n):  # the bias named after the matrix, else every vector that fits (the fit decides)
        stem = name.removesuffix("weight")
        named = [v for v in vecs if v.startswith(stem) and shapes[v][1] == n]
        return named or [v for v in vecs if shapes[v][1] == n] + [None] if vecs else [None]

    def with_biases(ins, down, split, n_in):
        for bs in itertools.product(*(biases(m, n_in) for m, _ in ins), biases(down[0], H)):
            used = [b for b in bs if b]
            if len(used) == len(set(used)):
                yield Layout(ins, down, split, bs[:-1], bs[-1])

    for down in mats:
        for dt, inter in orient(down, "out"):
            rest = [m for m in mats if m != down]
            if len(rest) == 2:
                for g, u in (rest, rest[::-1]):
                    for (gt, gn), (ut, un) in itertools.product(orient(g, "in"), orient(u, "in")):
                        if gn == un == inter:
                            yield from with_biases(((g, gt), (u, ut)), (down, dt), None, inter)
            elif len(rest) == 1:
                for it, n in orient(rest[0], "in"):
                    if n == 2 * inter:
                        for split in ("halves", "interleave", "halves_up_first", "interleave_up_first"):
                            yield from with_biases(((rest[0], it),), (down, dt), split, n)
                    if n == inter:
                        yield from with_biases(((rest[0], it),), (down, dt), None, n)


def bindings(block: nn.Module, cand: Candidate, lay: Layout) -> dict[str, Binding]:
    """Canonical expert roles (w13, w2, b13?, b2?) -> how each is read from the block."""
    group = resolve(block, cand.container) if cand.container is not None else None
    members = tuple(member_names(group)) if group is not None else ()

    def part(name: str, transposed: bool = False) -> Part:
        if group is not None:
            return Part(name, transposed, cand.container, members)
        t, E = resolve(block, name), cand.num_experts
        return Part(name, transposed, unflatten=E if t.dim() == 2 and t.shape[0] != E else 0,
                    rows=E if t.dim() == 3 and t.shape[0] != E else 0)

    def binding(parts) -> Binding:
        p = parts[0]
        if len(parts) == 1 and isinstance(p, Part) and p.container is None and not (p.transposed or p.unflatten
                                                                                        or p.rows):
            return Param(p.name)  # the block's own tensor, as it is
        return Derived(tuple(parts))

    out = {"w13": binding([part(*i) for i in lay.ins]), "w2": binding([part(*lay.down)])}
    if any(lay.in_bias):  # a projection without bias gets zeros beside one with
        n = [_shape(block, cand, m)[2 if t else 1] for m, t in lay.ins]
        out["b13"] = binding([part(b) if b else n_i for b, n_i in zip(lay.in_bias, n)])
    if lay.down_bias:
        out["b2"] = binding([part(lay.down_bias)])
    return out


def materialize(block: nn.Module, roles: dict[str, Binding], experts=None) -> dict:
    """role -> tensor, built from the block's tensors now (`experts`: only those rows, for fitting)."""
    return {r: b.derive(block, experts) if isinstance(b, Derived) else
            (b.get(block) if experts is None else b.get(block)[experts]) for r, b in roles.items()}
