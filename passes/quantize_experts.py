"""quantize_experts: routed experts -> int8 / int4 weight-only experts (compile(..., quantize=cfg)).

Matches, after batch_experts:

    y = moec.experts(x[T,H], ids[T,k], w[T,k], W13[E,N1,H], b13?, W2[E,H,I], b2?, ...)        # [T, H]

and leaves, for Int8Experts() / Int4Experts(g):

    y = moec.experts_int8(x, ids, w, Q13 int8[E,N1,H], S13[E,N1], b13?, Q2, S2, b2?, ...)
    y = moec.experts_int4(x, ids, w, Q13 u8[E,N1,H/2], S13[E,N1,H/g], Z13? u8[E,N1,H/g], b13?, Q2, S2, Z2?, b2?, ...)

with a last argument int8_activations=True under activations="int8" (the torch backend's int8 experts then
quantize each GEMM's input rows; ONNX Runtime's lowering reads the config). Requires batch_experts. The quantized tensors, in moec's format (moec.quant), become persistent buffers
of the block (`_moec_w13_q`, `_moec_w13_scale`[, `_moec_w13_zero`], same for w2) read by the graph at
call time (moec.bindings.Param): they are what a saved model holds, what load_state_dict / moec.load
write, and what the kernels read (backends/cpu_quant.py). Biases keep their dtype. The shared
experts too, unless cfg.shared: then each nn.Linear inside the shared module becomes a
moec.quant.QuantLinear (same format, [1, N, K]; the graph's call of the shared module is
unchanged). The router too, unless cfg.router: then

    logits, ids, w = moec.route(x, dequantized(q, scale, zero?, bits, g)[0], ...)     # [1,E,H] -> [E,H]

(router weights are ~0.1% of a block's bytes: the original is kept; this is for a router
computing with the weights a quantized deployment holds).
Invariant: the block equals the original block with dequantized expert (and shared) weights (the
final proof checks exactly that: moec.api). Until the block is installed, every change to it is
listed in gm.meta["undo"], so a block whose proof fails is left as it was.
Stats: quantized, expert_bytes (fp) -> expert_qbytes (quantized), shared_linears.

Once the block is proved and installed, `release_originals` (called by moec.compile) empties
the original expert tensors the graph no longer reads, so the model really shrinks.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import operator

import torch

from moec.bindings import resolve
from moec.canonical import add_buffer, drop_unused_roles, role_value
from moec.pass_manager import PassResult, Rejected, register_pass
from moec.passes.detect.candidates import members
from moec.quant import Int8Experts, QuantLinear, check_shape, dequantized, nbytes, quantize


@register_pass("quantize_experts", requires=("batch_experts",))
def quantize_experts(gm) -> PassResult:
    cfg = gm.meta.get("options", {}).get("quantize")
    if cfg is None:
        raise Rejected("quantize_experts needs a quantization config: moec.compile(model, quantize=Int8Experts())")
    path = gm.meta["candidate"].path
    stats = {"quantized": 0, "expert_bytes": 0, "expert_qbytes": 0}
    for node in [n for n in gm.graph.nodes if n.target is torch.ops.moec.experts]:
        x, ids, w, w13, b13, w2, b2, *rest = node.args
        new_args = []
        for role, wnode in (("w13", w13), ("w2", w2)):
            weight = role_value(gm, wnode)
            try:
                check_shape(cfg, weight, f"block {path!r} {role}")
            except ValueError as e:
                raise Rejected(str(e)) from None
            t = quantize(cfg, weight)
            stats["expert_bytes"] += weight.numel() * weight.element_size()
            stats["expert_qbytes"] += nbytes(t)
            attrs = {k: add_buffer(gm, f"_moec_{role}_{k}", v) for k, v in t.items()}
            new_args.append((attrs["q"], attrs["scale"]) if isinstance(cfg, Int8Experts) else
                            (attrs["q"], attrs["scale"], attrs.get("zero")))
        (t13, t2) = new_args
        node.target = torch.ops.moec.experts_int8 if isinstance(cfg, Int8Experts) else torch.ops.moec.experts_int4
        node.args = (x, ids, w, *t13, b13, *t2, b2, *rest) + ((True,) if cfg.activations == "int8" else ())
        stats["quantized"] += 1
    if stats["quantized"] and cfg.router:
        _quantize_router(gm, cfg, path)
    gm.graph.eliminate_dead_code()
    drop_unused_roles(gm)
    spec = gm.meta["moe_spec"]
    if stats["quantized"] and cfg.shared and spec.shared:
        stats["shared_linears"] = _quantize_shared(gm, resolve(gm.meta["block"], spec.shared.module), cfg, path)
    if stats["quantized"]:
        gm.meta["moe_spec"] = spec.with_(quant=cfg)
    return PassResult(gm, stats["quantized"] > 0, stats)


def _quantize_router(gm, cfg, path: str) -> None:
    """moec.route's weight W [E, H] -> its quantized form ([1, E, H] buffers `_moec_router_*`), dequantized in
    the graph before the route: the router then computes with the weights a quantized deployment holds. The fp
    weight stays in the block: when it changes, the block quantizes it again before its next call
    (canonical.CompiledForward)."""
    for node in [n for n in gm.graph.nodes if n.target is torch.ops.moec.route]:
        weight = role_value(gm, node.args[1])
        try:
            check_shape(cfg, weight[None], f"block {path!r} router")
        except ValueError as e:
            raise Rejected(str(e)) from None
        t = {k: add_buffer(gm, f"_moec_router_{k}", v) for k, v in quantize(cfg, weight[None]).items()}
        with gm.graph.inserting_before(node):  # in x's dtype, as the original's router weight after .to()
            dtype = gm.graph.call_function(getattr, (node.args[0], "dtype"))
            w = gm.graph.call_function(dequantized, (t["q"], t["scale"], t.get("zero"), cfg.bits,
                                                     getattr(cfg, "group_size", 0), dtype))
            w = gm.graph.call_function(operator.getitem, (w, 0))  # [E, H]
        node.args = (node.args[0], w, *node.args[2:])


def _quantize_shared(gm, shared: torch.nn.Module, cfg, path: str) -> int:
    """Every nn.Linear of the shared experts -> QuantLinear (in place: the block's graph calls this module)."""
    linears = [(n, m) for n, m in shared.named_modules() if type(m) is torch.nn.Linear and n]
    for name, m in linears:
        try:
            check_shape(cfg, m.weight[None], f"block {path!r} shared expert layer {name!r}")
        except ValueError as e:
            raise Rejected(str(e)) from None
    for name, m in linears:
        parent, _, attr = name.rpartition(".")
        owner = resolve(shared, parent) if parent else shared
        setattr(owner, attr, QuantLinear(cfg, m))
        gm.meta.setdefault("undo", []).append(lambda o=owner, a=attr, m=m: setattr(o, a, m))
    return len(linears)


def quantized_tensors(block: torch.nn.Module, role: str) -> dict[str, torch.Tensor]:
    """The block's moec-format tensors of `role` ("w13", "w2" or "router"): {"q", "scale"[, "zero"]}; {} if not quantized."""
    return {k: getattr(block, f"_moec_{role}_{k}") for k in ("q", "scale", "zero") if hasattr(block, f"_moec_{role}_{k}")}


def release_originals(block: torch.nn.Module, cand) -> int:
    """Empty (shape [0]) the original expert matrices of an installed quantized or offloaded block that its
    graph no longer reads, and the quantized ones too once they are offloaded (biases it still reads are kept).
    The tensors stay in the state_dict (empty), so moec.save / moec.load still match. Returns the bytes freed."""
    gm = block.__dict__["_moec_graph"]
    used = {id(t) for b in gm.meta["bindings"].values() for t in b.sources(block)}
    owners = members(resolve(block, cand.container)) if cand.container else [block]
    names = {id(m): n for n, m in block.named_modules()}
    quantized = [(name, t) for name, t in block.named_buffers(recurse=False) if name.startswith("_moec_")]
    freed = 0
    for path, t in [(f"{names[id(m)]}.{name}".lstrip("."), resolve(m, name)) for m in owners for name in cand.experts] \
            + quantized:
        if id(t) not in used and t.numel():
            freed += t.numel() * t.element_size()
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
            gm.meta.setdefault("released", []).append(path)  # a call refuses once one holds values again
    if freed:
        block.register_load_state_dict_pre_hook(functools.partial(_refuse_new_experts, cand.path,
                                                                  list(gm.meta["released"])))
    return freed


def refuse_new_experts_first(model: torch.nn.Module) -> None:
    """The blocks' refusals (_refuse_new_experts), and those of layers quantized by dense= or shared=True, as a
    load_state_dict pre-hook of the model itself, which torch runs before it copies anything: a block's own hook
    runs when its turn comes, after the modules before it (the embedding, earlier layers) were loaded, and left the
    model half-loaded (so did torch's missing-key error for a quantized layer, raised after the copies)."""
    if model.__dict__.get("_moec_refuses_first"):
        return
    model.__dict__["_moec_refuses_first"] = True
    model.register_load_state_dict_pre_hook(_refuse_in_every_block)


def _refuse_in_every_block(model, state_dict, prefix, *args) -> None:
    for name, module in model.named_modules():
        here = f"{prefix}{name}." if name else prefix
        gm = module.__dict__.get("_moec_graph")
        if gm is not None and gm.meta.get("released"):
            _refuse_new_experts(name, gm.meta["released"], module, state_dict, here)
        elif isinstance(module, QuantLinear) and here + "weight" in state_dict:
            raise RuntimeError(f"moec: layer {name!r} was quantized at compile ({module.cfg.describe()}: dense= or "
                               f"shared=True) and its fp weight released: load_state_dict cannot give it a new weight "
                               f"(nothing was loaded); load the weights into a fresh model and compile it (moec.load "
                               f"reads a moec.save file)")


def _refuse_new_experts(path: str, released: list[str], module, state_dict, prefix, *args) -> None:
    """A load_state_dict pre-hook (a partial of this function: the model still pickles): new values for the
    released expert tensors raise, saying why (torch's own error is a size mismatch against shape [0]); a moec.save
    file holds them empty and loads."""
    given = [p for p in released if getattr(state_dict.get(prefix + p), "numel", lambda: 0)()]
    if given:
        raise RuntimeError(f"moec: block {path!r} runs its experts from what compile made of them (quantized, "
                           f"offloaded, sharded or pruned) and released {given}: load_state_dict cannot give it new "
                           f"expert weights; load them into a fresh model and compile it (moec.load reads a moec.save "
                           f"file)")


def give_back_memory() -> None:
    """Return freed expert copies to the OS: glibc keeps freed heap pages, so released experts would not lower
    the resident memory (measured: RSS crept by ~half a block per block in load_offloaded without this)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
