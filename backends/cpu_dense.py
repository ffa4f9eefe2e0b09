"""compile(..., dense=Int4Experts(g, ...) | Int8Experts(...)), backend torch, CPU: the model's dense nn.Linear layers
on quantized weights, as llama.cpp's quantized files and export_onnx(dense=) (ONNX Runtime's MatMulNBits) have them.

    nn.Linear: y [.., N] = x [.., K] @ W [N, K]^T + b
        ->  moec.quant.QuantLinear: y = x' @ dequant(q [1, N, K/2 or K], scale[, zero])^T + b
            x' = x, or with activations="int8" its rows rounded to int8 (int4: per group of g; int8: per row)

on moec's kernels (torch_backend.quantized_linear: the C int4 kernels at every row count, numba/oneDNN for int8).
Which layers: every nn.Linear (exactly that class and its forward) with more than one output (not a shared
expert's sigmoid gate), outside the MoE blocks or called by a compiled block's graph (shared experts). So never
a router (quantized router weights would change which experts run) or a layer of a candidate block moec left
alone. Left fp32, with the reason in moec.inspect: a layer whose K is not a multiple of the group size, one whose
weight another module shares (an lm_head tied to the embedding: quantizing it would untie them), an nn.Linear
subclass or a layer with a forward of its own (moec's decode_linears excepted: replaced like the others), and one
whose check fails. Code that reads a quantized layer's `.weight` instead of calling it (Jamba's dt_proj) gets the
dequantized weight it computes with; assigning one raises. A router computed outside its block (by the parent
module) is not told apart from a dense layer: such a model's routing would run on quantized weights.
Each layer is checked once, at 1 and 16 rows of a random input, against the reference on its own quantized weight
(torch's GEMM on the dequantized weight and the rounded rows).

An approximation the user asks for by name (docs/quality.md): the outputs change by the quantization. The layers'
fp32 weights are released: the model's state_dict holds q, scale[, zero] in their place (moec.save/load keep
them; loading an fp32 checkpoint into the compiled model fails on its keys). Inference only: the layers compute
values, and a backward through one raises.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moec.backends import cpu_linear
from moec.bindings import resolve
from moec.quant import Int4Experts, QuantConfig, QuantLinear, dequantize, int8_rows

CHECK_ROWS = (1, 16)  # the kernels' one-row path and their tiles of 4 rows


def dense_layers(model: nn.Module) -> list[QuantLinear]:
    """The layers compile(dense=) quantized."""
    return [m for m in model.modules() if isinstance(m, QuantLinear) and m.__dict__.get("_moec_dense")]


def check_recompile(model: nn.Module, cfg: QuantConfig | None, backend: str) -> None:
    """ValueError when `model` holds dense layers quantized by an earlier compile and this one asks for another
    format, none, or another backend: their fp32 weights are gone."""
    done = dense_layers(model)
    if done and (cfg != done[0].cfg or backend != "torch"):
        raise ValueError(f"moec.compile: the model was compiled before with dense={done[0].cfg!r}, whose layers hold "
                         f"their quantized weights only: build a fresh model to compile it with dense={cfg!r} on "
                         f"backend {backend!r}")


def _tied(model: nn.Module) -> set[int]:
    """ids of the parameters more than one module holds."""
    seen, tied = set(), set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    return tied


@torch.no_grad()
def _agrees(layer: QuantLinear) -> bool:
    """The layer's kernels against the reference on its own quantized weight, at CHECK_ROWS rows: each output
    within 1e-5 of |x'| |W[n]| + |b[n]| (the orders of fp32 sums)."""
    t = {k: getattr(layer, k) for k in ("q", "scale", "zero") if hasattr(layer, k)}
    w = dequantize(layer.cfg, t)[0]  # [N, K]
    b = layer.bias
    g = torch.Generator().manual_seed(0)
    for rows in CHECK_ROWS:
        x = torch.randn(rows, layer.in_features, generator=g)
        if layer.int8_activations:
            x = int8_rows(x, layer.cfg.group_size if isinstance(layer.cfg, Int4Experts) else layer.in_features)
        got, ref = layer(x), F.linear(x, w.float(), None if b is None else b.float())
        bound = 1e-5 * (torch.linalg.vector_norm(x, dim=1, keepdim=True) * torch.linalg.vector_norm(w, dim=1)
                        + (0 if b is None else b.abs()))
        if not bool(((got - ref).abs() <= bound).all()):
            return False
    return True


def install(model: nn.Module, cfg: QuantConfig, rejected: list[str]) -> tuple[int, list[str]]:
    """Replace the model's dense layers (see above) by QuantLinear in `cfg`'s format, in place; `rejected`: the
    paths of the candidate blocks moec left alone. Returns (how many layers are quantized, earlier compiles'
    included; "name: reason" for each dense nn.Linear left fp32)."""
    group = cfg.group_size if isinstance(cfg, Int4Experts) else 1
    skip, tied = cpu_linear.unused(model), _tied(model)
    for path in rejected:
        skip |= {id(m) for m in (resolve(model, path) if path else model).modules()}
    n, left = len(dense_layers(model)), []
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.Linear) or id(m) in skip or m.out_features == 1:
            continue
        if type(m) is not nn.Linear or ("forward" in m.__dict__ and not cpu_linear.installed(m)):
            left.append(f"{name}: {type(m).__name__} with a forward of its own")  # what it computes is not F.linear's
        elif m.in_features % group:
            left.append(f"{name}: {m.in_features} inputs are not a multiple of the group size {group}")
        elif id(m.weight) in tied:
            left.append(f"{name}: its weight is tied to another module's")
        elif m.weight.device.type != "cpu":
            left.append(f"{name}: on {m.weight.device.type} (moec's quantized layers run on CPU)")
        else:
            layer = QuantLinear(cfg, m, int8_activations=cfg.activations == "int8").train(m.training)
            layer.__dict__["_moec_dense"] = True
            if not _agrees(layer):
                left.append(f"{name}: moec's kernels did not match the reference on its weights")
                continue
            parent, _, attr = name.rpartition(".")
            setattr(resolve(model, parent) if parent else model, attr, layer)
            n += 1
    return n, left
