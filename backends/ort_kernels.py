"""moec's kernels inside an ONNX Runtime session: a custom-op library (backend="onnxruntime").

    moec::Int4Experts(x [T, H] fp32, ids [T, k] int64, w [T, k] fp32,
                      q13 u8 [E, 2I, H/2], s13 [E, 2I, H/g] fp32, z13 u8 [E, 2I, H/g] or [0],
                      q2 u8 [E, H, I/2], s2 [E, H, I/g] fp32, z2 u8 [E, H, I/g] or [0];
                      int8_activations, gate_up, tiles) -> y [T, H] fp32
        y[t] = sum_j w[t, j] * W2[e] (silu(gate) * up)(W13[e] x[t]),  e = ids[t, j]

    moec::Int4MatMul(x [..., K] fp32, q u8 [N, K/2], s [N, K/g] fp32, z u8 [N, K/g] or absent; int8_activations, tiles)
        -> y [..., N] = x W^T,  W = (q - z) * s  (z 8 if absent): a dense layer's MatMulNBits (moec.export_dense)

Int4Experts: what moec::experts_int4 computes for gated SiLU experts without biases (Mixtral, Qwen-MoE, DeepSeek, ...), weights
in moec's int4 format as stored (moec.quant), on the kernels of backends/cpu_native.py (the same C source is built
into this library): int8_activations, each GEMM input rounded to int8 per group of the weights (moec_pack_a8) and
int8 dot products; else fp32 rows (AVX-512 builds only). Routing stays in the graph (ids and w are its outputs),
so the op takes any router moec proves. The step: sort the (token, slot) pairs by expert, round (or reorder) each
token's row once, FC1 over (expert, chunk of output channels) work items, SiLU-and-multiply and round each row,
FC2 likewise, then each token's weighted sum in slot order, as moec's torch op (backends/torch_backend.py
`_native_int4`). Threads: ONNX Runtime's own intra-op pool (OrtApi::KernelContext_ParallelFor), so the kernels
and the session's other nodes share one pool. Int4MatMul runs the same phases with one expert taking every row.

Why: measured against ORT's own ops on the same weights (docs/benchmarks.md), the experts op takes 10-20% less
time than QMoE at 64 tokens and the same at one; the dense MatMulNBits stream ~15 GB/s at one row where this
kernel reaches 20-27; whole decode 1.03-1.22x, prefill 1.1-1.3x.

The ABI: the onnxruntime wheel ships no C headers, so the declarations in csrc/ort_api.c are ours, from ONNX
Runtime's onnxruntime_c_api.h (API version 20 or later): OrtApi is a table of function pointers that only grows, used here
by index; registration checks one index against a known string (GetBuildInfoString) and fails (the session
refuses the library, moec keeps QMoE) if the table is not laid out as expected. OrtCustomOp version 16: the V2
callbacks, which return a status (shape errors reach the caller as an ORT error, not a crash).

tiles=1 (int8 activations, AVX-512 builds, every matrix's N a multiple of 4): q and s in the tile layout (`tiled`,
the same shapes): a tile of 4 output channels is one sequential stream, each 32-input block of its 4 channels one
64-byte load and each step's 16 scales another, where moec's layout makes 4 loads of 16 bytes from 4 rows apart
(`tile_weights` lays out the session's file so: decode and prefill 1.11-1.15x on the benchmark models,
docs/benchmarks.md). The same numbers: the kernel sums the same products in the same order.

tiles=2 (weight-only, AVX-512 builds, every matrix's N a multiple of 32): q, s and z in panels of 32 channels
(`int4_panels`, the same shapes), run by the fp32 panel kernel (csrc/panels.c), each weight made (q - z) * s as it is read:
at prefill a panel's part is widened once into L1 and every row block reads it there, so 512 tokens take the fp32
experts' time (the old per-channel kernel unpacked each weight again per 4 rows: 1.65x that on a mix layer),
decode as before or faster. Its own sums (the panels' order), batch-invariant like every panel op.

Weights in panels (AVX-512 builds): one GEMM over panels of 32 output channels, [ceil(N/32), K, 32] (`panels`),
for fp32, bf16 and int8 (a scale per channel) weights:

    moec::Experts(x, ids, w, w13 [E, ceil(2I/32), H, 32], w2 [E, ceil(H/32), I, 32]; gate_up) -> y [T, H]
    moec::ExpertsBf16 (w13, w2 bf16), moec::ExpertsInt8(..., w13 i8, w2 i8, s13 [E, 2I], s2 [E, H])
    moec::Linear(x [..., K], w [ceil(n/32), K, 32]; n) -> y [..., n],  LinearBf16, LinearInt8(x, w i8, s [n])

the same phases as Int4Experts (Linear: one expert taking every row); each output the same sum of its K
products (even k, odd k, then the two) whatever the rows of the call. `panel_weights` lays out the Experts nodes
of the session's file (export_dense.moec_fp32_matmuls the Linear ones), `narrow_bf16` stores weights that are all
bf16 numbers in bf16.

ExpertsBf16 / LinearBf16 with bf16_rows=1 (`round_rows`: a bf16 model's nodes, AVX512-BF16 builds, every K even):
each GEMM input row rounded to bf16 as the bf16 model's activations are (`bf16_row`), the weights in pairs
[ceil(N/32), K/2, 64] (`pair_bf16`) and one vdpbf16ps per 2 inputs of 16 channels: the products exact, fp32 sums. Against the fp32 rows on
the same bf16 weights, one mix layer's experts at 64 and 512 tokens in 0.58x the time (twice the multiply-adds an
instruction); whole prefill at 512 tokens 1.5-2.1x (docs/benchmarks.md).

ExpertsInt8 / LinearInt8 with int8_activations=1 (Int8Experts(activations="int8"), AVX512-VNNI builds): each GEMM
input row rounded to int8 at one step (moec_pack_a8 with one group), the weights in panels of 16 channels
[ceil(N/16), K/4, 64] bytes (`panels_a8`), 4 inputs of 16 channels a 64-byte load and one vpdpbusd a row; exact
int32 sums, then times the channel's scale and the row's step: the torch backend's numbers (to the bit where it
runs moec's kernels; its torch._int_mm path rounds its SiLU by an ulp apart). Against the weight-only panels, one
mix layer's experts (in the L3): 1.16x at one token, 2.1x at 64, 3.6x at 512 (docs/benchmarks.md).

The same library holds moec::CachedAttention (backends/ort_attention.py: its source is built in after these ops),
and export_dense merges the Int4MatMuls of one input (q/k/v) into one node.

The C source is in csrc/ (ort_api.c, panels.c, ort_experts.c, then ort_attention.c and ort_register.c), built
like cpu_native's library (the system C compiler, moec's cache directory) after its kernels (csrc/native.c);
`library()` is None where it cannot be (no compiler, no AVX2/FMA, MOEC_NATIVE=0, onnxruntime older than 1.20):
lower_onnx then keeps ORT's QMoE.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from moec.backends import c_source
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


def register_schema() -> None:
    """The ops' schemas, registered with onnx (onnxscript builds the nodes, onnx.checker checks them)."""
    import onnx
    from onnx.defs import OpSchema

    optional = OpSchema.FormalParameterOption.Optional
    a8 = OpSchema.Attribute("int8_activations", OpSchema.AttrType.INT, "GEMM inputs rounded to int8")
    tiles = OpSchema.Attribute("tiles", onnx.helper.make_attribute("tiles", 0),
                               "1: q and s in the tile layout (ort_kernels.tiled, int8 activations); 2: q, s and z "
                               "in panels (ort_kernels.int4_panels, fp32 rows)")
    rows8 = OpSchema.Attribute("int8_activations", onnx.helper.make_attribute("int8_activations", 0),
                               "1: each input row rounded to int8 at one step, weights in panels_a8")
    rows16 = OpSchema.Attribute("bf16_rows", onnx.helper.make_attribute("bf16_rows", 0),
                                "1: each input row rounded to bf16, weights in pairs (pair_bf16)")
    for op, types, attrs in (
            (OP, {"x": "float", "ids": "int64", "w": "float", "q13": "uint8", "s13": "float", "z13": "uint8",
                  "q2": "uint8", "s2": "float", "z2": "uint8"},
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
            (MATMUL, {"x": "float", "q": "uint8", "s": "float", "z": "uint8"}, [a8, tiles])):
        if onnx.defs.has(op, DOMAIN):
            continue
        onnx.defs.register_schema(OpSchema(
            op, DOMAIN, 1, "moec's kernels (backends/ort_kernels.py)",
            inputs=[OpSchema.FormalParameter(n, f"tensor({t})", **({"param_option": optional} if n[0] == "z" else {}))
                    for n, t in types.items()],
            outputs=[OpSchema.FormalParameter("y", "tensor(float)")], attributes=attrs))


def node_args(x, ids, w, q13, s13, z13, q2, s2, z2, int8_activations: bool, gate_up: str) -> tuple[tuple, dict]:
    """Inputs and attributes of the node for moec::experts_int4's arguments (moec's layout: tile_weights may then
    lay the weights out in tiles)."""
    return (x, ids, w, q13, s13, z13, q2, s2, z2), {"int8_activations": int(int8_activations),
                                                    "gate_up": GATE_UP[gate_up], "tiles": 0}


def round_rows(proto, base_dir: str = "") -> int:
    """Each moec::ExpertsBf16 / LinearBf16 node (narrow_bf16's layout) whose every K is even takes bf16_rows=1: its
    input rows rounded to bf16 as a bf16 model's own are, its weights re-laid in pairs (`pair_bf16`, vdpbf16ps;
    AVX512-BF16 builds: cpu_native.has_bf16). Returns how many nodes."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    weights = {EXPERTS + "Bf16": (3, 4), FP32_MATMUL + "Bf16": (1,)}
    done, count = {}, 0
    for n in proto.graph.node:
        if (n.domain != DOMAIN or n.op_type not in weights or any(a.name == "bf16_rows" for a in n.attribute)
                or any(inits[n.input[i]].dims[-2] % 2 for i in weights[n.op_type])):  # panels [..., K, 32]
            continue
        for name in (n.input[i] for i in weights[n.op_type] if n.input[i] not in done):
            a = numpy_helper.to_array(inits[name], base_dir).view(np.uint16)
            a = pair_bf16(a.reshape(*a.shape[:-1], 16, 2).swapaxes(-1, -2).reshape(a.shape))  # channels in order
            t = onnx.TensorProto(name=f"{name}_pairs", data_type=onnx.TensorProto.BFLOAT16, dims=a.shape,
                                 raw_data=a.astype("<u2").tobytes())
            proto.graph.initializer.append(t)
            done[name] = t.name
        for i in weights[n.op_type]:
            n.input[i] = done[n.input[i]]
        n.attribute.append(helper.make_attribute("bf16_rows", 1))
        count += 1
    used = {i for n in proto.graph.node for i in n.input} | {v.name for v in (*proto.graph.input, *proto.graph.output)}
    for t in [t for t in proto.graph.initializer if t.name in set(done) - used]:
        proto.graph.initializer.remove(t)
    return count


def round_rows_file(path: str) -> int:
    """round_rows on the ONNX file at `path`, in place (as lay_out_file: weights in external data are read only where
    re-laid, their new copies written beside the model); how many nodes."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    count = round_rows(proto, os.path.dirname(path))
    if count:
        onnx.save(proto, path, save_as_external_data=any(t.data_location == onnx.TensorProto.EXTERNAL
                                                         for t in proto.graph.initializer))
    return count


def panels(w: np.ndarray) -> np.ndarray:
    """fp32 weights [E, N, K] -> panels [E, ceil(N/32), K, 32] (moec_f32_panels): panel p holds channels
    32p..32p+31, zeros past N."""
    E, N, K = w.shape
    w = np.pad(w, ((0, 0), (0, -N % 32), (0, 0)))
    return np.ascontiguousarray(w.reshape(E, -1, 32, K).swapaxes(-1, -2))


def pair_bf16(p: np.ndarray) -> np.ndarray:
    """Panels [..., K, 32] (K even) -> the bf16-row kernel's pairs [..., K/2, 64] (moec_pairs): each channel's
    weights of inputs 2i and 2i + 1 side by side, channel c at 2c (what one vdpbf16ps lane reads)."""
    *lead, K, _ = p.shape
    return np.ascontiguousarray(p.reshape(*lead, K // 2, 2, 32).swapaxes(-1, -2)).reshape(*lead, K // 2, 64)


def panels_a8(q: np.ndarray) -> np.ndarray:
    """int8 weights [E, N, K] (K a multiple of 32) -> the int8-row kernel's panels [E, ceil(N/16), K/4, 64]
    (moec_panels_a8): panel p holds channels 16p..16p+15 as [K/4][16 channels][4 inputs] bytes of q + 128 (128 past
    N), each 32 inputs in moec_pack_a8's order (the evens, then the odds); int8 arrays holding those bytes."""
    E, N, K = q.shape
    if K % 32:
        raise ValueError(f"moec: panels_a8 takes K a multiple of 32 (int8 rows of moec_pack_a8), not {K}")
    u = np.pad(q.astype(np.int16) + 128, ((0, 0), (0, -N % 16), (0, 0)), constant_values=128).astype(np.uint8)
    u = u.reshape(E, -1, 16, K // 32, 16, 2).swapaxes(-1, -2)  # [E, P, 16, K/32, 2, 16]: per 32, evens then odds
    u = u.reshape(E, -1, 16, K // 4, 4).swapaxes(2, 3)  # [E, P, K/4, 16, 4]
    return np.ascontiguousarray(u).reshape(E, -1, K // 4, 64).view(np.int8)


def halves(w13: np.ndarray, gate_up: int) -> np.ndarray:
    """FC1 [E, 2I, K] with rows in `gate_up` order (GATE_UP's numbers) -> gate rows then up rows."""
    I = w13.shape[1] // 2
    a, b = (w13[:, 0::2], w13[:, 1::2]) if gate_up & 2 else (w13[:, :I], w13[:, I:])
    return np.concatenate((b, a) if gate_up & 1 else (a, b), axis=1)


def tiled(q: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q [..., N, K/2] and s [..., N, G] in moec's int4 format (N a multiple of 4) -> the same in the tile layout
    (moec_int4_tiles), same shapes: per tile of 4 channels, q as [K/32][4][16 bytes] and s as [G/4][4][4] then
    [4][G % 4]."""
    *lead, N, half = q.shape
    G, full = s.shape[-1], s.shape[-1] // 4 * 4
    q = q.reshape(*lead, N // 4, 4, half // 16, 16).swapaxes(-3, -2)
    s = s.reshape(*lead, N // 4, 4, G)
    steps = s[..., :full].reshape(*lead, N // 4, 4, full // 4, 4).swapaxes(-3, -2)
    s = np.concatenate([steps.reshape(*lead, N // 4, -1), s[..., full:].reshape(*lead, N // 4, -1)], -1)
    return np.ascontiguousarray(q).reshape(*lead, N, half), np.ascontiguousarray(s).reshape(*lead, N, G)


def int4_panels(q: np.ndarray, s: np.ndarray, z: np.ndarray | None):
    """q [..., N, K/2], s [..., N, G], z [..., N, G] or None in moec's int4 format (N a multiple of 32) -> the same
    in panels (moec_panels' int4 weights), same shapes: per panel of 32 channels, q as [K][16 bytes] (channel c's
    nibble for k in the low half of byte c, channel c + 16's in the high half), s and z as [G][32]."""
    *lead, N, half = q.shape
    G = s.shape[-1]
    if N % 32:
        raise ValueError(f"moec: int4_panels takes N a multiple of 32 (panels of 32 channels), not {N}")
    n = np.stack([q & 15, q >> 4], -1).reshape(*lead, N // 32, 2, 16, 2 * half)  # nibbles [.., P, 2, 16, K]
    q = (n[..., 0, :, :] | n[..., 1, :, :] << 4).swapaxes(-1, -2)  # [.., P, K, 16]

    def groups(a):
        return None if a is None else np.ascontiguousarray(a.reshape(*lead, N // 32, 32, G).swapaxes(-1, -2)).reshape(
            *lead, N, G)
    return np.ascontiguousarray(q).reshape(*lead, N, half), groups(s), groups(z)


def lay_out_file(path: str) -> tuple[int, int, int]:
    """tile_weights, panel_weights and narrow_bf16 on the ONNX file at `path`, in place; how many nodes each laid
    out. Weights in external data: only those laid out are read, and their new copies written to a new file beside
    the model (onnx names it); the others stay where they are."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    base = os.path.dirname(path)
    counts = tile_weights(proto, base), panel_weights(proto, base), narrow_bf16(proto, base)
    if any(counts):
        onnx.save(proto, path, save_as_external_data=any(t.data_location == onnx.TensorProto.EXTERNAL
                                                         for t in proto.graph.initializer))
    return counts


def narrow_bf16(proto, base_dir: str = "") -> int:
    """Each moec::Experts / moec::Linear node whose weights are all bf16 numbers (a bf16 model exported in fp32, or
    an fp32 model of bf16 weights) becomes moec::ExpertsBf16 / LinearBf16 with them in bf16: half the bytes, the
    same values (checked here, every weight: the narrowing is exact), the same products and sums. Returns how many
    nodes."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    weights = {EXPERTS: (3, 4), FP32_MATMUL: (1,)}
    done, count = {}, 0
    for n in proto.graph.node:
        if n.domain != DOMAIN or n.op_type not in weights or any(n.input[i] not in inits for i in weights[n.op_type]):
            continue
        arrays = {n.input[i]: numpy_helper.to_array(inits[n.input[i]], base_dir) for i in weights[n.op_type]
                  if n.input[i] not in done}
        if any(a.dtype != np.float32 or (a.view(np.uint32) & 0xFFFF).any() for a in arrays.values()):
            continue
        for name, a in arrays.items():  # each k's 32 channels interleaved, (c0, c16, c1, c17, ...): see panel_load
            a = np.ascontiguousarray(a.reshape(*a.shape[:-1], 2, 16).swapaxes(-1, -2)).reshape(a.shape)
            t = onnx.TensorProto(name=f"{name}_bf16", data_type=onnx.TensorProto.BFLOAT16, dims=a.shape,
                                 raw_data=(a.view(np.uint32) >> 16).astype("<u2").tobytes())
            proto.graph.initializer.append(t)
            done[name] = t.name
        for i in weights[n.op_type]:
            n.input[i] = done[n.input[i]]
        n.op_type += "Bf16"
        count += 1
    used = {i for n in proto.graph.node for i in n.input} | {v.name for v in (*proto.graph.input, *proto.graph.output)}
    for t in [t for t in proto.graph.initializer if t.name in set(done) - used]:
        proto.graph.initializer.remove(t)
    return count


def panel_weights(proto, base_dir: str = "") -> int:
    """Each moec::Experts / ExpertsInt8 node of `proto` gets its weights [E, N, K] in panels (new initializers
    `<name>_panels`, `panels`; with int8_activations `<name>_panels_a8`, `panels_a8`; FC1's rows in halves, its
    scales s13 [E, 2I] too, gate_up 0), the ops' only layout:
    export_onnx makes these nodes only where this CPU's build has the kernel (lower_onnx). Returns how many nodes;
    a node whose weights are not initializers is an error (the op could not run)."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    done, count = {}, 0
    for n in proto.graph.node:
        if n.domain != DOMAIN or n.op_type not in (EXPERTS, EXPERTS + "Int8"):
            continue
        a = {x.name: x for x in n.attribute}
        gate_up = a["gate_up"].i
        a8 = "int8_activations" in a and a["int8_activations"].i == 1
        for i in (3, 4, 5)[:3 if len(n.input) > 5 else 2]:  # w13, w2 (and s13)
            name = n.input[i]
            if name not in inits:
                raise RuntimeError(f"moec::Experts node {n.name}: its weight {name} is not a constant of the file")
            key = (name, gate_up if i != 4 else 0, a8 and i < 5)
            if key not in done:
                w = numpy_helper.to_array(inits[name], base_dir)
                w = halves(w, gate_up) if i != 4 else w
                done[key] = f"{name}_panels{'_a8' * key[2]}{gate_up if key[1] else ''}"
                w = w if i == 5 else panels_a8(w) if a8 else panels(w)
                proto.graph.initializer.append(numpy_helper.from_array(w, done[key]))
            n.input[i] = done[key]
        n.attribute.remove(a["gate_up"])
        n.attribute.append(helper.make_attribute("gate_up", 0))
        count += 1
    used = {i for n in proto.graph.node for i in n.input} | {v.name for v in (*proto.graph.input, *proto.graph.output)}
    for t in [t for t in proto.graph.initializer if t.name in {k[0] for k in done} - used]:
        proto.graph.initializer.remove(t)
    return count


def tile_weights(proto, base_dir: str = "") -> int:
    """Each moec::Int4Experts / Int4MatMul node of `proto` with constant weights gets them in the layout of this
    CPU's kernels, where its build has them (AVX-512): with int8 activations and every matrix's rows a multiple of
    4, the tile layout (`tiled`, tiles=1); weight-only and rows multiples of 32, panels (`int4_panels`, tiles=2).
    New initializers `<name>_tiles` / `<name>_panels` (weights in external data are read from `base_dir`, only
    these); the other nodes stay as they are. Returns how many nodes."""
    from onnx import helper, numpy_helper

    from moec.backends import cpu_native

    if not cpu_native.has_tiles():
        return 0
    inits = {t.name: t for t in proto.graph.initializer}
    done, count = {}, 0  # (a weight's name, layout) -> its copy's (each of q, s, z laid out on its own)
    for n in proto.graph.node:
        if n.domain != DOMAIN or n.op_type not in (OP, MATMUL):
            continue
        a = {x.name: x for x in n.attribute}
        a8 = helper.get_attribute_value(a["int8_activations"]) == 1
        layout, suffix, rows = (1, "_tiles", 4) if a8 else (2, "_panels", 32)
        triples = [(i, i + 1, i + 2 if not a8 and len(n.input) > i + 2 and n.input[i + 2] else None)
                   for i in ((3, 6) if n.op_type == OP else (1,))]  # q, s (and z: panels) input indices
        names = [n.input[i] for t in triples for i in t if i is not None]
        if ("tiles" in a and a["tiles"].i != 0
                or any(k not in inits or (k, layout) not in done and f"{k}{suffix}" in inits for k in names)
                or any(inits[n.input[q]].dims[-2] % rows for q, _, _ in triples)):
            continue
        for t in triples:
            if any((n.input[i], layout) not in done for i in t if i is not None):
                arrays = [numpy_helper.to_array(inits[n.input[i]], base_dir) if i is not None else None for i in t]
                laid = tiled(*arrays[:2]) if a8 else int4_panels(*arrays)
                for i, array in zip(t, laid):
                    if i is not None and (n.input[i], layout) not in done:
                        done[n.input[i], layout] = f"{n.input[i]}{suffix}"
                        proto.graph.initializer.append(numpy_helper.from_array(array, done[n.input[i], layout]))
            for i in t:
                if i is not None:
                    n.input[i] = done[n.input[i], layout]
        if "tiles" in a:
            n.attribute.remove(a["tiles"])
        n.attribute.append(helper.make_attribute("tiles", layout))
        count += 1
    used = {i for n in proto.graph.node for i in n.input} | {v.name for v in (*proto.graph.input, *proto.graph.output)}
    for t in [t for t in proto.graph.initializer if t.name in {k for k, _ in done} - used]:
        proto.graph.initializer.remove(t)
    return count


def _self_test(path: str) -> None:
    """A session of one node (3 tokens, 4 experts, top-2, groups of 32 and 64, asymmetric FC1) against
    moec::experts_int4 on the same weights, in moec's layout, in tiles and in panels; RuntimeError where they
    differ."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import helper, numpy_helper

    from moec.backends import cpu_native
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
    for a8, tiles in ([(True, 0)] + [(True, 1), (False, 2)] * cpu_native.has_tiles()
                      + [(False, 0)] * cpu_native.has_f32()):  # tiles: the layout's attribute
        node = helper.make_node(OP, list(inputs), ["y"], domain=DOMAIN, int8_activations=int(a8), gate_up=2,
                                tiles=tiles)
        weights = dict(inputs)
        for m in ("13", "2") if tiles else ():
            q, s, z = (inputs[f"{n}{m}"].numpy() if f"{n}{m}" in inputs else None for n in "qsz")
            for n, a in zip("qsz", tiled(q, s) if tiles == 1 else int4_panels(q, s, z)):
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
                               f"{tiles}; relative error {err:.2e})")
        got = matmul_session(path, weights["q13"][1], weights["s13"][1], weights["z13"][1], a8, tiles=tiles).run(
            None, {"x": x.numpy()})[0]
        want = quantized_linear(x, (t13["q"][1:2], t13["scale"][1:2], t13["zero"][1:2]), a8)
        err = ((torch.from_numpy(got) - want).norm() / want.norm()).item()
        if not err < 1e-5:
            raise RuntimeError(f"its self-test differs from moec's quantized linear layer (int8 activations: {a8}, "
                               f"tiles: {tiles}; relative error {err:.2e})")
    # fp32 and bf16 experts: 2I = 80 and H = 48 end in part-filled panels, 7 rows on expert 0
    for dtype in (torch.float32, torch.bfloat16) if cpu_native.has_f32() else ():
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
    for a8 in [False] * cpu_native.has_f32() + [True] * cpu_native.has_vnni512():
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
