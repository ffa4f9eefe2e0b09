"""moec::CausalBias: HF's causal mask over a padding mask as one node of the KV-cache export, which
moec::CachedAttention takes as its mask and export_onnx otherwise expands into ONNX's own ops.

    bias = moec::CausalBias(attention_mask [>= B, T] bool, batch_size B, q_length S, kv_length T; to)  # [B, 1, S, T]
        bias[b, 0, s, t] = 0 if attention_mask[b, t] and t <= T - S + s, else the minimum of type `to`
        (B, S, T: int64 scalars, T the past's positions and the new ones'; an error where the mask has fewer than B
        rows or is not T wide: HF pads a narrower mask and cuts a wider one, which a caller's mask that does not
        fit the cache must not get)

moec.export_gqa's mask function makes it (the torch op moec::causal_bias) where HF asks for its plain causal mask
(`causal_mask_function`) over a 2-D padding mask whose queries are the last S of the T positions, and checks it
equal to HF's eager mask on the example; any other mask (sliding window, chunks, packed sequences, a 4-D mask the
caller built) is HF's eager mask as before. torch.onnx traced HF's mask as ~33 small nodes (Shape, Range, Expand,
GatherND, And, Where ...) that each decode step ran after the weights had gone through the caches (the time is in
docs/benchmarks.md).

`take`: a moec::CachedAttention whose bias is such a node reads the 2-D mask instead. Its kernel is causal whatever
the bias (query s never reads a key after position T - S + s), so the padding row of each batch row is all it
needs (it refuses a mask that is not [B, T]). `expand`: every node left (another reader, a file for another
runtime) becomes ONNX's ops:

    rows = Reshape(Gather(mask, Range(0, B)), [B, T], allowzero=1)     # [B, T]: index or size errors where it is not
    pos = Range(0, T); q = Range(T - S, T)                                                 # [T], [S]
    bias = Where(And(LessOrEqual(pos, Unsqueeze(q, 1)), Unsqueeze(rows, [1, 2])), 0, min)  # [B, 1, S, T]
"""

from __future__ import annotations

from moec.backends import register_once

OP = "CausalBias"
DOMAIN = "moec"


def register_schema() -> None:
    """moec::CausalBias's schema, registered with onnx (onnxscript builds the node, onnx.checker checks it)."""
    import onnx
    from onnx.defs import OpSchema

    schema = OpSchema(
        OP, DOMAIN, 1, "HF's causal mask over a padding mask, additive (backends/ort_mask.py)",
        inputs=[OpSchema.FormalParameter("attention_mask", "tensor(bool)"),
                *(OpSchema.FormalParameter(n, "tensor(int64)") for n in ("batch_size", "q_length", "kv_length"))],
        outputs=[OpSchema.FormalParameter("bias", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"], "")],
        attributes=[OpSchema.Attribute("to", OpSchema.AttrType.INT, "the bias's element type")])

    def infer(ctx):  # the type `to`, rank 4 (shape inference keeps what the exporter knew of the dims)
        out = onnx.TypeProto()
        out.tensor_type.elem_type = ctx.get_attribute("to").i
        out.tensor_type.shape.dim.extend([onnx.TensorShapeProto.Dimension() for _ in range(4)])
        ctx.set_output_type(0, out)

    schema.set_type_and_shape_inference_function(infer)
    register_once(schema)


def _masks(graph) -> dict:
    """output name -> its moec::CausalBias node"""
    return {n.output[0]: n for n in graph.node if n.op_type == OP and n.domain == DOMAIN}


def take(proto) -> int:
    """Each moec::CachedAttention of `proto` (in place) whose bias is a moec::CausalBias's reads that node's mask as
    its input `mask` instead; the CausalBias nodes nothing reads now go. Returns how many attention nodes."""
    from moec.backends import ort_attention

    graph, count = proto.graph, 0
    masks = _masks(graph)
    for n in graph.node:
        if n.op_type != ort_attention.OP or n.domain != DOMAIN or len(n.input) < 6 or \
                n.input[5] not in masks:
            continue
        inputs = list(n.input) + [""] * (9 - len(n.input))
        mask = masks[inputs[5]].input[0]
        inputs[5] = ""
        del n.input[:]
        n.input.extend([*inputs[:9], mask])
        count += 1
    ort_attention.prune(graph, set(masks))
    return count


def expand(proto) -> int:
    """Every moec::CausalBias node of `proto` (in place) as ONNX's own ops (the module docstring), where it was.
    Returns how many."""
    import torch
    from onnx import TensorProto, helper

    graph = proto.graph
    nodes = list(_masks(graph).values())
    minimum = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
               TensorProto.BFLOAT16: torch.bfloat16, TensorProto.DOUBLE: torch.float64}
    for node in nodes:
        (mask, batch, length, width), (bias,) = node.input, node.output
        to = next(a.i for a in node.attribute if a.name == "to")
        x = f"{bias}_moec_causal"  # the names of the values made here

        def const(name, type_, values, dims=()):
            return helper.make_node("Constant", [], [f"{x}_{name}"],
                                    value=helper.make_tensor(f"{x}_{name}", type_, list(dims), values))

        ops = [const("zero", TensorProto.INT64, [0]), const("one", TensorProto.INT64, [1]),
               const("axis0", TensorProto.INT64, [0], [1]), const("axis1", TensorProto.INT64, [1], [1]),
               const("axes12", TensorProto.INT64, [1, 2], [2]),
               const("open", to, [0.0]), const("shut", to, [torch.finfo(minimum[to]).min]),
               helper.make_node("Range", [f"{x}_zero", batch, f"{x}_one"], [f"{x}_b"]),  # [B]
               helper.make_node("Gather", [mask, f"{x}_b"], [f"{x}_first"], axis=0,  # [B, W]: B rows or an error
                                name=f"{bias}: the attention mask has a row for each row of the batch"),
               helper.make_node("Unsqueeze", [batch, f"{x}_axis0"], [f"{x}_B1"]),
               helper.make_node("Unsqueeze", [width, f"{x}_axis0"], [f"{x}_T1"]),
               helper.make_node("Concat", [f"{x}_B1", f"{x}_T1"], [f"{x}_BT"], axis=0),
               helper.make_node("Reshape", [f"{x}_first", f"{x}_BT"], [f"{x}_rows"], allowzero=1,  # [B, T] or error
                                name=f"{bias}: the attention mask is as wide as the past and the new tokens"),
               helper.make_node("Sub", [width, length], [f"{x}_P"]),  # the past: T - S
               helper.make_node("Range", [f"{x}_zero", width, f"{x}_one"], [f"{x}_pos"]),  # [T]
               helper.make_node("Range", [f"{x}_P", width, f"{x}_one"], [f"{x}_q"]),  # [S]
               helper.make_node("Unsqueeze", [f"{x}_q", f"{x}_axis1"], [f"{x}_qs"]),  # [S, 1]
               helper.make_node("LessOrEqual", [f"{x}_pos", f"{x}_qs"], [f"{x}_causal"]),  # [S, T]
               helper.make_node("Unsqueeze", [f"{x}_rows", f"{x}_axes12"], [f"{x}_rows4"]),  # [B, 1, 1, T]
               helper.make_node("And", [f"{x}_causal", f"{x}_rows4"], [f"{x}_allowed"]),  # [B, 1, S, T]
               helper.make_node("Where", [f"{x}_allowed", f"{x}_open", f"{x}_shut"], [bias])]
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for i, op in enumerate(ops):
            graph.node.insert(at + i, op)
    return len(nodes)
