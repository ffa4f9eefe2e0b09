"""Prefetch: which experts of the next block to load before it runs, and when (`Offload(prefetch="router")`).

Each offloaded block b+1 gets up to two predictions, both by its own router (moec.route on its live weights,
top `width * k`, most likely first), both loaded by the pool's worker:

    early   as block b starts:       router_{b+1}(x_b)              x_b [T, H]: block b's input
    late    as b+1's layer starts:   router_{b+1}(N_{b+1}(r))       r [.., H]: that layer's input (the residual
                                                                      stream), N_{b+1}: the module whose output
                                                                      is block b+1's input (its norm)

The early guess (mixtral-offloading's) leaves a whole layer to load in, but block b's input is not what
b+1's router will see. The late one sees the residual stream that b+1's norm will see, less the attention
in between, and names 65-92% of the experts (vs 51-77%; fine_moe_lm, top 6-18 of 64, docs/offload.md).
The late predictor is set up on the first call: N_{b+1} is found among the children of b+1's parent
module (the decoder layer) as the one whose output object is the block's input. It must hold no buffers
and no MoE block (a norm: calling it again changes nothing and costs little), and the parent must be called
itself (not a ModuleList). Models without that shape keep the early guess alone.
A prediction only loads into free or evictable slots: it never changes a number.

`fit_prefetch(model, batches)` fits the late predictor to the attention it cannot see: per block, a matrix A
[H, E] with N(r) @ A ~ the router's logits on the block's actual input, by ridge regression towards the
router's own weight (calibration text), then ranks experts by the router's rule on N(r) @ A instead.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from moec.ir import MoESpec


def router_predictor(roles: dict, block: nn.Module, spec: MoESpec, width: int, weight: torch.Tensor | None = None):
    """x [.., H] -> the experts block's router ranks in its top `width * k` for any row of x, most likely first
    (rank by rank over the rows). weight [E, H]: used instead of the router's (a fitted predictor)."""
    from moec.api import block_route

    r, E, width_e = spec.router, spec.experts.num_experts, spec.router_width
    m = r.top_k if r.scoring == "sparsemixer" else min(width * r.top_k, r.topk_group * width_e // max(r.n_group, 1))
    router = dataclasses.replace(r, top_k=m, capacity=0, top_p=0.0)  # a prediction ranks, it drops nothing

    def predict(x: torch.Tensor) -> list[int] | None:
        if x.shape[-1] != spec.experts.hidden:  # another block's width (the early guess between unlike blocks)
            return None
        with torch.no_grad():
            live = roles["router_weight"].get(block)  # a fitted weight follows the router's device and dtype
            w = None if weight is None else weight.to(device=live.device, dtype=live.dtype)
            ids = block_route(block, spec, roles, x, router, weight=w)[1]  # [T, m]
        return [e for e in dict.fromkeys(ids.T.flatten().tolist()) if e < E]  # (not the zero-compute experts)

    return predict


def fit_prefetch(model: nn.Module, batches, ridge: float = 1.0) -> dict[str, int]:
    """Fit each offloaded block's late predictor on `batches` (input_ids tensors or mappings of inputs, e.g. a
    tokenizer's output; calibration text, not what you measure): A = argmin |N(r) A - logits|^2 + ridge * s *
    |A - W^T|^2, s the mean squared norm of N(r)'s rows, W the router weight, logits without the router's bias.
    Runs the first batch twice (it finds each block's norm). Holds an [H, H] float64 sum per block meanwhile (CPU).
    Returns {block: rows fitted on}; blocks it could not fit are named in a warning. Outputs never change (a
    prediction only loads experts); the cache and its statistics are reset."""
    from collections.abc import Mapping

    from moec.api import block_route
    from moec.canonical import compiled_graph
    from moec.offload.pool import OffloadedExperts

    pools = {id(m.pool): m.pool for gm in filter(None, map(compiled_graph, model.modules()))
             for m in gm.children() if isinstance(m, OffloadedExperts)}
    lates = [lp for pool in pools.values() for lp in pool.late]
    if not lates:
        raise ValueError("moec.offload.fit_prefetch: no late prefetch to fit: compile with "
                         "moec.Offload(prefetch='router') a model whose blocks sit in layers with a norm before them")
    batches = [batches] if isinstance(batches, (torch.Tensor, Mapping)) else list(batches)
    if not batches:
        raise ValueError("moec.offload.fit_prefetch: no batches to fit on")
    run = lambda b: model(**b) if isinstance(b, Mapping) else model(b)  # noqa: E731
    routing = {lp.path: (compiled_graph(lp.block).meta["moe_spec"], compiled_graph(lp.block).meta.get(
        "canonical_bindings", compiled_graph(lp.block).meta["bindings"])) for lp in lates}  # paths: the pool's own
    sums, seen, hooks = {}, {}, []
    with torch.no_grad():
        try:
            run(batches[0])  # the first call finds each block's norm
            for lp in (lp for lp in lates if lp.norm is not None):
                spec, roles = routing[lp.path]

                def at_layer(m, args, kwargs, lp=lp):
                    r = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)
                              and a.is_floating_point() and a.dim() >= 2 and a.shape[-1] == lp.hidden), None)
                    seen[lp.path] = None if r is None else lp.norm.forward(r).reshape(-1, lp.hidden).double().cpu()

                def at_block(m, args, kwargs, lp=lp, spec=spec, roles=roles):
                    x = seen.pop(lp.path, None)
                    h = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
                    if x is None or h is None or h.numel() // lp.hidden != len(x) or not len(x):
                        return
                    y = block_route(m, spec, roles, h)[0].double().cpu()  # [T, E] the logits the router computes
                    if "router_bias" in roles:  # the predictor adds the bias itself
                        y = y - roles["router_bias"].get(m).double().cpu()
                    s = sums.setdefault(lp.path, [0, 0, 0])
                    s[0], s[1], s[2] = s[0] + x.T @ x, s[1] + x.T @ y, s[2] + len(x)

                hooks += [lp.parent.register_forward_pre_hook(at_layer, with_kwargs=True),
                          lp.block.register_forward_pre_hook(at_block, with_kwargs=True)]
            for b in batches:
                run(b)
        finally:
            for h in hooks:
                h.remove()
    fitted = {}
    for lp in lates:
        if lp.path not in sums:
            continue
        xtx, xty, n = sums[lp.path]
        spec, roles = routing[lp.path]
        w = roles["router_weight"].get(lp.block).double().cpu()  # [E, H]
        lam = ridge * torch.diagonal(xtx).sum() / n
        a = torch.linalg.solve(xtx + lam * torch.eye(len(xtx), dtype=xtx.dtype), xty + lam * w.T)  # [H, E]
        fitted[lp.path] = (lp, spec, roles, a.T.float().contiguous(), int(n))
    for lp, spec, roles, weight, _ in fitted.values():  # swapped only once every fit succeeded
        lp.predict = router_predictor(roles, lp.block, spec, lp.pool.cfg.prefetch_width, weight=weight)
    for pool in pools.values():
        pool.reset()
    if missed := [lp.path for lp in lates if lp.path not in fitted]:
        warnings.warn(f"moec.offload.fit_prefetch: {len(missed)} block(s) not fitted (their norm was not found on "
                      f"the first batch, or they saw no tokens): {', '.join(missed)}; they keep the router's "
                      f"prediction", stacklevel=2)
    return {path: f[-1] for path, f in fitted.items()}


class LatePrefetch:
    """The late predictor of one block: finds N (first call), then predicts at each start of the block's parent."""

    def __init__(self, pool, path: str, parent: nn.Module, block: nn.Module, predict, hidden: int):
        self.pool, self.path, self.parent, self.block, self.predict, self.hidden = pool, path, parent, block, predict, hidden
        self.norm: nn.Module | None = None
        self.outputs: dict[int, nn.Module] = {}  # id(output) -> the child of parent that returned it (this call)
        self.handles = [c.register_forward_hook(self._record(c)) for c in parent.children() if c is not block]
        self.handles.append(block.register_forward_pre_hook(self._find, with_kwargs=True))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.norm = [], None

    def _record(self, child: nn.Module):
        def hook(m, args, out):
            if isinstance(out, torch.Tensor):
                self.outputs[id(out)] = child
        return hook

    def _find(self, m, args, kwargs) -> None:
        """The block's first call: the child whose output it takes is N, if calling N again changes nothing and
        runs no MoE block (no buffers, no compiled block inside) and the parent is called itself (not a list)."""
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        norm = self.outputs.get(id(x)) if x is not None else None
        self.close()
        self.outputs.clear()
        if (norm is None or next(norm.buffers(), None) is not None
                or any("_moec_graph" in sub.__dict__ for sub in norm.modules())
                or type(self.parent).forward is nn.Module.forward):  # ModuleList, ModuleDict: never called
            return
        self.norm = norm
        self.handles = [self.parent.register_forward_pre_hook(self._start, with_kwargs=True)]
        self.pool.blocks[self.path]["router"] = None  # the early guess for this block gives way to this one

    def _start(self, m, args, kwargs) -> None:
        r = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()
                  and a.dim() >= 2 and a.shape[-1] == self.hidden), None)
        if r is None or self.path not in self.pool.blocks:
            return
        try:
            with torch.no_grad():
                guess = self.predict(self.norm.forward(r))
        except Exception as e:  # noqa: BLE001  N is not what it seemed (e.g. it takes more arguments): no late guess
            warnings.warn(f"moec offload: the prefetch for block {self.path!r} could not run ({type(e).__name__}: "
                          f"{e}); it falls back to the early guess (outputs are unchanged)", stacklevel=2)
            self.close()
            self.pool.blocks[self.path]["router"] = self.predict
            return
        self.pool.prefetch(self.path, guess, reserve=0)
