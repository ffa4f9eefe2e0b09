"""The canonical graph of a proved MoE block, and how it replaces the block's forward.

`build_graph(block, spec, bindings)` traces moec's reference form of the block into an fx
GraphModule. Every tensor it reads is an input (a placeholder named by its role), never a
captured attribute: the installed block passes the tensors its `bindings` (moec.bindings) give
at call time, so the graph always computes with the module's parameters as they are now.

    x                = hidden_states.reshape(-1, H)                   # [T, H]
    logits           = linear(x, router_weight, router_bias)          # [T, E]
    scores, ids, w   = softmax/sigmoid, group mask, topk, gather ...  # [T, k]
    kept             = moec.capacity_kept(ids, w, rows, E, x.dtype)    # only with expert capacity
    w                = moec.capacity(w, kept)                          # 0 past capacity
    ids, w, w_x, some = split_identity(ids, w, E)                      # only with zero-compute experts
    y                = moec.experts_loop(x, ids, w, w13, b13, w2, b2) # [T, H]
    y                = where(some, y, 0) + x * w_x                     # only with zero-compute experts
    y                = where(any pair of the token kept, y, x)        # only if dropped tokens pass through
    y                = y + shared(x) [* sigmoid(shared_gate(x))] [* c] # the block's own modules, called
    y                = y + out_bias                                    # if the block adds one
    return y.reshape(hidden_states.shape), logits, ids, w

fuse_gate and batch_experts then rewrite this graph; `install` makes the block run it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import warnings

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules import module as _module

from moec.backends.torch_backend import route_math, split_identity
from moec.bindings import Binding, NoBackward, Param, generation, resolve, tracing, transformed
from moec.form import Form, ModelRef
from moec.ir import MoESpec
from moec.ops import experts_args, route_args

torch.fx.wrap("split_identity")  # one node of the canonical graph: fuse_gate rewires around it

__all__ = ["add_buffer", "build_graph", "install", "uninstall", "call", "resolve", "CompiledForward", "role_value", "add_role"]


class _Reference(nn.Module):
    def __init__(self, block: nn.Module, spec: MoESpec, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.block, self.spec, self.roles = block, spec, list(tensors)
        for role, t in tensors.items():  # attributes only for tracing; they become placeholders
            self.register_buffer(role, t, persistent=False)

    def forward(self, hidden_states):
        s, b = self.spec, self.block
        p = {role: getattr(self, role) for role in self.roles}
        x = hidden_states.reshape(-1, s.experts.hidden)  # [T, H]
        xr = x.to(p["router_weight"].dtype)  # a router kept in fp32 (Switch casts its own on first use)
        logits, ids, w = route_math(xr, p["router_weight"], p.get("router_bias"), p.get("select_bias"),
                                    *route_args(s.router), num_experts=s.router_width)
        # capacity per row: [B, S, H] has B rows, [T, H] one (numel / (S*H) stays symbolic under tracing)
        rows = hidden_states.numel() // (hidden_states.shape[-2] * hidden_states.shape[-1]) \
            if s.router.capacity_per_row else 1
        if s.router.capacity:  # pairs past an expert's capacity are dropped (weight 0)
            kept = torch.ops.moec.capacity_kept(ids, w, rows, s.experts.num_experts, x.dtype, s.router.to_json())
            w = torch.ops.moec.capacity(w, kept, s.router.to_json())
        run_ids, run_w = ids, w
        if s.experts.identity:  # zero-compute experts: their pairs add the token itself
            run_ids, run_w, w_x, some = split_identity(ids, w, s.experts.num_experts)
        y = torch.ops.moec.experts_loop(x, run_ids, run_w, p["w13"], p.get("b13"), p["w2"], p.get("b2"),
                                        *experts_args(s.experts))  # [T, H]
        if s.experts.identity:
            y = (torch.where(some, y, 0) + x * w_x).to(x.dtype)
        if s.router.dropped == "input":  # a token with every pair dropped passes through
            y = torch.where(kept.any(-1, keepdim=True), y, x)
        if s.shared:
            shared = resolve(b, s.shared.module)(x)
            if s.shared.gate:
                shared = shared * torch.sigmoid(resolve(b, s.shared.gate)(x))
            if s.shared.scale != 1.0:
                shared = shared * s.shared.scale
            y = y + shared
        if "out_bias" in p:
            y = y + p["out_bias"]
        return y.reshape(hidden_states.shape), logits, ids, w


class _ReferenceExperts(nn.Module):
    """An experts module's canonical form: the caller routes (RouterSpec.scoring "external")."""

    def __init__(self, spec: MoESpec, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.spec, self.roles = spec, list(tensors)
        for role, t in tensors.items():
            self.register_buffer(role, t, persistent=False)

    def forward(self, x, ids, weights):
        e, k = self.spec.experts, self.spec.router.top_k
        p = {role: getattr(self, role) for role in self.roles}
        y = torch.ops.moec.experts_loop(x.reshape(-1, e.hidden), ids.reshape(-1, k), weights.reshape(-1, k), p["w13"],
                                        p.get("b13"), p["w2"], p.get("b2"), *experts_args(e))  # [T, H]
        return y.reshape(x.shape)


class _Tracer(fx.Tracer):
    """Keeps the shared experts as single call_module nodes. Every tensor attribute is a proxy, the role tensors
    that are views (a flat or transposed router weight) included: `router_weight.dtype` stays an op of the graph,
    which follows .to(), not a constant of the dtype at compile."""

    proxy_buffer_attributes = True

    def __init__(self, leaves: frozenset[str] = frozenset()):  # no arguments needed: GraphModule unpickling
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m, qualname):
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def build_graph(block: nn.Module, spec: MoESpec, bindings: dict[str, Binding], name: str = "moe") -> fx.GraphModule:
    """The reference graph: forward(hidden_states, <one input per role of `bindings`>), or for an experts
    module forward(x, ids, weights, <roles>)."""
    tensors = {role: b.get(block) for role, b in bindings.items()}
    tensors = {r: t for r, t in tensors.items() if t is not None}
    external = spec.router.scoring == "external"
    root = _ReferenceExperts(spec, tensors) if external else _Reference(block, spec, tensors)
    leaves = {f"block.{p}" for p in (spec.shared.module, spec.shared.gate) if p} if spec.shared else set()
    graph = _Tracer(frozenset(leaves)).trace(root)
    role_of = {id(getattr(root, r)): r for r in root.roles}  # the tracer names a tensor by its first path
    inputs, last = {}, [n for n in graph.nodes if n.op == "placeholder"][-1]
    for node in [n for n in graph.nodes if n.op == "get_attr" and id(resolve(root, n.target)) in role_of]:
        role = role_of[id(resolve(root, node.target))]
        if role not in inputs:
            with graph.inserting_after(last):
                inputs[role] = last = graph.placeholder(role)
        node.replace_all_uses_with(inputs[role])
        graph.erase_node(node)
    gm = fx.GraphModule(root, graph, class_name=f"MoE_{name.replace('.', '_')}")
    gm.meta.update(moe_spec=spec, n_inputs=3 if external else 1)
    gm.meta["bindings"] = {r: bindings[r] for r in roles(gm)}
    return gm


def roles(gm: fx.GraphModule) -> list[str]:
    """The graph's tensor inputs after its data inputs (hidden_states; an experts module's x, ids, weights)."""
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"][gm.meta.get("n_inputs", 1):]


def role_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The tensor an input node of the graph stands for, as the block holds it now."""
    return gm.meta["bindings"][node.target].get(gm.meta["block"])


def add_role(gm: fx.GraphModule, role: str, binding: Binding) -> fx.Node:
    """A new input of the graph (after the others) bound to `binding`."""
    g = gm.graph
    last = [n for n in g.nodes if n.op == "placeholder"][-1]
    with g.inserting_after(last):
        node = g.placeholder(role)
    gm.meta["bindings"][role] = binding
    return node


def add_buffer(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> fx.Node:
    """A new input of the graph: a persistent buffer of the user's block (what moec.save writes and load_state_dict
    fills; removed again if the block is not installed)."""
    block = gm.meta["block"]
    block.register_buffer(name, tensor)
    gm.meta.setdefault("undo", []).append(lambda: delattr(block, name))
    return add_role(gm, name, Param(name))


def drop_unused_roles(gm: fx.GraphModule) -> None:
    for n in [n for n in gm.graph.nodes if n.op == "placeholder"][gm.meta.get("n_inputs", 1):]:
        if not n.users:
            gm.meta["bindings"].pop(n.target, None)
            gm.graph.erase_node(n)


def graph_inputs(gm: fx.GraphModule, block: nn.Module) -> list[torch.Tensor]:
    """The tensors the graph reads after hidden_states, from the block as it is now."""
    bindings = gm.meta["bindings"]
    return [bindings[r].get(block) for r in gm.meta.get("installed_roles") or roles(gm)]


def call(gm: fx.GraphModule, block: nn.Module, *inputs: torch.Tensor):
    """Run the graph on its data inputs and the block's tensors as they are now."""
    return gm(*inputs, *graph_inputs(gm, block))


def runner(gm: fx.GraphModule, block: nn.Module):
    """The graph as the block (or experts module) would be called: its return structure rebuilt."""
    spec = gm.meta["moe_spec"]
    if spec.router.scoring == "external":
        return lambda x, ids, weights: call(gm, block, x, ids, weights)
    return lambda x: assemble(spec.outputs, x, *call(gm, block, x))


def _capture_key(hook) -> str | None:
    """The output a transformers output-capturing hook records (e.g. "router_logits"), None for other hooks.
    transformers installs them on the first call asking for an output (output_hidden_states=True, ...) and
    leaves them, idle, on every recordable module."""
    if getattr(hook, "__name__", "") != "output_capturing_hook" or not hook.__module__.startswith("transformers."):
        return None
    cells = dict(zip(hook.__code__.co_freevars, hook.__closure__ or ()))
    return cells["key"].cell_contents if "key" in cells else None


def idle_capture(hook) -> bool:
    """A transformers output-capturing hook with nothing to record in this call (it returns at once)."""
    key = _capture_key(hook)
    if key is None:
        return False
    collector = sys.modules[hook.__module__]._active_collector.get()
    return collector is None or key not in collector


class CompiledForward:
    """Replaces `block.forward`: runs the block's final graph on its live tensors and rebuilds the
    block's own return structure. The original forward runs instead (the same results, by
    construction) when the graph cannot stand for it: the block in training mode, extra non-None
    inputs (e.g. a padding mask), no tokens, an input rank the proof did not cover (a block that
    raises on [T, H] or computes something else there), forward hooks on a submodule the graph skips (they
    would not fire; e.g. HF's output_router_logits records the router's output that way), or a block changed
    since compile (moec.form: a submodule replaced, gate.top_k set, dropout put back in training mode). A quantized
    block's original expert weights are released: there, those cases raise instead."""

    def __init__(self, block: nn.Module, gm: fx.GraphModule, path: str, user_forward=None, container=None):
        self.owner, self.gm, self.path = ModelRef(block), gm, path  # (weakly: this object lives in block.__dict__)
        self.user_forward = user_forward  # an instance-level forward the block had before compile, if any
        self.container = container
        self.settle()  # recorded again once compile installed everything
        self._gen = -1
        self._skipped: list[nn.Module] = []
        self._foreign: str | None = None  # a tensor the graph reads is of a tensor subclass (_refresh)
        self._signature = None
        self._router_key = self._router_now()  # quantize(router=True): the fp weight the buffers were made from
        self._said: set[str] = set()  # reasons not asked for (hooks, a changed block) warned about once

    @property
    def block(self) -> nn.Module:
        return self.owner.model

    def original(self, *args, **kwargs):
        if self.user_forward is not None:
            return self.user_forward(*args, **kwargs)
        block = self.block  # (the class's function called on the block: Dynamo resolves a bound `forward` it made
        return type(block).forward(block, *args, **kwargs)  # itself to the block's own attribute, moec's forward)

    def __getstate__(self):  # pickle / deepcopy: a GraphModule does not keep its meta (spec, bindings)
        return {**self.__dict__, "_meta": dict(self.gm.meta), "_gen": -1, "_skipped": [], "_signature": None,
                "_foreign": None}

    def __setstate__(self, state):
        meta = state.pop("_meta")
        self.__dict__.update(state)
        self.gm.meta.update(meta)
        _unowned(self.gm)

    def _split(self, args, kwargs):
        """(the graph's data inputs, extra inputs that are not None) from a call in the original's signature:
        hidden_states; or an experts module's x, ids, weights (named as its block passes them)."""
        call = self.gm.meta.get("call")
        if call is None and len(args) == 1 and not kwargs:
            return (args[0],), {}
        if self._signature is None:
            self._signature = inspect.signature(self.user_forward or type(self.block).forward.__get__(self.block))
        bound = dict(self._signature.bind(*args, **kwargs).arguments)
        names = (call["x"], call["ids"], call["weights"]) if call else (next(iter(bound)),)
        data = tuple(bound.pop(n, None) for n in names)
        extras = {k: v for k, v in bound.items() if v is not None and not (isinstance(v, dict) and not v)}
        return data, extras

    def _refresh(self) -> None:
        """Submodules the graph skips (their hooks would not fire), and the live shared modules."""
        called = self._called()
        self._skipped = [m for n, m in self.block.named_modules() if n and not any(
            n == c or n.startswith(c + ".") for c in called)]
        for c in called:  # the graph calls the block's shared modules: follow a replaced one
            if resolve(self.gm, f"block.{c}") is not resolve(self.block, c):
                parent, _, attr = f"block.{c}".rpartition(".")
                setattr(resolve(self.gm, parent), attr, resolve(self.block, c))
        if not tracing():
            self._gen = generation()
            bindings, block = self.gm.meta["bindings"], self.block
            self._foreign = next((  # e.g. torchao's quantized weights, FSDP's DTensors
                f"its {role} tensor is a {kind.__module__}.{kind.__name__} (a tensor subclass): the compiled graph "
                f"reads plain tensors" for role in self.gm.meta.get("installed_roles") or roles(self.gm)
                for kind in set(map(type, bindings[role].live_sources(block))) - _PLAIN), None)

    def why_original(self, hidden, extras) -> str | None:
        if extras:
            return f"extra inputs {sorted(extras)}"
        if self.block.training:
            return "training mode"
        if not tracing() and (what := transformed()):
            return what
        if torch.jit.is_tracing():  # (its graph would hold moec's copies of the weights as constants)
            return "torch.jit.trace"
        if (changed := self.changed()) is not None:  # (before _refresh: a module it looks up may be gone)
            return changed
        if tracing() or self._gen != generation():  # traced: never read the counter (Dynamo would guard on it)
            self._refresh()
        if self._foreign and not tracing():
            return self._foreign
        if not isinstance(hidden, torch.Tensor) or hidden.numel() == 0 and not self.gm.meta["moe_spec"].sharded:
            return "no tokens"  # (a sharded block takes part in the exchange with no rows: the other ranks wait)
        if self.gm.meta.get("ranks") and hidden.dim() not in self.gm.meta["ranks"]:
            return f"a {hidden.dim()}-d input (proved on {' and '.join(map(str, self.gm.meta['ranks']))}-d inputs)"
        if _autocast(hidden) and not (self.released() or self.gm.meta.get("approximation")):  # (those run their
            # graph without autocast, as proved)
            return (f"autocast is on: the block computes in its dtypes (e.g. its router's scores), which the compiled "
                    f"block, proved without autocast, would not")
        return self.why_hooks()

    def released(self) -> bool:
        """The block's original expert weights are gone (quantized, offloaded, sharded): its own forward cannot run."""
        spec = self.gm.meta["moe_spec"]
        return spec.quant is not None or spec.offloaded or bool(spec.sharded)

    def settle(self) -> None:
        """Record the block's form as compile leaves it (dense= and decode_linears= replace or wrap its Linears after
        the blocks are installed)."""
        self.form = Form(self.block, self.container, self._called(), self._unread())

    def _unread(self) -> tuple[str, ...]:
        """The tensors the block's own forward read at analysis (detect_moe's capture) that the graph does not read
        (but for the modules it calls, the experts it released and the counters it adds to)."""
        read = {id(t) for r in self.gm.meta.get("installed_roles") or roles(self.gm)
                for t in self.gm.meta["bindings"][r].sources(self.block)}
        skip = (*self._called(), *self.gm.meta.get("released", ()), *self.gm.meta["moe_spec"].counters)
        return tuple(p for p in self.gm.meta.get("reads", ()) if not any(p == s or p.startswith(s + ".") for s in skip)
                     and id(resolve(self.block, p)) not in read)

    def _called(self) -> tuple[str, ...]:
        """The block's modules the graph calls (shared experts, their gate): they run as they are at each call."""
        spec = self.gm.meta["moe_spec"]
        return tuple(p for p in (spec.shared.module, spec.shared.gate) if p) if spec.shared else ()

    def changed(self) -> str | None:
        """Why the graph no longer stands for the block (moec.form), or None."""
        what = self.form.traced_changed(self.block, unread=not _OWN_TRACE[0]) if tracing() else self.form.changed(
            self.block)
        return what and f"the block changed after compile ({what}): compile the model again to compile it anew"

    def why_hooks(self) -> str | None:
        """Why hooks make the original forward run (they would miss submodules the graph does not call), or None."""
        if not (_module._global_forward_hooks or _module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in self._skipped)):
            return None
        glob = [*_module._global_forward_hooks.values(), *_module._global_forward_pre_hooks.values()]
        hooks = [*glob, *(h for m in self._skipped for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values())]
        live = [h for h in hooks if not idle_capture(h)]
        if not live:
            return None
        if what := sorted({_capture_key(h) for h in live} - {None}):
            return (f"transformers records {', '.join(what)} from a submodule the compiled graph does not call; "
                    f"call the model with {', '.join(f'output_{w}=False' for w in what)} or set "
                    f"{', '.join(f'output_{w} = False' for w in what)} in the model's config (its text_config in a "
                    f"multimodal model) to run the compiled block")
        if any(h in glob for h in live):
            return ("a global forward hook (torch.nn.modules.module.register_module_forward_hook) would see "
                    "submodules the compiled graph does not call")
        return "forward hooks on a submodule the compiled graph does not call"

    def _router_now(self) -> tuple | None:
        """quantize(router=True): which fp router weight the block holds now (storage, version, dtype); else None."""
        quant = self.gm.meta["moe_spec"].quant
        if quant is None or not quant.router:
            return None
        sources = self.gm.meta["canonical_bindings"]["router_weight"].sources(self.block)
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)

    def _follow(self) -> None:
        """Before running the graph: refuse where a tensor moec released at compile (quantized or offloaded
        experts' fp weights) holds values again (`.data =`, a new Parameter: the graph would ignore them), and
        quantize a changed fp router weight again (quantize(router=True): the graph reads its quantized buffers).
        Traced (torch.compile, torch.export), where versions cannot be compared, the router is quantized at each call
        (a compiled graph would keep the buffers of its first call); the released tensors' sizes are guarded."""
        if replaced := [p for p in self.gm.meta.get("released", ()) if resolve(self.block, p).numel()]:
            spec = self.gm.meta["moe_spec"]
            where = "the offload store" if spec.offloaded else "its shard" if spec.sharded else "its quantized buffers"
            raise RuntimeError(f"moec: block {self.path!r}: {replaced} were given new values after compile, but "
                               f"the block runs the experts in {where}, made at compile: compile the model again "
                               f"from its new weights (moec.load reads a moec.save file into a compiled model)")
        if self._router_key is None or tracing() and _OWN_TRACE[0]:  # (moec.export_onnx: compiled a moment before)
            return
        now = None if tracing() else self._router_now()
        if now is None or now != self._router_key:
            from moec.passes.quantize_experts import quantized_tensors
            from moec.quant import quantize

            weight = self.gm.meta["canonical_bindings"]["router_weight"].get(self.block)  # [E, H]
            fresh = quantize(self.gm.meta["moe_spec"].quant, weight[None])
            with torch.no_grad():
                for k, t in quantized_tensors(self.block, "router").items():
                    t.copy_(fresh[k])
            self._router_key = now or self._router_key

    def __call__(self, *args, **kwargs):
        data, extras = self._split(args, kwargs)
        hidden = data[0]
        why = self.why_original(hidden, extras)
        if why:
            spec = self.gm.meta["moe_spec"]
            if self.released():
                kind = "quantized" if spec.quant else "offloaded" if spec.offloaded else "sharded (expert parallel)"
                raise NotImplementedError(
                    f"moec: block {self.path!r} runs {kind} experts and its "
                    f"original expert weights were released, so its original forward cannot run ({why})")
            if self.gm.meta.get("approximation"):  # the original would compute what the user asked to change
                raise NotImplementedError(
                    f"moec: block {self.path!r} was compiled with an approximation ({self.gm.meta['approximation']}) "
                    f"that its original forward does not make ({why}): compile a fresh model without topk= or experts= for this")
            if why not in self._said and (why == self.why_hooks() or why == self.changed()  # not asked for
                                          or why == self._foreign or why.startswith("autocast")):
                self._said.add(why)
                warnings.warn(f"moec: block {self.path!r} runs its original forward, not the compiled one: {why}",
                              stacklevel=2)
            return self.original(*args, **kwargs)
        self._follow()
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False) if _autocast(hidden) \
                else contextlib.nullcontext():  # the graph computes what was proved
            result = call(self.gm, self.block, *data)
        outs = list(result) if isinstance(result, tuple) else [result]  # (out, logits, ids, w), or an experts out
        if self.gm.meta["moe_spec"].counters and not _OWN_TRACE[0]:  # eager, torch.compile, torch.export
            with torch.no_grad():
                for name in self.gm.meta["moe_spec"].counters:
                    add_counts(resolve(self.block, name), outs[2], self.gm.meta["moe_spec"].experts.num_experts)
        if torch.is_grad_enabled() and (not tracing() or not torch.compiler.is_exporting()):  # (a traced backward
            # skipped the block's share of the gradients: 0.62 off; an exported program is for inference)
            inputs = [t for t in data if isinstance(t, torch.Tensor)] + list(self.block.parameters())
            if any(t.requires_grad for t in inputs):  # a backward through this output raises, clearly
                why = (f"moec: block {self.path!r} was compiled for inference and computes no gradients in eval mode; "
                       + ("run inference under torch.no_grad() (its original expert weights were released, so it "
                          "cannot train: train the original model)" if self.gm.meta.get("released") else
                          "call model.train() (compiled blocks then run their original forward, gradients included) "
                          "or run inference under torch.no_grad()"))
                outs[:2] = [NoBackward.apply(why, [t], *inputs) for t in outs[:2]]
        if len(outs) == 1:
            return outs[0]
        return assemble(self.gm.meta["moe_spec"].outputs, hidden, *outs)


_PLAIN = {torch.Tensor, nn.Parameter}  # what a graph reads (not a tensor subclass)


def _autocast(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


_OWN_TRACE = [0]  # > 0 while moec.export_onnx traces (a module global: Dynamo reads it, a ContextVar it cannot; so
# a torch.compile or torch.export trace run by another thread meanwhile reads it too)


@contextlib.contextmanager
def own_trace():
    """moec.export_onnx traces the copy it compiled a moment before: compiled blocks leave their counter buffers alone
    (an ONNX file holds no state to count into), and their graph stands for tensors it leaves unread (their values
    are those the proof compared)."""
    _OWN_TRACE[0] += 1
    try:
        yield
    finally:
        _OWN_TRACE[0] -= 1


@contextlib.contextmanager
def buffers_kept(model: nn.Module):
    """The model's buffers as they were before, after runs that are moec's, not the user's (inspect's expert load,
    backend='onnxruntime''s checks against the eager model): a forward may write into its buffers (a block's token
    counters, compiled or not), in place or by assigning a new tensor."""
    kept = [(m, name, b, b.clone(), b._version) for m in model.modules() for name, b in m._buffers.items()
            if b is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, name, b, was, version in kept:
                if m._buffers.get(name) is not b:
                    m._buffers[name] = b
                if b._version != version:
                    b.copy_(was)


def add_counts(buf: torch.Tensor, ids: torch.Tensor, num_experts: int) -> None:
    """buf [E] += the number of (token, expert) pairs of `ids` routed to each expert: fp32 counts (exact below 2^24)
    added in buf's dtype, as a block's forward adds a histc of its choices. A scatter of ones, not bincount: no host
    sync (torch.compile, CUDA graphs)."""
    counts = torch.zeros(num_experts, dtype=torch.float32, device=buf.device)
    counts.index_add_(0, ids.flatten().to(buf.device), torch.ones(ids.numel(), dtype=torch.float32, device=buf.device))
    buf.add_(counts if buf.is_floating_point() else counts.to(buf.dtype))


def assemble(outputs: tuple[str, ...], hidden, out, logits, ids, weights):
    """The block's own return structure (MoESpec.outputs) from the graph's outputs."""
    if outputs == ("out",):
        return out
    leaves = {"out": out, "out_flat": out.reshape(-1, out.shape[-1]), "out_1d": out.reshape(-1), "logits": logits,
              "logits_bse": logits.reshape(*hidden.shape[:-1], -1), "logits_1d": logits.reshape(-1), "ids": ids,
              "weights": weights, "none": None}
    return tuple(leaves[o] for o in outputs)


def original_forward(block: nn.Module):
    """The block's own forward (also when moec compiled it)."""
    compiled = compiled_forward(block)
    return compiled.original if compiled is not None else block.forward


def _run_compiled(compiled: CompiledForward, *args, **kwargs):
    return compiled(*args, **kwargs)


def compiled_forward(block: nn.Module) -> CompiledForward | None:
    fwd = block.__dict__.get("forward")
    return fwd.args[0] if isinstance(fwd, functools.partial) and fwd.func is _run_compiled else None


def _extra_repr(own: str, line: str) -> str:
    return f"{own}\n{line}" if own else line


def install(block: nn.Module, gm: fx.GraphModule, path: str) -> None:
    """Make `block` run `gm`; its parameters, state_dict and class stay as they were."""
    old = compiled_forward(block)
    user_forward = old.user_forward if old is not None else block.__dict__.get("forward")
    gm.meta.pop("block", None)  # the compiled block holds no compile-time references (tensors, candidates)
    container = getattr(gm.meta.pop("candidate", None), "container", None)
    gm.meta["installed_roles"] = roles(gm)  # read per call without gm.graph (which torch.compile does not trace)
    block.__dict__["_moec_graph"] = gm  # kept out of _modules: state_dict and named_modules are unchanged
    _unowned(gm)
    # a partial of a module-level function: torch.export reads its code, pickle stores it
    block.forward = functools.partial(_run_compiled, CompiledForward(block, gm, path, user_forward, container))
    try:  # the block's own signature (torch.export matches dynamic_shapes to its parameter names and structure)
        block.forward.__signature__ = inspect.signature(user_forward or type(block).forward.__get__(block))
    except (TypeError, ValueError):  # (none to read, e.g. a builtin: the partial's own stands)
        pass
    own = type(block).extra_repr(block)
    d = gm.meta["moe_spec"].describe()
    line = f"moec: {d['router']}; experts {d['experts']}" + (f"; shared {d['shared']}" if d["shared"] != "-" else "")
    block.extra_repr = functools.partial(_extra_repr, own, line)  # print(model) shows the rewrite


def _unowned(gm: fx.GraphModule) -> None:
    """An installed graph is run, never edited: its fx graph's reference back to the GraphModule (a cycle that would
    keep a deleted model's experts, held in the GraphModule's bindings, until the garbage collector runs) goes."""
    gm.graph.owning_module = None


def uninstall(block: nn.Module) -> None:
    """Give `block` its own forward back (the tensors re-pointed into moec's storage keep their values)."""
    compiled = compiled_forward(block)
    block.__dict__.pop("forward", None)
    if compiled is not None and compiled.user_forward is not None:
        block.forward = compiled.user_forward
    for attr in ("_moec_graph", "extra_repr"):
        block.__dict__.pop(attr, None)


def compiled_graph(block: nn.Module) -> fx.GraphModule | None:
    return block.__dict__.get("_moec_graph")
