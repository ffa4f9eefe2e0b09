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

from moec.passes.detect.proof import TOL, rel_err

MAX_GRAPHS = 4  # keys kept per model (e.g. batch sizes); the oldest graph is dropped first


@dataclass
class GraphStats:
    """moec.inspect(model).cuda_graphs: what the decode steps did."""

    captured: int = 0
    replayed: int = 0
    eager: int = 0  # one-token steps run eagerly (first call of a key, or a key refused)
    refused: dict[str, str] = field(default_factory=dict)  # key description -> why it runs eagerly

    def describe(self) -> str:
        why = f"; eager: {'; '.join(self.refused.values())}" if self.refused else ""
        return f"CUDA graphs: {self.captured} captured, {self.replayed} steps replayed, {self.eager} eager{why}"


class _Graph:
    def __init__(self, graph, inputs: dict, output, cache):
        self.graph, self.inputs, self.output, self.cache = graph, inputs, output, cache  # cache: kept alive


class GraphedStep:
    """transformers' decode-step callable for a model compiled with cuda_graphs=True (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.graphs: dict[tuple, _Graph | str] = {}  # key -> graph, or the reason the key runs eagerly
        self.stats = GraphStats()

    def __call__(self, **kw):
        model = self.model
        tensors = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
        ids = kw.get("input_ids")
        cache = kw.get("past_key_values")
        if (model.training or torch.is_grad_enabled() or ids is None or ids.dim() != 2 or ids.shape[1] != 1
                or ids.device.type != "cuda" or not _cache_tensors(cache)
                or any(kw.get(f) for f in ("output_attentions", "output_hidden_states"))):
            return model(**kw)
        key = self._key(kw, tensors, cache)
        entry = self.graphs.get(key)
        if entry is None:
            self.stats.eager += 1
            return self._capture(key, kw, tensors, cache)
        if isinstance(entry, str):
            self.stats.eager += 1
            return model(**kw)
        for k, v in tensors.items():
            entry.inputs[k].copy_(v)
        entry.graph.replay()
        self.stats.replayed += 1
        return _map_tensors(entry.output, torch.clone)

    def _key(self, kw: dict, tensors: dict, cache) -> tuple:
        args = tuple(sorted((k, (v.shape, v.dtype, v.device) if isinstance(v, torch.Tensor) else
                             id(v) if k == "past_key_values" else repr(v)) for k, v in kw.items()))
        weights = tuple((t.data_ptr(), t.dtype, t._version)
                        for t in itertools.chain(self.model.parameters(), self.model.buffers()))
        return args, tuple(t.data_ptr() for t in _cache_tensors(cache)), weights

    def _capture(self, key: tuple, kw: dict, tensors: dict, cache):
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
            inputs = {k: v.clone() for k, v in tensors.items()}
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = model(**(kw | inputs))
                for t, t0 in small:
                    t.copy_(t0)
                graph.replay()  # the eager step once more: same cache writes, its counters advanced once
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001  any op that cannot be captured (a host sync, a CPU tensor, ...)
                why = f"the step cannot be captured ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
                for (t, _), t1 in zip(small, after):
                    t.copy_(t1)
            else:
                err = rel_err(static_out.logits.float(), out.logits.float())
                if not err <= TOL[out.logits.dtype]:
                    why = f"the replayed step's logits differ from the eager step's (relative error {err:.1e})"
        if why is not None:
            self.graphs[key] = why
            self.stats.refused[f"batch {kw['input_ids'].shape[0]}"] = why
            warnings.warn(f"moec: cuda_graphs: this decode step runs eagerly: {why}", stacklevel=3)
            return out
        if len(self.graphs) >= MAX_GRAPHS:
            self.graphs.pop(next(iter(self.graphs)))
        self.graphs[key] = _Graph(graph, inputs, static_out, cache)
        self.stats.captured += 1
        return out


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
