"""Whole decode steps replayed as CUDA graphs behind `model.generate()`: moec.compile(model, cuda_graphs=True).

At one token a decode step is hundreds of small kernels launched from Python (moec's blocks: routing ops and six
Triton launches each; attention, norms, rotary: the model's own modules), and the host, not the GPU, sets the speed
(docs/benchmarks.md: a ~600 us floor per MoE layer call on an H200). With cuda_graphs=True a transformers model's
generate() runs with a static KV cache (fixed shapes, written in place; moec asks for it where neither the call nor
a generation config names another cache or assisted decoding: `_Generate`) and each one-token step is the replay of a CUDA graph captured from the model's own forward.
transformers asks for its decode-step callable once per generate() call through `get_compiled_call` (the hook of
its torch.compile path); moec answers with the model's `GraphedStep`, its graphs of earlier calls dropped:

    step(input_ids [B, 1], position_ids [B, 1], mask (4-D [B, 1, 1, L], or a dict of them), cache) -> logits [B, 1, V]
      new key (below): run the forward eagerly: its result is the step's result. A graph is made only if that step
        left the model's and the cache's Python state as it found them (scalars, tensor identities) and wrote no
        cache tensor but the layers' keys/values (at positions: writing them again writes the same) and small
        counters (<= 64 elements, whose values before and after the step are kept). Then: capture the forward (runs
        nothing), put the counters back, replay (the step again, into NaN-filled outputs): the counters must reach
        their after-step values and the logits the eager step's (moec's tolerance for the dtype). If anything fails,
        the counters are put back and the step runs eagerly once more (same cache writes), and steps of this form
        (argument structure, dtypes, ranks) run eagerly from then on, with a warning saying why.
      same key: copy the inputs into the graph's buffers, replay, return clones of the outputs.

Key: the arguments but the cache, flattened (torch.utils._pytree: their structure, tensors' shapes, dtypes and
devices; other leaves must be None/bool/int/float/str, else the step runs eagerly), every parameter's and buffer's
data pointer, dtype and version counter (weights loaded in place or assigned, moved, cast, edited: captured again),
and the cache's tensors. Prefill (more than one token), training mode, gradients, output_attentions/hidden_states
and inputs on another device than the model's run the forward as usual.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import re
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import _pytree as pytree

from moec.form import ModelRef
from moec.passes.detect.proof import TOL, rel_err

DEVICE = "cuda"  # the device type whose steps are graphed (tests on a CPU emulate the graph: tests/test_cuda_graphs)
MAX_GRAPHS = 4  # keys kept per generate() call (e.g. a step whose mask changes form); the oldest dropped first
MAX_REFUSED = 64  # argument forms whose refusal is remembered
SMALL = 64  # cache tensors of at most this many elements are counters, saved and put back around the check
PLAIN = (type(None), bool, int, float, str)


@dataclass
class GraphStats:
    """moec.inspect(model).cuda_graphs: what the decode steps did."""

    captured: int = 0
    replayed: int = 0
    eager: int = 0  # one-token steps run eagerly (a key's first step, or a key refused)
    refused: list[str] = field(default_factory=list)  # why steps run eagerly, each reason once

    def describe(self) -> str:
        why = f"; eager because: {'; '.join(self.refused)}" if self.refused else ""
        return f"CUDA graphs: {self.captured} captured, {self.replayed} steps replayed, {self.eager} eager{why}"


@dataclass
class _Graph:
    graph: object  # torch.cuda.CUDAGraph
    inputs: list  # the step's arguments flattened: its tensors are the buffers the graph reads
    output: object  # the ModelOutput whose tensors the graph writes (its cache left out)


class GraphedStep:
    """transformers' decode-step callable for a model compiled with cuda_graphs=True (see the module docstring).
    Refusals are remembered per argument form (up to MAX_REFUSED); graphs for one generate() call."""

    def __init__(self, model: nn.Module):
        self.owner = ModelRef(model)
        self.graphs: dict[tuple, _Graph] = {}  # (arguments and weights, cache tensors) -> graph
        self.refused: dict[tuple, str] = {}  # the arguments' form -> why such steps run eagerly
        self.cache = _dead  # weakref to the cache the graphs write into (not kept alive by them)
        self.stats = GraphStats()

    @property
    def model(self) -> nn.Module:
        return self.owner.model

    def __getstate__(self):  # copies and pickles of the model start without graphs (they are the GPU's)
        return {**self.__dict__, "graphs": {}, "cache": None}

    def __setstate__(self, state):
        self.__dict__.update(state, cache=_dead)

    def new_call(self) -> GraphedStep:
        """A generate() call begins: the graphs of earlier calls go (their cache, the model's Python state)."""
        self.graphs.clear()
        return self

    def __call__(self, **kw):
        model = self.model
        ids = kw.get("input_ids")
        cache = kw.get("past_key_values")
        device = next((p.device for p in model.parameters()), None)
        cache_tensors = _cache_tensors(cache)
        if (model.training or torch.is_grad_enabled() or ids is None or ids.dim() != 2 or ids.shape[1] != 1
                or ids.device.type != DEVICE or ids.device != device or not cache_tensors
                or any(kw.get(f) for f in ("output_attentions", "output_hidden_states"))):
            return model(**kw)
        leaves, spec = pytree.tree_flatten({k: v for k, v in kw.items() if k != "past_key_values"})
        odd = next((v for v in leaves if not isinstance(v, (torch.Tensor, *PLAIN))), None)
        form = str(spec), tuple((v.dtype, v.dim()) if isinstance(v, torch.Tensor) else type(v) for v in leaves)
        why = self.refused.get(form) or (odd is not None and self._refuse(
            form, f"an argument is a {type(odd).__name__}, neither a tensor nor a plain value"))
        if why:
            self.stats.eager += 1
            return model(**kw)
        if cache is not self.cache():  # another cache: graphs write into the cache they were captured with
            self.graphs.clear()
            self.cache = weakref.ref(cache)
        key = self._key(leaves, spec), tuple(t.data_ptr() for t in cache_tensors)
        entry = self.graphs.get(key)
        if entry is None:
            self.stats.eager += 1
            with torch.cuda.device(ids.device) if ids.is_cuda else contextlib.nullcontext():
                return self._capture(form, key, kw, leaves, spec, cache)
        for buf, v in zip(entry.inputs, leaves):
            if isinstance(v, torch.Tensor):
                buf.copy_(v)
        entry.graph.replay()
        self.stats.replayed += 1
        return _output(entry.output, cache, torch.clone)

    def _key(self, leaves: list, spec) -> tuple:
        """The step's arguments but the cache (their structure: a mask may be a dict of tensors; the tensors' shapes,
        dtypes and devices; the other values) and the weights' state."""
        args = tuple((v.shape, v.dtype, v.device) if isinstance(v, torch.Tensor) else (type(v), repr(v))
                     for v in leaves)
        weights = tuple((t.data_ptr(), t.dtype, _version(t))
                        for t in itertools.chain(self.model.parameters(), self.model.buffers()))
        return str(spec), args, weights

    def _refuse(self, form: tuple, why: str) -> str:
        """Steps of this form (argument structure, dtypes, ranks) run eagerly from now on; one warning per reason
        (numbers aside)."""
        if len(self.refused) >= MAX_REFUSED:
            self.refused.pop(next(iter(self.refused)))
        self.refused[form] = why
        kind = re.sub(r"[0-9][0-9.e+-]*", "#", why)
        if kind not in {re.sub(r"[0-9][0-9.e+-]*", "#", w) for w in self.stats.refused}:
            self.stats.refused.append(why)
            warnings.warn(f"moec: cuda_graphs: decode steps run eagerly: {why}", stacklevel=4)
        return why

    def _capture(self, form: tuple, key: tuple, kw: dict, leaves: list, spec, cache):
        """Eager step (returned), then capture, replay once and check (see the module docstring)."""
        model = self.model
        tensors = _cache_tensors(cache)
        small = [t for t in tensors if t.numel() <= SMALL]
        before_small, versions = [t.clone() for t in small], [_version(t) for t in tensors]
        before = _python_state(model, cache)
        buffers = {n: _version(b) for n, b in model.named_buffers()}
        out = model(**kw)
        written = next((n for n, b in model.named_buffers() if buffers.get(n, -1) != _version(b)), None)
        why = _python_state_changes(before, _python_state(model, cache)) or _hidden_state(cache) or \
            _unexpected_writes(cache, tensors, versions) or (None if hasattr(out, "logits") else
                                                             "the forward returns no logits") or \
            (written and f"the step writes the model's buffer {written} (e.g. a block's token counter): a graph "
                         f"would write it again at its check, and each step would need a graph of its own")
        if why:
            self._refuse(form, why)
            return out
        after_small = [t.clone() for t in small]
        inputs = [v.clone() if isinstance(v, torch.Tensor) else v for v in leaves]  # the graph's input buffers
        try:
            graph, static_out = _record(lambda: model(**pytree.tree_unflatten(inputs, spec), past_key_values=cache))
            _put(small, before_small)
            static_out.logits.fill_(float("nan"))  # what the replay does not write stays NaN
            graph.replay()  # the eager step once more: the same cache writes, its counters advanced once
            reached = all(torch.equal(t, a) for t, a in zip(small, after_small))  # (a sync: replay errors raise here)
            err = rel_err(static_out.logits.float(), out.logits.float())
            if not reached:
                why = "the replayed step does not advance the cache's counters as the eager step did"
            elif not err <= TOL[out.logits.dtype]:
                why = f"the replayed step's logits differ from the eager step's (relative error {err:.1e})"
        except Exception as e:  # noqa: BLE001  any op that cannot be captured (a host sync, a CPU tensor, ...)
            why = f"the step cannot be captured ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        if why:
            self._refuse(form, why)
            _put(small, before_small)
            return model(**kw)  # the step again, eagerly: the cache as the first eager step left it
        if len(self.graphs) >= MAX_GRAPHS:
            self.graphs.pop(next(iter(self.graphs)))
        self.graphs[key] = _Graph(graph, inputs, _output(static_out, None))  # not the cache: not kept alive
        self.stats.captured += 1
        return out


class _CompiledCall:
    """The model's `get_compiled_call` (transformers calls it at the start of each generate() loop)."""

    def __init__(self, model: nn.Module):
        self.owner = ModelRef(model)

    def __call__(self, compile_config=None) -> GraphedStep:
        return self.owner.model.__dict__["_moec_graphs"].new_call()


class _Generate:
    """The model's `generate`: transformers' own, asked for a static cache unless the call (its arguments, its
    generation config, the model's) names a cache, a cache implementation, no cache, or assisted decoding (which crops
    its cache, as an assistant too)."""

    def __init__(self, model: nn.Module):
        self.owner = ModelRef(model)

    def __call__(self, *args, **kwargs):
        model = self.owner.model
        args = list(args)
        positional = len(args) > 1  # generate(inputs, generation_config, ...)
        given = args[1] if positional else kwargs.get("generation_config")
        if not any(kwargs.get(k) is not None for k in ("past_key_values", "assistant_model")):
            rest = {k: v for k, v in kwargs.items() if k != "generation_config"}
            config, _ = model._prepare_generation_config(copy.deepcopy(given), **rest)
            if config.use_cache and not any(getattr(c, "cache_implementation", None) for c in (
                    config, given, model.generation_config)) and not any(getattr(config, k, None) for k in (
                    "prompt_lookup_num_tokens", "assistant_early_exit", "is_assistant")):
                if given is None:
                    kwargs["cache_implementation"] = "static"
                else:  # a copy of the caller's config (an extra argument beside a config is deprecated)
                    given = copy.deepcopy(given)
                    given.cache_implementation = "static"
                    if positional:
                        args[1] = given
                    else:
                        kwargs["generation_config"] = given
        return type(model).generate(model, *args, **kwargs)


def _dead():
    return None


def _record(step):
    """(a CUDA graph of step's kernels, step's output: the tensors that graph writes). Capture runs nothing."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def _put(tensors: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for t, v in zip(tensors, values):
        t.copy_(v)


def _version(t: torch.Tensor) -> int:
    """A tensor's version counter; -1 for one made under torch.inference_mode (it has none)."""
    return -1 if t.is_inference() else t._version


def _cache_tensors(cache) -> list[torch.Tensor]:
    """The tensors a transformers Cache holds as attributes of its layers (a StaticCache's keys/values/counters)."""
    layers = getattr(cache, "layers", None)
    if not layers or not getattr(cache, "is_compileable", False):
        return []
    return [v for layer in layers for v in vars(layer).values() if isinstance(v, torch.Tensor)]


def _hidden_state(cache) -> str | None:
    """Tensors the cache keeps inside containers (a linear-attention layer's conv/recurrent states in dicts): the
    check replay would advance them past the step, and nothing here could put them back."""
    for o in (cache, *cache.layers):
        for k, v in vars(o).items():
            if isinstance(v, (dict, list, tuple)) and any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(v)):
                return f"the cache keeps tensors in a {type(v).__name__} ({type(o).__name__}.{k})"
    return None


def _unexpected_writes(cache, tensors: list[torch.Tensor], versions: list[int]) -> str | None:
    """A cache tensor the step wrote other than a layer's keys/values (written at positions) or a small counter."""
    kv = {id(getattr(layer, n, None)) for layer in cache.layers for n in ("keys", "values")}
    for t, v in zip(tensors, versions):
        if id(t) not in kv and t.numel() > SMALL and (t.is_inference() or _version(t) != v):
            how = "may write (an inference tensor: no version counter)" if t.is_inference() else "writes"
            return f"the step {how} a cache tensor of shape {tuple(t.shape)} that is not a layer's keys or values"
    return None


def _python_state(model: nn.Module, cache) -> dict:
    """Scalars and tensor identities of the cache, its layers and the model's modules: a graph replays kernels, so a
    step that changes any of them (a sliding-window cache's int position, a re-allocated tensor) cannot be one."""
    objs = [cache, *getattr(cache, "layers", []), *model.modules()]
    return {(i, k): (id(v) if isinstance(v, torch.Tensor) else v) for i, o in enumerate(objs)
            for k, v in vars(o).items() if isinstance(v, (bool, int, float, str, torch.Tensor))}


def _python_state_changes(before: dict, after: dict) -> str | None:
    changed = sorted({k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}, key=str)
    names = list(dict.fromkeys(str(k[1]) for k in changed))
    return None if not changed else f"the step changes Python state ({', '.join(names[:3])})"


def _output(out, cache, fn=lambda t: t):
    """The model output with each of its tensors passed through fn, and `cache` as its past_key_values."""
    fields = {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in out.items() if k != "past_key_values"}
    return type(out)(**fields, **({} if cache is None else {"past_key_values": cache}))


def check(model: nn.Module) -> None:
    """compile(cuda_graphs=True)'s requirements of the model, before anything is rewritten."""
    if not (hasattr(model, "generate") and hasattr(model, "generation_config") and hasattr(model, "get_compiled_call")):
        raise TypeError(f"moec.compile: cuda_graphs=True graphs the decode steps of a transformers model's generate(); "
                        f"{type(model).__name__} has none")
    if getattr(model.config, "is_encoder_decoder", False):
        raise NotImplementedError(f"moec.compile: cuda_graphs=True graphs decoder-only models' steps; "
                                  f"{type(model).__name__} is an encoder-decoder (its cache pairs two caches): compile "
                                  f"it without cuda_graphs")
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        where = ", ".join(sorted(map(str, devices))) or "no parameters"
        raise ValueError(f"moec.compile: cuda_graphs=True needs the whole model on one CUDA device (it is on {where}): "
                         f"model.to('cuda') first")


def install(model: nn.Module, on: bool) -> GraphStats | None:
    """compile(cuda_graphs=...): graphed decode steps for the model's generate(), or none (compiled again without)."""
    d = model.__dict__
    for name in ("_moec_graphs", "get_compiled_call", "generate"):
        if name == "_moec_graphs" or isinstance(d.get(name), (_CompiledCall, _Generate)):
            d.pop(name, None)
    if not on:
        return None
    d["_moec_graphs"] = step = GraphedStep(model)
    d["get_compiled_call"], d["generate"] = _CompiledCall(model), _Generate(model)
    return step.stats
