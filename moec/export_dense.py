"""export_onnx(..., dense=Int4Experts(g) | Int8Experts()): the exported file's dense MatMuls as MatMulNBits.

    y[.., N] = MatMul(x[.., K], W[K, N] initializer)   ->   y = com.microsoft::MatMulNBits(x, Q, scales)
    y[T, N] = Gemm(x[T, K], W[N, K], b?, transB=1)      ->   the same, + b   (a Linear on token rows: shared experts)

for the attention projections, the lm_head and the dense / shared MLPs: every MatMul whose second input is a
constant [K, N] with K a multiple of the block size, except the routers (N = a block's expert count: quantized
router weights would change which experts run) and one-column gates (N = 1, the shared experts' sigmoid gate).
Gemms of that kind are first written as MatMul (+ Add): ORT's quantizer takes MatMuls only.
int4 nodes hold moec.quant's numbers, the config's grid in blocks of its group size (the torch backend's dense=
weights: symmetric, signed_scale or with zero points, fp16-rounded steps; ONNX Runtime's own quantizer has one
grid of 16 levels with fp32 steps); int8 ones are ONNX Runtime's quantizer's (onnxruntime.quantization.
matmul_nbits_quantizer), per block of 32 (Int8Experts). With activations="int8" (either config) the nodes take
accuracy_level=4 (int8 activations, int8 dot products).
For backend="onnxruntime" (moec's kernels in the session), `moec_matmuls` then moves the int4 ones to moec's op.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moec.quant import Int4Experts, Int8Experts


def _quantizable(dims, block: int, router_widths: set[int]) -> bool:
    """A constant [K, N] weight to quantize (see the module docstring)."""
    return len(dims) == 2 and dims[0] % block == 0 and dims[1] not in router_widths | {1}


def dense_matmuls(proto: onnx.ModelProto, block: int, router_widths: set[int]) -> list[str]:
    """Names of the MatMul nodes to quantize (see the module docstring)."""
    consts = {t.name: t.dims for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node
            if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")
            and _quantizable(consts.get(n.input[1], ()), block, router_widths)]


def left_fp32(proto: onnx.ModelProto, cfg: Int4Experts | Int8Experts, router_widths: set[int]) -> list[str]:
    """The file's MatMuls, Gemms and ORT's FusedMatMuls on a constant weight that dense= left in fp32, each as
    "module op node: why" (the routers and one-column gates are left by design and not listed): a weight the
    embedding reads too (a tied lm_head, as the torch backend's dense= leaves it), a batched weight (e.g. an MLA
    attention's kv_b_proj, absorbed into one matrix per head, which the torch backend's dense= quantizes as one
    nn.Linear), or a K the format's blocks do not divide."""
    consts = {t.name: list(t.dims) for t in proto.graph.initializer}
    gathered = {n.input[0] for n in proto.graph.node if n.op_type == "Gather"}  # embedding tables
    block = cfg.group_size if isinstance(cfg, Int4Experts) else 32
    left = []
    for n in proto.graph.node:
        if (n.op_type, n.domain or "") not in MATMULS or len(n.input) < 2 or n.input[1] not in consts:
            continue
        dims = consts[n.input[1]]
        trans = n.op_type != "MatMul" and any(a.name == "transB" and a.i for a in n.attribute)
        K, N = (dims[::-1] if trans else dims) if len(dims) == 2 else (None, None)
        if N in router_widths | {1}:
            continue
        why = ("its weight is the embedding's too (tied)" if n.input[1] in gathered
               else f"its weight is {dims}, one matrix per head (dense= takes [K, N] weights)" if K is None
               else f"K {K} is not a multiple of {block}" if K % block else "left as it was")
        left.append(f"{_module(n)} {n.op_type} {n.name}: {why}")
    return left


MATMULS = {("MatMul", ""), ("MatMul", "ai.onnx"), ("Gemm", ""), ("Gemm", "ai.onnx"), ("FusedMatMul", "com.microsoft")}


def _module(node) -> str:
    """The model's module a node was traced in (torch.onnx's name scopes, less the export wrapper's "model."), or
    "a"."""
    import ast

    scopes = next((ast.literal_eval(p.value) for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), [])
    return scopes[-2].removeprefix("model.") if len(scopes) > 2 else "a"


def gemms_as_matmuls(proto: onnx.ModelProto, block: int, router_widths: set[int]) -> None:
    """Gemm(x, W, b?) with a constant W of a quantizable [K, N] (transB: W is [N, K]), alpha = beta = 1 and no transA
    -> MatMul(x, W [K, N]) (+ Add(b)), in place."""
    inits = {t.name: t for t in proto.graph.initializer}
    nodes, replaced = [], set()
    for n in proto.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        w = inits.get(n.input[1]) if n.op_type == "Gemm" else None
        if w is None or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or \
                not _quantizable(list(reversed(w.dims)) if a.get("transB", 0) else w.dims, block, router_widths):
            nodes.append(n)
            continue
        weight = numpy_helper.to_array(w)
        kn = numpy_helper.from_array(np.ascontiguousarray(weight.T if a.get("transB", 0) else weight),
                                     f"{w.name}_kn")
        proto.graph.initializer.append(kn)
        replaced.add(w.name)
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        product = f"{n.output[0]}_matmul" if bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], kn.name], [product], name=f"{n.name}_matmul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [n.output[0]], name=f"{n.name}_bias"))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    for t in [t for t in proto.graph.initializer if t.name in replaced and t.name not in used]:
        proto.graph.initializer.remove(t)


def quantize_dense(path: str, cfg: Int4Experts | Int8Experts, router_widths: set[int], external_data: bool) -> int:
    """Rewrite the file at `path` in place; return how many MatMuls became MatMulNBits."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    block = cfg.group_size if isinstance(cfg, Int4Experts) else 32
    proto = onnx.load(path)
    gemms_as_matmuls(proto, block, router_widths)
    names = dense_matmuls(proto, block, router_widths)
    if not names:
        return 0
    int8 = cfg.activations == "int8"  # int8 dot products, as for the experts
    if isinstance(cfg, Int4Experts):
        _int4_nodes(proto, set(names), cfg, int8)
        _save(proto, path, external_data, "com.microsoft")
        return len(names)
    # nodes_to_include adds to the op types it quantizes (every MatMul): the others are excluded by name
    chosen = set(names)
    others = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in chosen]
    quantizer = MatMulNBitsQuantizer(proto, bits=cfg.bits, block_size=block, accuracy_level=4 if int8 else None,
                                     is_symmetric=getattr(cfg, "symmetric", True), nodes_to_include=names,
                                     nodes_to_exclude=others)
    ort_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level, ort_log.level = ort_log.level, logging.WARNING  # it logs a line per node at INFO
    try:
        quantizer.process()
    finally:
        ort_log.setLevel(level)
    quantizer.model.save_model_to_file(path, use_external_data_format=external_data)
    return sum(n.op_type == "MatMulNBits" for n in onnx.load(path, load_external_data=False).graph.node)


def _int4_nodes(proto: onnx.ModelProto, names: set[str], cfg: Int4Experts, int8: bool) -> None:
    """Each MatMul of `names` -> MatMulNBits on moec.quant's int4 numbers of its weight, in place:

        MatMul(x, W [K, N])  ->  MatMulNBits(x, B [N, K/g, g/2] u8, scales [N*K/g][, zero_points [N, ceil(K/g / 2)]])

    moec's q [N, K/2] is already B's nibbles (the even input low), its steps the scales (in the weight's dtype: exact,
    they are fp16 numbers), its zeros two to a byte; a symmetric grid's zero is MatMulNBits' default 8."""
    import torch

    from moec.quant import quantize

    inits = {t.name: t for t in proto.graph.initializer}
    nodes, g = [], cfg.group_size
    for n in proto.graph.node:
        if n.name not in names:
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])  # [K, N]
        (K, N), G = w.shape, w.shape[0] // g
        t = quantize(cfg, torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32))[None])
        arrays = {"q4": t["q"][0].reshape(N, G, g // 2).numpy(),
                  "scales": t["scale"][0].reshape(-1).numpy().astype(w.dtype)}
        if "zero" in t:
            z = np.pad(t["zero"][0].numpy(), ((0, 0), (0, G % 2)))  # [N, G] -> [N, ceil(G/2)], two to a byte
            arrays["zero_points"] = z[:, 0::2] | (z[:, 1::2] << 4)
        for k, v in arrays.items():
            proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(v), f"{n.name}_{k}"))
        nodes.append(helper.make_node("MatMulNBits", [n.input[0], *(f"{n.name}_{k}" for k in arrays)], list(n.output),
                                      name=f"{n.name}_Q4", domain="com.microsoft", K=K, N=N, bits=4, block_size=g,
                                      **({"accuracy_level": 4} if int8 else {})))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)  # (the fp weights no node reads now are dropped as the file is saved)


def moec_matmuls(path: str, external_data: bool) -> int:
    """backend="onnxruntime" with moec's kernels: each int4 MatMulNBits of the file at `path` (fp32, groups of 32, 64
    or 128, no g_idx or bias) becomes moec::Int4MatMul (backends/ort_kernels.py), the same numbers in moec's layout:

        MatMulNBits(x, B [N, K/g, g/2] u8, scales [N*K/g], zero_points? [N, ceil(K/g / 2)] u8 nibbles)
            -> moec::Int4MatMul(x, q [N, K/2] u8, s [N, K/g], z? [N, K/g] u8)     # w = (q - z) * s, z 8 if absent

    int8_activations where the node had accuracy_level 4. Nodes that read the same input then become one
    (_merge_siblings). Rewritten in place; returns how many MatMulNBits were converted."""
    from moec.backends import ort_kernels

    proto = onnx.load(path)
    inits = {t.name: t for t in proto.graph.initializer}
    count = 0
    for n in proto.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        tensors = [inits.get(i) for i in n.input[1:]]
        if (n.op_type != "MatMulNBits" or a.get("bits") != 4 or a.get("block_size") not in (32, 64, 128)
                or len(n.input) > 4 or None in tensors or a["K"] % a["block_size"]
                or tensors[1].data_type != onnx.TensorProto.FLOAT
                or (len(tensors) > 2 and tensors[2].data_type != onnx.TensorProto.UINT8)):
            continue
        N, K, G = a["N"], a["K"], a["K"] // a["block_size"]
        arrays = {"q": numpy_helper.to_array(tensors[0]).reshape(N, K // 2),
                  "s": numpy_helper.to_array(tensors[1]).reshape(N, G)}
        if len(tensors) > 2:
            zp = numpy_helper.to_array(tensors[2]).reshape(N, -1)
            arrays["z"] = np.stack([zp & 15, zp >> 4], -1).reshape(N, -1)[:, :G].astype(np.uint8)
        names = []
        for k, v in arrays.items():
            proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(v), f"{n.name}_moec_{k}"))
            names.append(f"{n.name}_moec_{k}")
        new = helper.make_node(ort_kernels.MATMUL, [n.input[0], *names], list(n.output), name=n.name,
                               domain=ort_kernels.DOMAIN, int8_activations=int(a.get("accuracy_level") == 4), tiles=0)
        n.CopyFrom(new)
        count += 1
    if count:
        _merge_siblings(proto)
        _save(proto, path, external_data)
    return count


def moec_fp32_matmuls(path: str, router_widths: set[int], external_data: bool, int8: bool = False,
                      a8: bool = False) -> int:
    """backend="onnxruntime" with moec's kernels, fp32 models: the dense MatMuls (as `dense_matmuls` picks them, any
    K; Gemms of that kind first written as MatMul) become moec::Linear (backends/ort_kernels.py: the weights in
    panels, one sequential stream a 32-channel panel), those of one input as one node and a Split:

        y_i = MatMul(x, W_i [K, N_i])   ->   y = moec::Linear(x, panels(cat_i W_i^T); n = sum N_i)
                                              y_1, .., y_n = Split(y, [N_1, .., N_n], axis=-1)

    int8 (dense=Int8Experts(), weight-only): moec::LinearInt8(x, panels(q), s), W^T quantized as moec.quant does (a
    scale per channel: the torch backend's dense= numbers). Each channel's K products are summed the same way
    (even k, odd k, then the two) whatever node it lands in: merging changes no number. a8 (dense=Int8Experts(
    activations="int8"), an AVX512-VNNI build): the same weights in `panels_a8` and int8_activations=1, each row
    rounded to int8 at one step (the torch backend's numbers, exact int32 sums), where every such MatMul's K is a
    multiple of 32 and at most 65536; else the file is left as it was (0: export_onnx then writes MatMulNBits,
    which round per 32 inputs). Rewritten in place; returns how many MatMuls were converted."""
    import torch

    from moec.quant import Int8Experts, quantize
    from moec.backends import ort_kernels, ort_layouts

    proto = onnx.load(path)
    gemms_as_matmuls(proto, 1, router_widths)
    inits = {t.name: t for t in proto.graph.initializer}
    dense, groups, merges = set(dense_matmuls(proto, 1, router_widths)), {}, []
    for n in proto.graph.node:
        if n.name in dense and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT:
            groups.setdefault(n.input[0], []).append(n)
    if a8 and any(inits[n.input[1]].dims[0] % 32 or inits[n.input[1]].dims[0] > 65536 for g in groups.values()
                  for n in g):
        return 0  # int8 rows take K a multiple of 32 (int32 sums below 2^31): all or none, said by the caller
    for x, nodes in list(groups.items()):
        name = (nodes[0].name or nodes[0].output[0]) + "_moec"
        if any(f"{name}_{k}" in inits for k in ("w", "s", "split")):
            del groups[x]  # its names are taken: left as it was
            continue
        w = np.concatenate([numpy_helper.to_array(inits[n.input[1]]) for n in nodes], axis=1).T  # [sum N_i, K]
        weights = {"w": w}
        if int8:
            t = quantize(Int8Experts(), torch.from_numpy(np.ascontiguousarray(w))[None])
            weights = {"w": t["q"][0].numpy(), "s": t["scale"][0].numpy()}
        weights["w"] = (ort_layouts.panels_a8 if a8 else ort_layouts.panels)(weights["w"][None])[0]
        proto.graph.initializer.extend(numpy_helper.from_array(v, f"{name}_{k}") for k, v in weights.items())
        merged = [helper.make_node(ort_kernels.FP32_MATMUL + "Int8" * int8, [x, *(f"{name}_{k}" for k in weights)],
                                   [f"{name}_y"] if len(nodes) > 1 else list(nodes[0].output), name=name,
                                   domain=ort_kernels.DOMAIN, n=w.shape[0], **({"int8_activations": 1} if a8 else {}))]
        if len(nodes) > 1:
            sizes = numpy_helper.from_array(np.array([inits[n.input[1]].dims[1] for n in nodes], np.int64),
                                            f"{name}_split")
            proto.graph.initializer.append(sizes)
            merged.append(helper.make_node("Split", [f"{name}_y", sizes.name], [n.output[0] for n in nodes],
                                           name=f"{name}_split", axis=-1))
        merges.append(([n.output[0] for n in nodes], merged))
    _splice(proto, merges)
    count = sum(map(len, groups.values()))
    if count:
        _save(proto, path, external_data)
    return count


def _save(proto, path: str, external_data: bool, domain: str | None = None) -> None:
    """The rewritten file: initializers no node or output reads dropped, the nodes' `domain` (default moec's)
    imported."""
    from moec.backends import ort_kernels

    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    for t in [t for t in proto.graph.initializer if t.name not in used]:
        proto.graph.initializer.remove(t)
    domain = domain or ort_kernels.DOMAIN
    if not any(o.domain == domain for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(domain, 1))
    onnx.save(proto, path, save_as_external_data=external_data)


def _splice(proto, merges: list[tuple[list[str], list]]) -> None:
    """For each (members, merged): the nodes whose first output is in members out of the graph, merged where the
    first of them was (their inputs are ready there). One pass over the graph."""
    group = {o: i for i, (members, _) in enumerate(merges) for o in members}
    kept, placed = [], set()
    for n in proto.graph.node:
        i = group.get(n.output[0])
        if i is None:
            kept.append(onnx.NodeProto.FromString(n.SerializeToString()))
        elif i not in placed:
            placed.add(i)
            kept.extend(merges[i][1])
    del proto.graph.node[:]
    proto.graph.node.extend(kept)


def _merge_siblings(proto) -> None:
    """moec::Int4MatMul nodes reading the same input with the same numerics and group count (zero points in all or
    none) become one node over their stacked rows and a Split, e.g. q/k/v, or a shared expert's gate/up:

        y_i = Int4MatMul(x, q_i [N_i, K/2], s_i [N_i, G], z_i?)  ->  y = Int4MatMul(x, cat q_i, cat s_i, cat z_i?)
                                                                     y_1, .., y_n = Split(y, [N_1, .., N_n], axis=-1)

    Each output channel is computed from its own row as before (bit for bit where each member's rows are a multiple
    of 4; else a tile of 4 channels may straddle two members and round differently, ~1e-6); the input is rounded
    once and the rows run in one parallel region instead of n (one token: ~2 us a layer on q/k/v)."""
    from moec.backends import ort_kernels

    inits = {t.name: t for t in proto.graph.initializer}
    groups: dict[tuple, list] = {}
    merges = []
    for n in proto.graph.node:
        if n.domain == ort_kernels.DOMAIN and n.op_type == ort_kernels.MATMUL:
            a8 = next(helper.get_attribute_value(x) for x in n.attribute if x.name == "int8_activations")
            zero = len(n.input) > 3 and bool(n.input[3])
            groups.setdefault((n.input[0], a8, zero, tuple(inits[n.input[2]].dims[1:])), []).append(n)
    for (x, a8, zero, _), nodes in groups.items():
        if len(nodes) < 2:
            continue
        name = (nodes[0].name or nodes[0].output[0]) + "_merged"
        if any(k in inits for k in (f"{name}_q", f"{name}_s", f"{name}_z", f"{name}_split")):
            continue  # its names are taken: left as it was
        parts = range(3 if zero else 2)
        stacked = [np.concatenate([numpy_helper.to_array(inits[n.input[1 + i]]) for n in nodes]) for i in parts]
        names = [f"{name}_{k}" for k in "qsz"[:len(stacked)]]
        proto.graph.initializer.extend(numpy_helper.from_array(t, k) for t, k in zip(stacked, names))
        sizes = numpy_helper.from_array(np.array([inits[n.input[1]].dims[0] for n in nodes], np.int64), f"{name}_split")
        proto.graph.initializer.append(sizes)
        merged = [helper.make_node(ort_kernels.MATMUL, [x, *names], [f"{name}_y"], name=name, domain=ort_kernels.DOMAIN,
                                   int8_activations=a8, tiles=0),
                  helper.make_node("Split", [f"{name}_y", sizes.name], [o for n in nodes for o in n.output],
                                   name=f"{name}_split", axis=-1)]
        merges.append(([n.output[0] for n in nodes], merged))
    _splice(proto, merges)
