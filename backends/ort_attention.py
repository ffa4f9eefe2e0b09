"""moec::CachedAttention: the KV-cache export's attention on moec's kernel inside ONNX Runtime (backend="onnxruntime", CPU).

    moec::CachedAttention(q [B, S, H*D], k [B, S, KVH*D], v [B, S, KVH*D], past_k [B, KVH, P, D], past_v,
                    bias [B|1, 1, S, T] additive, sinks [H], cos [B|1, S, D], sin, mask [B, T] bool optional
                    (instead of the bias: 0 where set, -inf where not, for every query);
                    num_heads H, kv_num_heads KVH, scale, rotary_half h optional)
        -> out [B, S, H*D], present_k [B, KVH, T, D], present_v          (T = P + S)
        q, k = per head x*cos + cat(-x[h:], x[:h])*sin   where rotary_half is set (HF's rotate_half: h = D/2)
        K, V = cat(past_k, k), cat(past_v, v)                 # query head h reads kv head h // (H / KVH)
        without present outputs (the cache kept in place, `in_place`): past_k, past_v [B, KVH, R >= T, D] whose
        first P = T - S rows (T: the bias's or mask's) are the past; k and v are written into rows P..T-1 and K, V
        read there
        out = softmax([q K^T * scale + bias | sinks])[..., :T] V   # causal: query s never reads a key t > P + s;
                                                                   # 0 where every such key is masked

what moec::ort_gqa computes (backends/onnx_backend.py), the op moec.export_gqa proves each layer's attention
against and exports as com.microsoft::GroupQueryAttention. `rewrite` turns those nodes into this op in the files
backend="onnxruntime" runs on CPU with moec's kernel library (fp32 models; export_onnx/export_genai files keep
ORT's op), and `fuse_rotary` gives it the rotary that torch.onnx exported as ~10 small nodes for each of q and k
(Reshape, Transpose, two Slices, Neg, Concat, two Muls, Add, Transpose, Reshape): the 4-layer demo model's
decode step ran 190 nodes after ORT's optimizations, 122 with the rotary inside (the step's time is in
docs/benchmarks.md with the session's other changes; this one was not timed alone). `in_place` then keeps the cache
in place: the session's callers give each past room and the step hands back the logits alone.

Why: at decode ORT's GroupQueryAttention took ~22 us a layer for one token over 61 positions (a one-node session:
31 us, this op's 16, an Identity's 8.6), for work of a few microseconds. This kernel:
per (batch, kv head, query) the query heads that share the kv head together: fp32 logits with 8-lane dot products,
8 keys at a time (each key's row read from L1 by every head, the 8 sums reduced at once as a single one would be;
with AVX-512 two heads a register, one in each half), the rows 32 keys on prefetched (at decode the cache comes
from DRAM: the experts' weights pass through the L3 between two steps), the softmax with a vectorised exp
(correctly rounded: ort_kernels' exp8), the weighted sum of values in registers (up to 64 channels (AVX-512; 16
with AVX2) of up to 4 heads per pass over the values, each value row read once for the heads); the past copied into
the present once. The vector widths change which lanes run together, not any number's sequence of operations: for
head sizes that are multiples of 8 the outputs are the same bits with or without AVX-512 (up to which NaN comes out
where NaNs meet: an FMA's operand order), and the same as before these paths (a review compared 4,300 cases and
exp8 on every float). Other head sizes take a scalar tail that gcc compiles differently for each build. A query's numbers do not depend on the other queries of the call (decode and prefill agree
to the bit). Work is split over ORT's pool (KernelContext_ParallelFor) only when it is large enough to
pay for waking a thread (prefill).
Positions whose bias is -inf or below -FLT_MAX/2 (HF's masks use the float minimum) are skipped: their probability
is exactly 0 in fp32 for finite keys (a NaN or inf key or value there, which the reference turns into NaN, is not
read). A query with every causal position so masked (a row of padding) gets zeros, as ORT's op gives (and so HF's
sdpa attention's tokens; eager attention spreads such a row evenly instead: export_gqa's proof skips these rows).
"""

from __future__ import annotations

from moec.backends import c_source, register_once

OP = "CachedAttention"

# C source, built into backends/ort_kernels.py's library after its ABI and helpers (error, get_input, parallel)
SOURCE = c_source("ort_attention.c")


def register_schema() -> None:
    """moec::CachedAttention's schema, registered with onnx (onnx.checker checks the rewritten file)."""
    from onnx.defs import OpSchema

    optional = OpSchema.FormalParameterOption.Optional
    register_once(OpSchema(
        OP, "moec", 1, "moec's attention kernel (backends/ort_attention.py)",
        inputs=[OpSchema.FormalParameter(n, "tensor(bool)" if n == "mask" else "tensor(float)",
                                         **({"param_option": optional} if i >= 5 else {}))
                for i, n in enumerate(("q", "k", "v", "past_k", "past_v", "bias", "sinks", "cos", "sin", "mask"))],
        outputs=[OpSchema.FormalParameter(n, "tensor(float)", **({"param_option": optional} if i else {}))
                 for i, n in enumerate(("out", "present_k", "present_v"))],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "query heads"),
                    OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, "key/value heads"),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "the logits' scale"),
                    OpSchema.Attribute("rotary_half", OpSchema.AttrType.INT, "q and k rotated first (cos, sin)",
                                       required=False)]))


# GroupQueryAttention attributes the op computes (with the value each must have where the op has no such thing)
_ATTRIBUTES = {"num_heads": None, "kv_num_heads": None, "scale": None, "do_rotary": 0, "rotary_interleaved": 0,
               "local_window_size": -1, "softcap": 0.0, "smooth_softmax": 0, "qk_output": 0}


def _why_not(node, a: dict) -> str | None:
    """Why a GroupQueryAttention node is not moec::ort_gqa's computation as this op takes it (None: it is)."""
    inputs = list(node.input) + [""] * (12 - len(node.input))
    if not all(inputs[:5]) or not inputs[10]:
        return "no separate k/v, past or attention bias"
    if any(inputs[7:10]) or any(inputs[12:]) or any(node.output[3:]):
        return "rotary caches, position ids, quantized or normalized q/k, or attention probabilities as an output"
    other = {k: v for k, v in a.items() if k not in _ATTRIBUTES or (_ATTRIBUTES[k] is not None and v != _ATTRIBUTES[k])}
    if other or "scale" not in a:
        return f"attributes {sorted(other) or ['no scale']}"
    return None


def rewrite(proto) -> int:
    """Each com.microsoft::GroupQueryAttention of `proto` (an fp32 onnx.ModelProto, in place) that computes
    moec::ort_gqa (separate q/k/v, past, additive bias, optional sinks; no rotary, window or softcap) becomes
    moec::CachedAttention; the nodes that only fed the removed seqlens_k/total_sequence_length inputs go too. Returns
    how many."""
    from onnx import helper

    register_schema()
    count, dropped = 0, set()
    for n in proto.graph.node:
        if n.op_type != "GroupQueryAttention" or n.domain != "com.microsoft":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        if _why_not(n, a) is not None:
            continue
        inputs = list(n.input) + [""] * (12 - len(n.input))
        dropped.update(inputs[5:7])
        new = helper.make_node(OP, [*inputs[:5], inputs[10], inputs[11]], list(n.output)[:3], name=n.name,
                               domain="moec", num_heads=a["num_heads"], kv_num_heads=a["kv_num_heads"],
                               scale=float(a["scale"]))
        n.CopyFrom(new)
        count += 1
    if count:
        prune(proto.graph, dropped - {""})
        if not any(o.domain == "moec" for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid("moec", 1))
    return count


def fuse_rotary(proto) -> int:
    """Each moec::CachedAttention whose q and k come out of HF's rotate-half rotary as torch.onnx exports it
    takes the rotation in (inputs cos, sin; attribute rotary_half = h), and the ~20 small nodes that computed it go:

        x = Transpose(Reshape(lin [B, S, H*D], [B, S, H, D]), [0, 2, 1, 3])                 # [B, H, S, D]
        rot = Add(Mul(x, Unsqueeze(cos [B, S, D], 1)),
                  Mul(Concat(Neg(Slice(x, h:)), Slice(x, :h), axis=-1), Unsqueeze(sin, 1)))     # h = D/2
        q = Reshape(Transpose(rot, [0, 2, 1, 3]), [B, S, H*D])     ->     CachedAttention(lin, ..., cos, sin)

    (either operand order of Add and Mul; the op computes this for any 0 < h < D). What the graph cannot say
    statically, the op checks when it runs (cos and sin [B or 1, S, D]); the session is then checked against the
    eager model like every session. Returns how many nodes."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    if any(a.HasField("g") or a.graphs for n in graph.node for a in n.attribute):
        return 0  # readers inside subgraphs: not counted here

    def index():
        prod = {o: n for n in graph.node for o in n.output}
        readers: dict[str, int] = {o.name: 1 for o in graph.output}
        for n in graph.node:
            for i in n.input:
                readers[i] = readers.get(i, 0) + 1
        return prod, readers

    prod, readers = index()
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.data_location != 1}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def node(name, op, n_readers=1):
        n = prod.get(name)
        return n if n is not None and n.op_type == op and n.domain in ("", "ai.onnx") and \
            readers.get(name, 0) == n_readers else None

    def const(name):
        v = consts.get(name)
        return None if v is None else [int(i) for i in v.reshape(-1)]

    def transposed(n):
        return n is not None and [int(p) for a in n.attribute if a.name == "perm" for p in a.ints] == [0, 2, 1, 3]

    def unsqueezed(name):  # Unsqueeze(t, [1]) -> t
        n = prod.get(name)
        if n is None or n.op_type != "Unsqueeze" or len(n.input) != 2 or const(n.input[1]) != [1]:
            return None
        return n.input[0]

    def half_of(sl, x):  # Slice(x, a, b, axes [-1] or [3], steps 1) -> (a, b)
        if sl is None or sl.input[0] != x or len(sl.input) < 4:
            return None
        starts, ends, axes = const(sl.input[1]), const(sl.input[2]), const(sl.input[3])
        steps = const(sl.input[4]) if len(sl.input) > 4 and sl.input[4] else [1]
        if None in (starts, ends, axes, steps) or axes not in ([-1], [3]) or steps != [1]:
            return None
        return starts[0], ends[0]

    def match(name):
        r1 = node(name, "Reshape")
        t1 = r1 and node(r1.input[0], "Transpose")
        add = transposed(t1) and node(t1.input[0], "Add")
        if not add:
            return None
        muls = [node(i, "Mul") for i in add.input]
        if None in muls:
            return None
        for plain, turned in (muls, muls[::-1]):
            for ci in (0, 1):
                cat = node(turned.input[ci], "Concat")
                sin = unsqueezed(turned.input[1 - ci])
                if cat is None or sin is None or len(cat.input) != 2 or \
                        [a.i for a in cat.attribute if a.name == "axis"] not in ([-1], [3]):
                    continue
                neg = node(cat.input[0], "Neg")
                hi = neg and node(neg.input[0], "Slice")
                x = hi.input[0] if hi else None
                lo = node(cat.input[1], "Slice")
                for xi in (0, 1):
                    cos = unsqueezed(plain.input[1 - xi])
                    if plain.input[xi] != x or cos is None:
                        continue
                    a, b = half_of(lo, x) or (None, None), half_of(hi, x) or (None, None)
                    if a[0] != 0 or a[1] is None or a[1] <= 0 or b[0] != a[1] or b[1] < 2 ** 31 or readers.get(x) != 3:
                        continue
                    t0 = node(x, "Transpose", 3)
                    r0 = transposed(t0) and node(t0.input[0], "Reshape")
                    if r0:
                        return r0.input[0], cos, sin, a[1]
        return None

    count, before = 0, _used(graph)
    for n in graph.node:
        if n.op_type != OP or n.domain != "moec" or any(a.name == "rotary_half" for a in n.attribute):
            continue
        q, k = match(n.input[0]), match(n.input[1])
        if q is None or k is None or q[1:] != k[1:]:
            continue
        dropped = {n.input[0], n.input[1]}
        inputs = list(n.input) + [""] * (7 - len(n.input))
        inputs[0], inputs[1] = q[0], k[0]
        del n.input[:]
        n.input.extend([*inputs[:7], q[1], q[2]])
        n.attribute.append(helper.make_attribute("rotary_half", q[3]))
        count += 1
        prune(graph, dropped)
        prod, readers = index()
    gone = before - _used(graph)  # the Slices' constants
    for t in [t for t in graph.initializer if t.name in gone]:
        graph.initializer.remove(t)
    return count


def in_place(proto) -> int:
    """The KV cache kept in place: where every past input of `proto` (the KV-cache session's file) is a
    moec::CachedAttention's past_k or past_v and is otherwise only measured by Shape nodes, each such node loses its
    present outputs and writes its new keys and values into its past instead (the caller gives each past room for
    the new rows; the past length P is now the mask's width minus the new tokens'):

        out, present_k, present_v = CachedAttention(q, k, v, past_k [B, KVH, P, D], past_v, ...)
        ->  out = CachedAttention(q, k, v, past_k [B, KVH, R >= P + S, D], past_v, ...)    # rows P..P+S-1 written
        Shape(past_k)[2] = P   ->   Shape(attention_mask)[1] - Shape(input_ids)[1]

    A decode step then hands no cache back to Python and copies no past: mix bf16 after a 1024-token prompt decoded
    1.09x as fast, after 16 tokens within the noise (docs/benchmarks.md). Returns how many nodes (0: left as it
    was)."""
    from onnx import helper

    graph = proto.graph
    names = {i.name for i in graph.input}
    attention = [n for n in graph.node if n.op_type == OP and n.domain == "moec"]
    read = [p for n in attention for p in n.input[3:5]]
    pasts, presents = set(read), {p for n in attention for p in n.output[1:3]}
    plain = {"input_ids", "attention_mask", "position_ids"}
    if (not attention or "input_ids" not in names or "attention_mask" not in names or names - plain != pasts
            or len(read) != len(pasts)  # a past two nodes read (layers sharing a cache) would get both's rows
            or {o.name for o in graph.output} != presents | {graph.output[0].name} or graph.output[0].name in presents
            or any(a.HasField("g") or a.graphs for n in graph.node for a in n.attribute)):
        return 0  # other state (recurrent layers, another attention) or an odd graph: as it was
    shapes = []
    for n in graph.node:
        reads = [i for i in n.input if i in pasts]
        if reads and not (n.op_type == OP and n.domain == "moec" and list(n.input).count(reads[0]) == 1
                          and set(reads) <= set(n.input[3:5])) and n.op_type != "Shape":
            return 0
        if any(o in presents for o in n.output) and not (n.op_type == OP and n.domain == "moec"):
            return 0
        if reads and n.op_type == "Shape":
            shapes.append(n)
    if any(i in presents for n in graph.node for i in n.input):
        return 0
    length = "moec_past_length"  # [1]: the mask's width minus the new tokens'
    nodes = [helper.make_node("Shape", ["attention_mask"], [length + "_total"], start=1, end=2),
             helper.make_node("Shape", ["input_ids"], [length + "_new"], start=1, end=2),
             helper.make_node("Sub", [length + "_total", length + "_new"], [length])]
    for n in shapes:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        start, end = a.get("start", 0), a.get("end", 4)
        start, end = (min(max(d + 4 if d < 0 else d, 0), 4) for d in (start, end))
        parts = []
        for d in range(start, end):
            parts.append(length if d == 2 else f"{n.output[0]}_dim{d}")
            if d != 2:
                nodes.append(helper.make_node("Shape", [n.input[0]], [parts[-1]], start=d, end=d + 1))
        nodes.append(helper.make_node("Concat", parts, [n.output[0]], axis=0) if parts else
                     helper.make_node("Constant", [], [n.output[0]], value_ints=[]))
        graph.node.remove(n)
    for n in attention:
        del n.output[1:]
    for o in [o for o in graph.output if o.name in presents]:
        graph.output.remove(o)
    for i, n in enumerate(nodes):
        graph.node.insert(i, n)
    return len(attention)


def _used(graph) -> set[str]:
    """The names the graph's nodes read, inside their subgraphs too, and its outputs."""
    names = {o.name for o in graph.output}
    for n in graph.node:
        names.update(n.input)
        for attr in n.attribute:
            for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= _used(g)
    return names


def prune(graph, dropped: set[str]) -> None:
    """Drop the nodes that made the `dropped` values (e.g. seqlens_k, total_sequence_length) and that nothing reads
    now, and so on up the chain that fed them."""
    while dropped:
        used = _used(graph)
        dead = [n for n in graph.node if any(o in dropped for o in n.output) and not any(o in used for o in n.output)]
        dropped = {i for n in dead for i in n.input if i}  # checked against the next pass's readers
        for n in dead:
            graph.node.remove(n)


def rotate_half(x, cos, sin, heads: int):
    """HF's apply_rotary_pos_emb on rows x [B, S, heads*D] with cos, sin [B or 1, S, D]: what rotary_dim computes."""
    import torch

    B, S, _ = x.shape
    x = x.reshape(B, S, heads, -1)
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), -1)
    return (x * cos[:, :, None] + turned * sin[:, :, None]).reshape(B, S, -1)


def self_test(path: str) -> None:
    """A one-node session against moec::ort_gqa (2 rows, 3 new tokens after 5, 8 heads over 2, a padded row,
    a fully masked row, sinks and none, q and k rotated first; a long row that takes the threaded path), and each
    case again with the cache kept in place (the same output to the bit, the presents' rows written into the pasts);
    RuntimeError where they differ."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import helper

    import moec.backends.onnx_backend  # noqa: F401 (registers moec::ort_gqa's torch implementation)

    g = torch.Generator().manual_seed(0)
    for B, S, P, H, KVH, D, sinks, rotary in ((2, 3, 5, 8, 2, 16, True, False), (2, 3, 5, 4, 4, 8, False, True),
                                              (1, 40, 300, 8, 2, 64, False, False)):
        T = P + S
        x = {"q": torch.randn(B, S, H * D, generator=g) * 3, "k": torch.randn(B, S, KVH * D, generator=g),
             "v": torch.randn(B, S, KVH * D, generator=g), "past_k": torch.randn(B, KVH, P, D, generator=g),
             "past_v": torch.randn(B, KVH, P, D, generator=g), "bias": torch.zeros(B, 1, S, T)}
        x["bias"][..., P + 1:] = torch.finfo(torch.float32).min  # causal-like, and row 1's first 2 positions padded
        if B > 1:
            x["bias"][1, ..., :2] = float("-inf")
            x["bias"][1, 0, 0] = torch.finfo(torch.float32).min  # a fully masked query row
        x["sinks"] = torch.randn(H, generator=g) if sinks else None
        if rotary:
            angle = torch.randn(B, S, D // 2, generator=g) * 3
            x["cos"], x["sin"] = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        node = helper.make_node(OP, [n if t is not None else "" for n, t in x.items()],
                                ["out", "present_k", "present_v"], domain="moec", num_heads=H, kv_num_heads=KVH,
                                scale=D ** -0.5, **({"rotary_half": D // 2} if rotary else {}))
        x = {n: t for n, t in x.items() if t is not None}

        def run(outputs, feeds, inputs=tuple(node.input)):
            graph = helper.make_graph([helper.make_node(OP, list(inputs), outputs, domain="moec")],
                                      "moec_attention_self_test",
                                      [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), None)
                                       for n, a in feeds.items()],
                                      [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs])
            graph.node[0].attribute.extend(node.attribute)
            model = helper.make_model(graph, ir_version=10,
                                      opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("moec", 1)])
            so = ort.SessionOptions()
            so.register_custom_ops_library(path)
            so.intra_op_num_threads = 2
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return [torch.from_numpy(o) for o in sess.run(None, feeds)]

        feeds = {n: t.numpy() for n, t in x.items()}
        got = run(["out", "present_k", "present_v"], feeds)
        for name in ("past_k", "past_v"):  # the cache kept in place: pasts with room (2 rows more), written into
            feeds[name] = np.concatenate([feeds[name], np.zeros((B, KVH, S + 2, D), np.float32)], 2)
        kept = run(["out"], feeds)[0]
        if not (torch.equal(kept, got[0]) and all(np.array_equal(feeds[n][:, :, :T], p.numpy())
                                                  for n, p in zip(("past_k", "past_v"), got[1:]))):
            raise RuntimeError(f"moec::CachedAttention's self-test: with the cache kept in place, the output or the "
                               f"rows written differ from those with presents (B={B} S={S} P={P})")
        # a mask [B, T] instead of the bias: the same bits as the bias that is 0 where it is set, -inf where not
        mask = np.ones((B, T), bool)
        mask[-1, :2] = False
        rows = {**{n: a for n, a in feeds.items() if n != "bias"}, "mask": mask}
        masked = [run(["out"], rows, [*("" if n == "bias" else n for n in node.input), *[""] * (9 - len(node.input)),
                                      "mask"])[0],
                  run(["out"], {**feeds, "bias": np.where(mask, 0, -np.inf).astype(np.float32)[:, None, None]
                                .repeat(S, 2)})[0]]
        if not torch.equal(*masked):
            raise RuntimeError(f"moec::CachedAttention's self-test: with a mask, the output differs from that with "
                               f"the bias it stands for (B={B} S={S} P={P})")
        q, k = x["q"], x["k"]
        if rotary:
            q, k = rotate_half(q, x["cos"], x["sin"], H), rotate_half(k, x["cos"], x["sin"], KVH)
        want = torch.ops.moec.ort_gqa(q, k, x["v"], x["past_k"], x["past_v"], x["bias"], x.get("sinks"), H, KVH,
                                      D ** -0.5)
        for name, a, b in zip(("out", "present_k", "present_v"), got, want):
            err = ((a - b).abs().max() / b.abs().max()).item()
            if not err < 1e-5:
                raise RuntimeError(f"moec::CachedAttention's self-test differs from moec::ort_gqa ({name}, B={B} S={S} "
                                   f"P={P} rotary={rotary}: relative error {err:.2e})")
