"""backend="onnxruntime": the whole model runs through an ONNX Runtime InferenceSession.

    model = moec.compile(model, backend="onnxruntime", providers=None, session_options=None, quantize=None)
    out = model(**inputs)   # a new input signature exports (moec.export_onnx) and opens a session

`model.forward` is replaced by an `OrtForward`: it binds each call to the model's own signature,
keys sessions by the names, dtypes and ranks of the tensor inputs (batch and sequence sizes are
dynamic axes of the exported file, so one session serves every size), runs the session and gives
back the model's own output type (HF models: their ModelOutput with the logits). The first call of
a signature also runs the eager model once and refuses a session whose outputs differ from it.
HF decoder LMs whose cache is a key/value pair per layer run with it: a call with use_cache (as
`generate` makes them; unset, the config's, as HF's forward) goes to a session exported with kv_cache=True,
returns the model's own output class with the cache, and is fed the past this forward
returned before for that cache object (the whole past: a sliding-window layer's HF cache is cropped), and
the new keys/values are appended to the HF cache so `generate` counts positions as usual (attention as
GroupQueryAttention nodes, moec.export_gqa: a call of several tokens after a past at batch > 1, which ORT's
kernel refuses, runs one row at a time); their plain greedy and sampling `generate` calls run in one loop around the session
(backends/ort_generate.py). On the CPU provider moec's own kernels run inside the session (a custom-op library,
backends/ort_kernels.py, registered on the session options; on a caller's ort.SessionOptions once, which keeps
it): int4 experts where a block fits them (else ORT's QMoE), int4 dense MatMuls, and fp32 models' attention
(backends/ort_attention.py); fp32 and weight-only int8 experts and fp32 models' dense MatMuls on weights
in panels, in bf16 where every weight is a bf16 number; a bf16 model runs as its fp32 upcast (runs_bf16), its
experts' and dense layers' input rows rounded to bf16 as the model's own are where the CPU has AVX512-BF16.
MOEC_ORT_KERNELS=0 (at compile) or MOEC_NATIVE=0 keeps ORT's own ops. Other models
run without KV cache (`generation_config.use_cache = False`): generate recomputes the whole sequence.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import re
import sys
import tempfile
import threading
import warnings
import weakref

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _module

from moec.canonical import buffers_kept
from moec.bindings import NoBackward, generation, transformed
from moec.form import Form, ModelRef, train_sensitive
from moec.log import log

# max relative error of the session's outputs against eager on the first call, per activation dtype
CHECK_TOL = {torch.float32: 1e-4, torch.float16: 2e-2}
# ort.SessionOptions objects moec's custom-op library is registered on (a caller's object: once, and it keeps it)
_REGISTERED: weakref.WeakSet = weakref.WeakSet()
# non-tensor arguments a call may pass with these values (use_cache and past_key_values: see _cached)
_FIXED = {"return_dict": True, "output_attentions": False, "output_hidden_states": False,
          "output_router_logits": False}


def default_providers() -> list[str]:
    """CUDA first when torch sees a GPU and onnxruntime has the provider, else CPU.
    (onnxruntime-gpu lists CUDA even on a machine without one: the list alone proves nothing.)"""
    import onnxruntime as ort

    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _first_available(providers: list[str]) -> str:
    """The provider ONNX Runtime will pick from `providers`: the first this build has."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return next((p for p in providers if p in have), providers[0])


def session_options(options) -> "onnxruntime.SessionOptions":  # noqa: F821
    """An ort.SessionOptions as is, or a dict of its attributes, e.g. {"intra_op_num_threads": 2,
    "graph_optimization_level": "ORT_ENABLE_ALL", "optimized_model_filepath": "opt.onnx"}."""
    import onnxruntime as ort

    if isinstance(options, ort.SessionOptions):
        return options
    so = ort.SessionOptions()
    for name, value in (options or {}).items():
        if not hasattr(so, name):
            raise ValueError(f"moec: unknown onnxruntime session option {name!r}")
        if name == "graph_optimization_level" and isinstance(value, str):
            value = getattr(ort.GraphOptimizationLevel, value)
        setattr(so, name, value)
    return so


def _widen(t: torch.Tensor) -> torch.Tensor:
    """An export example with every size-1 dynamic (batch/sequence) axis made 2 (a size-1 axis would be baked in)."""
    from moec.export import dynamic_axes

    axes = dynamic_axes(t) or {}
    return t.repeat(*(2 if a in axes and t.shape[a] == 1 else 1 for a in range(t.dim())))


def runs_bf16(providers) -> bool:
    """Whether bf16 models run with these providers: on the CPU provider with moec's kernels built, the
    model is exported in fp32 (exactly its numbers) and its moec::Experts / Linear weights stored back in bf16
    (ort_layouts.narrow_bf16), so the session computes the fp32 upcast of the model from bf16 weights."""
    from moec.backends import ort_kernels

    return (providers[0] == "CPUExecutionProvider" and os.environ.get("MOEC_ORT_KERNELS", "1") != "0"
            and ort_kernels.library() is not None)


class OrtForward:
    def __init__(self, model: nn.Module, report, providers, options, quantize, dense):
        self.owner, self.report, self.quantize, self.dense = ModelRef(model), report, quantize, dense
        forward = model.forward  # the model's own (held unbound: this object lives in the model's __dict__)
        self._bound = getattr(forward, "__self__", None) is model
        self._forward = forward.__func__ if self._bound else forward
        self.signature = inspect.signature(forward)
        self.__signature__ = self.signature  # what HF's generate reads to pass attention_mask, position_ids ...
        self.providers = list(providers) if providers else default_providers()
        report.backend = f"onnxruntime ({_first_available(self.providers)})"  # the one that ran, once a session opens
        self.options = options
        self.tmp = tempfile.TemporaryDirectory(prefix="moec-ort-")
        self.sessions: dict[tuple, tuple] = {}  # key -> (session, input names, outputs -> the model's structure)
        self.weights = None  # _weights(...) when the sessions were exported
        self.walk = ModelWalk()
        self.form = self.settings = None  # the model's form (moec.form) and config settings then: baked into them
        self._eager_said: set[str] = set()  # why the model's own forward ran, warned once
        self.cached = _takes_cache(model)  # an HF decoder LM with a key/value cache: generate uses it
        self.output_type = None  # the model's ModelOutput class (found by the KV-cache session's first check)
        self._past = weakref.WeakKeyDictionary()  # HF cache -> (the session's last present arrays, its tensors then)
        self._fallback_said: set[str] = set()  # blocks warned of (see _take_export)
        self._config_said: set[str] = set()  # config output flags warned of (see _say_config_outputs)
        self.use_cache = None  # the generation config's use_cache before install set it (None: left as it was)
        self.kernels = self._kernels()  # moec's kernels as an ORT custom-op library (or None)
        self._opening = threading.RLock()  # one export a key: threads calling at once wait for the first

    @property
    def model(self) -> nn.Module:
        return self.owner.model

    @property
    def original(self):
        """The model's own forward."""
        return self._forward.__get__(self.model) if self._bound else self._forward

    def _kernels(self) -> str | None:
        """The custom-op library (backends/ort_kernels.py) on CPU: int4 experts and MatMuls, attention (None with
        MOEC_NATIVE=0, or MOEC_ORT_KERNELS=0 at compile: ORT's QMoE, MatMulNBits and GroupQueryAttention)."""
        from moec.backends import ort_kernels

        if self.providers[0] != "CPUExecutionProvider" or os.environ.get("MOEC_ORT_KERNELS", "1") == "0":
            return None
        return ort_kernels.library()

    def __getstate__(self):  # pickle / deepcopy: sessions, their files and cache records are opened again
        return {**self.__dict__, "tmp": None, "sessions": {}, "weights": None, "_past": None, "_opening": None,
                "walk": ModelWalk()}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.tmp, self._past = tempfile.TemporaryDirectory(prefix="moec-ort-"), weakref.WeakKeyDictionary()
        self._opening = threading.RLock()
        if self.kernels:  # built in this process (a path of another may not exist here)
            self.kernels = self._kernels()

    def __call__(self, *args, **kwargs):
        if self.model.training:  # training runs the model's own forward: dropout, router jitter, gradients
            return self.original(*args, **kwargs)
        if why := eager_reason(self.model, self.walk):
            if why not in self._eager_said:
                self._eager_said.add(why)
                warnings.warn(f"moec backend='onnxruntime': the model runs its own forward, not the session: {why}",
                              stacklevel=2)
            return self.original(*args, **kwargs)
        if kwargs.get("return_dict") is False:  # HF's tuple: the output's fields that are set, in order
            out = self(*args, **{**kwargs, "return_dict": True})
            return out.to_tuple() if hasattr(out, "to_tuple") else out
        bound = self.signature.bind(*args, **kwargs)
        extra = bound.arguments.pop(next((n for n, p in self.signature.parameters.items()
                                          if p.kind is p.VAR_KEYWORD), None), {})
        tensors, keep = {}, None
        args = {**bound.arguments, **extra}
        if args.get("labels") is not None:
            raise NotImplementedError("moec backend='onnxruntime': labels= is not supported (the session returns the "
                                      "logits): compute the loss from them")
        self._check_ids(args)
        cache = args.pop("past_key_values", None)
        if cache is not None:
            from transformers import DynamicCache

            if not isinstance(cache, DynamicCache):
                raise NotImplementedError(f"moec backend='onnxruntime': a {type(cache).__name__} (e.g. "
                                          f"cache_implementation='static') is not supported: the session steps HF's "
                                          f"DynamicCache; use the default cache, or backend='torch'")
        if isinstance(mask := args.get("attention_mask"), torch.Tensor) and mask.dim() != 2:
            raise NotImplementedError(f"moec backend='onnxruntime': a {mask.dim()}-d attention_mask is not supported (the "
                                      f"session takes a [batch, length] padding mask): pass that, or use backend='torch'")
        use_cache = args.get("use_cache")
        if use_cache is None and self.cached:  # HF's default: the config's (a plain call returns the cache)
            use_cache = getattr(self.model.config, "use_cache", False)
        if self.cached and (cache is not None or use_cache):
            if args.get("inputs_embeds") is not None:  # the cached export takes token ids
                raise NotImplementedError("moec backend='onnxruntime': inputs_embeds= with the KV cache (generate, "
                                          "use_cache=True): pass input_ids, or use_cache=False, or backend='torch'")
            return self._cached(args, cache)
        self._say_config_outputs(args)
        for name, value in args.items():
            if name == "logits_to_keep":  # applied to the session's logits (HF's rule: _kept), not exported
                keep = value
            elif isinstance(value, torch.Tensor):
                tensors[name] = value
            elif value is not None and name != "use_cache" and (name not in _FIXED or _FIXED[name] != value):
                raise NotImplementedError(f"moec backend='onnxruntime': argument {name}={_short(value)} is not supported "
                                          "(the session takes the model's tensor inputs and returns its outputs)")
        key = tuple((n, t.dtype, t.dim()) for n, t in tensors.items())
        with self._opening:
            if self.sessions and (what := self._stale()):  # load_state_dict, edits, .to(), settings: export again
                log.info(f"moec backend='onnxruntime': {what} since the export; exporting again")
                self.sessions.clear()
            if key not in self.sessions:
                self.sessions[key] = self._opened(self._open, tensors)
            session, names, rebuild = self.sessions[key]
        device = next(iter(tensors.values())).device
        feeds = {n: _array(tensors[n]) for n in names}
        outs = [self._ours(torch.from_numpy(np.asarray(o)).to(device)) for o in session.run(None, feeds)]
        outs[0] = self._no_backward(_kept(outs[0], keep), tensors.values())
        return rebuild(outs)

    def _cached(self, args: dict, cache):
        """One step with the KV cache: (input_ids, attention_mask, past) -> logits, the cache appended."""
        from transformers import DynamicCache

        from moec import export_state

        ids = args.get("input_ids")
        if ids is None:
            raise NotImplementedError("moec backend='onnxruntime': a cached call needs input_ids")
        for name, value in args.items():
            if name in ("input_ids", "attention_mask", "position_ids", "cache_position", "use_cache",
                        "logits_to_keep") or value is None or (name in _FIXED and _FIXED[name] == value):
                continue
            raise NotImplementedError(f"moec backend='onnxruntime': argument {name}={_short(value)} is not supported")
        self._say_config_outputs(args)
        cache = DynamicCache(config=self.model.config) if cache is None else cache
        B, S = ids.shape
        mask = args.get("attention_mask")
        session, names, layout, fused = self.cached_session(ids, mask)
        (layers, *_), states = layout
        kv = next(i for i in range(layers) if i not in states)  # a layer whose cache has the past positions
        past = self._past_of(cache, None if mask is None else mask.shape[1] - S, states)
        P = 0 if past is None else past[2 * kv].shape[2]
        mask = torch.ones(B, P + S, dtype=torch.long) if mask is None else mask.long().cpu()
        if mask.shape != (B, P + S):
            raise ValueError(f"moec backend='onnxruntime': attention_mask of shape {tuple(mask.shape)} for {S} new "
                             f"token(s) after a cache of {P}: it must cover the past and the new tokens, ({B}, {P + S})")
        if bool((mask[:, 1:] < mask[:, :-1]).any()):  # a pad after a real token: right padding, or a gap
            if _slides(self.model.config):
                raise NotImplementedError("moec backend='onnxruntime': right padding on a model with sliding-window "
                                          "or chunked attention layers: the session's window counts each row's tokens (as "
                                          "onnxruntime-genai needs), HF's counts cache slots, so they differ after "
                                          "the pads; pad on the left (tokenizer.padding_side='left'), as HF's "
                                          "generate expects")
            if states:
                raise NotImplementedError("moec backend='onnxruntime': a pad after a real token (right padding, or a "
                                          "gap in the mask) on a model with recurrent layers: the session's layers "
                                          "keep their state over a pad, HF's do not; pad on the left "
                                          "(tokenizer.padding_side='left'), as HF's generate expects")
        pos = args.get("position_ids")
        if pos is None:  # as HF's forward takes them (generate passes its own, from the mask)
            at = args.get("cache_position")
            pos = (torch.arange(P, P + S) if at is None else at.cpu().long()).expand(B, S)
        past = empty_past(layout, B) if past is None else past
        kept = in_place(session)
        if kept:  # the session writes the new rows into the pasts: arrays with room for them
            past = with_room(past, P + S)
        feeds = {"input_ids": ids.cpu().numpy(), "attention_mask": mask.numpy(), "position_ids": pos.cpu().numpy(),
                 **dict(zip(names[3:], past))}
        if kept:
            outs = session.run(None, feeds) + [a[:, :, :P + S] for a in past]
        elif B > 1 and S > 1 and P > 0 and fused:
            # ORT's GroupQueryAttention refuses several new tokens after a past at batch > 1: one row at a time
            rows = [session.run(None, {n: a[b:b + 1] for n, a in feeds.items()}) for b in range(B)]
            outs = [np.concatenate(parts) for parts in zip(*rows)]
        else:
            outs = session.run(None, feeds)
        device = ids.device
        for i in range(layers):  # the new positions, so that generate's cache counts them; states as they are now
            new = [outs[1 + 2 * i + j] for j in (0, 1)]
            if i in states:
                export_state.hold(cache.layers[i], *(self._ours(torch.from_numpy(a).to(device)) for a in new))
            else:  # copies: an in-place session's arrays stay its own
                cache.update(*(self._ours(torch.from_numpy(np.ascontiguousarray(a[:, :, P:])).to(device))
                               for a in new), i)
        if cache not in self._past:
            self._follow_reorder(cache)
        self._past[cache] = (outs[1:], _tensors(cache))
        logits = self._no_backward(_kept(self._ours(torch.from_numpy(outs[0]).to(device)), args.get("logits_to_keep")))
        return self.output_type(logits=logits, past_key_values=cache)

    def _check_ids(self, args: dict) -> None:
        """Token ids outside the vocabulary raise, as the eager model's embedding does: ONNX's Gather would read a
        negative id from the end of the table (a wrong answer, silently), and one past the end fails in ORT. Where
        the ids index an nn.Embedding (an HF model's, its decoder's for decoder_input_ids); a subclass with its own
        forward is asked eagerly about the ids outside the table (a table on the CPU). Other models' ids run their
        own graph's ops."""
        for name in ("input_ids", "decoder_input_ids"):
            ids = args.get(name)
            if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.numel() == 0:
                continue
            table = embedding_table(self.model, decoder=name == "decoder_input_ids")
            if table is None:
                continue
            if ids.dim() != 2:
                raise ValueError(f"moec backend='onnxruntime': {name} must be [batch, sequence], not of shape "
                                 f"{tuple(ids.shape)}")
            low, high, vocab = int(ids.min()), int(ids.max()), table.num_embeddings
            if (low < 0 or high >= vocab) and not _eager_takes(table, ids):
                raise IndexError(f"moec backend='onnxruntime': {name} holds {low if low < 0 else high}, outside the "
                                 f"vocabulary [0, {vocab}) (the eager model raises 'index out of range in self')")

    def _say_config_outputs(self, args: dict) -> None:
        """Warn (once per flag) where the model's config turns on outputs the session does not return and the call
        leaves the flag unset: the eager model would return them, the session returns the logits (and the cache)."""
        from moec.export import config_outputs

        for name, where in config_outputs(self.model).items():
            if args.get(name) is None and name not in self._config_said:
                self._config_said.add(name)
                log.warning(f"moec backend='onnxruntime': the model's config sets {name}=True, but the session "
                            f"returns the logits (and the cache) only: those outputs are None (set "
                            f"{where} = False to silence this, or use backend='torch'; generate "
                            f"returns the same tokens)")

    def _no_backward(self, logits: torch.Tensor, inputs=()) -> torch.Tensor:
        """The session's logits, marked so that a backward through them raises (it computes no gradients) where
        autograd records and a parameter or an input asks for gradients, as compiled blocks do in eval mode."""
        if not torch.is_grad_enabled():
            return logits
        wants = next((t for t in (*inputs, *self.model.parameters()) if t.requires_grad), None)
        if wants is None:
            return logits
        return NoBackward.apply("moec: the model runs in an ONNX Runtime session (backend='onnxruntime'), which "
                                "computes no gradients in eval mode; call model.train() (the model then runs its own "
                                "forward, gradients included) or run inference under torch.no_grad()", [logits], wants)

    def _past_of(self, cache, length: int | None, states: dict) -> list[np.ndarray] | None:
        """The whole past to feed for `cache` (None: empty): the present arrays this forward left with it, or, when
        something else changed the cache since (beam search reorders it, assisted decoding crops it, the eager
        model filled it), the cache's own tensors if they hold every past position (`length` if known) and the
        linear-attention layers' states."""
        from moec import export_state

        record = self._past.get(cache)
        if record is not None and _same(_tensors(cache), record[1]):
            return record[0]
        if cache.get_seq_length() == 0:
            return None
        arrays = [_array(t) if t is not None else None for layer in cache.layers for t in export_state.present(layer)]
        kv = [a for i, a in enumerate(arrays) if i // 2 not in states]
        held = {a.shape[2] for a in kv if a is not None}
        if (length is not None and len(held) == 1 and length not in held and all(a is not None for a in arrays)
                and not _slides(self.model.config)):  # (a window layer's cache is cropped: said below)
            raise ValueError(f"moec backend='onnxruntime': the attention_mask covers {length} past position(s) but "
                             f"the cache holds {held.pop()}: it must cover the past and the new tokens")
        length = kv[0].shape[2] if length is None else length
        if any(a is None for a in arrays) or any(a.shape[2] != length for a in kv):
            raise NotImplementedError(
                "moec backend='onnxruntime': this KV cache was changed outside the session (beam search reorders "
                "it, assisted decoding crops it, or the eager model filled it) and no longer holds every past "
                "position (a sliding-window layer's HF cache keeps only its window), which the session needs: let "
                "this model fill the cache (greedy search or sampling from the prompt, not a cache another model or "
                "decoding strategy made), or use backend='torch'")
        return arrays

    def _follow_reorder(self, cache) -> None:
        """Beam search reorders the cache's rows (cache.reorder_cache(beam_idx)): reorder the session's past too."""
        own = cache.__dict__.get("reorder_cache")  # (the class's, usually)
        this, held = weakref.ref(self), weakref.ref(cache)  # (not kept alive by the method the cache holds)

        def reorder_cache(beam_idx: torch.Tensor) -> None:
            cache, past = held(), this()._past
            record = past.get(cache)
            fresh = record is not None and _same(_tensors(cache), record[1])
            own(beam_idx) if own is not None else type(cache).reorder_cache(cache, beam_idx)
            if fresh:
                rows = beam_idx.cpu().numpy()
                past[cache] = ([a[rows] for a in record[0]], _tensors(cache))

        cache.reorder_cache = reorder_cache

    def cached_session(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple:
        """(session, input names, cache layout, attention fused) of the KV-cache export, exported again if the
        model's weights changed since."""
        key = ("kv_cache", ids.dtype)
        with self._opening:
            if self.sessions and (what := self._stale()):
                log.info(f"moec backend='onnxruntime': {what} since the export; exporting again")
                self.sessions.clear()
            if key not in self.sessions:
                self.sessions[key] = self._opened(self._open_cached, ids, mask)
            return self.sessions[key]

    def _open_cached(self, ids: torch.Tensor, mask: torch.Tensor):
        from moec.export import export_onnx, layer_layout

        provider = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        path = os.path.join(self.tmp.name, f"model{len(self.sessions)}_kv.onnx")
        with self._as_original() as model:
            layout = layer_layout(model, _widen(ids))
            log.info(f"exporting {type(model).__name__} to ONNX with its KV cache for onnxruntime")
            with _exporting(model):
                exported = export_onnx(model, {"input_ids": _widen(ids)}, path, quantize=self.quantize,
                                       dense=self.dense, _moec_kernels=self.kernels is not None, provider=provider,
                                       kv_cache=True)
            probe = _long({"input_ids": _widen(ids)})["input_ids"]
            with torch.no_grad():
                out = model(input_ids=probe, use_cache=False)
            self.output_type, eager = type(out), out.logits  # the model's own ModelOutput class
        session = self._session(path)
        self._take_export(exported)
        names = [i.name for i in session.get_inputs()]
        B, T = probe.shape
        with _exporting(model, f"its session at {T} tokens"):
            got = session.run(None, {"input_ids": probe.numpy(), "attention_mask": np.ones((B, T), np.int64),
                                     "position_ids": np.tile(np.arange(T), (B, 1)),
                                     **dict(zip(names[3:], empty_past(layout, B, T if in_place(session) else 0)))})[0]
        self._check(eager, torch.from_numpy(got))  # the prompt step, 300 tokens, against eager
        return self._round_rows(path, session), names, layout, exported.gqa_layers > 0

    def _opened(self, opener, *args):
        """opener(*args), a new session, noted with what it was exported from (form, settings, parameters) as they
        were before the export began: another thread's load_state_dict or in-place edit during the export is seen
        by the next call's _stale (exported again). Where such a write made the session's check against the eager
        model fail, it is exported again (at most 3 times). The buffers are noted after it: the export's runs of the
        model put back what they wrote into them (buffers_kept), which moves their versions."""
        for tries in range(3, 0, -1):
            params, form, settings = _weights(self.walk(self.model))[0], Form(self.model, None), copy.deepcopy(
                _settings(self.model))
            try:
                opened = opener(*args)
            except RuntimeError:
                if tries > 1 and _weights(self.walk(self.model))[0] != params:
                    log.info("moec backend='onnxruntime': the model's weights changed during the export; exporting "
                             "again")
                    continue
                raise
            self.weights, self.form, self.settings = (params, _weights(self.walk(self.model))[1]), form, settings
            return opened

    def _stale(self) -> str | None:
        """What changed since the export (the sessions hold it baked in), or None."""
        if _weights(self.walk(self.model)) != self.weights:
            return "the model's weights changed"
        if what := self.form.changed(self.model):
            return f"the model changed ({what})"
        if _settings(self.model) != self.settings:
            return "the model's config changed"
        return None

    def _take_export(self, exported) -> None:
        """Keep the export's report, and say (once per block) what runs other than the compile-time report said:
        a block the export left as it was runs its own code, in the model's dtype and unquantized (listed as
        rejected); a block that fell back to standard ONNX ops runs dequantized weights with fp activations."""
        from moec.report import Rejection

        self.report.export = exported
        for why in exported.dense_left:  # the same MatMuls in every session's file
            if why not in self.report.dense_left:
                self.report.dense_left.append(why)
                log.warning(f"moec: dense= leaves a MatMul in fp32 in the ONNX Runtime session: {why}")
        said = {r.path for r in self.report.rejected}
        for r in exported.rejected:
            if r.path not in said:
                self.report.rejected.append(Rejection(r.path, f"onnxruntime: the export left it as it was ({r.reason})"))
                log.warning(f"moec: onnxruntime runs block {r.path!r} as its own code, unquantized: the export left it "
                            f"as it was ({r.reason})")
        if self.quantize is not None and self.quantize.activations == "int8":
            for b in exported.blocks:
                if b.op == "fallback" and b.path not in self._fallback_said:
                    self._fallback_said.add(b.path)
                    log.warning(f"moec: block {b.path!r} runs in standard ONNX ops with dequantized weights and fp32 "
                                f"activations, not int8 ones ({b.why})")

    def _bf16(self) -> bool:
        """Whether the model is (now: .to() may change it) a bf16 model, run as its fp32 upcast (runs_bf16)."""
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None) == torch.bfloat16

    def _bf16_rows(self) -> bool:
        """Whether the sessions round the experts' and dense layers' input rows to bf16 (a bf16 model on a CPU
        with AVX512-BF16: ort_layouts.round_rows), as the model does."""
        from moec.backends import cpu_native

        return self._bf16() and runs_bf16(self.providers) and cpu_native.has_bf16()

    def _ours(self, t: torch.Tensor) -> torch.Tensor:
        """A session output in the model's dtype (a bf16 model's session computes in fp32; its HF cache is bf16)."""
        return t.to(torch.bfloat16) if t.dtype == torch.float32 and self._bf16() else t

    @contextlib.contextmanager
    def _as_original(self):
        """The model as moec.export_onnx takes it: its own forward and generate, no moec report; a bf16 model as its
        fp32 upcast (a copy, for the export and its check: runs_bf16). A shallow copy: the user's object keeps
        moec's forward and generate, so calls from other threads during an export wait for it in moec's code."""
        model = copy.copy(self.model)  # a new object on the same modules, parameters and config
        for k in ("forward", "generate", "_moec_report"):
            model.__dict__.pop(k, None)
        with buffers_kept(model):  # the checks run the model: its token counters must not count them
            yield copy.deepcopy(model).float() if self._bf16() and runs_bf16(self.providers) else model

    def _open(self, tensors: dict[str, torch.Tensor]):
        from moec.export import export_onnx

        provider = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        path = os.path.join(self.tmp.name, f"model{len(self.sessions)}.onnx")
        checks = (tensors, _long(tensors))  # the call's inputs, and 300 tokens (routing paths at length)
        with self._as_original() as model:
            with torch.no_grad():
                eager = [model(**_like(model, feeds)) for feeds in checks]
            log.info(f"exporting {type(model).__name__} to ONNX for onnxruntime (inputs {', '.join(tensors)})")
            with _exporting(model):
                exported = export_onnx(model, {n: _widen(t) for n, t in _like(model, tensors).items()}, path,
                                       quantize=self.quantize, dense=self.dense, provider=provider, kv_cache=False,
                                       _moec_kernels=self.kernels is not None)
        session = self._session(path)
        self._take_export(exported)
        names = [i.name for i in session.get_inputs()]
        rebuild = _rebuilder(eager[0])
        for feeds, want in zip(checks, eager):
            with _exporting(model, f"its session at {next(iter(feeds.values())).shape[-1]} tokens"):
                got = rebuild([torch.from_numpy(np.asarray(o)) for o in session.run(
                    None, {n: _array(feeds[n]) for n in names})])
            self._check(want, got, feeds.get("attention_mask"))
        return self._round_rows(path, session), names, rebuild

    def _session(self, path: str):
        import onnxruntime as ort

        options = session_options(self.options)
        if self.kernels and options not in _REGISTERED:  # ORT refuses a domain registered twice on one object
            options.register_custom_ops_library(self.kernels)
            _REGISTERED.add(options)
        session = ort.InferenceSession(path, sess_options=options, providers=self.providers)
        ran = session.get_providers()[0]
        self.report.backend = f"onnxruntime ({ran})"
        if ran != self.providers[0]:
            log.warning(f"onnxruntime runs on {ran}, not {self.providers[0]} (asked {self.providers})")
        return session

    def _round_rows(self, path: str, session):
        """The checked session, or where its model is a bf16 model on a CPU with AVX512-BF16 a session of the same
        file with the bf16 nodes' input rows rounded to bf16 as the model's own are (ort_layouts.round_rows): the
        export is proved on fp32 rows (_check, 1e-4 against the upcast), the rounding is the kernels' (their
        tests and the library's self-test); not checked against the model again, where rounding an input on a
        near-tie may route a token otherwise than the upcast does, as the bf16 model's own rounding may."""
        from moec.backends import ort_layouts

        if not self._bf16_rows() or not (count := ort_layouts.round_rows_file(path)):
            return session
        for b in self.report.export.blocks:
            if b.op == "moec::ExpertsBf16":
                b.why += (f"; {count} of the file's bf16 nodes round their input rows to bf16 as the bf16 model does "
                          f"(vdpbf16ps)")
        return self._session(path)

    def _check(self, eager, got, mask: torch.Tensor | None = None) -> None:
        """Refuse a session that does not compute what the model does (CHECK_TOL per dtype), at the positions the
        attention mask keeps (a padded position's output means nothing: eager and ORT fill it differently).
        Quantized sessions differ from the fp model by design (docs/quality.md); tests compare them with the
        dequantized model."""
        if self.quantize is not None or self.dense is not None:
            return
        ref = _main(eager)
        out = _main(got).to(ref.device)
        if mask is not None and ref.dim() >= 2 and ref.shape[:2] == mask.shape:
            keep = mask.to(ref.device).bool()
            ref, out = ref[keep], out[keep]
        err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
        if not err <= CHECK_TOL.get(ref.dtype, 1e-4):  # NaN too
            raise RuntimeError(f"moec backend='onnxruntime': the session's output differs from the eager model's "
                               f"(relative error {err:.2e}); not using it")


def _kept(logits: torch.Tensor, keep) -> torch.Tensor:
    """HF's `logits_to_keep`: an int n keeps the last n positions (0 or None: all), a tensor the positions it
    indexes."""
    if isinstance(keep, torch.Tensor):
        return logits[:, keep.to(logits.device)]
    return logits[:, -keep:] if keep else logits


def _array(t: torch.Tensor) -> np.ndarray:
    """A tensor as the session's input: bf16 (a bf16 model's, whose session computes in fp32) as fp32."""
    t = t.detach().cpu().contiguous()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _like(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A call's tensors for `model`: bf16 ones as fp32 where the model is a bf16 model's fp32 upcast."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return {n: t.float() if t.dtype == torch.bfloat16 and dtype == torch.float32 else t for n, t in tensors.items()}


def _slides(config) -> bool:
    """Whether some attention layer of an HF config has a sliding window or attention chunks (Llama 4)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return "sliding_attention" in types or "chunked_attention" in types
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True) is not False


def _tensors(cache) -> list:
    """The key/value tensors (linear-attention states) an HF cache holds now, with their in-place write counters (an
    inference tensor has none: torch.inference_mode() serving; HF's caches make new tensors at each update, which
    the identity shows, but an in-place write into one is not seen)."""
    from moec import export_state

    return [(t, None if t is None else -1 if t.is_inference() else t._version)
            for layer in cache.layers for t in export_state.present(layer)]


def _same(now: list, then: list) -> bool:
    return len(now) == len(then) and all(a is b and u == v for (a, u), (b, v) in zip(now, then))


def embedding_table(model: nn.Module, decoder: bool) -> nn.Embedding | None:
    """The table an HF model's (or its decoder's) token ids index: an nn.Embedding or a subclass of it."""
    try:
        table = (model.get_decoder() if decoder else model).get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return table if isinstance(table, nn.Embedding) else None


def _eager_takes(table: nn.Embedding, ids: torch.Tensor) -> bool:
    """Whether the table's own forward (a subclass's: a scaled embedding, ids remapped) takes the ids outside
    [0, num_embeddings): run eagerly on those ids alone, so a subclass that maps them into the table is not
    refused and one that looks them up as nn.Embedding does raises where the eager model raises. On the CPU
    only: on a GPU an index out of range is an asynchronous device assert that ends the CUDA context, so a
    subclass's table there is not checked (as before)."""
    if type(table).forward is nn.Embedding.forward:
        return False
    if table.weight.device.type != "cpu":
        return True
    outside = ids[(ids < 0) | (ids >= table.num_embeddings)].reshape(1, -1)
    try:
        with torch.no_grad():
            table(outside)
    except (IndexError, RuntimeError):
        return False
    return True


@contextlib.contextmanager
def _exporting(model: nn.Module, what: str = "the export"):
    """An error of torch.onnx, of the model's code under export, or of ONNX Runtime running the exported file,
    said in one line with what to do (moec's own refusals pass as they are; the cause stays chained)."""
    try:
        yield
    except Exception as e:
        if str(e).startswith("moec.export_onnx: torch.onnx.export failed"):  # (on code moec left as it was)
            raise NotImplementedError(f"moec backend='onnxruntime': {e}; use backend='torch' for this model") from e
        if str(e).startswith("moec") or isinstance(e, (MemoryError, OSError, torch.OutOfMemoryError)) or _ours(e):
            raise  # moec's refusals, a machine's limits, and moec's own defects, as they are
        root = e  # torch.export's own error wraps the model's: say the model's
        while root.__cause__ is not None:
            root = root.__cause__
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(root))  # (torch.export colours its messages)
        first = " ".join(line.strip() for line in text.splitlines() if line.strip())  # (the first line may end in ":")
        raise NotImplementedError(f"moec backend='onnxruntime': {type(model).__name__} cannot run in ONNX Runtime: "
                                  f"{what} failed ({type(root).__name__}: {first[:300]}); use backend='torch' for this "
                                  f"model") from e


def _ours(e: BaseException) -> bool:
    """Whether the innermost frame of e's traceback is in moec's own code (a defect of moec, not a limit of the
    model or of ONNX Runtime: ORT's errors come from a call in moec's code, but are ORT's own types)."""
    from moec import backends, passes

    if type(e).__module__.startswith("onnxruntime"):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = os.path.abspath(tb.tb_frame.f_code.co_filename) if tb is not None else ""
    roots = {os.path.dirname(os.path.abspath(m.__file__)) for m in (sys.modules["moec"], backends, passes)}
    return any(where.startswith(r + os.sep) for r in roots)


def empty_past(layout: tuple, batch: int, rows: int = 0) -> list[np.ndarray]:
    """The first step's past: per layer a key and a value of [batch, kv_heads, 0, head_dim] (`rows` rows of zeros:
    room for a session that keeps its cache in place), or a linear-attention layer's conv and recurrent states at
    zero."""
    (layers, heads, key_dim, value_dim, dtype), states = layout

    def np_dtype(t):
        return np.float16 if t == torch.float16 else np.float32

    return [np.zeros((batch, *shape), np_dtype(kind)) for i in range(layers)
            for shape, kind in (zip(states[i][:2], states[i][2]) if i in states else
                                (((heads[i], rows, key_dim), dtype), ((heads[i], rows, value_dim), dtype)))]


def in_place(session) -> bool:
    """Whether a KV-cache session keeps its cache in place (ort_attention.in_place): logits its only output, each
    past given with room for the new rows, which the session writes there."""
    return len(session.get_outputs()) == 1 and len(session.get_inputs()) > 3


def with_room(past: list[np.ndarray], rows: int) -> list[np.ndarray]:
    """Pasts [B, KVH, P, D] as an in-place session takes them: arrays of `rows` or more rows whose first P are the
    past. A past that is the first rows of such an array (this forward's last step left it) is that array again;
    others are copied into new arrays with room to grow (twice the rows), so a step rarely copies the past."""
    out = []
    for a in past:
        base = a.base
        if not (isinstance(base, np.ndarray) and base.base is None and base.ndim == 4 and base.shape[2] >= rows
                and a.shape[:2] == base.shape[:2] and a.shape[3] == base.shape[3] and a.strides == base.strides
                and a.ctypes.data == base.ctypes.data):
            base = np.zeros((*a.shape[:2], max(rows, 2 * a.shape[2]), a.shape[3]), a.dtype)
            base[:, :, :a.shape[2]] = a
        out.append(base)
    return out


def _long(tensors: dict[str, torch.Tensor], tokens: int = 300) -> dict[str, torch.Tensor]:
    """The inputs tiled along their sequence axis (dim 1 of [batch, seq, ...] inputs) to `tokens` positions;
    position_ids go on counting (tiled, they would start over: HF reads that as packed sequences)."""
    from moec.export import dynamic_axes

    out = {}
    for n, t in tensors.items():
        axes = dynamic_axes(t) or {}
        if n == "position_ids" and t.dim() == 2 and t.shape[1] < tokens:
            t = torch.cat([t, t[:, -1:] + torch.arange(1, tokens - t.shape[1] + 1, dtype=t.dtype)], 1)
        elif 1 in axes and t.dim() >= 2 and t.shape[1] < tokens:
            reps = -(-tokens // t.shape[1])
            t = t.repeat(1, reps, *([1] * (t.dim() - 2)))[:, :tokens]
        out[n] = t
    return out


class ModelWalk:
    """What `_weights` and `eager_reason` read of a model at each call, listed once per module tree (bindings'
    generation: a module, parameter or buffer registered anywhere lists them again); the lists are read at each call
    (a hook added, a tensor swapped straight into `_parameters`). The model itself is not held: the walk lives in its
    forward (a reference cycle)."""

    def __init__(self):
        self.gen, self.of = -1, None

    def __call__(self, model: nn.Module) -> "ModelWalk":
        if self.gen != generation() or self.of() is not model:
            named = list(model.named_modules())
            self.params, self.buffers = [m._parameters for _, m in named], [m._buffers for _, m in named]
            self.hooks = [d for _, m in named for d in (m._forward_hooks, m._forward_pre_hooks)]
            self.sensitive = [(n, m) for n, m in named if n and train_sensitive(m)]  # (the model's: its forward's)
            self.gen, self.of = generation(), weakref.ref(model)
        return self


def _weights(walk: ModelWalk) -> tuple:
    """(the parameters', the buffers') data pointers, versions and dtypes: changes whenever one is replaced, moved, or
    written in place."""
    return tuple(tuple((t.data_ptr(), t._version, t.dtype) for d in dicts for t in d.values() if t is not None)
                 for dicts in (walk.params, walk.buffers))


def eager_reason(model: nn.Module, walk: ModelWalk | None = None) -> str | None:
    """Why the model's own forward runs instead of a session: forward hooks on its modules or global ones (but
    transformers' idle output-capturing hooks), which a session would not call (nor one exported while they were
    on stop calling them); a dropout or other module that acts on its training flag in training mode in an
    eval-mode model (Monte-Carlo dropout: the export is the eval forward); float64 weights; forward-mode AD or a
    torch.func transform (a session computes values only)."""
    from moec.canonical import idle_capture

    if what := transformed():
        return what
    walk = (walk or ModelWalk())(model)
    hooks = [*_module._global_forward_hooks.values(), *_module._global_forward_pre_hooks.values()]
    if any(walk.hooks):
        hooks += [h for d in walk.hooks for h in d.values()]
    if any(not idle_capture(h) for h in hooks):
        return "forward hooks on its modules, which a session would not call"
    if training := next((n for n, m in walk.sensitive if m.training), None):
        return f"{training} is in training mode"
    if next(model.parameters(), torch.empty(0)).dtype == torch.float64:
        return "float64 weights (ONNX Runtime's attention and moec's kernels take fp32, bf16 or fp16)"
    return None


_CALL_SETTINGS = frozenset({"use_cache", "return_dict", "output_attentions", "output_hidden_states",
                            "output_router_logits", "output_scores", "torchscript"})  # read at each call, not baked


def _settings(model: nn.Module) -> list:
    """The model config's public settings and its sub-configs' (sliding_window, rope parameters ...): an export
    bakes them in. Values compared by value (numbers, strings, dicts and lists of them); other objects left out."""
    out, stack = [], [getattr(model, "config", None)]
    while stack:
        config = stack.pop()
        for k, v in (vars(config).items() if config is not None else ()):
            if hasattr(v, "to_dict") and hasattr(v, "model_type"):  # a sub-config (text_config ...)
                stack.append(v)
            elif not k.startswith("_") and k not in _CALL_SETTINGS and _by_value(v):
                out.append((k, v))
    return out


def _by_value(v) -> bool:
    if isinstance(v, (list, tuple)):
        return all(map(_by_value, v))
    if isinstance(v, dict):
        return all(map(_by_value, v.values()))
    return v is None or type(v) in (int, float, bool, str)


def _short(value) -> str:
    """A value for an error message: its repr if short, else its type (a ModelOutput's repr prints its tensors)."""
    text = repr(value)
    return text if len(text) <= 60 and "\n" not in text else f"<{type(value).__name__}>"


def _main(out):
    return out.logits if hasattr(out, "logits") else out if isinstance(out, torch.Tensor) else out[0]


def _rebuilder(eager):
    """outputs of the session (list of tensors) -> the model's own return structure."""
    if hasattr(eager, "logits"):  # an HF ModelOutput: the exported graph returns the logits
        return lambda outs: type(eager)(logits=outs[0])
    leaves, spec = torch.utils._pytree.tree_flatten(eager)
    return lambda outs: torch.utils._pytree.tree_unflatten(outs, spec)


def _takes_cache(model: nn.Module) -> bool:
    """An HF decoder LM whose layers cache a key/value pair, or a state the export substitutes (moec.export_state),
    with one key/value layer at least: what export_onnx(kv_cache=True) exports."""
    from moec import export_state
    from moec.export import layer_layout

    if getattr(model, "generation_config", None) is None or not hasattr(model, "config"):
        return False
    try:
        (layers, *_), states = layer_layout(
            model, torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device))
    except (ValueError, NotImplementedError, TypeError):
        return False
    return len(states) < layers and (not states or export_state.substitutable(model))


def uninstall(model: nn.Module) -> None:
    """Take a backend="onnxruntime" install off `model` (compiled again, with any backend): its own forward and
    generate run again."""
    forward = model.__dict__.get("forward")
    if not isinstance(forward, OrtForward):
        return
    del model.__dict__["forward"]
    model.__dict__.pop("generate", None)
    if forward.use_cache is not None:
        model.generation_config.use_cache = forward.use_cache


def install(model: nn.Module, report, providers, options, quantize, dense) -> None:
    forward = OrtForward(model, report, providers, options, quantize, dense)
    if getattr(model, "generation_config", None) is not None and not forward.cached:
        forward.use_cache = model.generation_config.use_cache
        model.generation_config.use_cache = False  # the exported graph has no KV cache
    model.forward = forward
    if forward.cached:  # plain greedy search and sampling in one loop around the session (backends/ort_generate.py)
        from moec.backends.ort_generate import OrtGenerate

        model.generate = OrtGenerate(forward)
