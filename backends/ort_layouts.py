"""The weights of moec's ONNX Runtime ops laid out for their kernels (backends/csrc/panels.c, ort_experts.c): each
function rewrites a session file's initializers in place (same values, the kernel's order) or gives one matrix's
layout. export_onnx calls `lay_out_file` after the lowering; ort_session calls `round_rows_file` for a bf16 model.

    panels      fp32 [N, K] -> [ceil(N/32), K, 32]: a panel of 32 output channels is one sequential stream
    pair_bf16   bf16 panels -> [ceil(N/32), K/2, 32, 2]: k and k + 1 side by side (vdpbf16ps)
    panels_a8   int8 [N, K] -> [ceil(N/16), K/4, 16, 4] bytes of w + 128 (vpdpbusd)
    tiled       int4 q [N, K/2], s [N, G] -> tiles of 4 channels (int8 activations)
    int4_panels int4 q, s, z -> panels of 32 channels (weight-only)
"""

from __future__ import annotations

import os

import numpy as np

from moec.backends.ort_kernels import DOMAIN, EXPERTS, FP32_MATMUL, MATMUL, OP


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


def half_if_exact(s: np.ndarray) -> np.ndarray:
    """The scales s in fp16 if every one is an fp16 number (moec.quant makes them so; the tile kernel widens them
    exactly: the same numbers in half the bytes), else as they are."""
    with np.errstate(over="ignore"):  # past fp16's range: inf, not equal, kept
        h = s.astype(np.float16)
    return h if np.array_equal(h.astype(s.dtype), s) else s


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
    CPU's kernels: with int8 activations and every matrix's rows a multiple of 4, the tile layout (`tiled`, tiles=1;
    the scales in fp16 where they all are fp16 numbers: `half_if_exact`; AVX-512 builds only); weight-only and rows
    multiples of 32, panels (`int4_panels`, tiles=2).
    New initializers `<name>_tiles` / `<name>_panels` (weights in external data are read from `base_dir`, only
    these); the other nodes stay as they are. Returns how many nodes."""
    from onnx import helper, numpy_helper

    from moec.backends import cpu_native

    inits = {t.name: t for t in proto.graph.initializer}
    done, count = {}, 0  # (a weight's name, layout) -> its copy's (each of q, s, z laid out on its own)
    for n in proto.graph.node:
        if n.domain != DOMAIN or n.op_type not in (OP, MATMUL):
            continue
        a = {x.name: x for x in n.attribute}
        a8 = helper.get_attribute_value(a["int8_activations"]) == 1
        if a8 and not cpu_native.has_tiles():  # the tile layout: AVX-512 builds only
            continue
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
                laid = list(tiled(*arrays[:2]) if a8 else int4_panels(*arrays))
                if a8:
                    laid[1] = half_if_exact(laid[1])
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
