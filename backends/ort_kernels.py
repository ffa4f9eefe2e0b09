"""moec's kernels inside an ONNX Runtime session: a custom-op library (backend="onnxruntime").

    moec::Int4Experts(x [T, H] fp32, ids [T, k] int64, w [T, k] fp32,
                      q13 u8 [E, 2I, H/2], s13 [E, 2I, H/g] fp32, z13 u8 [E, 2I, H/g] or [0],
                      q2 u8 [E, H, I/2], s2 [E, H, I/g] fp32, z2 u8 [E, H, I/g] or [0];
                      int8_activations, gate_up, tiles) -> y [T, H] fp32
        y[t] = sum_j w[t, j] * W2[e] (silu(gate) * up)(W13[e] x[t]),  e = ids[t, j]

    moec::Int4MatMul(x [..., K] fp32, q u8 [N, K/2], s [N, K/g] fp32, z u8 [N, K/g] or absent; int8_activations, tiles)
        -> y [..., N] = x W^T,  W = (q - z) * s  (z 8 if absent): a dense layer's MatMulNBits (moec.export_dense)

Int4Experts: what moec::experts_int4 computes for gated SiLU experts without biases (Mixtral, Qwen-MoE, DeepSeek,
...), weights in moec's int4 format as stored (moec.quant), on the kernels of backends/cpu_native.py (the same C
source is built into this library): int8_activations, each GEMM input rounded to int8 per group of the weights
(moec_pack_a8) and int8 dot products; else fp32 rows. Routing stays in the graph (ids and w
are its outputs), so the op takes any router moec proves. The step: sort the (token, slot) pairs by expert, round
(or reorder) each token's row once, FC1 over (expert, chunk of output channels) work items, SiLU-and-multiply and
round each row, FC2 likewise, then each token's weighted sum in slot order, as moec's torch op
(backends/torch_backend.py `_native_int4`). Threads: ONNX Runtime's own intra-op pool
(OrtApi::KernelContext_ParallelFor), so the kernels and the session's other nodes share one pool. Int4MatMul runs
the same phases with one expert taking every row.

Why: measured against ORT's own ops on the same weights (docs/benchmarks.md), the experts op takes 10-20% less
time than QMoE at 64 tokens and the same at one; the dense MatMulNBits stream ~15 GB/s at one row where this
kernel reaches 20-27; whole decode 1.03-1.22x, prefill 1.1-1.3x.

The ABI: the onnxruntime wheel ships no C headers, so the declarations in csrc/ort_api.c are ours, from ONNX
Runtime's onnxruntime_c_api.h (API version 20 or later): OrtApi is a table of function pointers that only grows,
used here by index; registration checks one index against a known string (GetBuildInfoString) and fails (the session
refuses the library, moec keeps QMoE) if the table is not laid out as expected. OrtCustomOp version 16: the V2
callbacks, which return a status (shape errors reach the caller as an ORT error, not a crash).

tiles=1 (int8 activations, AVX-512 builds, every matrix's N a multiple of 4): q and s in the tile layout
(`ort_layouts.tiled`, the same shapes): a tile of 4 output channels is one sequential stream, each 32-input block of
its 4 channels one 64-byte load and each step's 16 scales another, where moec's layout makes 4 loads of 16 bytes
from 4 rows apart (`ort_layouts.tile_weights` lays out the session's file so: decode and prefill 1.11-1.15x on the
benchmark models, docs/benchmarks.md). The same numbers: the kernel sums the same products in the same order.
The scales in fp16 where every one of a matrix's is an fp16 number (moec.quant makes them so; the kernel widens them
exactly): a symmetric group of 32 weights is then 18 bytes, as llama.cpp's q4_0, not 20.

tiles=2 (weight-only, every matrix's N a multiple of 32): q, s and z in panels of 32 channels
(`ort_layouts.int4_panels`, the same shapes), run by the panel kernel (csrc/panels.c) a group at a time: the
products x (q - z) of a group summed (q - z is exact), then the sum times the group's scale added with one FMA, no
multiply a weight (whole-model decode 1.16-1.24x that of multiplying each weight by its scale, and nearer the exact
sums). At prefill a panel's part is widened (q - z in fp32) once into L1 and every row block reads it there: 512
tokens at 0.95-0.97x the fp32 model's (FMA-bound, the groups' scaling on top). Its own sums (the panels' order),
batch-invariant like every panel op.

Weights in panels: one GEMM over panels of 32 output channels, [ceil(N/32), K, 32]
(`ort_layouts.panels`), for fp32, bf16 and int8 (a scale per channel) weights:

    moec::Experts(x, ids, w, w13 [E, ceil(2I/32), H, 32], w2 [E, ceil(H/32), I, 32]; gate_up) -> y [T, H]
    moec::ExpertsBf16 (w13, w2 bf16), moec::ExpertsInt8(..., w13 i8, w2 i8, s13 [E, 2I], s2 [E, H])
    moec::Linear(x [..., K], w [ceil(n/32), K, 32]; n) -> y [..., n],  LinearBf16, LinearInt8(x, w i8, s [n])

the same phases as Int4Experts (Linear: one expert taking every row); each output the same sum of its K products
(even k, odd k, then the two) whatever the rows of the call. `ort_layouts.panel_weights` lays out the Experts nodes
of the session's file (export_dense.moec_fp32_matmuls the Linear ones), `ort_layouts.narrow_bf16` stores weights
that are all bf16 numbers in bf16. A build without AVX-512 runs the panels 8 channels a vector, one row at a time
over a whole panel (16 registers), with each channel's sums in the same order: the same bits.

ExpertsBf16 / LinearBf16 with bf16_rows=1 (`ort_layouts.round_rows`: a bf16 model's nodes, AVX512-BF16 builds, every
K even): each GEMM input row rounded to bf16 as the bf16 model's activations are (`bf16_row`), the weights in pairs
[ceil(N/32), K/2, 64] (`ort_layouts.pair_bf16`) and one vdpbf16ps per 2 inputs of 16 channels: the products exact,
fp32 sums. Against the fp32 rows on the same bf16 weights, one mix layer's experts at 64 and 512 tokens in 0.58x the
time (twice the multiply-adds an instruction); whole prefill at 512 tokens 1.5-2.1x (docs/benchmarks.md).

ExpertsInt8 / LinearInt8 with int8_activations=1 (Int8Experts(activations="int8"), AVX512-VNNI builds): each GEMM
input row rounded to int8 at one step (moec_pack_a8 with one group), the weights in panels of 16 channels
[ceil(N/16), K/4, 64] bytes (`ort_layouts.panels_a8`), 4 inputs of 16 channels a 64-byte load and one vpdpbusd a
row; exact int32 sums, then times the channel's scale and the row's step: the torch backend's numbers (to the bit
where it runs moec's kernels; its torch._int_mm path rounds its SiLU by an ulp apart). Against the weight-only
panels, one mix layer's experts (in the L3): 1.16x at one token, 2.1x at 64, 3.6x at 512 (docs/benchmarks.md).

The same library holds moec::CachedAttention (backends/ort_attention.py: its source is built in after these ops),
and export_dense merges the Int4MatMuls of one input (q/k/v) into one node.

The C source is in csrc/ (ort_api.c, panels.c, ort_experts.c, then ort_attention.c and ort_register.c), built
like cpu_native's library (the system C compiler, moec's cache directory) after its kernels (csrc/native.c);
`library()` is None where it cannot be (no compiler, no AVX2/FMA, MOEC_NATIVE=0, onnxruntime older than 1.20):
lower_onnx then keeps ORT's QMoE.
"""

from __future__ import annotations

import functools

import numpy as np

from moec.backends import c_source, register_once
from moec.log import log

DOMAIN = "moec"
OP = "Int4Experts"
EXPERTS = "Experts"  # fp32 weights in panels (ExpertsBf16: in bf16, narrow_bf16; ExpertsInt8: moec's Int8Experts)
FP32_MATMUL = "Linear"  # one fp32 matrix in panels: a dense layer's MatMul (moec.export_dense.moec_fp32_matmuls)
MATMUL = "Int4MatMul"  # one matrix: a dense layer's MatMulNBits (moec.export_dense.moec_matmuls)
GATE_UP = {"halves": 0, "halves_up_first": 1, "interleave": 2, "interleave_up_first": 3}  # moec.ir.GATE_UPS
MIN_ORT = (1, 20)

# C source: ONNX Runtime's ABI and helpers, the panel kernels, the ops (after cpu_native's kernels)
OP_SOURCE = c_source("ort_api.c", "panels.c", "ort_experts.c")

# the ops' tables and the entry point ORT calls, after every op's source (ort_attention.SOURCE included)
REGISTER_SOURCE = c_source("ort_register.c")


def _ort_version() -> tuple[int, ...]:
    import onnxruntime

    return tuple(int(p) for p in onnxruntime.__version__.split(".")[:2] if p.isdigit())


def build(flags: tuple[str, ...] = ()) -> str:
    """The custom-op library built for this CPU, with the compiler `flags` added (tests build narrower ones, e.g.
    -mno-avx512f: the AVX2 paths), unchecked; RuntimeError where it cannot be built."""
    from moec.backends import cpu_native, ort_attention

    source = cpu_native.SOURCE + OP_SOURCE + ort_attention.SOURCE + REGISTER_SOURCE
    return str(cpu_native.build(cpu_native.FLAGS + ("-fvisibility=hidden", *flags), source, "moec_ort"))


@functools.cache
def library() -> str | None:
    """The custom-op library's path, built and checked once per process (tiny sessions against moec's torch ops),
    or None where it cannot be (the reason logged once): the exports then keep ORT's QMoE, MatMulNBits and
    GroupQueryAttention."""
    from moec.backends import cpu_native, ort_attention

    if cpu_native.library() is None:  # no compiler or CPU support, or MOEC_NATIVE=0 (logged there)
        return None
    try:
        if _ort_version() < MIN_ORT:
            raise RuntimeError(f"onnxruntime {'.'.join(map(str, _ort_version()))} is older than "
                               f"{'.'.join(map(str, MIN_ORT))}")
        path = build()
        _self_test(path)
        ort_attention.self_test(path)
    except Exception as e:  # noqa: BLE001 (a failed build or check of an optional kernel: QMoE runs instead)
        log.warning("moec: moec's kernels for onnxruntime are not available (%s): backend='onnxruntime' runs ONNX "
                    "Runtime's own ops (QMoE, MatMulNBits, GroupQueryAttention)", e)
        return None
    return path


SCALES = "float or float16"  # register_schema: an int4 node's scales (fp16 in the tile layout: tile_weights)


def register_schema() -> None:
    """The ops' schemas, registered with onnx (onnxscript builds the nodes, onnx.checker checks them)."""
    import onnx
    from onnx.defs import OpSchema

    optional = OpSchema.FormalParameterOption.Optional
    a8 = OpSchema.Attribute("int8_activations", OpSchema.AttrType.INT, "GEMM inputs rounded to int8")
    tiles = OpSchema.Attribute("tiles", onnx.helper.make_attribute("tiles", 0),
                               "1: q and s in the tile layout (ort_layouts.tiled, int8 activations; s fp32 or fp16); "
                               "2: q, s and z in panels (ort_layouts.int4_panels, fp32 rows)")
    rows8 = OpSchema.Attribute("int8_activations", onnx.helper.make_attribute("int8_activations", 0),
                               "1: each input row rounded to int8 at one step, weights in panels_a8")
    rows16 = OpSchema.Attribute("bf16_rows", onnx.helper.make_attribute("bf16_rows", 0),
                                "1: each input row rounded to bf16, weights in pairs (pair_bf16)")
    for op, types, attrs in (
            (OP, {"x": "float", "ids": "int64", "w": "float", "q13": "uint8", "s13": SCALES, "z13": "uint8",
                  "q2": "uint8", "s2": SCALES, "z2": "uint8"},
             [a8, tiles, OpSchema.Attribute("gate_up", OpSchema.AttrType.INT, "FC1's row order, GATE_UP")]),
            (EXPERTS, {"x": "float", "ids": "int64", "w": "float", "w13": "float", "w2": "float"},
             [OpSchema.Attribute("gate_up", OpSchema.AttrType.INT, "FC1's row order, GATE_UP")]),
            (FP32_MATMUL, {"x": "float", "w": "float"},
             [OpSchema.Attribute("n", OpSchema.AttrType.INT, "output channels")]),
            (EXPERTS + "Bf16", {"x": "float", "ids": "int64", "w": "float", "w13": "bfloat16", "w2": "bfloat16"},
             [rows16, OpSchema.Attribute("gate_up", OpSchema.AttrType.INT, "FC1's row order, GATE_UP")]),
            (FP32_MATMUL + "Bf16", {"x": "float", "w": "bfloat16"},
             [rows16, OpSchema.Attribute("n", OpSchema.AttrType.INT, "output channels")]),
            (EXPERTS + "Int8", {"x": "float", "ids": "int64", "w": "float", "w13": "int8", "w2": "int8",
                                "s13": "float", "s2": "float"},
             [rows8, OpSchema.Attribute("gate_up", OpSchema.AttrType.INT, "FC1's row order, GATE_UP")]),
            (FP32_MATMUL + "Int8", {"x": "float", "w": "int8", "s": "float"},
             [rows8, OpSchema.Attribute("n", OpSchema.AttrType.INT, "output channels")]),
            (MATMUL, {"x": "float", "q": "uint8", "s": SCALES, "z": "uint8"}, [a8, tiles])):
        # the int4 scales: a type variable per input, fp32 or (tile layout) fp16
        register_once(OpSchema(
            op, DOMAIN, 1, "moec's kernels (backends/ort_kernels.py)",
            inputs=[OpSchema.FormalParameter(n, f"S_{n}" if t == SCALES else f"tensor({t})",
                                             **({"param_option": optional} if n[0] == "z" else {}))
                    for n, t in types.items()],
            outputs=[OpSchema.FormalParameter("y", "tensor(float)")], attributes=attrs,
            type_constraints=[(f"S_{n}", ["tensor(float)", "tensor(float16)"], "the int4 groups' scales")
                              for n, t in types.items() if t == SCALES]))


def node_args(x, ids, w, q13, s13, z13, q2, s2, z2, int8_activations: bool, gate_up: str) -> tuple[tuple, dict]:
    """Inputs and attributes of the node for moec::experts_int4's arguments (moec's layout: tile_weights may then
    lay the weights out in tiles)."""
    return (x, ids, w, q13, s13, z13, q2, s2, z2), {"int8_activations": int(int8_activations),
                                                    "gate_up": GATE_UP[gate_up], "tiles": 0}


def _self_test(path: str) -> None:
    """A session of one node (3 tokens, 4 experts, top-2, groups of 32 and 64, asymmetric FC1) against
    moec::experts_int4 on the same weights, in moec's layout, in tiles and in panels; RuntimeError where they
    differ."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import helper, numpy_helper

    from moec.backends import cpu_native
    from moec.backends.ort_layouts import half_if_exact, int4_panels, tiled
    from moec.backends.torch_backend import quantized_linear
    from moec.quant import Int4Experts, Int8Experts, quantize

    g = torch.Generator().manual_seed(0)
    T, H, I, E, k = 3, 64, 64, 4, 2
    x = torch.randn(T, H, generator=g)
    ids = torch.tensor([[0, 2], [2, 1], [3, 0]])
    w = torch.rand(T, k, generator=g)
    t13 = quantize(Int4Experts(32, symmetric=False), torch.randn(E, 2 * I, H, generator=g))
    t2 = quantize(Int4Experts(64), torch.randn(E, H, I, generator=g))
    inputs = {"x": x, "ids": ids, "w": w, "q13": t13["q"], "s13": t13["scale"], "z13": t13["zero"],
              "q2": t2["q"], "s2": t2["scale"]}
    # tiles: the layout's attribute; half: the tile layout's scales in fp16 (quantize makes them fp16 numbers)
    for a8, tiles, half in ([(True, 0, False)] + [(True, 1, False), (True, 1, True), (False, 2, False)]
                            * cpu_native.has_tiles() + [(False, 0, False), (False, 2, False)]):
        node = helper.make_node(OP, list(inputs), ["y"], domain=DOMAIN, int8_activations=int(a8), gate_up=2,
                                tiles=tiles)
        weights = dict(inputs)
        for m in ("13", "2") if tiles else ():
            q, s, z = (inputs[f"{n}{m}"].numpy() if f"{n}{m}" in inputs else None for n in "qsz")
            laid = list(int4_panels(q, s, z) if tiles == 2 else tiled(q, s))
            if half:
                laid[1] = half_if_exact(laid[1])
                if laid[1].dtype != np.float16:
                    raise RuntimeError("its self-test's scales are not fp16 numbers (moec.quant._fp16)")
            for n, a in zip("qsz", laid):
                if a is not None:
                    weights[f"{n}{m}"] = torch.from_numpy(a)
        graph = helper.make_graph(
            [node], "moec_self_test",
            [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(inputs[n].numpy().dtype), None)
             for n in ("x", "ids", "w")], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
            [numpy_helper.from_array(weights[n].numpy(), n) for n in list(inputs)[3:]])
        model = helper.make_model(graph, ir_version=10,
                                  opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
        so = ort.SessionOptions()
        so.register_custom_ops_library(path)
        so.intra_op_num_threads = 2
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {n: inputs[n].numpy() for n in ("x", "ids", "w")})[0])
        want = torch.ops.moec.experts_int4(x, ids, w, t13["q"], t13["scale"], t13["zero"], None, t2["q"],
                                           t2["scale"], None, None, "silu", True, 1.0, 0.0, False, "interleave", a8)
        err = ((got - want).norm() / want.norm()).item()
        if not err < 1e-5:
            raise RuntimeError(f"its self-test differs from moec::experts_int4 (int8 activations: {a8}, tiles: "
                               f"{tiles}, fp16 scales: {half}; relative error {err:.2e})")
        got = matmul_session(path, weights["q13"][1], weights["s13"][1], weights["z13"][1], a8, tiles=tiles).run(
            None, {"x": x.numpy()})[0]
        want = quantized_linear(x, (t13["q"][1:2], t13["scale"][1:2], t13["zero"][1:2]), a8)
        err = ((torch.from_numpy(got) - want).norm() / want.norm()).item()
        if not err < 1e-5:
            raise RuntimeError(f"its self-test differs from moec's quantized linear layer (int8 activations: {a8}, "
                               f"tiles: {tiles}, fp16 scales: {half}; relative error {err:.2e})")
    # fp32 and bf16 experts: 2I = 80 and H = 48 end in part-filled panels, 7 rows on expert 0
    for dtype in (torch.float32, torch.bfloat16):
        H, I = 48, 40
        x, ids = torch.randn(7, H, generator=g), torch.tensor([[0, 2], [2, 0], [0, 1], [0, 3], [0, 2], [0, 1], [0, 3]])
        w = torch.rand(7, k, generator=g)
        w13, w2 = (torch.randn(shape, generator=g).to(dtype).float() for shape in ((E, 2 * I, H), (E, H, I)))
        got = torch.from_numpy(experts_session(path, w13.numpy(), w2.numpy(), GATE_UP["interleave"]).run(
            None, {"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()})[0])
        want = torch.ops.moec.experts(x, ids, w, w13, None, w2, None, "silu", True, 1.0, 0.0, False, "interleave")
        err = ((got - want).norm() / want.norm()).item()
        if not err < 1e-5:
            raise RuntimeError(f"its self-test differs from moec::experts ({dtype} weights; relative error {err:.2e})")
        if dtype == torch.bfloat16 and cpu_native.has_bf16():  # bf16 rows: FC2's input rounded too (~3e-3)
            got = torch.from_numpy(experts_session(path, w13.numpy(), w2.numpy(), GATE_UP["interleave"],
                                                   bf16_rows=True).run(
                None, {"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()})[0])
            want = torch.ops.moec.experts(x.bfloat16().float(), ids, w, w13, None, w2, None, "silu", True, 1.0, 0.0,
                                          False, "interleave")
            err = ((got - want).norm() / want.norm()).item()
            if not err < 2e-2:
                raise RuntimeError(f"its self-test differs from moec::experts (bf16 rows; relative error {err:.2e})")
    # int8 weights, a scale per channel; with int8 rows (VNNI builds) H and I multiples of 32: the same numbers
    for a8 in [False] + [True] * cpu_native.has_vnni512():
        if a8:
            H, I = 64, 96
            x, w13, w2 = (torch.randn(shape, generator=g) for shape in ((7, H), (E, 2 * I, H), (E, H, I)))
        t13, t2 = quantize(Int8Experts(), w13), quantize(Int8Experts(), w2)
        got = torch.from_numpy(experts_session(
            path, t13["q"].numpy(), t2["q"].numpy(), GATE_UP["interleave"], s13=t13["scale"].numpy(),
            s2=t2["scale"].numpy(), a8=a8).run(None, {"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()})[0])
        want = torch.ops.moec.experts_int8(x, ids, w, t13["q"], t13["scale"], None, t2["q"], t2["scale"], None, "silu",
                                           True, 1.0, 0.0, False, "interleave", a8)
        err = ((got - want).norm() / want.norm()).item()
        if not err < 1e-5:
            raise RuntimeError(f"its self-test differs from moec::experts_int8 (int8 activations: {a8}; relative "
                               f"error {err:.2e})")


def experts_session(path: str, w13: np.ndarray, w2: np.ndarray, gate_up: int, options=None, s13=None, s2=None,
                    a8: bool = False, bf16_rows: bool = False):
    """A session of one moec::Experts node with fp32 weights w13 [E, 2I, H] (rows in `gate_up` order) and w2
    [E, H, I], laid out by panel_weights (and narrow_bf16: ExpertsBf16 where they are bf16 numbers, with bf16 rows
    if `bf16_rows`); with the
    channels' scales s13 [E, 2I] and s2 [E, H], moec::ExpertsInt8 on int8 w13 and w2 (a8: int8 rows). Inputs "x",
    "ids", "w"."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from moec.backends.ort_layouts import narrow_bf16, panel_weights, round_rows

    int8 = s13 is not None
    weights = {"w13": w13, "w2": w2, **({"s13": s13, "s2": s2} if int8 else {})}
    node = helper.make_node(EXPERTS + "Int8" * int8, ["x", "ids", "w", *weights], ["y"], domain=DOMAIN,
                            gate_up=gate_up, **({"int8_activations": 1} if a8 else {}))
    graph = helper.make_graph(
        [node], "moec_experts",
        [helper.make_tensor_value_info(n, t, None) for n, t in (("x", onnx.TensorProto.FLOAT),
                                                                 ("ids", onnx.TensorProto.INT64),
                                                                 ("w", onnx.TensorProto.FLOAT))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.int8 if n[0] == "w" and int8 else np.float32), n)
         for n, v in weights.items()])
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    panel_weights(model)
    narrow_bf16(model)
    if bf16_rows:
        round_rows(model)
    so = options or ort.SessionOptions()
    so.register_custom_ops_library(path)
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def matmul_session(path: str, q, s, z, a8: bool, options=None, tiles: int = 0):
    """A session of one Int4MatMul node with these weights ([N, K/2], [N, G], [N, G] or None; tiles 1: q and s
    `tiled`, 2: q, s and z in `int4_panels`), input "x"."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(t.numpy(), n) for n, t in (("q", q), ("s", s), ("z", z)) if t is not None]
    node = helper.make_node(MATMUL, ["x", "q", "s", "z" if z is not None else ""], ["y"], domain=DOMAIN,
                            int8_activations=int(a8), tiles=int(tiles))
    graph = helper.make_graph([node], "moec_matmul", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    so = options or ort.SessionOptions()
    so.register_custom_ops_library(path)
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
