"""A folder onnxruntime-genai runs: moec.export_genai(model, tokenizer, out_dir).

    out_dir/model.onnx (+ model.onnx.data)   moec.export_onnx(..., kv_cache=True): every MoE block one MoE/QMoE node
    out_dir/genai_config.json                 the decoder's inputs/outputs and sizes, special tokens, search defaults
    out_dir/tokenizer.json, tokenizer_config.json, ...   the tokenizer's own files

    import onnxruntime_genai as og                    # no torch needed
    model = og.Model("out_dir"); tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model); params.set_search_options(max_length=64)
    generator = og.Generator(model, params); generator.append_tokens(tokenizer.encode("def "))
    while not generator.is_done(): generator.generate_next_token()

The model type is genai's generic "decoder": genai feeds input_ids, attention_mask (past + new tokens),
position_ids and past_key_values.{i}.key/value, and gives each step's present.{i}.key/value back as the next
step's past (no shared buffer: the exported attention, GroupQueryAttention nodes on CPU, concatenates).
Gated-delta-net and Mamba layers (Qwen3-Next, Jamba) are exported with their states,
past_key_values.{i}.conv_state / recurrent_state, which genai finds by name and feeds back the same way;
genai_config's head sizes are the key/value layers'.

A chat's second append_tokens after generating fails in genai 0.18 with a shape error (genai counts its last
generated token in the positions and mask but never runs it; the cache here is sized by what a step feeds, so
the step is refused instead of answered without that token): rewind_to(0) and append the whole conversation.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from moec.export import ExportReport, check_exportable, export_onnx, layer_layout
from moec.quant import QuantConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def _token_id(model: nn.Module, tokenizer, name: str):
    """The special token `name` (bos/eos/pad) as the model's generation config, its config or the tokenizer says."""
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, f"{name}_token_id", None)
        if value is not None:
            return value
    return getattr(tokenizer, f"{name}_token_id", None) if tokenizer is not None else None


def _tokenizer_files(tokenizer) -> list[Path] | None:
    """The files of a tokenizer folder (None for a transformers tokenizer, which saves itself); refused with the
    reason before anything is written."""
    if isinstance(tokenizer, (str, os.PathLike)):
        src = Path(tokenizer)
        if not (src / "tokenizer.json").is_file() and not (src / "tokenizer.model").is_file():
            raise FileNotFoundError(f"moec.export_genai: no tokenizer.json (or tokenizer.model) in {src}: give a "
                                    f"tokenizer folder or a transformers tokenizer")
        return [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"moec.export_genai: tokenizer must be a transformers tokenizer or a folder with its files, "
                        f"not {type(tokenizer).__name__}")
    return None


def export_genai(model: nn.Module, tokenizer, out_dir: str | os.PathLike, *, quantize: QuantConfig | None = None,
                 dense: QuantConfig | None = None, provider: str = "cpu", context_length: int | None = None,
                 expert_slices: int | None = None) -> ExportReport:
    """Write `out_dir` for onnxruntime-genai (see the module docstring) from an HF decoder LM (left unchanged) and
    its tokenizer (a transformers tokenizer, or a folder holding tokenizer.json and its config). quantize, dense,
    provider and expert_slices as in moec.export_onnx; context_length: genai's max length (default: the model's
    max_position_embeddings). Returns export_onnx's report."""
    out = Path(out_dir)
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise TypeError(f"moec.export_genai takes a transformers decoder LM (with .config and .generate), not "
                        f"{type(model).__name__}: use moec.export_onnx for other models")
    context_length = context_length or getattr(config, "max_position_embeddings", None)
    if not context_length:
        raise ValueError("moec.export_genai: the model's config has no max_position_embeddings: pass context_length=")
    files = _tokenizer_files(tokenizer)
    hf_tokenizer = tokenizer if files is None else None
    tokens = {name: _token_id(model, hf_tokenizer, name) for name in ("bos", "eos", "pad")}
    if tokens["eos"] is None:
        raise ValueError("moec.export_genai: neither the model's configs nor the tokenizer name an eos token id: set "
                         "model.generation_config.eos_token_id")
    if tokens["pad"] is None:
        tokens["pad"] = tokens["eos"] if isinstance(tokens["eos"], int) else tokens["eos"][0]
    ids = torch.randint(0, config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
    (layers, heads, key_size, value_size, _), _ = layer_layout(model, ids)  # genai finds state layers by name
    if len(kv_heads := set(heads) - {0}) > 1:
        raise NotImplementedError(f"moec.export_genai: the model's layers cache "
                                  f"{' or '.join(map(str, sorted(kv_heads)))} key/value heads and genai_config.json "
                                  f"takes one number: use moec.compile(model, backend='onnxruntime') or "
                                  f"moec.export_onnx")
    kv_heads = kv_heads.pop() if kv_heads else 0
    # genai_config.json has one head_size: keys and values of different sizes (MLA's two latents) are cached as
    # two equal halves of their concatenation (moec.export._ExportableWithCache)
    head_size = (key_size + value_size + 1) // 2 if key_size != value_size else key_size
    check_exportable(model, quantize, provider, dense)  # refused before anything is written (bf16, ...)
    out.mkdir(parents=True, exist_ok=True)
    if files is None:
        tokenizer.save_pretrained(str(out))
    for f in files or []:
        shutil.copy(f, out / f.name)
    report = export_onnx(model, {"input_ids": ids}, out / "model.onnx", quantize=quantize, dense=dense,
                         provider=provider, kv_cache=True, external_data=True, expert_slices=expert_slices,
                         _cache_halves=True)
    gen = getattr(model, "generation_config", None)
    search = {"do_sample": bool(getattr(gen, "do_sample", False)), "num_beams": getattr(gen, "num_beams", 1) or 1,
              "temperature": getattr(gen, "temperature", None) or 1.0, "top_k": getattr(gen, "top_k", None) or 50,
              "top_p": getattr(gen, "top_p", None) or 1.0,
              "repetition_penalty": getattr(gen, "repetition_penalty", None) or 1.0,
              "max_length": context_length, "min_length": 0, "past_present_share_buffer": False}
    kv = {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    genai_config = {
        "model": {
            "type": "decoder",
            "context_length": context_length,
            "vocab_size": config.vocab_size,
            "bos_token_id": tokens["bos"] if tokens["bos"] is not None else tokens["pad"],
            "eos_token_id": tokens["eos"],
            "pad_token_id": tokens["pad"],
            "decoder": {
                "filename": "model.onnx",
                "session_options": {"log_id": "onnxruntime-genai", "provider_options":
                                    [] if provider == "cpu" else [{"cuda": {}}]},
                "hidden_size": config.hidden_size,
                "num_attention_heads": getattr(config, "num_attention_heads", kv_heads),
                "num_key_value_heads": kv_heads,
                "head_size": head_size,
                "num_hidden_layers": layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", **kv},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": search,
    }
    (out / "genai_config.json").write_text(json.dumps(genai_config, indent=2))
    return report
