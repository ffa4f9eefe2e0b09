"""Experts modules: when a whole block cannot be rewritten, the module that runs its experts may be.

A block can hold more than an MoE (router and experts as siblings inside a layer that also runs
attention), return what moec does not compute (an aux loss), or store statistics: moec leaves such a
block as it is. Its experts often live in a module of their own called with the routing the block
computed, `experts(x [T, H], ids [T, k], weights [T, k]) -> [T, H]` (HF's experts modules, most
libraries' "Experts" classes). That call is a canonical experts op by itself: moec rewrites the
experts module (batched experts, quantization, the Triton kernels), the block's own code keeps routing.

    experts_candidate(block, cand)  the experts module of a rejected candidate and how the block calls it
                                    (which argument is x, ids, weights), seen in one run of the block
    analyze(module, cand)           its layout and activation: the module's output on random routing must be
                                    sum_j w[t, j] * expert[ids[t, j]](x[t]) for one of the layouts
    probes(...)                     routing the proof tries: 1-300 tokens, every pair on one expert, every
                                    expert, zero and large weights
"""

from __future__ import annotations

import inspect
import itertools

import torch
from torch import nn

from moec.backends.torch_backend import all_experts
from moec.bindings import resolve
from moec.capture import capture, untouched
from moec.ir import ExpertsSpec, MoESpec, RouterSpec
from moec.pass_manager import Rejected
from moec.passes.detect import features as feat
from moec.passes.detect.candidates import Candidate
from moec.passes.detect.layouts import bindings as layout_bindings
from moec.passes.detect.layouts import layouts, materialize
from moec.passes.detect.proof import Probe, rel_err

EXTERNAL = "external"  # RouterSpec.scoring of an experts module: the caller routes


def _owners(cand: Candidate) -> list[str]:
    """Paths (in the block) of the modules holding every expert tensor, innermost first; not the block."""
    parts = [n.split(".")[:-1] for n in ([cand.container] if cand.container else cand.experts)]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return [".".join(common[:i]) for i in range(len(common), 0, -1)]


def experts_candidate(block: nn.Module, cand: Candidate, x: torch.Tensor) -> Candidate | None:
    """The experts module of `cand` (a rejected block) as a candidate of its own, with how the block calls it:
    the innermost module holding every expert, called once per run with x [.., H], integer ids [.., k] < E and
    float weights [.., k] among its arguments."""
    owners = [p for p in _owners(cand) if not cand.router.startswith(p + ".")
              and not isinstance(resolve(block, p), (nn.ModuleList, nn.ModuleDict))]
    if not owners:
        return None
    try:
        with untouched(block):
            cap = capture(block, x)
    except Exception:  # noqa: BLE001  a block that does not run alone: nothing to learn here
        return None
    for path in owners:
        found = _routed_call(resolve(block, path), [c for c in cap.calls if c.path == path], cand)
        if found is not None:
            return _sub_candidate(cand, path, resolve(block, path), found)
    return None


def _routed_call(module: nn.Module, calls, cand: Candidate) -> dict | None:
    """Which of the module's arguments are x, ids and weights, if its one call passes them."""
    if len(calls) != 1:
        return None
    sig = inspect.signature(module.forward)
    try:
        bound = sig.bind(*calls[0].args, **calls[0].kwargs).arguments
    except TypeError:
        return None
    roles, k = {}, None
    for name, v in bound.items():
        if not isinstance(v, torch.Tensor):
            continue
        if v.is_floating_point() and v.shape[-1] == cand.hidden and "x" not in roles:
            roles["x"] = name
        elif not v.is_floating_point() and v.dim() >= 1 and v.numel() and int(v.max()) < cand.num_experts:
            roles["ids"], k = name, v.shape[-1]
        elif v.is_floating_point() and "ids" in roles and v.shape[-1] == k:
            roles["weights"] = name
    return {**roles, "top_k": k} if set(roles) == {"x", "ids", "weights"} else None


def _sub_candidate(cand: Candidate, path: str, module: nn.Module, call: dict) -> Candidate:
    prefix = path + "."
    experts = {n.removeprefix(prefix): t for n, t in cand.experts.items()}
    container = cand.container.removeprefix(prefix) if cand.container else None
    return Candidate(f"{cand.path}.{path}" if cand.path else path, module, cand.num_experts, cand.hidden, "",
                     experts, container, call=call)


def call_module(forward, cand: Candidate, x, ids, weights):
    """An experts module's forward called as its block calls it."""
    return forward(**{cand.call["x"]: x, cand.call["ids"]: ids, cand.call["weights"]: weights})


def analyze(module: nn.Module, cand: Candidate):
    """([spec], bindings, facts) of an experts module, or Rejected with the reason."""
    E, H, k = cand.num_experts, cand.hidden, cand.call["top_k"]
    work = module if all(p.dtype == torch.float32 for p in module.parameters()) else None
    if work is None:
        raise Rejected("an experts module in low precision is not analysed yet (compile its model in fp32 first)")
    gen = torch.Generator(device="cpu").manual_seed(5)
    dev = next(module.parameters()).device
    T = 10
    x = torch.randn(T, H, generator=gen, device="cpu").to(dev)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(dev)
    w = torch.rand(T, k, generator=gen, device="cpu").to(dev)
    with untouched(module) as changes:
        cap = capture(module, **{cand.call["x"]: x, cand.call["ids"]: ids, cand.call["weights"]: w})
    if changes:
        raise Rejected(f"its experts module changes its own state ({'; '.join(sorted(set(changes))[:3])})")
    out = cap.output[0] if isinstance(cap.output, tuple) else cap.output
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        raise Rejected("its experts module does not return one [T, H] tensor")
    placeholders = {n.name: n for n in cap.graph.nodes if n.op == "placeholder"}
    ids_node = next(n for n in placeholders.values() if n.meta["val"] is ids)
    from moec.passes.detect_moe import _check_reads  # the same rule: only the expert choice may be read

    _check_reads(cap, {ids_node})
    seen = {feat.target_name(n) for n in cap.graph.nodes}
    acts = sorted(("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai"),
                  key=lambda a: (a.split("_")[0] not in seen and not (a == "swiglu_oai" and "clamp" in seen), a))
    alpha, limit = feat.oai_constants(cap)
    best = None
    for lay, act in itertools.product(list(layouts(work, cand)), acts):
        if act == "swiglu_oai" and not lay.gated:
            continue
        lb = layout_bindings(work, cand, lay)
        t = materialize(work, lb)
        Y = all_experts(x, t["w13"], t.get("b13"), t["w2"], t.get("b2"), act, lay.gated, alpha, limit, lay.gate_up)
        pred = (Y[ids, torch.arange(T, device=dev)[:, None]] * w[..., None]).sum(1)  # [T, H]
        err = rel_err(pred, out)
        if err < feat.FIT_TOL and (best is None or err < best[0]):
            best = (err, lay, act, lb, t)
    if best is None:
        raise Rejected("its experts module computes no expert layout/activation moec knows, weighted by its inputs")
    _, lay, act, lb, t = best
    espec = ExpertsSpec(E, H, t["w2"].shape[2], act, lay.gated, "b13" in t or "b2" in t, alpha, limit,
                        gate_up=lay.gate_up)
    spec = MoESpec(RouterSpec(top_k=k, scoring=EXTERNAL), espec, None, {}, ("out",))
    return [spec], dict(lb), {"in_dim": 2, "work": work, "reads": cap.tensors_read()}


def probes(spec: MoESpec, device) -> list[Probe]:
    """Routing inputs for the proof (x, ids, weights): token counts, one expert for all, every expert, weights 0
    and large."""
    E, H, k = spec.experts.num_experts, spec.experts.hidden, spec.router.top_k
    gen = torch.Generator(device="cpu").manual_seed(6)

    def routing(T, ids=None, w=None):
        x = torch.randn(T, H, generator=gen, device="cpu")
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if ids is None else ids
        w = torch.rand(T, k, generator=gen, device="cpu") if w is None else w
        return x, ids, w

    cases = {f"{T} token(s)": routing(T) for T in (1, 2, 3, 16, 300)}
    one = torch.arange(k).repeat(40, 1)  # every token on the same k experts
    cases["every pair on the same experts"] = routing(40, ids=one)
    cases["every expert"] = routing(E, ids=(torch.arange(E)[:, None] + torch.arange(k)) % E)
    cases["weights 0 and 100"] = routing(8, w=torch.tensor([0.0, 100.0]).repeat(8, (k + 1) // 2)[:, :k])
    return [Probe(name, x.to(device), (ids.to(device), w.to(device))) for name, (x, ids, w) in cases.items()]
