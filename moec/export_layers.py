"""Each kind of decoder layer traced once: the KV-cache export's torch.onnx.export costs ~3 s per layer (two symbolic
traces, docs/benchmarks.md "Conversion time"), so a 48-layer model spent minutes tracing 48 copies of one layer.

    plan(exportable, inputs)          -> Plan: traced T < L layers, and for each later layer j the layer t it repeats
    with truncated(exportable, plan): torch.onnx.export(...)    # the first T layers only
    repeat(program, plan)                                        # layers T..L-1 as copies of their layer's nodes

Proof that layer j computes what layer t does (`plan`): one eager run of the whole model on the example, every aten /
custom op recorded while a decoder layer runs, each tensor argument named by what it is to the layer: its input, an
op output of its own (by position), one of its own tensors (parameters, buffers, compiled blocks' bindings: by name
under the layer), its own past (by slot), a tensor computed before the layers (the same object for every layer:
masks, rotary tables), else a constant (by value up to SMALL elements, by identity above). Layers j and t are the
same kind when these records are equal: same ops, same attributes, same shapes, each on the same relative tensors.
Layer 0 is never a source: its input comes from the embedding, not a layer.

The copies (`repeat`), on the un-optimized ONNX graph: the nodes torch.onnx.export put under `<layers>.{t}` (its
name scopes) that depend on the layer are cloned with layer j's tensors (initializers found by name or storage
among layer t's own tensors -> layer j's), its past_key_values.{j}.* inputs and present.{j}.* outputs, and
chained after layer j-1. The graph must have the shape this assumes, or the export traces every layer (LayersUnfit,
with the reason): layers connected only through one hidden state, nothing outside the layers reading inside them
(but the last layer's output) or their weights and past, each present output made by its own layer; nor may any op
run between two layers (the record says).
"""

from __future__ import annotations

import ast
import contextlib
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.nn.modules import module as module_hooks
from torch.utils._pytree import tree_flatten

from moec.canonical import compiled_graph

SMALL = 1 << 16  # a tensor no op made, of at most this many elements, is a constant compared by value


class LayersUnfit(Exception):
    """The graph is not a chain of layers the copies can repeat: trace every layer."""


@dataclass
class Plan:
    path: str  # the decoder layers' ModuleList under the HF model ("model.layers")
    layers: int  # L
    traced: int  # T: layers 0..T-1 are traced
    source: dict[int, int] = field(default_factory=dict)  # j >= T -> the traced layer t (1 <= t < T) it repeats
    own: list[dict[str, torch.Tensor]] = field(default_factory=list, repr=False)  # each layer's own_tensors
    named: set[str] = field(default_factory=set, repr=False)  # the exportable's parameter and buffer names


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(path, ModuleList) of an HF decoder's layers: the ModuleList named `layers` with num_hidden_layers entries."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n and name.split(".")[-1] == "layers":
            return name, m
    return None


def own_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A layer's tensors by name under it: parameters, buffers, and what each compiled block's graph reads
    (`<block>:<role>`, moec.bindings; export layouts are constants moec made, not parameters)."""
    own = {**dict(layer.named_parameters(remove_duplicate=False)), **dict(layer.named_buffers(remove_duplicate=False))}
    for path, m in layer.named_modules():
        gm = compiled_graph(m)
        for role, binding in (gm.meta["bindings"].items() if gm is not None else ()):
            t = binding.get(m)
            if isinstance(t, torch.Tensor):  # how it is made from the parameters is part of its name
                own.setdefault(f"{path}:{role}:{binding.describe()}", t)
    return own


class _Recorder(TorchDispatchMode):
    """Each decoder layer's ops while the model runs, their tensors named relative to the layer (module docstring)."""

    def __init__(self, layers: nn.ModuleList, past: tuple, per_layer: int):
        super().__init__()
        self.names: dict[int, tuple] = {}  # id(tensor) -> what it is
        self.alive: list = []  # every tensor named, kept alive so that no id is reused while recording
        self.own = [own_tensors(layer) for layer in layers]
        for i, own in enumerate(self.own):
            for key, t in own.items():
                self._name(t, ("param", i, key))
        for k, t in enumerate(past):
            self._name(t, ("past", k // per_layer, k % per_layer))
        self.layer: int | None = None
        self.records: dict[int, list] = {}
        self.twice = False  # a layer ran twice in one forward: its records do not describe it
        self.after: int | None = None  # ops run outside the layers when the last layer returned
        self.between = False  # ops ran between two layers: the copies would leave them out
        self.ops = 0  # ops run outside the layers so far

    def _name(self, t: torch.Tensor, what: tuple) -> None:
        self.names.setdefault(id(t), what)
        self.alive.append(t)

    def enter(self, i: int, hidden) -> None:
        self.twice |= i in self.records
        self.between |= self.after is not None and self.ops != self.after
        self.layer, self.records[i] = i, []
        if isinstance(hidden, torch.Tensor):
            self.names[id(hidden)] = ("in", i)
            self.alive.append(hidden)

    def _arg(self, a):
        if isinstance(a, torch.Tensor):
            what = self.names.get(id(a))
            if what is None:  # no op made it, not a parameter or input: a constant
                if a.numel() <= SMALL:
                    return "const", a.dtype, tuple(a.shape), a.detach().cpu().flatten().tolist()
                self.alive.append(a)  # its id stays its own while recording
                return "unknown", id(a)
            kind, *rest = what
            if kind in ("param", "past", "in", "local") and rest[0] == self.layer:
                return (kind, *rest[1:])  # the layer's own: relative
            return what
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x) for x in a)
        if isinstance(a, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
                          torch.memory_format)):
            return a
        return (type(a).__name__, repr(a))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.layer is None:
            where, self.ops = ("global", self.ops), self.ops + 1
        else:
            record = self.records[self.layer]
            where = ("local", self.layer, len(record))
            record.append((str(func), self._arg(args), self._arg(sorted(kwargs.items()))))
        for k, t in enumerate(tree_flatten(out)[0]):
            if isinstance(t, torch.Tensor):
                self.names[id(t)] = (*where, k)
                self.alive.append(t)
        return out


def plan(exportable: nn.Module, inputs: tuple, per_layer: int = 2) -> Plan | None:
    """Which layers the export traces and which it repeats (module docstring); None when no layer repeats a traced
    one, or the model is not an HF decoder this applies to. `inputs`: (input_ids, attention_mask, position_ids,
    *past), `per_layer` past tensors per layer."""
    found = decoder_layers(exportable.model)
    if found is None:
        return None
    path, layers = found
    rec = _Recorder(layers, inputs[3:], per_layer)
    hooks = []
    if module_hooks._global_forward_pre_hooks or module_hooks._global_forward_hooks:
        return None  # hooks on every module run outside the layer's record
    for i, layer in enumerate(layers):
        def before(module, args, kwargs, i=i):  # first: the layer's own pre-hooks are in its record
            rec.enter(i, args[0] if args else kwargs.get("hidden_states"))

        def after(module, args, out):  # last: so are its forward hooks, and what it hands on
            rec.records[rec.layer].append(("return", rec._arg(tree_flatten(out)[0])))
            rec.layer, rec.after = None, rec.ops

        hooks += [layer.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
                  layer.register_forward_hook(after)]
    try:
        with torch.no_grad(), rec:
            exportable(*inputs)
    finally:
        for h in hooks:
            h.remove()
    if len(rec.records) != len(layers) or rec.twice or rec.between:
        return None
    first: dict = {}  # record -> the first layer >= 1 with it
    source, traced = {}, 1
    for j in range(1, len(layers)):
        key = repr(rec.records[j])
        if key in first:
            source[j] = first[key]
        else:
            first[key], traced = j, j + 1
    source = {j: t for j, t in source.items() if j >= traced}
    named = {n for n, _ in [*exportable.named_parameters(remove_duplicate=False),
                            *exportable.named_buffers(remove_duplicate=False)]}
    return Plan(path, len(layers), traced, source, rec.own, named) if source else None


@contextlib.contextmanager
def truncated(exportable: nn.Module, p: Plan):
    """The exportable with its first p.traced layers only (its cache and states with them). The config stays as it
    is: the layers are traced under what they were recorded under (HF runs `layers[:num_hidden_layers]`; code that
    needs the two to agree fails the trace, which then covers every layer)."""
    parent_path, _, attr = p.path.rpartition(".")
    parent = exportable.model.get_submodule(parent_path)
    saved = getattr(parent, attr), exportable.layers, exportable.states
    try:
        setattr(parent, attr, nn.ModuleList(list(saved[0])[:p.traced]))
        exportable.layers, exportable.states = p.traced, {i for i in saved[2] if i < p.traced}
        yield
    finally:
        setattr(parent, attr, saved[0])
        exportable.layers, exportable.states = saved[1], saved[2]


def _scopes(node) -> list[str]:
    return ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))


class _Owners:
    """Which layer's tensor an initializer is, and its name under the layer: by name (`<layers>.{i}.<key>`: the
    layer's parameters and buffers), else by storage (compiled blocks' export layouts, which torch.export lifts as
    constants of its own names, over the same storage). None: a constant of no layer (then equal in every layer's
    record); one that equals a layer's tensor without sharing its storage is refused (LayersUnfit)."""

    def __init__(self, prefix: str, own: list[dict[str, torch.Tensor]], named: set[str] = frozenset()):
        self.prefix, self.name = prefix, re.compile(re.escape(prefix) + r"\.(\d+)\.(.+)")
        self.own, self.named = own, named
        self.real = [{key: _real(x) for key, x in o.items()} for o in own]  # as the exporter stores them
        self.storage = {self._storage(x): (i, key) for i, o in enumerate(self.real) for key, x in o.items()}
        self.seen: dict = {}  # initializer -> its owner

    @staticmethod
    def _storage(x: torch.Tensor) -> tuple:
        return x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype

    def __call__(self, v) -> tuple[int, str] | None:
        if v not in self.seen:
            self.seen[v] = self._owner(v)
        return self.seen[v]

    def _owner(self, v) -> tuple[int, str] | None:
        if (m := self.name.fullmatch(v.name or "")) and m.group(2) in self.own[int(m.group(1))]:
            return int(m.group(1)), m.group(2)
        raw = getattr(v.const_value, "raw", None)
        if not isinstance(raw, torch.Tensor) or v.name in self.named:  # not a tensor, or a parameter outside
            return None
        if (hit := self.storage.get(self._storage(raw))) is not None:
            return hit
        for i, o in enumerate(self.real):  # a copy of a layer's tensor would be shared by mistake: refuse
            for key, x in o.items():
                if x.shape == raw.shape and x.dtype == raw.dtype and torch.equal(x, raw):
                    raise LayersUnfit(f"{v.name} equals layer {i}'s {key} without being it: whose is it?")
        return None


def repeat(program, p: Plan) -> None:
    """Layers p.traced..p.layers-1 added to the ONNX graph of the first p.traced layers (module docstring), in
    place. Raises LayersUnfit when the graph is not the chain it assumes."""
    graph = program.model.graph
    prefix = f"model.{p.path}"  # under _ExportableWithCache
    owners = _Owners(prefix, p.own, p.named)
    layer_of = _bound_nodes(graph, prefix, owners)
    outs = _chain(graph, layer_of, p, owners)
    last = outs[p.traced - 1]
    tail = [(c, k) for c, k in last.uses() if c not in layer_of]
    for j in range(p.traced, p.layers):
        t = p.source[j]
        last = _copy(graph, [n for n in graph if layer_of.get(n) == t], t, j, {outs[t - 1]: last}, owners)[outs[t]]
    for c, k in tail:
        c.replace_input_with(k, last)
    for group, kind in ((graph.inputs, "past_key_values"), (graph.outputs, "present")):
        _in_layer_order(group, kind, p)
    graph.sort()


def _bound_nodes(graph, prefix: str, owners: _Owners) -> dict:
    """node -> its layer, for the nodes under a layer's name scope that depend on something of that layer: its
    input, weights or past. The exporter also puts there nodes that depend on none (constants, sizes of the
    inputs), which it then shares with later layers: those stay shared."""
    import onnx_ir as ir

    scope = re.compile(re.escape(prefix) + r"\.(\d+)$")
    layer_of: dict = {}
    for node in graph:  # in topological order
        idx = {int(m.group(1)) for s in _scopes(node) if (m := scope.match(s))}
        if len(idx) > 1:
            raise LayersUnfit(f"node {node.name} is in layers {sorted(idx)}")
        if not idx:
            continue
        t = idx.pop()
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            raise LayersUnfit(f"node {node.name} of layer {t} holds a subgraph (what it reads is implicit)")
        if any(v is not None and (v.producer() in layer_of or v.name.startswith("past_key_values.")
                                  or v.is_initializer() and owners(v) is not None) for v in node.inputs):
            layer_of[node] = t
    return layer_of


def _chain(graph, layer_of: dict, p: Plan, owners: _Owners) -> dict:
    """t -> the one value traced layer t hands on (its hidden state), after checking that the layers form a chain:
    layer t reads of the other layers only layer t-1's hidden state, each present.{t}.* is layer t's, and nothing
    outside the layers reads inside one but the last layer's hidden state."""
    outs: dict = {}
    for t in range(p.traced):
        nodes = [n for n in graph if layer_of.get(n) == t]
        fed = {v for n in nodes for v in n.inputs if v is not None and layer_of.get(v.producer(), t) != t}
        if fed != ({outs[t - 1]} if t else set()):
            raise LayersUnfit(f"layer {t} reads {sorted(v.name for v in fed)} of other layers")
        handed = {v for n in nodes for v in n.outputs if any(layer_of.get(c) != t for c in v.consumers())}
        if len(handed) != 1:
            raise LayersUnfit(f"layer {t} hands on {sorted(v.name for v in handed)}, not one hidden state")
        outs[t] = handed.pop()
    for n in graph:
        if n in layer_of:
            continue
        if any(v is not None and v.producer() in layer_of and v is not outs[p.traced - 1] for v in n.inputs):
            raise LayersUnfit(f"node {n.name} outside the layers reads inside one")
        if any(v is not None and (v.is_initializer() and owners(v) is not None
                                  or v.name.startswith("past_key_values.") and n.op_type != "Shape")
               for v in n.inputs):  # its value would be shared by the copies of a layer that reads it
            raise LayersUnfit(f"node {n.name} outside the layers reads a layer's weights or past")
    for v in graph.outputs:
        m = re.fullmatch(r"present\.(\d+)\.\w+", v.name)
        if layer_of.get(v.producer()) != (int(m.group(1)) if m else None):
            raise LayersUnfit(f"the graph output {v.name} is made by layer {layer_of.get(v.producer())}")
    return outs


def _copy(graph, nodes: list, t: int, j: int, here: dict, owners: _Owners) -> dict:
    """Layer t's nodes added again as layer j: its own weights and past, the values in `here` (layer t-1's hidden
    state -> layer j-1's) replaced. Returns here, completed: each of layer t's values -> layer j's."""
    import onnx_ir as ir
    from torch.onnx._internal.exporter._core import TorchTensor

    def weight(v):
        """Layer j's initializer for the one layer t reads, or None: v is a constant every layer shares."""
        owner = owners(v)
        if owner is None:
            return None
        i, key = owner
        if i != t:
            raise LayersUnfit(f"layer {t} reads {v.name}, a tensor of layer {i}")
        tensor = owners.own[j].get(key)
        if tensor is None:
            raise LayersUnfit(f"layer {j} has no {key} (layer {t} reads it as {v.name})")
        m = owners.name.fullmatch(v.name)
        name = f"{owners.prefix}.{j}.{m.group(2)}" if m else f"{v.name}__{j}"
        value = TorchTensor(_real(tensor), name=name)
        if value.dtype != v.const_value.dtype or tuple(value.shape) != tuple(v.const_value.shape):
            raise LayersUnfit(f"{name} is {value.dtype} {tuple(value.shape)}, {v.name} {v.const_value.dtype} "
                              f"{tuple(v.const_value.shape)}")
        new = ir.Value(name=name, type=v.type, shape=_shape(v), const_value=value)
        graph.register_initializer(new)
        return new

    def mapped(v):
        if v is None or v in here:
            return None if v is None else here[v]
        if v.is_graph_input() and (m := re.fullmatch(rf"past_key_values\.{t}\.(\w+)", v.name)):
            here[v] = ir.Value(name=f"past_key_values.{j}.{m.group(1)}", type=v.type, shape=_shape(v))
            graph.inputs.append(here[v])
        elif v.is_initializer() and (new := weight(v)) is not None:
            here[v] = new
        else:
            return v  # computed before the layers, a graph input or a constant: shared
        return here[v]

    for n in nodes:
        attrs = [ir.Attr(a.name, a.type, a.value, a.ref_attr_name, doc_string=a.doc_string)
                 for a in n.attributes.values()]
        copy = ir.Node(n.domain, n.op_type, [mapped(v) for v in n.inputs], attrs, overload=n.overload,
                       num_outputs=len(n.outputs), version=n.version, name=f"{n.name}__{j}",
                       metadata_props=dict(n.metadata_props))
        for old, new in zip(n.outputs, copy.outputs):
            present = old.is_graph_output()
            new.name = f"present.{j}.{old.name.rsplit('.', 1)[1]}" if present else f"{old.name}__{j}"
            new.type, new.shape = old.type, _shape(old)
            here[old] = new
            if present:
                graph.outputs.append(new)
        graph.append(copy)
    return here


def _real(x: torch.Tensor) -> torch.Tensor:
    """Complex tensors as the exporter writes them: pairs of reals."""
    return torch.view_as_real(x) if x.is_complex() else x


def _shape(v):
    return v.shape.copy() if v.shape is not None else None


def _in_layer_order(group, prefix: str, p: Plan) -> None:
    """Graph inputs (outputs) as the export orders them: the others, then each layer's past (present) tensors in
    its source layer's slot order."""
    pattern = re.compile(rf"{prefix}\.(\d+)\.(\w+)")
    values = list(group)
    by_name = {v.name: v for v in values}
    slots = {}
    for v in values:
        if (m := pattern.fullmatch(v.name)) and int(m.group(1)) < p.traced:
            slots.setdefault(int(m.group(1)), []).append(m.group(2))
    ordered = [v for v in values if not pattern.fullmatch(v.name)]
    ordered += [by_name[f"{prefix}.{i}.{s}"] for i in range(p.layers) for s in slots[p.source.get(i, i)]]
    group.clear()
    group.extend(ordered)
