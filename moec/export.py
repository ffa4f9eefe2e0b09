"""moec.export_onnx: any model moec can compile -> one ONNX file, each MoE block ONE
com.microsoft::MoE (fp32/fp16) or QMoE (int8/int4) node, the rest ordinary ONNX ops.

    report = moec.export_onnx(model, (x,) | {"input_ids": ids}, "model.onnx", quantize=None | Int8Experts() | ...)

A copy of the model that shares its weights is compiled with the torch backend and the `lower_onnx` pass
(routing in ordinary ops or ORT's own, experts as ORT's op in its weight layout, or a standard-op fallback with
the reason), then exported with torch.onnx.export (dynamo; batch, sequence and past axes dynamic), fused for
ORT by onnxscript, saved (weights over 2 GB, or external_data=True, in `<file>.data`) and checked with
onnx.checker. Hugging Face decoder LMs are exported with their KV cache (export_onnx's `kv_cache`), and
linear-attention layers with their states (moec.export_state); their trace covers each kind of layer once, the
layers that repeat one added as copies of its nodes with their own weights (moec.export_layers).
"""

from __future__ import annotations

import contextlib
import copy
import inspect as pyinspect
import io
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass, field

import onnx
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from moec import export_layers
from moec.api import compile, inspect
from moec.report import Rejection
from moec.backends import cpu_native, ort_attention, ort_kernels, ort_layouts, ort_mask
from moec.backends.onnx_backend import ort_type_errors, register_ort_schemas, translations
from moec.canonical import own_trace, resolve
from moec.export_complex import as_real_pairs
from moec.export_dense import left_fp32, moec_fp32_matmuls, moec_matmuls, quantize_dense
from moec.log import log
from moec.pass_manager import DEFAULT_PIPELINE
from moec.quant import Int4Experts, Int8Experts, QuantConfig

PROVIDERS = ("cpu", "cuda")


@dataclass
class ExportBlock:
    path: str
    op: str  # "MoE", "QMoE", "fallback" (standard ONNX ops), or moec's "moec::Int4Experts", "moec::ExpertsInt8",
    #          "moec::Experts", "moec::ExpertsBf16" (backend="onnxruntime" only)
    why: str  # the routing fed to the contrib op, or why the block fell back
    router: str
    experts: str


@dataclass
class ExportReport:
    path: str
    provider: str
    quantize: QuantConfig | None = None
    blocks: list[ExportBlock] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)  # not rewritten: exported as torch.export traced them
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    external_data: bool = False
    seconds: dict[str, float] = field(default_factory=dict)  # where the export's time went, per stage
    dense: QuantConfig | None = None  # export_onnx(dense=...): the dense MatMuls' format
    dense_matmuls: int = 0  # how many became MatMulNBits (or moec's Int4MatMul / LinearInt8)
    dense_format: str = ""  # what those nodes hold (int8: blocks of 32 in MatMulNBits, or per channel in moec's)
    dense_left: list[str] = field(default_factory=list)  # "node: why" for each MatMul dense= left fp32
    attention: str = ""  # KV-cache exports: which layers' attention is one GroupQueryAttention node, why not others
    gqa_layers: int = 0  # how many
    fusions: dict[str, int] = field(default_factory=dict)  # ORT fused ops made from ordinary ones (_fuse_for_ort)
    repeated: dict[int, int] = field(default_factory=dict)  # layer -> the traced layer whose nodes it repeats

    def __rich__(self) -> Table:
        q = f", quantize {self.quantize.describe()}" if self.quantize else ""
        ext = ", weights in external data" if self.external_data else ""
        ext += f", {self.dense_matmuls} dense MatMuls quantized ({self.dense_format})" if self.dense else ""
        ext += f", {len(self.dense_left)} left fp32 (.dense_left)" if self.dense_left else ""
        ext += f"; attention: {self.attention}" if self.attention else ""
        ext += f"; fused: {', '.join(f'{k} x{v}' for k, v in self.fusions.items())}" if self.fusions else ""
        ext += f"; {len(self.repeated)} layers repeat a traced one's nodes" if self.repeated else ""
        took = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        t = Table(title=f"moec.export_onnx -> {self.path} (provider {self.provider}{q}{ext}); inputs "
                        f"{', '.join(self.inputs)}; outputs {', '.join(self.outputs)}; took {took}",
                  title_justify="left")
        for col in ("block", "ONNX op", "routing / why", "router", "experts"):
            t.add_column(col)
        for b in self.blocks:
            t.add_row(b.path, b.op if b.op == "fallback" or "::" in b.op else f"com.microsoft::{b.op}", b.why,
                      b.router, b.experts)
        for r in self.rejected:
            t.add_row(r.path, "as traced", f"[not an MoE moec rewrote] {r.reason}", "", "")
        return t

    def __str__(self) -> str:
        console = Console(width=200, file=io.StringIO())
        console.print(self)
        return console.file.getvalue()


class _Exportable(nn.Module):
    """The model as exported: every input positional (torch.export's dynamic shapes then match one tuple),
    HF models without KV cache, returning their logits. An HF model's gated-delta-net and Mamba scans run as
    moec.export_state's substitutes from a zero state (transformers' scans loop in Python over chunks or tokens,
    which one traced graph cannot hold); `check`: this forward proves them on real tensors (`proofs`)."""

    def __init__(self, model: nn.Module, n_args: int, names: list[str]):
        super().__init__()
        self.model, self.n_args, self.names = model, n_args, names
        self.training = model.training
        self.hf = hasattr(model, "config") and "use_cache" in pyinspect.signature(model.forward).parameters
        self.scans = False
        if self.hf:
            from moec import export_state  # imports transformers, which an HF model has

            self.scans = export_state.substitutable(model)
        self.check, self.proofs = False, []

    def forward(self, *inputs):
        kwargs = dict(zip(self.names, inputs[self.n_args:]), **({"use_cache": False} if self.hf else {}),
                      **outputs_off(self.model))
        with contextlib.ExitStack() as stack:
            if self.scans:
                from moec import export_state

                run = stack.enter_context(export_state.substituted(self.model, None, self.check, {}))
            stack.enter_context(as_real_pairs())
            out = self.model(*inputs[:self.n_args], **kwargs)
        if self.scans and self.check:
            self.proofs = run.proofs
        return out.logits if hasattr(out, "logits") else out


def export_pipeline(quantize) -> str:
    """The passes moec.export_onnx runs on its copy of the model (backend="onnxruntime" too, at a session's export)."""
    return DEFAULT_PIPELINE + (",quantize_experts" if quantize else "") + ",lower_onnx"


OUTPUT_FLAGS = ("output_attentions", "output_hidden_states", "output_router_logits")


def config_outputs(model: nn.Module) -> dict[str, str]:
    """The output flags an HF model's config turns on, each with where it is set: on the config or on its text
    sub-config (multimodal models such as Qwen3-VL-MoE read their language model's flags from `text_config`)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    found = {}
    for where, c in (("model.config", config), ("model.config.text_config", text)):
        for name in OUTPUT_FLAGS:
            if c is not None and getattr(c, name, False) is True:
                found.setdefault(name, f"{where}.{name}")
    return found


def outputs_off(model: nn.Module) -> dict[str, bool]:
    """output_attentions / output_hidden_states / output_router_logits=False where an HF model's config (or its
    text sub-config) turns them on and its forward takes them: the file returns the logits (and the cache), and the
    traced forward leaves out what they add (a router_logits config would trace the aux loss, which fails on a
    cached step)."""
    params = pyinspect.signature(model.forward).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {name: False for name in config_outputs(model) if name in params or takes_any}


@contextlib.contextmanager
def _windows_in_tokens(model: nn.Module, attention_mask: torch.Tensor):
    """Sliding windows and attention chunks (Llama 4) counted in the row's tokens rather than in cache slots, while
    the model runs.

    HF's window is `kv_slot > q_slot - window`, its chunks `(slot - left_padding) // chunk`. onnxruntime-genai pads a
    batch on the right and writes each new token after the pads, so under HF's rules a padded row would see fewer
    of its own tokens, or chunks moved by its pads, than when run alone. Here the slots are numbered by the row's
    tokens (the mask's running count), which equals HF's rules wherever padding is on the left (HF's generate) or
    absent."""
    from transformers import masking_utils

    names = ("sliding_window_causal_mask_function", "chunked_causal_mask_function")
    hf = {n: getattr(masking_utils, n, None) for n in names}
    if None in hf.values():
        if getattr(model.config, "sliding_window", None) or getattr(model.config, "attention_chunk_size", None):
            raise NotImplementedError(f"moec.export_onnx: this transformers has no masking_utils.{' or '.join(names)}, "
                                      f"where moec counts {type(model).__name__}'s sliding window or attention chunks "
                                      f"in tokens (see constraints.txt for the tested version)")
        yield
        return
    count = attention_mask.long().cumsum(-1)  # [B, P+S]: the row's tokens up to each slot

    def window(size: int):
        def allowed(batch, head, q, kv):  # index tensors broadcast to [B, H, S, P+S]
            return (kv <= q) & (count[batch, kv] > count[batch, q] - size)
        return allowed

    def chunks(size: int, left_padding):
        def allowed(batch, head, q, kv):  # a token's chunk: (its number in the row - 1) // size
            return (kv <= q) & ((count[batch, kv] - 1).div(size, rounding_mode="floor")
                                == (count[batch, q] - 1).div(size, rounding_mode="floor"))
        return allowed

    masking_utils.sliding_window_causal_mask_function = window
    masking_utils.chunked_causal_mask_function = chunks
    try:
        yield
    finally:
        for n, f in hf.items():
            setattr(masking_utils, n, f)


class _ExportableWithCache(nn.Module):
    """An HF decoder LM as exported with its KV cache: (input_ids [B, S], attention_mask [B, P+S], position_ids
    [B, S], past_key_values.{i}.key/value [B, kv_heads, P, head_dim] ...) -> (logits [B, S, V],
    present.{i}.key/value [B, kv_heads, P+S, head_dim] ...), the cache HF's DynamicCache would hold.
    gqa: None (attention as the model computes it), or layer -> None (fused: moec.export_gqa) | why not.
    halves: None, or the (key, value) head dims of a cache whose keys and values differ (MLA's latents), stored
    as two equal halves of their concatenation (zero-padded to an even width): one head size for both, as
    onnxruntime-genai's config has.
    states: the gated-delta-net and Mamba layers, whose pair is past_key_values.{i}.conv_state [B, C, K] /
    recurrent_state [B, H, dk, dv] | [B, I, N] -> present.{i}.conv_state / recurrent_state (moec.export_state)."""

    def __init__(self, model: nn.Module, layers: int, halves: tuple[int, int] | None = None,
                 states: set[int] = frozenset()):
        super().__init__()
        self.model, self.layers, self.halves, self.states = model, layers, halves, set(states)
        self.training = model.training
        self.gqa: dict[int, str | None] | None = None
        self.reference = "eager"  # export_gqa: the attention implementation the model ran
        self.check = False  # this forward proves each layer's fused attention / substituted rule on real tensors
        self.state_why: dict[int, str | None] = {}  # export_state: each state layer's proof (None: proved)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from moec import export_gqa, export_state  # import transformers

        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                      **outputs_off(self.model))
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]
        if self.halves:
            pairs = [_join_halves(a, b, *self.halves) for a, b in pairs]
        with contextlib.ExitStack() as stack:
            if self.states:
                stack.enter_context(export_state.substituted(self.model, attention_mask[:, -input_ids.shape[1]:],
                                                             self.check, self.state_why))
            if self.gqa is None:
                cache = export_state.filled(pairs, self.states)
            else:
                cache, run = stack.enter_context(
                    export_gqa.fused(pairs, self.check, self.gqa, self.reference, self.states))
            stack.enter_context(_windows_in_tokens(self.model, attention_mask))
            stack.enter_context(as_real_pairs())
            out = self.model(**kwargs, past_key_values=cache)
        layers = out.past_key_values.layers[:self.layers]
        if self.gqa is None:
            present = [export_state.present(layer) for layer in layers]
        else:
            if len(run.present) != self.layers - len(self.states):
                raise export_gqa.GQAUnfit(f"{self.layers - len(self.states) - len(run.present)} layer(s) updated the "
                                          f"cache without attending through the attention function")
            present = [export_state.present(layers[i]) if i in self.states else run.present[i]
                       for i in range(self.layers)]
        if self.halves:
            present = [_split_halves(k, v) for k, v in present]
        return (out.logits, *(t for pair in present for t in pair))


def _split_halves(keys, values):
    """[B, H, P, key] + [B, H, P, value] -> two [B, H, P, (key + value + 1) // 2]: their concatenation in halves."""
    both = torch.cat([keys, values], -1)
    width = (both.shape[-1] + 1) // 2
    both = nn.functional.pad(both, (0, 2 * width - both.shape[-1]))
    return both[..., :width], both[..., width:]


def _join_halves(first, second, key: int, value: int):
    """_split_halves undone: the cached keys [B, H, P, key] and values [B, H, P, value]."""
    both = torch.cat([first, second], -1)
    return both[..., :key], both[..., key:key + value]


# the layers of an HF DynamicCache the KV-cache export stands in for (a layer of another kind holds more: DSA's
# indexer keys, ...)
_CACHE_LAYERS = {"DynamicLayer", "DynamicSlidingWindowLayer", "LinearAttentionLayer"}


def layer_layout(model: nn.Module, input_ids: torch.Tensor) -> tuple[tuple[int, tuple, int, int, torch.dtype], dict]:
    """((layers, kv_heads per layer, key head_dim, value head_dim, dtype), states) of an HF decoder LM's cache, read
    off one cached call (the head dims differ in MLA: DeepSeek-V2/V3; the kv heads between layers in MiMo-V2-Flash:
    its sliding-window layers have twice as many; 0 for a state layer). states: layer -> (conv_state [C, K],
    recurrent_state [H, dk, dv], their dtypes) of its linear-attention and Mamba layers (moec.export_state).
    Refused with the reason when a layer holds neither a key/value pair nor one state of each kind."""
    from moec import export_state  # imports transformers

    name = type(model).__name__
    if "past_key_values" not in pyinspect.signature(model.forward).parameters:
        raise ValueError(f"moec.export_onnx(kv_cache=True): {name} takes no past_key_values (not a decoder LM)")
    with torch.no_grad():
        cache = model(input_ids=input_ids[:, :2], use_cache=True).past_key_values
    kinds = {type(layer).__name__ for layer in getattr(cache, "layers", None) or []}
    if type(cache).__name__ != "DynamicCache" or kinds - _CACHE_LAYERS:
        raise NotImplementedError(f"moec.export_onnx(kv_cache=True): {name} keeps its cache as {type(cache).__name__} "
                                  f"({', '.join(sorted(kinds)) or 'no layers'}), which the export does not substitute "
                                  f"(it does {', '.join(sorted(_CACHE_LAYERS))} in a DynamicCache); export_onnx(..., "
                                  f"kv_cache=False) exports it without the cache")
    try:
        states = export_state.layout(cache) if getattr(cache, "layers", None) else {}
    except export_state.StateUnfit as e:
        raise NotImplementedError(f"moec.export_onnx(kv_cache=True): {name}: {e}; export it with kv_cache=False") from e
    kv = [layer for i, layer in enumerate(getattr(cache, "layers", None) or []) if i not in states]
    if not getattr(cache, "layers", None) or any(getattr(layer, "keys", None) is None or layer.keys.dim() != 4
                                                 for layer in kv):
        raise NotImplementedError(f"moec.export_onnx(kv_cache=True): {name}'s cache is not a key/value pair or a "
                                  f"linear-attention state per layer ({type(cache).__name__}); export it with "
                                  f"kv_cache=False")
    if not kv:
        return (len(cache.layers), (0,) * len(cache.layers), 0, 0, next(iter(states.values()))[2][0]), states
    k, v = kv[0].keys, kv[0].values
    if (other := next((i for i, layer in enumerate(cache.layers) if i not in states and (
            layer.keys.shape[3], layer.values.shape[3], layer.keys.dtype) != (k.shape[3], v.shape[3], k.dtype)),
            None)) is not None:
        raise NotImplementedError(f"moec.export_onnx(kv_cache=True): {name}'s layer {other} caches keys and values of "
                                  f"other head sizes or dtype than layer {cache.layers.index(kv[0])}'s; export it with "
                                  f"kv_cache=False")
    heads = tuple(0 if i in states else layer.keys.shape[1] for i, layer in enumerate(cache.layers))
    return (len(cache.layers), heads, k.shape[3], v.shape[3], k.dtype), states


def _with_cache(model: nn.Module, input_ids, attention: str, halves: bool):
    """(module, example inputs, input names, output names, dynamic shapes, attention summary) of the KV-cache
    export: the example is the given tokens after a past of 3 random key/value positions (2+ so that the axis
    stays dynamic) and random linear-attention states. attention "gqa": each layer's attention fused where proved
    on the example (moec.export_gqa). halves: keys and values of different head dims are cached as two equal
    halves (_ExportableWithCache). A linear-attention layer is proved on the example (moec.export_state), or the
    export refused with export_state.StateUnfit."""
    from moec import export_gqa, export_state  # import transformers

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("moec.export_onnx(kv_cache=True): give example inputs with input_ids [batch, seq]")
    (layers, heads, key_dim, value_dim, dtype), states = layer_layout(model, input_ids)
    halves = (key_dim, value_dim) if halves and key_dim != value_dim and not states else None
    if halves:
        key_dim = value_dim = (key_dim + value_dim + 1) // 2
    B, S, P = *input_ids.shape, 3
    gen = torch.Generator().manual_seed(0)
    kinds = {i: zip(states[i][:2], states[i][2]) if i in states else
             (((heads[i], P, key_dim), dtype), ((heads[i], P, value_dim), dtype)) for i in range(layers)}
    past = tuple(torch.randn(B, *dims, generator=gen).to(kind) for i in range(layers) for dims, kind in kinds[i])
    inputs = (input_ids, torch.ones(B, P + S, dtype=torch.long), torch.arange(P, P + S).expand(B, S).contiguous(),
              *past)
    kv = [f"{i}.{part}" for i in range(layers)
          for part in (("conv_state", "recurrent_state") if i in states else ("key", "value"))]
    names = ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{n}" for n in kv)]
    outputs = ["logits", *(f"present.{n}" for n in kv)]
    d = torch.export.Dim.DYNAMIC
    shapes = ({0: d, 1: d}, {0: d, 1: d}, {0: d, 1: d},
              tuple({0: d} if i in states else {0: d, 2: d} for i in range(layers) for _ in range(2)))
    exportable, why = _ExportableWithCache(model, layers, halves, set(states)), "attention='ops' asked"
    was = None
    if attention == "gqa":
        try:
            was = exportable.reference = export_gqa.use(model)
            exportable.gqa = {}
        except export_gqa.GQAUnfit as e:
            why = str(e)
    unfit = []
    while exportable.gqa is not None or states:  # one run on real tensors decides each layer
        exportable.check = True
        try:
            exportable(*inputs)
        except export_gqa.GQAUnfit as e:  # attention as ordinary ops; the states are proved again
            exportable.gqa, why = None, str(e)
            model.set_attn_implementation(was)
            continue
        except export_state.StateUnfit as e:
            unfit = [str(e)]
        finally:
            exportable.check = False
        why = exportable.gqa if exportable.gqa is not None else why
        break
    unfit = unfit or [f"layer {i}: {exportable.state_why.get(i, 'its recurrent state was not updated')}"
                      for i in sorted(states) if exportable.state_why.get(i, "") is not None]
    if unfit:
        if exportable.gqa is not None:
            model.set_attn_implementation(was)  # as it was: export_onnx may go on without the cache
        raise NotImplementedError(f"moec.export_onnx(kv_cache=True): {type(model).__name__}'s recurrent state cannot "
                                  f"be exported: {'; '.join(unfit)}; export it with kv_cache=False")
    return exportable, inputs, names, outputs, shapes, export_gqa.summary(why)


def _prove_scans(exportable: _Exportable, inputs: tuple, name: str) -> None:
    """The no-cache export's substituted scans, proved on the example before the trace (moec.export_state)."""
    from moec import export_state

    exportable.check = True
    try:
        exportable(*inputs)
    except export_state.StateUnfit as e:
        raise NotImplementedError(f"moec.export_onnx: {name}'s scan cannot be exported: {e}") from e
    finally:
        exportable.check = False
    why = [w for w in exportable.proofs if w is not None]
    if why:
        raise NotImplementedError(f"moec.export_onnx: {name}'s scan cannot be exported: {why[0]}")


def _default_kv_cache(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """export_onnx's kv_cache=None: True for an HF decoder LM (generate, past_key_values, not encoder-decoder)
    given only input_ids (+ attention_mask) whose cache is a key/value pair or a linear-attention state per layer
    (export_onnx falls back to no cache, with a warning, if a state layer then fails its proof)."""
    config = getattr(model, "config", None)
    ids = kwargs.get("input_ids", args[0] if len(args) == 1 else None)
    if (config is None or getattr(config, "is_encoder_decoder", False) or not hasattr(model, "generate")
            or set(kwargs) - {"input_ids", "attention_mask"} or not isinstance(ids, torch.Tensor) or ids.dim() != 2
            or "past_key_values" not in pyinspect.signature(model.forward).parameters):
        return False
    try:
        layer_layout(model, ids)
    except NotImplementedError as e:
        warnings.warn(f"moec.export_onnx: exported without its cache (kv_cache=False): {e}", stacklevel=3)
        return False
    return True


# the names of an HF LM's dynamic axes (onnxruntime-genai's and Optimum's), by input and axis
_AXIS_NAMES = {"input_ids": ("batch_size", "sequence_length"), "position_ids": ("batch_size", "sequence_length"),
               "inputs_embeds": ("batch_size", "sequence_length"),
               "attention_mask": ("batch_size", "total_sequence_length"),
               "key": ("batch_size", None, "past_sequence_length"),
               "value": ("batch_size", None, "past_sequence_length"),
               "conv_state": ("batch_size",), "recurrent_state": ("batch_size",)}


def name_axes(proto: onnx.ModelProto) -> bool:
    """The exporter's symbols for the inputs' dynamic axes (s43, s56...: a past key's batch another symbol than
    input_ids') named as their role: batch_size, sequence_length, past_sequence_length, total_sequence_length,
    in every shape of the graph (a present key's "s69 + s70" becomes "past_sequence_length + sequence_length").
    The first input naming a symbol wins (without a cache, the mask's length is the sequence's). Whether any was."""
    names: dict[str, str] = {}
    for v in proto.graph.input:
        roles = _AXIS_NAMES.get(v.name.rpartition(".")[2] if v.name.startswith("past_key_values.") else v.name, ())
        for d, role in zip(v.type.tensor_type.shape.dim, roles):
            if role and re.fullmatch(r"s\d+", d.dim_param):
                names.setdefault(d.dim_param, role)
    if not names:
        return False
    sub = lambda m: names.get(m.group(), m.group())  # noqa: E731
    order = ["batch_size", "past_sequence_length", "sequence_length", "total_sequence_length"]
    for v in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = re.sub(r"\bs\d+\b", sub, d.dim_param)
                terms = d.dim_param.split(" + ")
                if len(terms) > 1 and set(terms) <= set(order):  # one order of a sum's terms ("s70 + s69" in some)
                    d.dim_param = " + ".join(sorted(terms, key=order.index))
    return True


def dynamic_axes(t):
    """Dynamic axes of one example input: every axis of an integer tensor (batch, sequence), every axis
    but the last (features) of a float one."""
    if not isinstance(t, torch.Tensor):
        return None
    axes = range(t.dim()) if not t.is_floating_point() else range(t.dim() - 1)
    return {a: torch.export.Dim.DYNAMIC for a in axes}


@contextlib.contextmanager
def _quiet(*loggers: str):
    """The exporter's and optimizer's loggers at WARNING while they run, unless the user set their level: they
    print every pass at INFO wherever the root logger is at INFO."""
    quiet = [logging.getLogger(n) for n in loggers if logging.getLogger(n).level == logging.NOTSET]
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg in quiet:
            lg.setLevel(logging.NOTSET)


@contextlib.contextmanager
def _without_slice_split():
    """onnxscript's optimizer without its rule that turns two Slices of one tensor into a Split. That rule has two
    output nodes, and the matcher tries every Slice of the graph against every other (quadratic in the graph's
    size): in the fusion stage of a GPT-OSS of hidden 512 it took 2.8 s of 7.7 at 8 layers and 13.9 s of 25 at
    16. It rewrote nothing in the Mixtral-, GPT-OSS- and DeepSeek-style models (the same nodes with and without).
    The rule list is onnxscript's module attribute, which its optimizer reads at each call: swapped while the
    fusions run."""
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import slice_split_rule

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if rules is None:  # another onnxscript: run its optimizer as it is
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if r is not slice_split_rule)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def _fuse_for_ort(program) -> dict[str, int]:
    """onnxscript's ORT fusions on the exported graph, in place: RMSNorm (+ residual add) chains of ~8 ops become
    com.microsoft::SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization, rotary chains RotaryEmbedding
    (a 1.1x faster decode step on the tiny GPT-OSS, docs/benchmarks.md). fp32 graphs only: in an fp16 model the
    norms compute in fp32 between casts, and the fusions made nodes of mixed fp16/fp32 types ORT refuses to load;
    other graphs get the optimizer alone.
    Returns {fusion: count} of those that applied."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    graph = program.model.graph
    with _without_slice_split():
        if any(v.dtype != ir.DataType.FLOAT for v in graph.initializers.values() if v.dtype.is_floating_point()):
            program.optimize()  # constant folding and the optimizer's rewrites, no fusions
            return {}
        program.model, counts = optimize_for_ort(program.model)
    if errors := ort_type_errors(program.model.graph):  # ORT would refuse to load the file: a moec bug
        raise RuntimeError(f"moec.export_onnx: the ORT fusions made nodes ONNX Runtime cannot load: {errors[:3]}")
    return {k: v for k, v in counts.items() if v}


def _sharing_weights(model: nn.Module) -> nn.Module:
    """A copy of `model` for export to compile: new modules, its parameters new tensor objects over the original's
    storage. Compile re-points the copy's tensors (`p.data = ...`: stacked or quantized experts, emptied originals)
    and never writes into their storage, so the user's model stays as it was without its weights being held twice (a
    deepcopy doubled an export's memory). Buffers are copied: a forward may write into them (a block's token
    counters), and the export runs the copy."""
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _trace(exportable, inputs, names, outputs, shapes, opset, repeat_layers: bool):
    """(torch.onnx.export of the exportable, the export_layers.Plan followed or None). repeat_layers (the KV-cache
    export): where later layers repeat earlier ones, only the first plan.traced layers are traced, the others added
    as copies of their kind's nodes (moec.export_layers); every layer is traced where that does not apply."""
    def export(exportable, inputs, names, outputs, shapes):
        with own_trace():  # a block's token counters: no state in the file (said by _warn_about_counters)
            return torch.onnx.export(
                exportable, inputs, input_names=names, output_names=outputs, dynamic_shapes=shapes, dynamo=True,
                custom_translation_table=translations(), opset_version=opset, verbose=False,
                optimize=False)  # _fuse_for_ort optimizes (the same onnxscript optimizer, then the fusions)

    try:
        repeat = export_layers.plan(exportable, inputs) if repeat_layers else None
        if repeat is not None:
            n = 3 + 2 * repeat.traced  # the token inputs, then two past tensors per layer
            with export_layers.truncated(exportable, repeat):
                program = export(exportable, inputs[:n], names[:n], outputs[:n - 2], (*shapes[:3], shapes[3][:n - 3]))
            export_layers.repeat(program, repeat)
            return program, repeat
    except Exception as e:  # LayersUnfit, or a model the record or shortened trace does not suit: trace it all
        log.info(f"moec.export_onnx: tracing every layer ({type(e).__name__}: {e})")
    return export(exportable, inputs, names, outputs, shapes), None


def check_exportable(model: nn.Module, quantize, provider: str, dense=None, bf16: bool = False) -> None:
    """Refuse, with the reason, what export_onnx cannot turn into a correct file (also used by
    backend="onnxruntime" at compile time, before any call; bf16: the backend exports bf16 models in fp32 and
    stores their weights back in bf16, ort_session.runs_bf16)."""
    if provider not in PROVIDERS:
        raise ValueError(f"moec.export_onnx: provider must be one of {PROVIDERS}, not {provider!r}")
    from moec.backends.cpu_dense import dense_layers

    if dense_layers(model):
        raise ValueError("moec.export_onnx: the model was compiled with dense= on the torch backend, whose layers hold "
                         "their quantized weights only: export a fresh model with export_onnx(..., dense=...)")
    if dense is not None and not isinstance(dense, (Int8Experts, Int4Experts)):
        raise TypeError(f"moec.export_onnx: dense must be moec.Int4Experts(...) or moec.Int8Experts(), not {dense!r}")
    if quantize is not None and not isinstance(quantize, (Int8Experts, Int4Experts)):
        raise TypeError(f"quantize must be moec.Int8Experts() or moec.Int4Experts(...), not {quantize!r}")
    if getattr(quantize, "shared", False):
        raise NotImplementedError("moec.export_onnx: quantized shared experts (shared=True) have no ONNX lowering; "
                                  "QMoE nodes quantize the routed experts only (leave shared=False)")
    if quantize is not None and provider == "cuda":
        raise NotImplementedError(
            "moec.export_onnx: quantized experts for provider='cuda' are not supported: ONNX Runtime's CUDA QMoE "
            "kernel takes weights pre-packed for its mixed-precision GEMM (weights_prepacked), a layout moec "
            "does not produce; export without quantize (MoE nodes run on both providers) or for provider='cpu'")
    config = getattr(model, "config", None)
    if getattr(config, "kv_lora_rank", None) and getattr(config, "num_key_value_heads", None) not in (
            None, getattr(config, "num_attention_heads", None)):
        raise NotImplementedError(
            f"moec.export_onnx: {type(model).__name__} has MLA attention with num_key_value_heads "
            f"{config.num_key_value_heads} != num_attention_heads {config.num_attention_heads}: traced, transformers "
            f"then repeats the expanded keys and the export fails. MLA caches one latent for all heads, so the value "
            f"is unused otherwise: set model.config.num_key_value_heads = model.config.num_attention_heads (as "
            f"DeepSeek's own configs do) and export again")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if kind in ("dynamic", "longrope"):
        raise NotImplementedError(f"moec.export_onnx: {type(model).__name__}'s rotary scaling {kind!r} picks its "
                                  f"frequencies by the sequence length at run time, which one traced graph cannot "
                                  f"hold: not supported (use backend='torch')")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if torch.bfloat16 in dtypes and not bf16:
        raise NotImplementedError("moec.export_onnx: bf16 models are not supported: ONNX Runtime's MoE/QMoE have no "
                                  "bf16 CPU kernel, and bf16 on CUDA is untested (convert the model to fp16 or fp32; "
                                  "moec.compile(model, backend='onnxruntime') runs bf16 models on moec's kernels)")


def _warn_about_ties(model: nn.Module, report) -> None:
    """ONNX Runtime breaks exact ties between expert scores by the lowest index; torch.topk by an order of
    its own. A router with identical (or all-zero) rows ties on every token: say so, it is not silent."""
    for b in report.blocks:
        block = resolve(model, b.path)
        gm = block.__dict__["_moec_graph"]
        binding = gm.meta["bindings"].get("router_weight") or gm.meta["canonical_bindings"].get("router_weight")
        if binding is None:
            continue  # an experts module rewritten alone: the caller routes
        w = binding.get(block)
        if torch.unique(w, dim=0).shape[0] < w.shape[0]:
            warnings.warn(f"moec.export_onnx: block {b.path!r} has router rows that are equal (e.g. an untrained or "
                          f"zero router): its experts tie on every token, and ONNX Runtime breaks a tie by the lowest "
                          f"expert index where torch.topk uses its own order, so the exported model may pick other "
                          f"experts than the PyTorch model", stacklevel=3)


def _warn_about_counters(work: nn.Module, report) -> None:
    """A block that counts its tokens per expert into a buffer (torchtitan's tokens_per_expert): the file holds no
    state, so running it counts nothing. Said, not silent."""
    for b in report.blocks:
        counters = resolve(work, b.path).__dict__["_moec_graph"].meta["moe_spec"].counters
        if counters:
            warnings.warn(f"moec.export_onnx: block {b.path!r} adds its tokens per expert to {', '.join(counters)} as "
                          f"it runs; an ONNX file holds no state, so the exported model (and backend='onnxruntime') "
                          f"does not count them: those buffers keep their values", stacklevel=3)


def export_onnx(model: nn.Module, example_inputs: tuple | dict, path: str | os.PathLike, *,
                quantize: QuantConfig | None = None, provider: str = "cpu", opset: int | None = None,
                external_data: bool | None = None, kv_cache: bool | None = None,
                dense: QuantConfig | None = None, expert_slices: int | None = None,
                attention: str | None = None, _cache_halves: bool = False, _repeat_layers: bool = True,
                _moec_kernels: bool = False) -> ExportReport:
    """Export `model` (left unchanged) to ONNX at `path`; return what became of each MoE block.

    example_inputs: positional args (a tuple) or keyword args (a dict) of model(...); their batch and
        sequence sizes must be >= 2 (a size-1 axis would be exported as a constant 1).
    quantize: None (MoE nodes in the model's dtype), Int8Experts() or Int4Experts(g, symmetric) (QMoE nodes);
        activations="int8" (either config): QMoE accuracy_level=4, int8 activations and dot products.
    provider: "cpu" or "cuda", the ONNX Runtime execution provider the file is for (weight layouts differ).
    opset: the default ONNX opset (None: the exporter's). external_data: True forces weights into
        `<path>.data`; None does that only past 2 GB.
    kv_cache: an HF decoder LM exported with its cache (_ExportableWithCache): inputs input_ids,
        attention_mask (past + new tokens), position_ids, past_key_values.{i}.key/value; outputs logits,
        present.{i}.key/value; batch, sequence and past length dynamic (the past may be empty). A gated-delta-net
        layer (Qwen3-Next's linear attention) or a Mamba layer (Jamba) takes and returns
        past_key_values.{i}.conv_state / recurrent_state instead (moec.export_state). None (the default): with the
        cache for an HF decoder LM given input_ids (and attention_mask) whose layers cache key/value pairs or such
        states; a model whose state moec cannot export exports without, with a warning.
    dense: None, or Int4Experts(g, symmetric) / Int8Experts(): the dense MatMuls (attention, lm_head, dense and
        shared MLPs; never the routers) become com.microsoft::MatMulNBits (moec.export_dense), apart from the
        experts' `quantize`.
    expert_slices: fp MoE nodes hold each expert as this many experts of I/slices intermediate units, which sum to
        it (passes/lower_onnx.py). ORT's CPU MoE runs one expert on one thread, so at decode (a token's k experts)
        threads sat idle: sliced in 2, two threads share every expert (decode steps 1.13-1.25x on 2 threads,
        docs/benchmarks.md). None: 2 for provider "cpu", 1 for "cuda". Quantized (QMoE) nodes are not sliced, nor
        experts without equal slices of 2 units or more (the report says why).
    attention: with kv_cache, "gqa" makes each layer's attention one com.microsoft::GroupQueryAttention node where
        it computes what the layer's eager attention does on the example (moec.export_gqa; the report says which
        layers and why not the others); "ops" traces it as ordinary ONNX ops. None: "gqa" for provider "cpu",
        "ops" for "cuda" (ORT's CUDA kernel, fp16/bf16 only, is untested with moec). ORT's GroupQueryAttention
        refuses several new tokens after a past at batch > 1 (backend="onnxruntime" runs those row by row).
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(parent):  # before the minutes of tracing, not at the save
        raise ValueError(f"moec.export_onnx: cannot write {path!r}: "
                         f"{'it is a directory' if os.path.isdir(path) else f'{parent!r} is not a directory'}; "
                         "give a file path in an existing directory")
    check_exportable(model, quantize, provider, dense)
    if expert_slices is None:
        expert_slices = 2 if provider == "cpu" else 1
    if not isinstance(expert_slices, int) or isinstance(expert_slices, bool) or expert_slices < 1:
        raise ValueError(f"moec.export_onnx: expert_slices must be an int >= 1, not {expert_slices!r}")
    attention = attention or ("gqa" if provider == "cpu" else "ops")
    if attention not in ("gqa", "ops"):
        raise ValueError(f"moec.export_onnx: attention must be 'gqa' or 'ops', not {attention!r}")
    if "_moec_report" in model.__dict__:
        raise ValueError("moec.export_onnx takes the original model, not one moec.compile already rewrote")
    args, kwargs = (tuple(example_inputs), {}) if not isinstance(example_inputs, dict) else ((), dict(example_inputs))
    defaulted = kv_cache is None
    if kv_cache is None:
        kv_cache = _default_kv_cache(model, args, kwargs)
    inputs = (*args, *kwargs.values())
    names = [f"input_{i}" for i in range(len(args))] + list(kwargs)
    for name, t in zip(names, inputs):
        if isinstance(t, torch.Tensor) and any(t.shape[a] == 1 for a in (dynamic_axes(t) or {})):
            raise ValueError(f"moec.export_onnx: example input {name} has shape {tuple(t.shape)}: give batch and "
                             "sequence sizes >= 2 so they export as dynamic axes (1 would be baked in)")

    seconds, clock = {}, [time.perf_counter()]

    def done(stage: str, then: str = "") -> None:
        """Time `stage` for the report and say what runs next: a large model's export takes minutes."""
        now = time.perf_counter()
        seconds[stage], clock[0] = now - clock[0], now
        if then:
            log.info(f"moec.export_onnx: {stage} took {seconds[stage]:.1f} s; {then}")

    log.info(f"moec.export_onnx: proving and lowering the MoE blocks of {type(model).__name__}")
    work = _sharing_weights(model)
    if model.training:  # dropout and router jitter would be traced (or fail to): the file is for inference
        warnings.warn(f"moec.export_onnx: {type(model).__name__} is in training mode; exported in eval mode (no dropout "
                      f"or router jitter; the model itself stays as it is)", stacklevel=2)
        work.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a model without MoE block exports as it is
        compile(work, backend="torch", passes=export_pipeline(quantize), quantize=quantize,
                _onnx={"expert_slices": expert_slices, "moec_kernels": _moec_kernels})
    compiled = inspect(work)
    if not compiled.blocks and not compiled.rejected:
        warnings.warn(f"moec.export_onnx: no MoE block found in {type(model).__name__}; it is exported as it is",
                      stacklevel=2)
    _warn_about_ties(work, compiled)
    _warn_about_counters(work, compiled)
    done("moec compile", "tracing with torch.onnx.export (the longest stage)")
    fused = ""
    with torch.no_grad(), _quiet("onnxscript", "onnx_ir"):
        if kv_cache:
            try:
                exportable, inputs, names, outputs, shapes, fused = _with_cache(
                    work, kwargs.get("input_ids", args[0] if args else None), attention, _cache_halves)
            except NotImplementedError as e:  # a linear-attention state moec cannot export
                if not defaulted:
                    raise
                warnings.warn(f"moec.export_onnx: exported without its cache (kv_cache=False): {e}", stacklevel=2)
                kv_cache = False
        if not kv_cache:
            exportable = _Exportable(work, len(args), list(kwargs))
            outputs = ["logits"] if exportable.hf else None
            shapes = (tuple(dynamic_axes(t) for t in inputs),)
            if exportable.scans:
                _prove_scans(exportable, inputs, type(model).__name__)
        try:
            program, repeat = _trace(exportable, inputs, names, outputs, shapes, opset, kv_cache and _repeat_layers)
        except Exception as e:
            if not compiled.rejected:
                raise
            why = "; ".join(f"{r.path}: {r.reason}" for r in compiled.rejected)
            raise RuntimeError(f"moec.export_onnx: torch.onnx.export failed on {type(model).__name__} "
                               f"({type(e).__name__}), which holds blocks moec left as they are (their own code "
                               f"then goes to the exporter): {why}") from e
    done("torch.onnx.export", "optimizing the graph for ONNX Runtime")
    if repeat:
        log.info(f"moec.export_onnx: traced {repeat.traced} of {repeat.layers} layers, the others repeat a traced "
                 f"layer's nodes with their own weights")
    with _quiet("onnxscript", "onnx_ir"):
        fusions = _fuse_for_ort(program)
    done("ORT fusions", f"saving {path}")
    program.save(path, external_data=external_data)
    done("save", "quantizing the dense MatMuls" if dense is not None else "checking the file")
    quantized, dense_format = 0, dense.describe() if dense is not None else ""
    fp32 = {p.dtype for p in work.parameters() if p.is_floating_point()} == {torch.float32}
    big = external_data or any(t.data_location == onnx.TensorProto.EXTERNAL
                               for t in onnx.load(path, load_external_data=False).graph.initializer)
    routers = {b.router_width for b in compiled.blocks}
    panels = _moec_kernels and fp32  # moec's kernels on weights in panels
    rows8 = panels and dense == Int8Experts(activations="int8") and cpu_native.has_vnni512()  # moec's int8 rows
    if panels and dense == Int8Experts() or rows8:  # a scale per channel (the torch backend's numbers)
        quantized = moec_fp32_matmuls(path, routers, big, int8=True, a8=rows8)
        log.info(f"moec.export_onnx: {quantized} dense MatMuls run moec's int8 kernel")
        done("dense MatMuls on moec's kernel", "checking the file")
    if dense is not None and not quantized and not (panels and dense == Int8Experts()):  # (weight-only int8: done)
        quantized = quantize_dense(path, dense, routers, big)
        if isinstance(dense, Int8Experts):  # ORT's quantizer: a scale per 32 inputs, where moec.quant has one a row
            dense_format = ("int8 in blocks of 32 inputs (MatMulNBits)"
                            + (", int8 activations per 32 inputs" if dense.activations == "int8" else ""))
        if quantized and rows8:  # moec_fp32_matmuls left them: a K not a multiple of 32
            log.warning("moec.export_onnx: a dense MatMul's K is not a multiple of 32 (or is above 65536): the dense "
                        "MatMuls are MatMulNBits, which round activations per 32 inputs, not per row as the torch "
                        "backend does")
        if _moec_kernels and isinstance(dense, Int4Experts) and fp32:
            log.info(f"moec.export_onnx: {moec_matmuls(path, big)} of the {quantized} MatMulNBits run moec's kernels")
        done("dense MatMulNBits", "checking the file")
    if panels and dense is None:
        log.info(f"moec.export_onnx: {moec_fp32_matmuls(path, routers, big)} dense MatMuls run moec's fp32 kernel")
        done("dense MatMuls on moec's kernel", "checking the file")
    if _moec_kernels and fp32 and any(counts := ort_layouts.lay_out_file(path)):
        log.info(f"moec.export_onnx: {counts[0]} of moec's int4 nodes take their weights in tiles or panels, {counts[1]} "
                 f"experts nodes in panels, {counts[2]} of moec's fp32 nodes hold bf16 numbers: stored in bf16")
        done("weights laid out for moec's kernels", "checking the file")
    proto = onnx.load(path, load_external_data=False)  # external weights stay where they are
    if _moec_kernels and fp32 and fused and ort_attention.rewrite(proto):
        fused += "; run as moec::CachedAttention (moec's kernel)"
        if ort_attention.fuse_rotary(proto):
            fused += ", rotary inside"
        if ort_mask.take(proto):
            fused += ", the 2-D mask inside"
        if ort_attention.in_place(proto):
            fused += ", the cache kept in place"
        ort_mask.expand(proto)  # (the mask's other readers)
        name_axes(proto)
        onnx.save(proto, path)
    elif ort_mask.expand(proto) | name_axes(proto):  # HF's mask as ONNX's ops; the axes' names
        onnx.save(proto, path)
    register_ort_schemas({(n.domain or "", n.op_type) for n in proto.graph.node})  # the fused ops' schemas
    onnx.checker.check_model(path)  # by path: also checks external data
    done("onnx.checker")

    report = ExportReport(path, provider, quantize, rejected=compiled.rejected,
                          inputs=[i.name for i in proto.graph.input], outputs=[o.name for o in proto.graph.output],
                          external_data=any(t.data_location == onnx.TensorProto.EXTERNAL
                                            for t in proto.graph.initializer), seconds=seconds,
                          dense=dense, dense_matmuls=quantized, dense_format=dense_format, attention=fused,
                          fusions=fusions,
                          dense_left=left_fp32(proto, dense, routers) if dense is not None else [],
                          gqa_layers=sum(n.op_type in ("GroupQueryAttention", "CachedAttention") for n in proto.graph.node),
                          repeated=repeat.source if repeat else {})
    ops = [n.op_type for n in proto.graph.node if n.domain == ort_kernels.DOMAIN]
    narrowed = ops.count(ort_kernels.EXPERTS + "Bf16")  # narrow_bf16: which numerics run, as the file says
    for b in compiled.blocks:
        info = resolve(work, b.path).__dict__["_moec_graph"].meta["onnx"]
        op, why = info["op"], info["why"]
        if op == "moec::Experts" and narrowed:
            if ops.count(ort_kernels.EXPERTS) == 0:
                op, why = "moec::ExpertsBf16", why + "; weights all bf16 numbers: stored in bf16 (the same numbers)"
            else:
                why += f"; {narrowed} of the file's fp32 experts nodes hold bf16 numbers, stored in bf16"
        report.blocks.append(ExportBlock(b.path, op, why, b.router, b.experts))
    nodes = sum((n.domain, n.op_type) in (("com.microsoft", "MoE"), ("com.microsoft", "QMoE"), ("moec", "Int4Experts"),
                                          ("moec", "Experts"), ("moec", "ExpertsBf16"), ("moec", "ExpertsInt8"))
                for n in proto.graph.node)
    contrib = sum(b.op != "fallback" for b in report.blocks)
    if nodes != contrib:  # each rewritten block must be exactly its one node
        raise RuntimeError(f"moec.export_onnx: the exported graph has {nodes} MoE/QMoE node(s) for {contrib} "
                           f"block(s) lowered to one:\n{report}")
    return report
