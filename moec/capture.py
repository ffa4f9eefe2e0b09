"""Capture: record one eager run of a module as an fx graph holding concrete values.

Whole HF models do not fx-trace and data-dependent expert loops break fx and torch.export
(platform.md), but every MoE block can be *run*. A TorchFunctionMode sees each torch call
made during the run (loops unrolled, `nonzero`/`where` with their real results); each call
becomes a `call_function` node whose `meta["val"]` is the value it produced, parameters and
buffers become `get_attr` nodes named by their path in the module, and `meta["module"]`
names the submodule that made the call. The graph is for analysis (detect_moe), not replay.
"""

from __future__ import annotations

import operator
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


@dataclass
class Capture:
    graph: fx.Graph
    inputs: tuple  # the tensors the module was called with
    output: Any  # what the module returned
    calls: list[ModuleCall] = field(default_factory=list)  # submodule calls, in order

    def dataflow(self) -> nx.DiGraph:
        """The graph as a networkx DiGraph of fx nodes (edges: producer -> user)."""
        g = nx.DiGraph()
        for n in self.graph.nodes:
            g.add_node(n)
            g.add_edges_from((a, n) for a in n.all_input_nodes)
        return g


_METADATA = {"__get__", "dim", "size", "numel", "is_floating_point", "__len__", "data_ptr", "__bool__", "item",
             "tolist", "__index__", "__int__", "__float__", "__format__", "__repr__", "__hash__"}


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: fx.Graph, names: dict[int, str], module_stack: list[str]):
        super().__init__()
        self.graph, self.names, self.stack = graph, names, module_stack
        self.node_of: dict[int, fx.Node] = {}
        self.keep: list[Any] = []  # keeps recorded tensors alive so ids stay unique

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
        if getattr(func, "__name__", "") in _METADATA:
            return out  # metadata queries carry no dataflow worth recording
        node = self.graph.call_function(func, self.arg(tuple(args)), self.arg(kwargs))
        node.meta["val"] = out
        node.meta["module"] = self.stack[-1] if self.stack else ""
        self.keep.append(out)
        name = getattr(func, "__name__", "")
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
        hooks.append(sub.register_forward_hook(lambda m, a, o, p=path: _leave(stack, calls, p, a, o)))
    try:
        with torch.no_grad(), rec:
            out = module(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    leaves = [rec.node_of.get(id(o)) for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
    graph.output(tuple(n for n in leaves if n is not None))
    inputs = tuple(a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor))
    return Capture(graph=graph, inputs=inputs, output=out, calls=calls)


def _leave(stack: list[str], calls: list[ModuleCall], path: str, args: tuple, out: Any) -> None:
    stack.pop()
    calls.append(ModuleCall(path, args, out))  # a forward hook must return None: the output stays


def target_name(node: fx.Node) -> str:
    """'softmax', 'topk', 'linear', '__mul__', ... for a recorded call."""
    t = node.target
    return getattr(t, "__name__", str(t)) if node.op == "call_function" else node.op
