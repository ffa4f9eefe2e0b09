"""Save and load compiled (quantized) models as safetensors, without re-quantizing on load.

    moec.save(model, "model.safetensors")            # after moec.compile(model, quantize=...)
    model = moec.load(build_model(), "model.safetensors")   # same architecture, any weights

The file holds the model's state_dict (the quantized experts as moec-format buffers, see
moec.quant) and, in its metadata, moec's format version and the compile options. `load`
compiles the fresh model with those options (which finds and proves the blocks, and quantizes the dense layers
of a model compiled with dense=; backend="onnxruntime" if the saved model ran there, else the default backend), then loads
every tensor from the file into the model's own tensors: compiled blocks read them at call
time (moec.bindings), so the loaded model computes with the file's weights, quantized or not. A model
saved on ONNX Runtime holds unquantized weights (its session quantizes them): loaded on another backend,
they go into the fresh model first, which is then compiled.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from moec import approx, quant

KEY = "moec"


def save(model: nn.Module, path: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"moec.save takes a torch.nn.Module, not {type(model).__name__}")
    report = model.__dict__.get("_moec_report")
    if report is None:
        raise ValueError("moec.save: the model was not compiled by moec.compile")
    if report.offload is not None:
        raise NotImplementedError("moec.save: this model's experts are offloaded (their weights live in the offload "
                                  "store, not the model): save the model before compiling it with offload=")
    if report.expert_parallel is not None:
        raise NotImplementedError("moec.save: this model's experts are sharded over ranks (expert_parallel=), each rank "
                                  "holding its own: save the model before compiling it, and give each rank its shard "
                                  "with moec.load_sharded")
    meta = {"format_version": quant.FORMAT_VERSION, "pipeline": report.pipeline, "backend": report.backend,
            "quantize": _config_json(report.quantize), "dense": _config_json(report.dense),
            "topk": approx.to_json(report.topk), "experts": approx.to_json(report.experts),
            "decode_linears": report.decode_linears is not None or report.backend != "torch",
            "cuda_graphs": report.cuda_graphs is not None,
            # each approximated block's error as measured at compile, on these weights (a load compiles the fresh
            # model's before its weights are read)
            "approximation": {b.path: b.approximate for b in report.blocks if b.approximate},
            "calibration": None if (cal := model.__dict__.get("_moec_calibration")) is None else cal.to_json()}
    tensors, tied, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)
        if key in seen:  # tied weights (and the released, empty experts): written once
            tied[name] = seen[key]
            continue
        seen[key] = name
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        tensors[name] = t.detach().contiguous() if whole else t.detach().clone()  # views of moec's storage: alone
    meta["tied"] = tied
    save_file(tensors, path, metadata={KEY: json.dumps(meta)})


def _config_json(cfg) -> dict | None:
    return None if cfg is None else {"kind": type(cfg).__name__, **dataclasses.asdict(cfg)}


def _config(saved: dict | None):
    return None if saved is None else getattr(quant, saved["kind"])(**{k: v for k, v in saved.items() if k != "kind"})


def load(model: nn.Module, path: str, **compile_options) -> nn.Module:
    from moec.api import compile

    if not isinstance(model, nn.Module):
        raise TypeError(f"moec.load takes a freshly built torch.nn.Module (then the file), not {type(model).__name__}")
    if compile_options.get("offload") is not None:
        raise NotImplementedError("moec.load does not take offload= (it would write the fresh model's experts to the "
                                  "store, not the file's): use moec.load_offloaded(model, original_checkpoint, "
                                  "offload, quantize=...)")
    try:
        with safe_open(path, "pt") as f:
            raw = (f.metadata() or {}).get(KEY)
    except Exception as e:  # noqa: BLE001  a missing file (OSError) or safetensors' own error for another format
        raise ValueError(f"moec.load: {path} is not a safetensors file written by moec.save ({e})") from None
    if raw is None:
        raise ValueError(f"moec.load: {path} was not written by moec.save (no '{KEY}' metadata)")
    meta = json.loads(raw)
    if meta.get("format_version") != quant.FORMAT_VERSION:
        raise ValueError(f"moec.load: {path} has moec format version {meta.get('format_version')}, this moec reads "
                         f"version {quant.FORMAT_VERSION}: re-export it with this moec version")
    cfg = _config(meta["quantize"])
    from_ort = str(meta.get("backend", "")).startswith("onnxruntime")  # then the file holds unquantized weights
    compile_options = dict(compile_options)
    asked = compile_options.pop("quantize", cfg)
    if asked != cfg and not from_ort:
        held = "unquantized experts" if cfg is None else f"experts quantized as quantize={cfg!r}"
        raise ValueError(f"moec.load: {path} holds {held}, not {asked!r}: load it without quantize= (the file's "
                         f"format is used), or compile the original weights with it")
    cfg = asked
    quantized = not from_ort and (cfg is not None or meta.get("dense") is not None)
    if quantized and compile_options.get("backend") == "onnxruntime":
        raise ValueError(f"moec.load: {path} holds weights quantized on the {meta.get('backend', 'torch')} backend; "
                         f"backend='onnxruntime' quantizes unquantized weights in its own export: load it with the "
                         f"backend it was saved from, or compile the original weights with backend='onnxruntime'")
    # the approximations the saved model was compiled with: compiled the same way again
    saved = {k: approx.from_json(meta[k]) for k in ("topk", "experts") if meta.get(k) is not None}
    saved |= {"approximate": True} if saved else {}
    if from_ort:  # the saved model's backend
        saved["backend"] = "onnxruntime"
    if meta.get("decode_linears") is False:  # compiled with decode_linears=False
        saved["decode_linears"] = False
    if meta.get("cuda_graphs"):  # compiled with cuda_graphs=True: again where the fresh model is on CUDA
        on_cuda = next((p.device.type == "cuda" for p in model.parameters()), False)
        saved["cuda_graphs"] = on_cuda
        if not on_cuda:
            warnings.warn(f"moec.load: {path} was saved with cuda_graphs=True; the model is not on CUDA: loaded "
                          f"without them", stacklevel=2)
    if "experts" in saved and compile_options.get("experts", saved["experts"]) != saved["experts"]:
        raise ValueError(f"moec.load: {path} holds a model with fewer experts (experts=, {saved['experts'].mode}): the file has "
                         f"the kept experts' weights only; load it without experts=")
    options = saved | compile_options  # options given here win over the file's
    if "dense" not in options and meta.get("dense"):  # the saved model's dense layers' format
        options["dense"] = _config(meta["dense"])
    elif meta.get("dense") and "backend" not in saved and options["dense"] != _config(meta["dense"]):
        raise ValueError(f"moec.load: {path} holds dense layers quantized with dense={_config(meta['dense'])!r}, not "
                         f"{options['dense']!r}: load it without dense= (the file's format is used)")
    # a model saved on ONNX Runtime holds its weights as they were (its session quantizes them): another backend
    # loads them into the fresh model first, then compiles it (quantizing as the session did)
    weights_first = saved.get("backend") == "onnxruntime" and options.get("backend") != "onnxruntime"
    if weights_first:
        _load_state(model, path, meta)
    compile(model, quantize=cfg, **options)
    if meta.get("calibration") is not None:
        from moec.calibrate import Calibration

        model.__dict__["_moec_calibration"] = Calibration.from_json(meta["calibration"])
    if not weights_first:
        _load_state(model, path, meta)  # into the model's own tensors (compiled blocks read them at call time)
        _say_saved_approximation(model, meta.get("approximation") or {})
    return model


def _say_saved_approximation(model: nn.Module, said: dict[str, str]) -> None:
    """The approximation errors the saved model measured at its compile, in place of those measured on the fresh
    model's weights before the file's were loaded."""
    from moec.canonical import compiled_graph, resolve

    report = model.__dict__.get("_moec_report")
    for b in report.blocks if report is not None else ():
        gm = compiled_graph(resolve(model, b.path))
        if b.path in said and gm is not None:
            b.approximate = gm.meta["approximation"] = said[b.path]


def _load_state(model: nn.Module, path: str, meta: dict) -> None:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    state = load_file(path, device=str(device))
    state.update({name: state[src] for name, src in meta.get("tied", {}).items()})
    model.load_state_dict(state)
