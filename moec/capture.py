"""Capture: record one eager run of a module as an fx graph holding concrete values.

Whole HF models do not fx-trace and data-dependent expert loops break fx and torch.export
(platform.md), but every MoE block can be *run*. A TorchFunctionMode sees each torch call
made during the run (loops unrolled, `nonzero`/`where` with their real results); each call
becomes a `call_function` node whose `meta["val"]` is the value it produced, parameters and
buffers become `get_attr` nodes named by their path in the module, and `meta["module"]`
names the submodule that made the call. Python reads of tensor *values* (`bool(t)`, `t.item()`,
`t.tolist()`, `int(t)`, indexing with a tensor: the ways code branches or loops on data) are
recorded in `Capture.reads`. The graph is for analysis (detect_moe), not replay.

`untouched(module)` runs the user's module and leaves it bit-identical afterwards (buffers,
plain attributes, training flags, RNG states restored) and lists what the run changed.
"""

from __future__ import annotations

import contextlib
import operator
import random
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


@dataclass
class ModuleCall:
    path: str
    args: tuple
    output: Any
    kwargs: dict = field(default_factory=dict)


@dataclass
class Capture:
    graph: fx.Graph
    inputs: tuple  # the tensors the module was called with
    output: Any  # what the module returned
    calls: list[ModuleCall] = field(default_factory=list)  # submodule calls, in order
    reads: list[tuple[str, fx.Node]] = field(default_factory=list)  # (how, tensor read) Python reads of values

    def tensors_read(self) -> tuple[str, ...]:
        """The paths of the module's parameters and buffers the run read."""
        return tuple(n.target for n in self.graph.nodes if n.op == "get_attr")

    def dataflow(self) -> nx.DiGraph:
        """The graph as a networkx DiGraph of fx nodes (edges: producer -> user)."""
        g = nx.DiGraph()
        for n in self.graph.nodes:
            g.add_node(n)
            g.add_edges_from((a, n) for a in n.all_input_nodes)
        return g


_METADATA = {"__get__", "dim", "size", "numel", "is_floating_point", "__len__", "data_ptr", "__format__", "__repr__",
             "__hash__"}
_VALUE_READS = {"__bool__", "item", "tolist", "__index__", "__int__", "__float__", "__iter__"}


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: fx.Graph, names: dict[int, str], module_stack: list[str]):
        super().__init__()
        self.graph, self.names, self.stack = graph, names, module_stack
        self.node_of: dict[int, fx.Node] = {}
        self.keep: list[Any] = []  # keeps recorded tensors alive so ids stay unique
        self.reads: list[tuple[str, fx.Node]] = []

    def node_for(self, t: torch.Tensor) -> fx.Node:
        n = self.node_of.get(id(t))
        if n is None:  # a parameter/buffer, or a tensor made outside torch calls
            name = self.names.get(id(t))
            n = self.graph.get_attr(name) if name else self.graph.placeholder(f"const_{len(self.node_of)}")
            n.meta["val"] = t
            self.node_of[id(t)] = n
            self.keep.append(t)
        return n

    def arg(self, a):
        if isinstance(a, torch.Tensor):
            return self.node_for(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(x) for x in a) if not hasattr(a, "_fields") else tuple(self.arg(x) for x in a)
        if isinstance(a, dict):
            return {k: self.arg(v) for k, v in a.items()}
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _METADATA and not (name == "__get__" and isinstance(out, torch.Tensor)):
            return out  # metadata queries carry no dataflow worth recording (but W.T, W.mT do)
        if name in _VALUE_READS:  # Python sees a tensor's values: code may branch or loop on them
            if args and isinstance(args[0], torch.Tensor):
                self.reads.append((name, self.node_for(args[0])))
            return out
        node = self.graph.call_function(func, self.arg(tuple(args)), self.arg(kwargs))
        node.meta["val"] = out
        node.meta["module"] = self.stack[-1] if self.stack else ""
        self.keep.append(out)
        if args and isinstance(args[0], torch.Tensor) and (name == "__setitem__" or name.startswith("__i")
                                                           or (name.endswith("_") and not name.endswith("__"))):
            self.node_of[id(args[0])] = node  # in-place: later reads of the tensor see this call
        if isinstance(out, torch.Tensor):
            self.node_of[id(out)] = node
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    item = self.graph.call_function(operator.getitem, (node, i))
                    item.meta["val"], item.meta["module"] = o, node.meta["module"]
                    self.node_of[id(o)] = item
        return out


def capture(module: torch.nn.Module, *args, **kwargs) -> Capture:
    """Run `module(*args, **kwargs)` once under the recorder and return its graph."""
    graph = fx.Graph()
    names = {id(t): n for n, t in module.named_parameters(remove_duplicate=False)}
    names.update({id(t): n for n, t in module.named_buffers(remove_duplicate=False)})
    stack: list[str] = []
    calls: list[ModuleCall] = []
    rec = _Recorder(graph, names, stack)
    for i, t in enumerate(a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)):
        rec.node_of[id(t)] = p = graph.placeholder(f"input_{i}")
        p.meta["val"] = t
    hooks = []
    for path, sub in module.named_modules():
        if sub is module:
            continue
        hooks.append(sub.register_forward_pre_hook(lambda m, a, p=path: stack.append(p)))
        hooks.append(sub.register_forward_hook(lambda m, a, kw, o, p=path: _leave(stack, calls, p, a, kw, o),
                                               with_kwargs=True))
    try:
        with torch.no_grad(), rec:
            out = module(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    leaves = [rec.node_of.get(id(o)) for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
    graph.output(tuple(n for n in leaves if n is not None))
    inputs = tuple(a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor))
    return Capture(graph=graph, inputs=inputs, output=out, calls=calls, reads=rec.reads)


def _leave(stack: list[str], calls: list[ModuleCall], path: str, args: tuple, kwargs: dict, out: Any) -> None:
    stack.pop()
    calls.append(ModuleCall(path, args, out, kwargs))  # a forward hook must return None: the output stays


def target_name(node: fx.Node) -> str:
    """'softmax', 'topk', 'linear', '__mul__', ... for a recorded call."""
    t = node.target
    return getattr(t, "__name__", str(t)) if node.op == "call_function" else node.op


_MODULE_SLOTS = ("_parameters", "_buffers", "_modules")


@contextlib.contextmanager
def untouched(module: torch.nn.Module):
    """Run the user's module in eval mode and leave it exactly as it was: buffer values, the plain
    attributes of every submodule (counters, cached statistics, training flags), the registered
    parameters/buffers/submodules and the RNG states are restored. Yields a list that, on exit,
    names what the run changed (the detector rejects a block whose forward changes its state)."""
    changes: list[str] = []
    mods = dict(module.named_modules(remove_duplicate=False))
    attrs = {p: {k: _shallow(v) for k, v in m.__dict__.items() if k not in _MODULE_SLOTS}
             for p, m in mods.items()}
    slots = {p: {s: dict(getattr(m, s)) for s in _MODULE_SLOTS} for p, m in mods.items()}
    bufs = {n: b.detach().clone() for n, b in module.named_buffers()}
    versions = {n: p._version for n, p in module.named_parameters()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            module.eval()
            yield changes
    finally:
        random.setstate(py_state)
        for p, m in mods.items():
            for s in _MODULE_SLOTS:
                if diff := _diff(getattr(m, s), slots[p][s]):
                    changes.append(f"changes the {s[1:]} of {p or 'the block'} ({diff})")
                    getattr(m, s).clear()
                    getattr(m, s).update(slots[p][s])
            now = {k: v for k, v in m.__dict__.items() if k not in _MODULE_SLOTS}
            for k in set(now) | set(attrs[p]):
                if k == "training" or isinstance(now.get(k), (torch.dtype, torch.device)):
                    continue  # eval() above, restored below; a dtype/device a forward notes (e.g. its input's)
                if k not in attrs[p] or k not in now or not _same(now[k], attrs[p][k]):
                    changes.append(f"sets {(p + '.') if p else ''}{k}")
            for k in set(now) - set(attrs[p]):
                del m.__dict__[k]
            m.__dict__.update({k: _restore(v) for k, v in attrs[p].items()})
        for n, b in module.named_buffers():
            if n in bufs and (b.shape != bufs[n].shape or not torch.equal(b, bufs[n])):
                changes.append(f"updates buffer {n}")
                b.data = bufs[n]
        changes += [f"writes parameter {n} in place" for n, p in module.named_parameters()
                    if n in versions and p._version != versions[n]]


class _Shallow:
    """A snapshot of a list/dict/set attribute: the container object and a copy of its items."""

    def __init__(self, obj):
        self.obj, self.items = obj, (dict(obj) if isinstance(obj, dict) else list(obj))


def _shallow(v):
    return _Shallow(v) if type(v) in (list, dict, set) else v


def _same(now, then) -> bool:
    if isinstance(then, _Shallow):
        items = dict(now) if isinstance(now, dict) else list(now) if isinstance(now, (list, set)) else None
        return now is then.obj and items is not None and len(items) == len(then.items) and all(
            a is b for a, b in zip(items.values() if isinstance(items, dict) else items,
                                   then.items.values() if isinstance(then.items, dict) else then.items))
    return now is then or (type(now) in (int, float, bool, str, type(None)) and now == then)


def _restore(v):
    if isinstance(v, _Shallow):
        v.obj.clear()
        (v.obj.update if isinstance(v.obj, (dict, set)) else v.obj.extend)(v.items)
        return v.obj
    return v


def _diff(now: dict, then: dict) -> str:
    added, removed = set(now) - set(then), set(then) - set(now)
    replaced = {k for k in set(now) & set(then) if now[k] is not then[k]}
    return ", ".join(f"{w} {sorted(ks)}" for w, ks in (("added", added), ("removed", removed),
                                                       ("replaced", replaced)) if ks)
