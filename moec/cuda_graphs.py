"""Whole decode steps replayed as CUDA graphs behind `model.generate()`: moec.compile(model, cuda_graphs=True).

At one token a decode step is hundreds of small kernels launched from Python (moec's blocks: routing ops and six
Triton launches each; attention, norms, rotary: the model's own modules), and the host, not the GPU, sets the speed
(docs/benchmarks.md: a ~600 us floor per MoE layer call on an H200). With cuda_graphs=True a transformers model's
generate() keeps a static KV cache (generation_config.cache_implementation = "static": fixed shapes, written in
place) and runs each one-token step as the replay of a CUDA graph captured from the model's own forward. transformers
asks for its decode-step callable through `get_compiled_call` (the hook of its torch.compile path); moec answers with
a `GraphedStep`:

    step(input_ids [B, 1], position_ids [B, 1], cache_position [1], 4-D mask [B, 1, 1, L], cache) -> logits [B, 1, V]
      new key (below): run the forward eagerly: its result is the step's result. Then capture the forward, restore
        the cache's small tensors (StaticLayer's position counter: the eager step advanced it) and replay once on
        the same inputs: the replay must give the eager step's logits (moec's tolerance for the dtype) and the step
        must leave the model's and the cache's Python state (counters, tensor attributes) as it found them.
        Otherwise, or if the capture fails: the forward runs eagerly for this key, with a warning saying why.
      same key: copy the inputs into the graph's buffers, replay, return clones of the outputs.

Key: the inputs' shapes, dtypes and devices, the other arguments, the cache's tensors (a new generate() call with a
new cache captures again), and every parameter's and buffer's data pointer, dtype and version counter (weights
loaded in place or assigned, moved, cast: captured again). Prefill (more than one token), training mode, gradients,
output_attentions/hidden_states and models off CUDA run the forward as usual.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import _pytree as pytree

from moec.passes.detect.proof import TOL, rel_err

DEVICE = "cuda"  # the device type whose steps are graphed (tests on a CPU emulate the graph: tests/test_cuda_graphs)
MAX_GRAPHS = 4  # keys kept per model (e.g. batch sizes); the oldest graph is dropped first


@dataclass
class GraphStats:
    """moec.inspect(model).cuda_graphs: what the decode steps did."""

    captured: int = 0
    replayed: int = 0
    eager: int = 0  # one-token steps run eagerly (first call of a key, or a key refused)
    refused: dict[str, str] = field(default_factory=dict)  # "batch B" -> why such steps run eagerly

    def describe(self) -> str:
        why = f"; eager: {'; '.join(self.refused.values())}" if self.refused else ""
        return f"CUDA graphs: {self.captured} captured, {self.replayed} steps replayed, {self.eager} eager{why}"


@dataclass
class _Graph:
    graph: object  # torch.cuda.CUDAGraph
    inputs: list  # the step's arguments flattened (torch.utils._pytree): tensors are the buffers the graph reads
    output: object  # the ModelOutput whose tensors the graph writes


class GraphedStep:
    """transformers' decode-step callable for a model compiled with cuda_graphs=True (see the module docstring).
    Graphs are kept for the cache of the latest generate() call only (up to MAX_GRAPHS keys): that cache stays
    allocated until the next call brings another. A refusal is remembered across calls (it does not depend on the
    cache): such steps run eagerly without another try."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache = None  # the cache the graphs write into
        self.graphs: dict[tuple, _Graph] = {}  # (inputs and weights, cache tensors) -> graph
        self.refused: dict[tuple, str] = {}  # inputs and weights -> why such steps run eagerly
        self.stats = GraphStats()

    def __call__(self, **kw):
        model = self.model
        ids = kw.get("input_ids")
        cache = kw.get("past_key_values")
        cache_tensors = _cache_tensors(cache)
        if (model.training or torch.is_grad_enabled() or ids is None or ids.dim() != 2 or ids.shape[1] != 1
                or ids.device.type != DEVICE or not cache_tensors
                or any(kw.get(f) for f in ("output_attentions", "output_hidden_states"))):
            return model(**kw)
        leaves, spec = pytree.tree_flatten({k: v for k, v in kw.items() if k != "past_key_values"})
        step = self._key(leaves, spec)
        if step in self.refused:
            self.stats.eager += 1
            return model(**kw)
        if cache is not self.cache:  # a new generate() call: the old cache's graphs go, and with them that cache
            self.graphs.clear()
            self.cache = cache
        key = step, tuple(t.data_ptr() for t in cache_tensors)
        entry = self.graphs.get(key)
        if entry is None:
            self.stats.eager += 1
            return self._capture(step, key, kw, leaves, spec, cache)
        for buf, v in zip(entry.inputs, leaves):
            if isinstance(v, torch.Tensor):
                buf.copy_(v)
        entry.graph.replay()
        self.stats.replayed += 1
        return _map_tensors(entry.output, torch.clone)

    def _key(self, leaves: list, spec) -> tuple:
        """The step's arguments but the cache (their structure: a mask may be a dict of tensors; the tensors' shapes,
        dtypes and devices; the other values) and the weights' state."""
        args = tuple((v.shape, v.dtype, v.device) if isinstance(v, torch.Tensor) else repr(v) for v in leaves)
        weights = tuple((t.data_ptr(), t.dtype, _version(t))
                        for t in itertools.chain(self.model.parameters(), self.model.buffers()))
        return str(spec), args, weights

    def _capture(self, step: tuple, key: tuple, kw: dict, leaves: list, spec, cache):
        """Eager step (returned), then capture, replay once and compare (see the module docstring)."""
        model = self.model
        small = [(t, t.clone()) for t in _cache_tensors(cache) if t.numel() <= 64]  # (counter, its value before)
        before = _python_state(model, cache)
        out = model(**kw)
        why = _python_state_changes(before, _python_state(model, cache))
        if why is None and not hasattr(out, "logits"):
            why = "the forward returns no logits"
        if why is None:
            after = [t.clone() for t, _ in small]
            inputs = [v.clone() if isinstance(v, torch.Tensor) else v for v in leaves]  # the graph's input buffers
            try:
                graph, static_out = _record(lambda: model(**pytree.tree_unflatten(inputs, spec), past_key_values=cache))
                for t, t0 in small:
                    t.copy_(t0)
                graph.replay()  # the eager step once more: same cache writes, its counters advanced once
                if out.logits.is_cuda:
                    torch.cuda.synchronize()  # a replay's error is raised here, inside the try
            except Exception as e:  # noqa: BLE001  any op that cannot be captured (a host sync, a CPU tensor, ...)
                why = f"the step cannot be captured ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
                for (t, _), t1 in zip(small, after):
                    t.copy_(t1)
            else:
                err = rel_err(static_out.logits.float(), out.logits.float())
                if not err <= TOL[out.logits.dtype]:
                    why = f"the replayed step's logits differ from the eager step's (relative error {err:.1e})"
        if why is not None:
            self.refused[step] = why
            self.stats.refused[f"batch {kw['input_ids'].shape[0]}"] = why
            warnings.warn(f"moec: cuda_graphs: this decode step runs eagerly: {why}", stacklevel=3)
            return out
        if len(self.graphs) >= MAX_GRAPHS:
            self.graphs.pop(next(iter(self.graphs)))
        self.graphs[key] = _Graph(graph, inputs, static_out)
        self.stats.captured += 1
        return out


def _record(step):
    """(a CUDA graph of step's kernels, step's output: the tensors that graph writes). Capture runs nothing."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def _version(t: torch.Tensor) -> int:
    """A tensor's version counter; -1 for one made under torch.inference_mode (it has none)."""
    return -1 if t.is_inference() else t._version


def _cache_tensors(cache) -> list[torch.Tensor]:
    """The tensors a transformers Cache holds in its layers (a StaticCache's keys/values/counters); [] if none."""
    layers = getattr(cache, "layers", None)
    if not layers or not getattr(cache, "is_compileable", False):
        return []
    return [v for layer in layers for v in vars(layer).values() if isinstance(v, torch.Tensor)]


def _python_state(model: nn.Module, cache) -> dict:
    """Scalars and tensor identities of the cache, its layers and the model's modules: a graph replays kernels, so a
    step that changes any of them (a sliding-window cache's int position, a re-allocated tensor) cannot be one."""
    objs = [cache, *getattr(cache, "layers", []), *model.modules()]
    return {(i, k): (id(v) if isinstance(v, torch.Tensor) else v) for i, o in enumerate(objs)
            for k, v in vars(o).items() if isinstance(v, (bool, int, float, str, torch.Tensor))}


def _python_state_changes(before: dict, after: dict) -> str | None:
    changed = sorted({k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}, key=str)
    return None if not changed else f"the step changes Python state ({', '.join(str(k[1]) for k in changed[:3])})"


def _map_tensors(out, fn):
    """The model output with each of its tensors passed through fn (the cache object stays itself)."""
    return type(out)(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in out.items()})


def install(model: nn.Module, on: bool) -> GraphStats | None:
    """compile(cuda_graphs=...): give the model's generate() a static cache and graphed decode steps, or take them
    back (a model compiled again without them)."""
    d = model.__dict__
    if not on:
        if "_moec_graphs" in d:
            del d["get_compiled_call"], d["_moec_graphs"]
            model.generation_config.cache_implementation = d.pop("_moec_cache_implementation")
        return None
    if not (hasattr(model, "generate") and hasattr(model, "generation_config") and hasattr(model, "get_compiled_call")):
        raise TypeError(f"moec.compile: cuda_graphs=True graphs the decode steps of a transformers model's generate(); "
                        f"{type(model).__name__} has none")
    if "_moec_graphs" not in d:
        d["_moec_cache_implementation"] = model.generation_config.cache_implementation
    step = GraphedStep(model)
    d["_moec_graphs"] = step
    d["get_compiled_call"] = lambda compile_config=None: step
    model.generation_config.cache_implementation = "static"
    return step.stats
