"""Save and load compiled (quantized) models as safetensors, without re-quantizing on load.

    moec.save(model, "model.safetensors")            # after moec.compile(model, quantize=...)
    model = moec.load(build_model(), "model.safetensors")   # same architecture, any weights

The file holds the model's state_dict (the quantized experts as moec-format buffers, see
moec.quant) and, in its metadata, moec's format version and the compile options. `load`
compiles the fresh model with those options (which finds and proves the blocks), then loads
every tensor from the file (the kernels read the quantized buffers as they are).
"""

from __future__ import annotations

import dataclasses
import json

from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from moec import quant

KEY = "moec"


def save(model: nn.Module, path: str) -> None:
    report = model.__dict__.get("_moec_report")
    if report is None:
        raise ValueError("moec.save: the model was not compiled by moec.compile")
    cfg = report.quantize
    meta = {"format_version": quant.FORMAT_VERSION, "pipeline": report.pipeline, "backend": report.backend,
            "quantize": None if cfg is None else {"kind": type(cfg).__name__, **dataclasses.asdict(cfg)}}
    save_model(model, path, metadata={KEY: json.dumps(meta)})


def load(model: nn.Module, path: str, **compile_options) -> nn.Module:
    from moec.api import compile

    with safe_open(path, "pt") as f:
        raw = (f.metadata() or {}).get(KEY)
    if raw is None:
        raise ValueError(f"moec.load: {path} was not written by moec.save (no '{KEY}' metadata)")
    meta = json.loads(raw)
    if meta.get("format_version") != quant.FORMAT_VERSION:
        raise ValueError(f"moec.load: {path} has moec format version {meta.get('format_version')}, this moec reads "
                         f"version {quant.FORMAT_VERSION}: re-export it with this moec version")
    q = meta["quantize"]
    cfg = None if q is None else getattr(quant, q.pop("kind"))(**q)
    compile(model, quantize=cfg, **compile_options)
    load_model(model, path)
    return model
