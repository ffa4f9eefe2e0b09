"""moec's int4 experts kernels as an ONNX Runtime custom op (backends/ort_kernels.py): the node alone against
moec::experts_int4 (the torch backend's op, the same kernels) over tokens, experts, k, groups, zero points, FC1
row orders and both numerics, with rare experts, one expert taking every pair, and large magnitudes; bad inputs
get ORT errors naming the op; backend="onnxruntime" runs it for the blocks it fits (and says why not for the
others), with a caller's SessionOptions too."""

import copy

import numpy as np
import pytest
import torch

import moec
from moec import models
from moec.backends import cpu_native, ort_kernels, ort_layouts
from moec.quant import Int4Experts, Int8Experts, quantize

from conftest import TOL, rel_err

# no compiler or CPU support here: skipped; where moec's C kernels build, the library must build and pass its
# self-test (test_library_builds), else these tests fail rather than skip
pytestmark = pytest.mark.skipif(cpu_native.library() is None, reason="moec's C kernels are not built here")
A8 = [True, False]
# (int8 activations, the weights' layout: 0 moec's, 1 tiles, HALF tiles with fp16 scales, 2 panels)
AVX512 = "needs AVX-512"
TILES = pytest.mark.skipif(not cpu_native.has_tiles(), reason=AVX512)
HALF = "half"
MODES = [pytest.param(True, 0, id="int8"), pytest.param(True, 1, id="int8-tiles", marks=TILES),
         pytest.param(True, HALF, id="int8-tiles-fp16", marks=TILES),
         pytest.param(False, 0, id="fp32"), pytest.param(False, 2, id="fp32-panels")]


def _laid_out(q, s, z, tiles) -> tuple:
    """moec's int4 format (torch tensors) in the layout `tiles` (numpy arrays; z None where absent)."""
    q, s, z = (None if t is None else t.numpy() for t in (q, s, z))
    if tiles == HALF:
        q, s = ort_layouts.tiled(q, s)
        s = ort_layouts.half_if_exact(s)
        assert s.dtype == np.float16  # quantize's scales are fp16 numbers
        return q, s, z
    return tuple(ort_layouts.tiled(q, s)) + (z,) if tiles == 1 else ort_layouts.int4_panels(q, s, z) if tiles else (q, s, z)


def _session(inputs: dict, a8: bool, gate_up: str, options=None, tiles=0):
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    names = [n for n in ("x", "ids", "w", "q13", "s13", "z13", "q2", "s2", "z2")]
    node = helper.make_node(ort_kernels.OP, [n if inputs.get(n) is not None else "" for n in names], ["y"],
                            domain=ort_kernels.DOMAIN, int8_activations=int(a8), gate_up=ort_kernels.GATE_UP[gate_up],
                            tiles=1 if tiles == HALF else tiles)
    weights = {}
    for m in ("13", "2"):
        for n, a in zip("qsz", _laid_out(*(inputs.get(f"{n}{m}") for n in "qsz"), tiles)):
            if a is not None:
                weights[f"{n}{m}"] = a
    graph = helper.make_graph(
        [node], "t", [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(inputs[n].numpy().dtype), None)
                      for n in ("x", "ids", "w")],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, n) for n, v in weights.items()])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                   helper.make_opsetid(ort_kernels.DOMAIN, 1)])
    so = options or ort.SessionOptions()
    so.register_custom_ops_library(ort_kernels.library())
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _case(T, H, I, E, k, g1, g2, symmetric, seed=0, scale=1.0, ids=None):
    gen = torch.Generator().manual_seed(seed)
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T else torch.zeros(0, k).long()
    t13 = quantize(Int4Experts(g1, symmetric=symmetric), torch.randn(E, 2 * I, H, generator=gen))
    t2 = quantize(Int4Experts(g2, symmetric=symmetric), torch.randn(E, H, I, generator=gen) / 8)
    return {"x": torch.randn(T, H, generator=gen) * scale, "ids": ids, "w": torch.rand(T, k, generator=gen),
            "q13": t13["q"], "s13": t13["scale"], "z13": t13.get("zero"), "q2": t2["q"], "s2": t2["scale"],
            "z2": t2.get("zero")}


def _check(inputs, a8, gate_up="halves", tol=1e-5, tiles=0):
    sess = _session(inputs, a8, gate_up, tiles=tiles)
    got = torch.from_numpy(sess.run(None, {n: inputs[n].numpy() for n in ("x", "ids", "w")})[0])
    for t in range(0, len(got), 97):  # a token alone: its row of the batch, to the bit
        alone = sess.run(None, {n: inputs[n][t:t + 1].numpy() for n in ("x", "ids", "w")})[0]
        assert np.array_equal(alone[0], got[t].numpy()), t
    i = inputs
    want = torch.ops.moec.experts_int4(i["x"], i["ids"], i["w"], i["q13"], i["s13"], i["z13"], None, i["q2"],
                                       i["s2"], i["z2"], None, "silu", True, 1.0, 0.0, False, gate_up, a8)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert got.numel() == 0 or rel_err(got, want) < tol, rel_err(got, want)


@pytest.mark.parametrize("a8,tiles", MODES)
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (1, 64, 6), (7, 8, 2), (300, 8, 2), (64, 64, 6)])
def test_node_equals_moec_op(T, E, k, a8, tiles):
    _check(_case(T, 128, 96, E, k, 32, 32, symmetric=True, seed=T + E), a8, tiles=tiles)


@pytest.mark.parametrize("a8,tiles", MODES)
@pytest.mark.parametrize("g1,g2,symmetric", [(32, 64, False), (64, 32, True), (128, 128, False)])
@pytest.mark.parametrize("gate_up", ["halves", "halves_up_first", "interleave", "interleave_up_first"])
def test_groups_zero_points_and_row_orders(g1, g2, symmetric, gate_up, a8, tiles):
    _check(_case(5, 256, 384, 4, 2, g1, g2, symmetric), a8, gate_up, tiles=tiles)  # FC2: 12, 6 or 3 groups


@pytest.mark.parametrize("g1,g2", [(64, 128), (128, 64)])
@pytest.mark.parametrize("a8,tiles", MODES)
def test_many_rows_an_expert_zero_points(g1, g2, a8, tiles):
    """~30 rows an expert: the panels' prefill path (q - z widened by the first row block, more than 6 rows) with
    zero points and groups of 64 and 128, its token alone equal to its row of the batch"""
    _check(_case(60, 256, 384, 4, 2, g1, g2, symmetric=False, seed=3), a8, tiles=tiles)


@pytest.mark.parametrize("a8,tiles", MODES)
def test_rare_and_crowded_experts_and_large_magnitudes(a8, tiles):
    T, E = 40, 16
    rare = torch.zeros(T, 2, dtype=torch.int64)  # every token to expert 0, slot 2 to 1 but one token to expert 15
    rare[:, 1] = 1
    rare[17, 1] = 15
    _check(_case(T, 128, 64, E, 2, 32, 32, symmetric=False, ids=rare), a8, tiles=tiles)
    _check(_case(3, 128, 64, 8, 2, 32, 32, symmetric=True, scale=1e4), a8, tiles=tiles)  # activations far from 1
    _check(_case(0, 128, 64, 8, 2, 32, 32, symmetric=True), a8, tiles=tiles)  # no tokens


def test_bad_inputs_are_ort_errors():
    inputs = _case(3, 128, 64, 8, 2, 32, 32, symmetric=True)
    sess = _session(inputs, True, "halves")
    feeds = {n: inputs[n].numpy() for n in ("x", "ids", "w")}
    with pytest.raises(Exception, match=r"moec::Int4Experts: expert id 8 out of \[0, 8\)"):
        sess.run(None, {**feeds, "ids": np.full((3, 2), 8, np.int64)})
    with pytest.raises(Exception, match="moec::Int4Experts: x .T, H., ids .T, k., w .T, k. and q13"):
        sess.run(None, {**feeds, "w": np.ones((3, 3), np.float32)})
    with pytest.raises(Exception, match="moec::Int4Experts: q13/s13/z13 are not moec's int4 format"):
        sess.run(None, {**feeds, "x": np.ones((3, 96), np.float32)})
    if cpu_native.has_tiles():
        with pytest.raises(Exception, match="moec::Int4Experts: the tile layout takes int8 activations"):
            _session(inputs, False, "halves", tiles=1)
        with pytest.raises(Exception, match=r"moec::Int4Experts: int4 panels \(tiles=2\) take fp32 rows"):
            _session(inputs, True, "halves", tiles=2)
        with pytest.raises(Exception, match="moec::Int4Experts: tiles 3 is not 0-2"):
            _session(inputs, False, "halves", tiles=3)
        half = {**inputs, "s13": inputs["s13"].half()}  # fp16 scales in moec's layout: the tile layout's only
        with pytest.raises(Exception, match=r"moec::Int4Experts: s13: the scales are fp32, or fp16 in the tile "
                                            r"layout \(tiles=1\), not element type 10 with tiles=0"):
            _session(half, True, "halves").run(None, feeds)
        odd = quantize(Int4Experts(32), torch.randn(1, 6, 128))
        for a8, tiles, layout, rows in ((True, 1, "tile", 4), (False, 2, "panel", 32)):
            with pytest.raises(Exception, match=f"moec::Int4MatMul: q/s/z has 6 rows: the {layout} layout takes a "
                                                f"multiple of {rows}"):
                ort_kernels.matmul_session(ort_kernels.library(), odd["q"][0], odd["scale"][0], None, a8,
                                           tiles=tiles).run(None, {"x": np.ones((1, 128), np.float32)})


@pytest.mark.parametrize("a8", ["fp32", "int8"])
def test_backend_runs_it_and_matches_the_torch_backend(a8):
    """backend="onnxruntime" with int4 experts: every block is moec::Int4Experts; its logits are the torch
    backend's (same quantization, same kernels: weight-only to fp32 rounding; int8 activations to the flips of
    a rounding boundary, see test_ort_backend.test_int8_activations_equal_their_reference), and greedy generation
    gives the same tokens."""
    import onnxruntime as ort

    model = models.tiny_model("mixtral", hidden_size=64, intermediate_size=64)
    cfg = Int4Experts(32, activations=a8)
    so = ort.SessionOptions()  # a caller's object: the library is registered on it once, for both sessions
    compiled = moec.compile(copy.deepcopy(model), backend="onnxruntime", quantize=cfg, session_options=so)
    reference = moec.compile(copy.deepcopy(model), quantize=cfg)
    inputs = models.example_inputs(model, batch=2, seq=7)
    with torch.no_grad():
        want = reference(**inputs).logits
        for use_cache in (False, True):  # two sessions (with and without the cache) on the one options object
            err = rel_err(compiled(**inputs, use_cache=use_cache).logits, want)
            assert err < (1e-5 if a8 == "fp32" else 1e-2), (use_cache, err)
    inputs = models.example_inputs(model, batch=1, seq=4)
    assert torch.equal(compiled.generate(**inputs, max_new_tokens=6, do_sample=False),
                       reference.generate(**inputs, max_new_tokens=6, do_sample=False))
    report = moec.inspect(compiled)
    assert len(compiled.forward.sessions) == 2
    assert [b.op for b in report.export.blocks] == ["moec::Int4Experts"] * len(report.blocks)
    import onnx  # the weights in tiles (int8 activations) or panels (ort_layouts.tile_weights), where the CPU has them

    proto = onnx.load(report.export.path, load_external_data=False)
    tiles = {onnx.helper.get_attribute_value(a) for n in proto.graph.node
             if n.op_type == ort_kernels.OP for a in n.attribute if a.name == "tiles"}
    assert tiles == {2 if a8 == "fp32" else 1 if cpu_native.has_tiles() else 0}
    # the scales the compared session read: fp16 in the tile layout (quantize's steps are fp16 numbers), else fp32
    types = {t.name: t.data_type for t in proto.graph.initializer}
    scales = {types[n.input[i]] for n in proto.graph.node if n.op_type == ort_kernels.OP for i in (4, 7)}
    assert scales == {onnx.TensorProto.FLOAT16 if tiles == {1} else onnx.TensorProto.FLOAT}


def test_blocks_it_does_not_fit_keep_qmoe():
    """ReLU experts (ORT's QMoE has them, moec's op only gated SiLU) stay QMoE and say why."""
    import handwritten as hw

    spec = hw.Spec(hidden=64, inter=64, activation="relu")
    lm = hw.TinyLM(vocab=64, hidden=spec.hidden, n_layers=1, block_fn=lambda: hw.make_block(spec))
    compiled = moec.compile(copy.deepcopy(lm), backend="onnxruntime", quantize=Int4Experts(32))
    with torch.no_grad():
        compiled(torch.randint(0, 64, (2, 5)))
    block = moec.inspect(compiled).export.blocks[0]
    assert block.op == "QMoE" and "not moec's kernels: they take gated SiLU experts" in block.why, block.why


def test_library_builds_for_avx2_only_cpus():
    """The op's code compiles for a CPU with AVX2 and FMA only."""
    path = cpu_native.build(("-O3", "-mavx2", "-mfma", "-shared", "-fPIC", "-fvisibility=hidden"),
                            cpu_native.SOURCE + ort_kernels.OP_SOURCE, "moec_ort")
    assert path.exists()


def test_the_avx2_build_gives_the_same_bits():
    """The library built without AVX-512 runs the panels in vectors of 8 channels, a row at a time (quantized weights
    widened by the first row for the others), summed in the AVX-512 build's order: fp32, bf16 and int8 experts and
    int4 panels give the same bits, at 1 to 40 tokens (rows an expert below, at and above the AVX-512 build's row
    blocks of 6) and part-filled panels."""
    if "avx512f" not in cpu_native._cpu_flags().split():
        pytest.skip("this CPU has no AVX-512: its own build is the AVX2 one")
    narrow = ort_kernels.build(("-mno-avx512f",))
    for T, H, I in [(1, 128, 96), (2, 96, 272), (3, 64, 40), (13, 128, 96), (40, 96, 272)]:
        x, ids, w, w13, w2 = _f32_case(T, H, I, 8, 2, seed=T)
        feeds = {"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()}
        t13, t2 = quantize(Int8Experts(), w13), quantize(Int8Experts(), w2)
        cases = [(w13.numpy(), w2.numpy(), {}), (w13.bfloat16().float().numpy(), w2.bfloat16().float().numpy(), {}),
                 (t13["q"].numpy(), t2["q"].numpy(), {"s13": t13["scale"].numpy(), "s2": t2["scale"].numpy()})]
        for a, b, scales in cases:
            got = [ort_kernels.experts_session(lib, a, b, 0, **scales).run(None, feeds)[0]
                   for lib in (ort_kernels.library(), narrow)]
            assert np.array_equal(*got), (T, a.dtype)
        gen = torch.Generator().manual_seed(T)
        t = quantize(Int4Experts(64, symmetric=False), torch.randn(1, 96, 256, generator=gen))  # panels: 32 rows each
        panels = [torch.as_tensor(a) for a in ort_layouts.int4_panels(t["q"][0].numpy(), t["scale"][0].numpy(),
                                                                       t["zero"][0].numpy())]
        x = torch.randn(T, 256, generator=gen).numpy()
        got = [ort_kernels.matmul_session(lib, *panels, False, tiles=2).run(None, {"x": x})[0]
               for lib in (ort_kernels.library(), narrow)]
        assert np.array_equal(*got), T


def test_a_failed_build_names_the_file_and_line_of_its_first_error(tmp_path, monkeypatch):
    """The C sources are backends/csrc's files concatenated: a compiler error names the file and line it is on (the
    #line marks), the first error, not the compiler's last line of context."""
    from moec.backends import c_source

    broken = tmp_path / "csrc"
    broken.mkdir()
    (broken / "ok.c").write_text("int fine(void) { return 1; }\n")
    (broken / "bad.c").write_text("/* line 1 */\n\nint oops(void) { return 1 }\n")
    monkeypatch.setattr("moec.backends.CSRC", broken)
    with pytest.raises(RuntimeError, match=r"csrc/bad\.c:3:\d+: error"):
        cpu_native.build(cpu_native.FLAGS, c_source("ok.c", "bad.c"), "moec_broken")


@pytest.mark.parametrize("a8,tiles", MODES)
@pytest.mark.parametrize("shape", [(1, 256), (7, 256), (2, 150, 256)])
@pytest.mark.parametrize("g,symmetric", [(32, True), (64, False), (128, False)])
def test_matmul_node_equals_moec_quantized_linear(shape, g, symmetric, a8, tiles):
    """moec::Int4MatMul (a dense layer) against the torch backend's quantized linear layer on the same weights."""
    from moec.backends.torch_backend import quantized_linear

    gen = torch.Generator().manual_seed(g)
    t = quantize(Int4Experts(g, symmetric=symmetric), torch.randn(1, 96, 256, generator=gen))
    x = torch.randn(*shape, generator=gen)
    q, s, z = (None if a is None else torch.as_tensor(a)
               for a in _laid_out(t["q"][0], t["scale"][0], t["zero"][0] if "zero" in t else None, tiles))
    sess = ort_kernels.matmul_session(ort_kernels.library(), q, s, z, a8, tiles=1 if tiles == HALF else tiles)
    got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    want = quantized_linear(x.reshape(-1, 256), (t["q"], t["scale"], t.get("zero")), a8).reshape(*shape[:-1], 96)
    assert got.shape == want.shape and rel_err(got, want) < 1e-5, rel_err(got, want)


def test_dense_matmuls_on_moec_kernels_equal_matmulnbits(monkeypatch):
    """dense=: the session's MatMulNBits become moec::Int4MatMul with the same weights (moved to moec's layout):
    weight-only, the logits equal the MatMulNBits/QMoE session's to fp32 rounding."""
    import onnx

    model = models.tiny_model("mixtral", hidden_size=64, intermediate_size=64)
    cfg = Int4Experts(32)
    ours = moec.compile(copy.deepcopy(model), backend="onnxruntime", quantize=cfg, dense=cfg)
    monkeypatch.setenv("MOEC_ORT_KERNELS", "0")
    ort_ops = moec.compile(copy.deepcopy(model), backend="onnxruntime", quantize=cfg, dense=cfg)
    inputs = models.example_inputs(model, batch=2, seq=5)
    with torch.no_grad():
        got, want = ours(**inputs).logits, ort_ops(**inputs).logits
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    ops = {n.op_type for n in onnx.load(moec.inspect(ours).export.path).graph.node}
    assert "Int4MatMul" in ops and "MatMulNBits" not in ops and "Int4Experts" in ops
    ops = {n.op_type for n in onnx.load(moec.inspect(ort_ops).export.path).graph.node}
    assert "MatMulNBits" in ops and "QMoE" in ops


@pytest.mark.parametrize("a8", A8)
def test_matmuls_of_one_input_merge_into_one_node(a8):
    """export_dense._merge_siblings: q/k/v-like Int4MatMuls of one input (and a pair with zero points) become one node
    and a Split each; one of another input, and one of another group size, stay; the outputs are the same numbers."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from moec.export_dense import _merge_siblings

    gen = torch.Generator().manual_seed(0)
    specs = {"q": ("x", 128, 32, True), "k": ("x", 64, 32, True), "v": ("x", 64, 32, True), "g": ("x", 64, 32, False),
             "u": ("x", 128, 32, False), "c": ("x", 64, 64, True), "o": ("y", 64, 32, True)}
    nodes, inits = [], []
    for name, (x, N, g, symmetric) in specs.items():
        t = quantize(Int4Experts(g, symmetric=symmetric), torch.randn(1, N, 256, generator=gen))
        ins = [x]
        for k in ("q", "scale", "zero"):
            if k in t:
                inits.append(numpy_helper.from_array(t[k][0].numpy(), f"{name}_{k}"))
                ins.append(f"{name}_{k}")
        nodes.append(helper.make_node(ort_kernels.MATMUL, ins, [f"out_{name}"], name=name, domain=ort_kernels.DOMAIN,
                                      int8_activations=int(a8), tiles=0))
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                           for n in ("x", "y")],
                              [helper.make_tensor_value_info(f"out_{n}", onnx.TensorProto.FLOAT, None) for n in specs],
                              inits)
    proto = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                   helper.make_opsetid(ort_kernels.DOMAIN, 1)])
    merged = onnx.ModelProto.FromString(proto.SerializeToString())
    _merge_siblings(merged)
    assert [n.op_type for n in merged.graph.node].count(ort_kernels.MATMUL) == 4  # qkv, gu, c, o
    assert [len(n.output) for n in merged.graph.node if n.op_type == "Split"] == [3, 2]
    feed = {"x": torch.randn(3, 256, generator=gen).numpy(), "y": torch.randn(3, 256, generator=gen).numpy()}
    outs = []
    for p in (proto, merged):
        so = ort.SessionOptions()
        so.register_custom_ops_library(ort_kernels.library())
        outs.append(ort.InferenceSession(p.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed))
    for a, b in zip(*outs):
        assert np.array_equal(a, b)


@pytest.mark.skipif(not cpu_native.has_tiles(), reason="needs AVX-512")
@pytest.mark.parametrize("groups", [1, 2, 3, 4, 5, 7, 8, 9])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9])
def test_tile_layout_gives_the_same_numbers(groups, rows):
    """The tile layout holds each channel's weights and scales (steps of 4 groups, then the 1-3 left) where the
    kernel reads them: the same products summed in the same order, so the outputs are moec's layout's to the bit,
    for 4, 8 and 68 channels (one tile, two, a chunk of 64 and one more), with and without zero points."""
    gen = torch.Generator().manual_seed(groups * 10 + rows)
    for N in (4, 8, 68):
        for symmetric in (True, False):
            t = quantize(Int4Experts(32, symmetric=symmetric), torch.randn(1, N, 32 * groups, generator=gen))
            z = t["zero"][0] if "zero" in t else None
            x = {"x": torch.randn(rows, 32 * groups, generator=gen).numpy()}
            q, s = ort_layouts.tiled(t["q"][0].numpy(), t["scale"][0].numpy())
            want = ort_kernels.matmul_session(ort_kernels.library(), t["q"][0], t["scale"][0], z, True).run(None, x)[0]
            for s in (s, s.astype(np.float16)):  # the scales are fp16 numbers: in fp16 too, the same outputs
                got = ort_kernels.matmul_session(ort_kernels.library(), torch.from_numpy(q), torch.from_numpy(s), z,
                                                 True, tiles=1).run(None, x)[0]
                assert np.array_equal(got, want), (N, symmetric, s.dtype, np.abs(got - want).max())


def _matmul_nodes(specs: dict, a8=True) -> list:
    """Int4MatMul nodes of input "x" without the tiles attribute: name -> (q, s) initializer names; output y_<name>."""
    from onnx import helper

    return [helper.make_node(ort_kernels.MATMUL, ["x", q, s], [f"y_{name}"], name=name, domain=ort_kernels.DOMAIN,
                             int8_activations=int(a8)) for name, (q, s) in specs.items()]


@pytest.mark.skipif(not cpu_native.has_tiles(), reason="needs AVX-512")
def test_tile_file_shared_weights_external_data_and_graph_outputs(tmp_path):
    """lay_out_file: a q read by two nodes with different s (one tiled copy of each tensor, no duplicate names), a
    scale that is also a graph output (kept as it was, beside its tiled copy), nodes made without the tiles attribute
    (0, moec's layout), a weight-only node (its weights in panels, a q and an s that int8-row nodes read in tiles);
    weights in external data: only the laid-out ones read and written beside the model; s_a's steps (quantize's,
    fp16 numbers) tiled in fp16, s_b's (not fp16 numbers) in fp32. The int8-row outputs are the untiled file's to
    the bit, the weight-only one to fp32 rounding (panels sum in another order)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    gen = torch.Generator().manual_seed(0)
    # K = 256: each laid-out copy (an fp16 s of 64 x 8 too) is past onnx.save's 1024 bytes for external data
    a, b = (quantize(Int4Experts(32), torch.randn(1, 64, 256, generator=gen)) for _ in range(2))
    arrays = {"q": a["q"][0], "s_a": a["scale"][0], "s_b": b["scale"][0] * (1 + 2 ** -12), "q_w": b["q"][0]}
    nodes = _matmul_nodes({"one": ("q", "s_a"), "two": ("q", "s_b"), "bare": ("q_w", "s_b")})
    nodes += _matmul_nodes({"fp32": ("q_w", "s_a")}, a8=False)
    outputs = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
               for name in [n.output[0] for n in nodes] + ["s_b"]]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)], outputs,
                              [numpy_helper.from_array(v.numpy(), k) for k, v in arrays.items()])
    proto = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                   helper.make_opsetid(ort_kernels.DOMAIN, 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(ort_kernels.library())
    feed = {"x": torch.randn(3, 256, generator=gen).numpy()}
    want = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)
    path = str(tmp_path / "m.onnx")
    onnx.save(proto, path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert ort_layouts.lay_out_file(path) == (4, 0, 0)  # one, two, bare in tiles, fp32 in panels
    tiled = onnx.load(path, load_external_data=False)
    names = [t.name for t in tiled.graph.initializer]
    assert len(names) == len(set(names)) and set(names) == {"q_tiles", "s_a_tiles", "s_b_tiles", "s_b", "q_w_tiles",
                                                             "q_w_panels", "s_a_panels"}
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in tiled.graph.initializer)
    types = {t.name: t.data_type for t in tiled.graph.initializer}
    assert types["s_a_tiles"] == onnx.TensorProto.FLOAT16 and types["s_b_tiles"] == onnx.TensorProto.FLOAT
    assert {a.i for n in tiled.graph.node for a in n.attribute if a.name == "tiles"} == {1, 2}
    got = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, feed)
    for g, w in zip(got[:3] + got[4:], want[:3] + want[4:]):
        assert np.array_equal(g, w)
    assert rel_err(torch.from_numpy(got[3]), torch.from_numpy(want[3])) < 1e-6


# ---- moec::Experts: fp32 experts, weights in panels ----
def _f32_case(T, H, I, E, k, seed=0, scale=1.0, ids=None):
    gen = torch.Generator().manual_seed(seed)
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T else torch.zeros(0, k).long()
    return (torch.randn(T, H, generator=gen) * scale, ids, torch.rand(ids.shape, generator=gen),
            torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5, torch.randn(E, H, I, generator=gen) / I ** 0.5)


def _f32_run(case, gate_up="halves"):
    x, ids, w, w13, w2 = case
    sess = ort_kernels.experts_session(ort_kernels.library(), w13.numpy(), w2.numpy(), ort_kernels.GATE_UP[gate_up])
    got = torch.from_numpy(sess.run(None, {"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()})[0])
    want = torch.ops.moec.experts(x, ids, w, w13, None, w2, None, "silu", True, 1.0, 0.0, False, gate_up)
    assert got.shape == want.shape and torch.isfinite(got).all()
    return got, want


@pytest.mark.parametrize("gate_up", ["halves", "halves_up_first", "interleave", "interleave_up_first"])
@pytest.mark.parametrize("T,H,I,E,k", [(1, 128, 96, 8, 2), (1, 64, 40, 64, 6), (7, 48, 40, 8, 2),
                                       (64, 128, 96, 64, 6), (300, 96, 272, 8, 2), (0, 64, 64, 8, 2)])
def test_fp32_node_equals_moec_experts(T, H, I, E, k, gate_up):
    """Tokens 0-300, channels ending in part-filled panels (48, 40, 80, 272), every FC1 row order, against
    moec::experts (the torch backend's op)."""
    got, want = _f32_run(_f32_case(T, H, I, E, k, seed=T + E), gate_up)
    assert got.numel() == 0 or rel_err(got, want) < 1e-6, rel_err(got, want)


def test_fp32_rare_and_crowded_experts_and_large_magnitudes():
    T, E = 40, 16
    rare = torch.zeros(T, 2, dtype=torch.int64)  # every token to expert 0, slot 2 to 1 but one token to expert 15
    rare[:, 1] = 1
    rare[17, 1] = 15
    for case in (_f32_case(T, 128, 64, E, 2, ids=rare), _f32_case(3, 128, 64, 8, 2, scale=1e4)):
        got, want = _f32_run(case)
        assert rel_err(got, want) < 1e-6, rel_err(got, want)


@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("T,H,I", [(13, 64, 96), (40, 64, 96), (40, 257, 40)])
def test_a_token_alone_is_its_row_of_the_batch(weights, T, H, I):
    """Each output sums its products in the same order whatever the batch: a token alone equals its row of a batch
    to the bit, for weights read in place (fp32), or widened by the first row block for the others (bf16, int8:
    13 tokens on 4 experts, row blocks of 6 and a few; 40: ~20 rows an expert; H = 257: FC1 in two parts of the
    inputs, the second one input long, and FC2's last panel part-filled)"""

    x, ids, w, w13, w2 = _f32_case(T, H, I, 4, 2, seed=T)
    if weights == "bf16":
        w13, w2 = w13.bfloat16().float(), w2.bfloat16().float()
    scales = {}
    if weights == "int8":
        t13, t2 = quantize(Int8Experts(), w13), quantize(Int8Experts(), w2)
        w13, w2, scales = t13["q"], t2["q"], {"s13": t13["scale"].numpy(), "s2": t2["scale"].numpy()}
    sess = ort_kernels.experts_session(ort_kernels.library(), w13.numpy(), w2.numpy(), 0, **scales)
    batch = sess.run(None, {"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()})[0]
    for t in range(T):
        alone = sess.run(None, {"x": x[t:t + 1].numpy(), "ids": ids[t:t + 1].numpy(), "w": w[t:t + 1].numpy()})[0]
        assert np.array_equal(alone[0], batch[t]), t
    if weights == "int8":
        want = torch.ops.moec.experts_int8(x, ids, w, t13["q"], t13["scale"], None, t2["q"], t2["scale"], None,
                                           "silu", True, 1.0, 0.0, False, "halves")
    else:
        want = torch.ops.moec.experts(x, ids, w, w13, None, w2, None, "silu", True, 1.0, 0.0, False, "halves")
    assert rel_err(torch.from_numpy(batch), want) < 1e-6


def test_the_kept_work_buffer_holds_no_state_between_calls_or_threads():
    """The experts op keeps its work buffer from one call to the next (a call that finds it in use allocates its
    own): calls of growing and shrinking sizes, and two sessions run from two threads at once, give what each call
    gives alone in a fresh order."""
    import threading

    cases = [_f32_case(T, 128, 64, 8, 2, seed=T) for T in (300, 1, 40, 300, 7)]
    sess = ort_kernels.experts_session(ort_kernels.library(), *[c.numpy() for c in cases[0][3:]], 0)
    feeds = [{"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()} for x, ids, w, *_ in cases]
    want = [sess.run(None, f)[0] for f in feeds]
    for f, y in zip(reversed(feeds), reversed(want)):
        assert np.array_equal(sess.run(None, f)[0], y)
    other = ort_kernels.experts_session(ort_kernels.library(), *[c.numpy() for c in cases[0][3:]], 0)
    bad = []

    def loop(s):
        for i in range(30):
            if not np.array_equal(s.run(None, feeds[i % len(feeds)])[0], want[i % len(feeds)]):
                bad.append(i)

    threads = [threading.Thread(target=loop, args=(s,)) for s in (sess, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad, bad


def test_fp32_bad_inputs_are_ort_errors():
    x, ids, w, w13, w2 = _f32_case(3, 64, 64, 8, 2)
    sess = ort_kernels.experts_session(ort_kernels.library(), w13.numpy(), w2.numpy(), 0)
    feeds = {"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()}
    with pytest.raises(Exception, match=r"moec::Experts: expert id -1 out of \[0, 8\)"):
        sess.run(None, {**feeds, "ids": np.full((3, 2), -1, np.int64)})
    with pytest.raises(Exception, match="moec::Experts: x .T, H., ids .T, k. and w .T, k. do not fit"):
        sess.run(None, {**feeds, "w": np.ones((3, 3), np.float32)})
    with pytest.raises(Exception, match=r"moec::Experts: w13 .E, ceil\(2I/32\), H, 32. and w2 .* do not fit x .T, 96."):
        sess.run(None, {**feeds, "x": np.ones((3, 96), np.float32)})


def test_panels_hold_the_weights():
    """panels: channel 32p + c of W [E, N, K] at [e, p, :, c], zeros past N; halves: every FC1 row order."""
    w = np.arange(2 * 40 * 3, dtype=np.float32).reshape(2, 40, 3)
    p = ort_layouts.panels(w)
    assert p.shape == (2, 2, 3, 32)
    assert np.array_equal(p[1, 1, :, 7], w[1, 39]) and np.array_equal(p[0, 0, :, 5], w[0, 5])
    assert not p[:, 1, :, 8:].any()
    gate, up = np.ones((1, 3, 2)), np.full((1, 3, 2), 2.0)
    orders = {"halves": np.concatenate([gate, up], 1), "halves_up_first": np.concatenate([up, gate], 1),
              "interleave": np.stack([gate, up], 2).reshape(1, 6, 2),
              "interleave_up_first": np.stack([up, gate], 2).reshape(1, 6, 2)}
    for name, w13 in orders.items():
        assert np.array_equal(ort_layouts.halves(w13, ort_kernels.GATE_UP[name]), orders["halves"]), name


def test_backend_runs_fp32_experts_and_matches_the_torch_backend(monkeypatch):
    """backend="onnxruntime", fp32: every block is moec::Experts, logits as the torch backend's with and without
    the cache, the same greedy tokens; MOEC_ORT_KERNELS=0 keeps ORT's MoE."""
    model = models.tiny_model("qwen2_moe")
    compiled = moec.compile(copy.deepcopy(model), backend="onnxruntime")
    reference = moec.compile(copy.deepcopy(model))
    inputs = models.example_inputs(model, batch=2, seq=7)
    with torch.no_grad():
        want = reference(**inputs).logits
        for use_cache in (False, True):
            assert rel_err(compiled(**inputs, use_cache=use_cache).logits, want) < 1e-5
    inputs = models.example_inputs(model, batch=1, seq=4)
    assert torch.equal(compiled.generate(**inputs, max_new_tokens=8, do_sample=False),
                       reference.generate(**inputs, max_new_tokens=8, do_sample=False))
    report = moec.inspect(compiled)
    assert [b.op for b in report.export.blocks] == ["moec::Experts"] * len(report.blocks)
    import onnx  # the dense MatMuls on moec's kernel, q/k/v (and the shared expert's gate/up) one node each

    ops = [n.op_type for n in onnx.load(report.export.path).graph.node]
    assert "MatMul" not in ops and ops.count(ort_kernels.FP32_MATMUL) == 4 * len(report.blocks) + 1, ops
    monkeypatch.setenv("MOEC_ORT_KERNELS", "0")
    plain = moec.compile(copy.deepcopy(model), backend="onnxruntime")
    with torch.no_grad():
        plain(**inputs)
    assert {b.op for b in moec.inspect(plain).export.blocks} == {"MoE"}


@pytest.mark.parametrize("T,H,I,E,k", [(1, 128, 96, 8, 2), (7, 48, 40, 8, 2), (64, 64, 40, 64, 6)])
def test_bf16_weights_node_equals_moec_experts(T, H, I, E, k):
    """Weights that are bf16 numbers: narrow_bf16 stores them in bf16 (moec::ExpertsBf16), the same values, the
    fp32 kernel's numbers to the bit; one weight off the bf16 grid keeps the node in fp32."""
    x, ids, w, w13, w2 = _f32_case(T, H, I, E, k, seed=T)
    w13, w2 = w13.bfloat16().float(), w2.bfloat16().float()
    lib = ort_kernels.library()
    sess = ort_kernels.experts_session(lib, w13.numpy(), w2.numpy(), 0)
    got = torch.from_numpy(sess.run(None, {"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()})[0])
    want = torch.ops.moec.experts(x, ids, w, w13, None, w2, None, "silu", True, 1.0, 0.0, False, "halves")
    assert rel_err(got, want) < 1e-6
    import onnx
    from onnx import helper, numpy_helper

    def model(w13, w2):
        node = helper.make_node(ort_kernels.EXPERTS, ["x", "ids", "w", "w13", "w2"], ["y"], domain=ort_kernels.DOMAIN,
                                gate_up=0)
        graph = helper.make_graph([node], "t", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(w13.numpy(), "w13"), numpy_helper.from_array(w2.numpy(), "w2")])
        m = helper.make_model(graph)
        ort_layouts.panel_weights(m)
        return m, ort_layouts.narrow_bf16(m)

    m, narrowed = model(w13, w2)
    assert narrowed == 1 and m.graph.node[0].op_type == "ExpertsBf16"
    assert {t.data_type for t in m.graph.initializer} == {onnx.TensorProto.BFLOAT16}
    off = w2.clone()
    off[0, 0, 0] = off[0, 0, 0].item() * (1 + 2 ** -12)  # between two bf16 numbers
    m, narrowed = model(w13, off)
    assert narrowed == 0 and m.graph.node[0].op_type == "Experts"


BF16 = pytest.mark.skipif(not cpu_native.has_bf16(), reason="needs AVX512-BF16")
WEIGHTS = [("fp32", False), ("bf16", False), pytest.param("bf16", True, marks=BF16, id="bf16-rows")]


@pytest.mark.parametrize("shape,N", [((1, 128), 96), ((7, 48), 40), ((2, 150, 64), 300), ((0, 64), 33),
                                     ((2, 1, 3, 2, 64), 40), ((5, 1000), 64)])
@pytest.mark.parametrize("weights,rows", WEIGHTS)
def test_fp32_matmul_node_equals_torch(shape, N, weights, rows):
    """moec::Linear / LinearBf16 (weights in panels, tails of 8, 12, 33 channels) against x @ W^T; with bf16 rows
    (a bf16 model's, narrow_bf16(rows=True): weights in pairs) against bf16(x) @ W^T: the products exact, the sums
    in fp32; K of 1000 ends in a part of 232 inputs; large and NaN inputs."""
    import onnx
    from onnx import helper, numpy_helper

    gen = torch.Generator().manual_seed(N)
    x, W = torch.randn(shape, generator=gen), torch.randn(N, shape[-1], generator=gen)
    if x.numel() > 8:
        x.view(-1)[3] = 1e30
    W = W.bfloat16().float() if weights == "bf16" else W
    node = helper.make_node(ort_kernels.FP32_MATMUL, ["x", "w"], ["y"], domain=ort_kernels.DOMAIN, n=N)
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(ort_layouts.panels(W.numpy()[None])[0], "w")])
    m = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                               helper.make_opsetid(ort_kernels.DOMAIN, 1)])
    assert ort_layouts.narrow_bf16(m) == int(weights == "bf16")
    if rows or weights == "fp32":
        assert ort_layouts.round_rows(m) == int(rows)  # bf16 nodes only
    assert [a.name for a in m.graph.node[0].attribute if a.name == "bf16_rows"] == ["bf16_rows"] * rows
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.register_custom_ops_library(ort_kernels.library())
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    want = ((x.bfloat16() if rows else x).double() @ W.double().T).float()
    assert got.shape == want.shape and (got.numel() == 0 or rel_err(got, want) < 1e-6), rel_err(got, want)
    if rows and x.numel():
        assert rel_err(got, (x.double() @ W.double().T).float()) > 1e-4  # the rows were rounded
        for r in range(0, x.numel() // x.shape[-1], 7):  # a row alone: its row of the batch, to the bit
            alone = sess.run(None, {"x": x.reshape(-1, x.shape[-1])[r:r + 1].numpy()})[0]
            assert np.array_equal(alone[0], got.reshape(-1, N)[r].numpy())
        x.view(-1)[0] = float("nan")
        got = sess.run(None, {"x": x.numpy()})[0].reshape(-1, N)
        assert np.isnan(got[0]).all() and np.isfinite(got[1:]).all()
    layout = "K/2, 64" if rows else "K, 32"
    with pytest.raises(Exception, match=rf"moec::Linear: x \[\.\.\., K\] and w \[ceil\(n/32\), {layout}\]"):
        sess.run(None, {"x": np.ones((1, shape[-1] + 2), np.float32)})


def _bf16_rows_reference(x, ids, w, w13, w2, gate_up):
    """moec's bf16-row experts in float64 where they round: FC1 on bf16(x), SiLU(gate) * up in fp32, rounded to
    bf16, FC2, each token's slots summed with their weights."""
    order = torch.from_numpy(ort_layouts.halves(w13.numpy(), ort_kernels.GATE_UP[gate_up]))
    I = w2.shape[2]
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            h = (order[e].double() @ x[t].bfloat16().double()).float()
            a = (torch.nn.functional.silu(h[:I]) * h[I:]).bfloat16()
            y[t] += w[t, j].double() * (w2[e].double() @ a.double()).float().double()
    return y.float()


@BF16
@pytest.mark.parametrize("gate_up", ["halves", "interleave_up_first"])
@pytest.mark.parametrize("T,H,I,E,k", [(1, 128, 96, 8, 2), (7, 48, 40, 8, 2), (64, 64, 272, 64, 6),
                                       (40, 512, 256, 8, 2), (0, 64, 64, 8, 2)])
def test_bf16_rows_node_equals_reference(T, H, I, E, k, gate_up):
    """moec::ExpertsBf16 with bf16_rows (a bf16 model's experts on AVX512-BF16: weights in pairs, vdpbf16ps)
    against _bf16_rows_reference: each token to 1e-6 but where one of its activations lies on a bf16 rounding
    boundary (the sums in another order, or moec's exp and torch's SiLU an ulp apart, round it apart: 2^-8 on that
    activation), which a few tokens may, none beyond 1e-3; each token alone its row of the batch to the bit; every
    row on one expert; and the rows really rounded (the fp32-row op differs by bf16's rounding)."""
    for case in (dict(), dict(ids=torch.zeros(T, k).long() + torch.arange(k))):
        x, ids, w, w13, w2 = _f32_case(T, H, I, E, k, seed=T + H, **case)
        w13, w2 = w13.bfloat16().float(), w2.bfloat16().float()
        sess = ort_kernels.experts_session(ort_kernels.library(), w13.numpy(), w2.numpy(),
                                           ort_kernels.GATE_UP[gate_up], bf16_rows=True)
        got = torch.from_numpy(sess.run(None, {"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()})[0])
        want = _bf16_rows_reference(x, ids, w, w13, w2, gate_up)
        assert got.shape == want.shape
        if not T:
            continue
        errs = torch.tensor([rel_err(got[t], want[t]) for t in range(T)])
        assert (errs < 1e-6).float().mean() >= 0.9 and errs.max() < 1e-3, errs
        for t in range(0, T, 13):
            alone = sess.run(None, {"x": x[t:t + 1].numpy(), "ids": ids[t:t + 1].numpy(), "w": w[t:t + 1].numpy()})[0]
            assert np.array_equal(alone[0], got[t].numpy()), t
        fp32_rows = ort_kernels.experts_session(ort_kernels.library(), w13.numpy(), w2.numpy(),
                                                ort_kernels.GATE_UP[gate_up])
        assert rel_err(got, torch.from_numpy(fp32_rows.run(None, {"x": x.numpy(), "ids": ids.numpy(),
                                                                  "w": w.numpy()})[0])) > 1e-4


@BF16
def test_bf16_rows_need_even_inputs_and_their_layout():
    """round_rows keeps fp32 rows (the interleaved layout) where a K is odd; a node given bf16_rows on the
    interleaved layout, or bf16_rows 2, is an ORT error naming the op."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    x, ids, w, w13, w2 = _f32_case(3, 48, 41, 4, 2, seed=1)
    w13, w2 = w13.bfloat16().float(), w2.bfloat16().float()
    odd = ort_kernels.experts_session(ort_kernels.library(), w13.numpy(), w2.numpy(), 0, bf16_rows=True)
    want = torch.ops.moec.experts(x, ids, w, w13, None, w2, None, "silu", True, 1.0, 0.0, False, "halves")
    got = torch.from_numpy(odd.run(None, {"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()})[0])
    assert rel_err(got, want) < 1e-6  # I = 41: fp32 rows
    x, ids, w, w13, w2 = _f32_case(3, 48, 40, 4, 2, seed=1)
    for rows, pairs, message in ((1, False, r"moec::Experts: w13 \[E, ceil\(2I/32\), H/2, 64\]"),
                                 (2, True, "ExpertsBf16: bf16_rows 2 is not 0 or 1")):
        node = helper.make_node(ort_kernels.EXPERTS, ["x", "ids", "w", "w13", "w2"], ["y"],
                                domain=ort_kernels.DOMAIN, gate_up=0)
        graph = helper.make_graph(
            [node], "t", [helper.make_tensor_value_info(n, t, None) for n, t in
                          (("x", onnx.TensorProto.FLOAT), ("ids", onnx.TensorProto.INT64), ("w", onnx.TensorProto.FLOAT))],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
            [numpy_helper.from_array(a.bfloat16().float().numpy(), n) for n, a in (("w13", w13), ("w2", w2))])
        m = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                   helper.make_opsetid(ort_kernels.DOMAIN, 1)])
        ort_layouts.panel_weights(m)
        ort_layouts.narrow_bf16(m)
        if pairs:
            ort_layouts.round_rows(m)
        attrs = m.graph.node[0].attribute
        for a in [a for a in attrs if a.name == "bf16_rows"]:
            attrs.remove(a)
        attrs.append(helper.make_attribute("bf16_rows", rows))
        so = ort.SessionOptions()
        so.register_custom_ops_library(ort_kernels.library())
        with pytest.raises(Exception, match=message):
            ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
                None, {"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()})


class _Upcast:
    """What a bf16 model's session computes: its fp32 upcast, where the CPU has AVX512-BF16 with each expert's and
    dense layer's input rounded to bf16 as the bf16 model rounds it (not the routers' and one-column gates': they
    stay ONNX Gemms); HF's experts run eagerly so that they go through F.linear."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).float()
        self.model.config._experts_implementation = "eager"
        self.rows = cpu_native.has_bf16()
        config = self.model.config
        self.keep = {getattr(config, "num_experts", None) or config.num_local_experts, 1}

    def __call__(self, *args, **kwargs):
        return self._run(self.model, *args, **kwargs)

    def generate(self, *args, **kwargs):
        return self._run(self.model.generate, *args, **kwargs)

    def _run(self, fn, *args, **kwargs):
        linear = torch.nn.functional.linear

        def rounded(x, w, b=None):
            return linear(x if w.shape[0] in self.keep else x.bfloat16().float(), w, b)

        with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
            if self.rows:
                mp.setattr(torch.nn.functional, "linear", rounded)
            return fn(*args, **kwargs)


@pytest.mark.parametrize("rows", [False, pytest.param(True, marks=BF16)])
def test_bf16_model_runs_as_its_fp32_upcast(rows, monkeypatch):
    """A bf16 model on backend="onnxruntime": the session computes the model's fp32 upcast (logits to 1e-5 before
    they are rounded to bf16, as the model returns them), every block and dense matrix on bf16 weights, generate
    gives the upcast's greedy tokens, a cache the eager model filled is read (bf16 -> fp32). With AVX512-BF16 (rows)
    the experts' and dense layers' input rows are rounded to bf16 as the bf16 model's are (_Upcast), and inspect
    says so; without it (or rows=False: has_bf16 made False) they stay fp32."""
    import onnx

    if not rows:
        monkeypatch.setattr(cpu_native, "has_bf16", lambda: False)
    model = models.tiny_model("qwen2_moe", dtype=torch.bfloat16)
    compiled = moec.compile(copy.deepcopy(model), backend="onnxruntime")
    upcast = _Upcast(model)
    assert upcast.rows == rows
    inputs = models.example_inputs(model, batch=2, seq=7)
    want = upcast(**inputs).logits
    with torch.no_grad():
        for use_cache in (False, True):
            got = compiled(**inputs, use_cache=use_cache).logits
            # the same logits rounded to bf16: nearly all equal; one on a rounding boundary may round the other
            # way; with bf16 rows a token with an input of a layer on one (test_bf16_rows_node_equals_reference)
            # may move its larger logits by one bf16 step too
            assert got.dtype == torch.bfloat16
            assert (got == want.bfloat16()).float().mean() > 0.99, (got == want.bfloat16()).float().mean()
            assert rel_err(got.float(), want.bfloat16().float()) <= (2 ** -8 if rows else 1e-3)
    nodes = [n for n in onnx.load(moec.inspect(compiled).export.path).graph.node if n.domain == "moec"]
    ops = {n.op_type for n in nodes}
    assert {"ExpertsBf16", "LinearBf16"} <= ops and not ops & {"Experts", "Linear"}, ops
    assert all(any(a.name == "bf16_rows" for a in n.attribute) == rows for n in nodes if "Bf16" in n.op_type)
    assert {b.op for b in moec.inspect(compiled).export.blocks} == {"moec::ExpertsBf16"}  # inspect says so
    assert all(("input rows to bf16" in b.why) == rows for b in moec.inspect(compiled).export.blocks)
    # inputs where rounding the attention's input moves a token to other experts than the upcast's (a near-tie):
    # the export is proved on fp32 rows, so the session is not refused; it computes the rounded model's output
    flips = models.example_inputs(model, batch=4, seq=16, seed=8)
    with torch.no_grad():
        got = compiled(**flips, use_cache=False).logits
    assert rel_err(got.float(), upcast(**flips, use_cache=False).logits) < TOL[torch.bfloat16]
    inputs = models.example_inputs(model, batch=1, seq=4)
    assert torch.equal(compiled.generate(**inputs, max_new_tokens=8, do_sample=False),
                       upcast.generate(**inputs, max_new_tokens=8, do_sample=False))
    with torch.no_grad():  # the eager bf16 model fills a cache; the session goes on from it
        out = model(**inputs, use_cache=True)
        ids = torch.tensor([[5]])
        eager = model(input_ids=ids, past_key_values=copy.deepcopy(out.past_key_values), use_cache=True).logits
        step = compiled(input_ids=ids, past_key_values=out.past_key_values, use_cache=True).logits
    assert rel_err(step.float(), eager.float()) < 3e-2  # the eager bf16 model's rounding against fp32


@BF16
def test_round_rows_file_with_external_data(tmp_path):
    """round_rows_file on a file whose weights are external data: a bf16 Linear, an fp32 one (left as it was) and an
    odd-K bf16 one (fp32 rows) beside it; the pairs written beside the model, every initializer external, the
    bf16-row node's numbers bf16(x) @ W^T and the others' unchanged."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    gen = torch.Generator().manual_seed(0)
    W = {"w": torch.randn(96, 128, generator=gen).bfloat16().float(), "w32": torch.randn(64, 128, generator=gen),
         "odd": torch.randn(40, 127, generator=gen).bfloat16().float()}
    nodes = [helper.make_node(ort_kernels.FP32_MATMUL, [x, w], [f"y_{w}"], domain=ort_kernels.DOMAIN, n=len(W[w]))
             for x, w in (("x", "w"), ("x", "w32"), ("x_odd", "odd"))]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)
                                           for x in ("x", "x_odd")],
                              [helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in nodes],
                              [numpy_helper.from_array(ort_layouts.panels(w.numpy()[None])[0], n) for n, w in W.items()])
    proto = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                   helper.make_opsetid(ort_kernels.DOMAIN, 1)])
    path = str(tmp_path / "m.onnx")
    onnx.save(proto, path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert ort_layouts.lay_out_file(path) == (0, 0, 2)  # w and odd in bf16
    assert ort_layouts.round_rows_file(path) == 1  # odd: K 127
    laid = onnx.load(path, load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in laid.graph.initializer)
    assert sorted(t.name for t in laid.graph.initializer) == ["odd_bf16", "w32", "w_bf16_pairs"]
    so = ort.SessionOptions()
    so.register_custom_ops_library(ort_kernels.library())
    x, x_odd = torch.randn(5, 128, generator=gen), torch.randn(5, 127, generator=gen)
    got = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy(), "x_odd": x_odd.numpy()})
    wants = [x.bfloat16().double() @ W["w"].double().T, x.double() @ W["w32"].double().T,
             x_odd.double() @ W["odd"].double().T]
    for g, w in zip(got, wants):
        assert rel_err(torch.from_numpy(g), w.float()) < 1e-6


def test_silu_is_correctly_rounded():
    """The experts ops' SiLU is gate / (1 + e^-gate) * up in fp32 with e^-gate correctly rounded (exp8: in double,
    rounded once; glibc's expf rounds ~1 in 13000 the other way): an Experts node whose FC1 passes x through as the
    gate with up = 1 and whose FC2 is the identity returns SiLU(x) itself, checked to the bit against float64's exp
    rounded to fp32, over 100k gates in [-110, 110] and the edges (0, -0, 88.7 where e^x overflows, -87.3 and -103.9
    where it is denormal or 0, +-1e30; inf or NaN would reach every gate of its row through the GEMM)."""
    H = 256
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(400, H, generator=gen) * 220 - 110).numpy()
    x[0, 1:12] = [0.0, -0.0, 88.7, -88.7, 87.3, -87.3, 103.9, -103.9, 1e30, -1e30, 1e-30]
    x[:, 0] = 1.0  # the input the up rows read
    w13 = np.concatenate([np.eye(H), np.tile(np.eye(H)[:1], (H, 1))]).astype(np.float32)[None]  # gate = x, up = 1
    sess = ort_kernels.experts_session(ort_kernels.library(), w13, np.eye(H, dtype=np.float32)[None], 0)
    got = sess.run(None, {"x": x, "ids": np.zeros((len(x), 1), np.int64), "w": np.ones((len(x), 1), np.float32)})[0]
    with np.errstate(over="ignore"):
        e = np.exp(-x.astype(np.float64)).astype(np.float32)  # correctly rounded but for a tie within 2^-29 ulp
        want = x / (np.float32(1) + e)
    assert np.array_equal(got, want), np.argwhere(got != want)[:5]


@pytest.mark.parametrize("gate_up", ["halves", "interleave_up_first"])
@pytest.mark.parametrize("T,H,I,E,k", [(1, 128, 96, 8, 2), (7, 48, 40, 8, 2), (64, 64, 272, 64, 6), (0, 64, 64, 8, 2)])
def test_int8_node_equals_moec_experts_int8(T, H, I, E, k, gate_up):
    """moec::ExpertsInt8 (int8 panels, a scale per channel, FC1's scales reordered with its rows) against
    moec::experts_int8 weight-only; large activations too."""

    for scale in (1.0, 1e4):
        x, ids, w, w13, w2 = _f32_case(T, H, I, E, k, seed=T + 1, scale=scale)
        t13, t2 = quantize(Int8Experts(), w13), quantize(Int8Experts(), w2)
        sess = ort_kernels.experts_session(ort_kernels.library(), t13["q"].numpy(), t2["q"].numpy(),
                                           ort_kernels.GATE_UP[gate_up], s13=t13["scale"].numpy(),
                                           s2=t2["scale"].numpy())
        got = torch.from_numpy(sess.run(None, {"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()})[0])
        want = torch.ops.moec.experts_int8(x, ids, w, t13["q"], t13["scale"], None, t2["q"], t2["scale"], None,
                                           "silu", True, 1.0, 0.0, False, gate_up)
        assert got.shape == want.shape and (got.numel() == 0 or rel_err(got, want) < 1e-6), rel_err(got, want)
    with pytest.raises(Exception, match=r"moec::Experts: s13 \[E, 2I\] and s2 \[E, H\]"):
        ort_kernels.experts_session(ort_kernels.library(), t13["q"].numpy(), t2["q"].numpy(), 0,
                                    s13=t13["scale"][:, :-1].numpy(), s2=t2["scale"].numpy()).run(
            None, {"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()})


VNNI = pytest.mark.skipif(not cpu_native.has_vnni512(), reason="needs AVX512-VNNI")


def _int8_rows_case(T, H, I, E, k, seed, scale=1.0, ids=None):
    """_f32_case with its x rounded as int8 rows see it pushed to the edges: a zero row (step 0) and a row of one
    large input among small ones, where there are rows"""
    x, ids, w, w13, w2 = _f32_case(T, H, I, E, k, seed=seed, scale=scale, ids=ids)
    if T >= 2:
        x[0] = 0
        x[1] /= 1e3
        x[1, 3] = 50 * scale
    return x, ids, w, w13, w2


@VNNI
@pytest.mark.parametrize("gate_up", ["halves", "interleave_up_first"])
@pytest.mark.parametrize("T,H,I,E,k", [(1, 128, 96, 8, 2), (7, 64, 160, 8, 2), (64, 64, 288, 64, 6),
                                       (300, 128, 64, 8, 3), (0, 64, 64, 8, 2)])
def test_int8_rows_node_equals_moec_experts_int8(T, H, I, E, k, gate_up):
    """moec::ExpertsInt8 with int8_activations (int8 rows, vpdpbusd on panels_a8) against moec::experts_int8 with
    int8 activations (the torch backend), large activations and a zero row too, and one expert taking every pair:
    the same numbers to the bit where the torch backend runs moec's kernels on every expert (few rows), else to
    1e-6 (an expert of many rows runs torch._int_mm and torch's SiLU, whose exp may differ from moec's by an ulp)."""
    from moec.backends.torch_backend import min_rows

    cases = [dict(scale=1.0), dict(scale=1e4), dict(scale=1.0, ids=torch.zeros(T, k).long() + torch.arange(k))]
    for case in cases:
        x, ids, w, w13, w2 = _int8_rows_case(T, H, I, E, k, seed=T + 2, **case)
        t13, t2 = quantize(Int8Experts(), w13), quantize(Int8Experts(), w2)
        sess = ort_kernels.experts_session(ort_kernels.library(), t13["q"].numpy(), t2["q"].numpy(),
                                           ort_kernels.GATE_UP[gate_up], s13=t13["scale"].numpy(),
                                           s2=t2["scale"].numpy(), a8=True)
        got = torch.from_numpy(sess.run(None, {"x": x.numpy(), "ids": ids.numpy(), "w": w.numpy()})[0])
        want = torch.ops.moec.experts_int8(x, ids, w, t13["q"], t13["scale"], None, t2["q"], t2["scale"], None,
                                           "silu", True, 1.0, 0.0, False, gate_up, True)
        exact = T == 0 or torch.bincount(ids.flatten()).max() < min_rows(False, True)
        assert got.shape == want.shape and (torch.equal(got, want) if exact else rel_err(got, want) < 1e-6)
        for t in range(0, T, 97):  # a token alone: its row of the batch, to the bit
            alone = sess.run(None, {"x": x[t:t + 1].numpy(), "ids": ids[t:t + 1].numpy(), "w": w[t:t + 1].numpy()})[0]
            assert np.array_equal(alone[0], got[t].numpy())
    with pytest.raises(Exception, match=r"moec::Experts: w13 \[E, ceil\(2I/16\), H/4, 64\]"):
        ort_kernels.experts_session(ort_kernels.library(), t13["q"].numpy(), t2["q"].numpy(), 0,
                                    s13=t13["scale"].numpy(), s2=t2["scale"].numpy(), a8=True).run(
            None, {"x": np.ones((1, H + 32), np.float32), "ids": np.zeros((1, k), np.int64),
                   "w": np.ones((1, k), np.float32)})


def _linear_session(w: np.ndarray, s: np.ndarray | None, a8: bool):
    """One moec::Linear / LinearInt8 node on W [N, K] (int8 with scales s: LinearInt8; a8: in panels_a8)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    layout = ort_layouts.panels_a8 if a8 else ort_layouts.panels
    weights = {"w": layout(w[None])[0], **({"s": s} if s is not None else {})}
    node = helper.make_node(ort_kernels.FP32_MATMUL + "Int8" * (s is not None), ["x", *weights], ["y"],
                            domain=ort_kernels.DOMAIN, n=w.shape[0], **({"int8_activations": 1} if a8 else {}))
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, n) for n, v in weights.items()])
    m = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                               helper.make_opsetid(ort_kernels.DOMAIN, 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(ort_kernels.library())
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


@VNNI
@pytest.mark.parametrize("shape,N", [((1, 128), 96), ((7, 64), 40), ((2, 150, 64), 300), ((0, 64), 33),
                                     ((2, 1, 3, 2, 96), 17)])
def test_int8_rows_linear_node_equals_quantized_linear(shape, N):
    """moec::LinearInt8 with int8_activations (panel tails of 8, 12, 1 channels) against the torch backend's
    quantized linear layer with int8 activations (a step a row): the same numbers to the bit."""
    from moec.backends.torch_backend import quantized_linear

    gen = torch.Generator().manual_seed(N)
    x, W = torch.randn(shape, generator=gen), torch.randn(N, shape[-1], generator=gen)
    t = quantize(Int8Experts(), W[None])
    sess = _linear_session(t["q"][0].numpy(), t["scale"][0].numpy(), a8=True)
    got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    want = quantized_linear(x.reshape(-1, shape[-1]), (t["q"], t["scale"]), True).reshape(*shape[:-1], N)
    assert got.shape == want.shape and torch.equal(got, want)
    with pytest.raises(Exception, match=r"moec::Linear: x \[\.\.\., K\] and w \[ceil\(n/16\), K/4, 64\]"):
        sess.run(None, {"x": np.ones((1, shape[-1] + 32), np.float32)})


def test_panels_a8_hold_the_weights():
    """panels_a8: channel c of panel p at input k holds q[16p + c, k] + 128 as a byte, k in moec_pack_a8's order
    (each 32: the evens, then the odds), 128 past N."""
    q = torch.randint(-127, 128, (2, 20, 64), dtype=torch.int8).numpy()
    p = ort_layouts.panels_a8(q).view(np.uint8)  # [2, 2, 16, 64]
    assert p.shape == (2, 2, 16, 64) and p.dtype == np.uint8
    order = np.concatenate([b + np.r_[0:32:2, 1:32:2] for b in range(0, 64, 32)])  # position -> input
    for e, j, pos in [(0, 0, 0), (1, 19, 17), (0, 5, 63), (1, 16, 32)]:
        assert p[e, j // 16, pos // 4, (j % 16) * 4 + pos % 4] == int(q[e, j, order[pos]]) + 128
    assert (p[:, 1, :, 16:] == 128).all()  # channels 20..31: zero weights


def test_backend_runs_int8_experts_on_moec_kernels():
    """Int8Experts() on backend="onnxruntime": moec::ExpertsInt8, the torch backend's logits and tokens; with
    int8 activations too where the CPU has AVX512-VNNI (int8 rows, as the torch backend rounds them), else the
    blocks stay QMoE and say why."""
    model = models.tiny_model("mixtral")
    compiled = moec.compile(copy.deepcopy(model), backend="onnxruntime", quantize=moec.Int8Experts())
    reference = moec.compile(copy.deepcopy(model), quantize=moec.Int8Experts())
    inputs = models.example_inputs(model, batch=2, seq=7)
    with torch.no_grad():
        for use_cache in (False, True):
            assert rel_err(compiled(**inputs, use_cache=use_cache).logits, reference(**inputs).logits) < 1e-5
    inputs = models.example_inputs(model, batch=1, seq=4)
    assert torch.equal(compiled.generate(**inputs, max_new_tokens=8, do_sample=False),
                       reference.generate(**inputs, max_new_tokens=8, do_sample=False))
    assert {b.op for b in moec.inspect(compiled).export.blocks} == {"moec::ExpertsInt8"}
    # and the dense layers too (dense=): moec::LinearInt8, per channel as the torch backend's
    compiled = moec.compile(copy.deepcopy(model), backend="onnxruntime", quantize=moec.Int8Experts(),
                            dense=moec.Int8Experts())
    reference = moec.compile(copy.deepcopy(model), quantize=moec.Int8Experts(), dense=moec.Int8Experts())
    with torch.no_grad():
        assert rel_err(compiled(**inputs).logits, reference(**inputs).logits) < 1e-5
    import onnx

    ops = {n.op_type for n in onnx.load(moec.inspect(compiled).export.path).graph.node if n.domain == "moec"}
    assert "LinearInt8" in ops and not ops & {"Linear", "Int4MatMul"}, ops
    cfg = moec.Int8Experts(activations="int8")
    a8 = moec.compile(copy.deepcopy(model), backend="onnxruntime", quantize=cfg, dense=cfg)
    with torch.no_grad():
        got = a8(**inputs).logits
    blocks = moec.inspect(a8).export.blocks
    if not cpu_native.has_vnni512():
        assert {b.op for b in blocks} == {"QMoE"} and "AVX512-VNNI" in blocks[0].why, blocks[0].why
        return
    assert {b.op for b in blocks} == {"moec::ExpertsInt8"}, blocks
    reference = moec.compile(copy.deepcopy(model), quantize=cfg, dense=cfg)
    with torch.no_grad():
        assert rel_err(got, reference(**inputs).logits) < 1e-5
    assert torch.equal(a8.generate(**inputs, max_new_tokens=8, do_sample=False),
                       reference.generate(**inputs, max_new_tokens=8, do_sample=False))
    nodes = [n for n in onnx.load(moec.inspect(a8).export.path).graph.node if n.domain == "moec"]
    rows8 = {n.op_type for n in nodes if any(a.name == "int8_activations" and a.i == 1 for a in n.attribute)}
    assert rows8 == {"ExpertsInt8", "LinearInt8"}, rows8


@VNNI
def test_int8_rows_dense_matmuls_all_or_none(tmp_path):
    """moec_fp32_matmuls(int8, a8): MatMuls of K = 64 and 96 become LinearInt8 with int8 rows, each equal to the
    torch backend's quantized linear layer to the bit; a file with one MatMul of K = 40 among them is left as it was
    (0: export_onnx then writes MatMulNBits and says why)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from moec.backends.torch_backend import quantized_linear
    from moec.export_dense import moec_fp32_matmuls

    gen = torch.Generator().manual_seed(0)

    def file(widths: dict[str, int]) -> str:
        w = {n: torch.randn(K, 24, generator=gen) for n, K in widths.items()}
        nodes = [helper.make_node("MatMul", [n, f"w{n}"], [f"y{n}"]) for n in widths]
        graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [3, K])
                                               for n, K in widths.items()],
                                  [helper.make_tensor_value_info(f"y{n}", onnx.TensorProto.FLOAT, None) for n in widths],
                                  [numpy_helper.from_array(v.numpy(), f"w{n}") for n, v in w.items()])
        path = str(tmp_path / f"m{len(widths)}.onnx")
        onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)]), path)
        return path, w

    path, _ = file({"a": 64, "b": 40, "c": 96})
    before = onnx.load(path)
    assert moec_fp32_matmuls(path, set(), False, int8=True, a8=True) == 0 and onnx.load(path) == before
    path, w = file({"a": 64, "c": 96})
    assert moec_fp32_matmuls(path, set(), False, int8=True, a8=True) == 2
    assert all(any(a.name == "int8_activations" and a.i == 1 for a in n.attribute) for n in onnx.load(path).graph.node)
    so = ort.SessionOptions()
    so.register_custom_ops_library(ort_kernels.library())
    x = {n: torch.randn(3, v.shape[0], generator=gen) for n, v in w.items()}
    got = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {k: v.numpy() for k, v in x.items()})
    for (n, v), y in zip(w.items(), got):
        t = quantize(Int8Experts(), v.T.contiguous()[None])
        assert torch.equal(torch.from_numpy(y), quantized_linear(x[n], (t["q"], t["scale"]), True))


def test_fp32_matmuls_keep_a_weight_that_is_a_graph_output(tmp_path):
    """moec_fp32_matmuls on a file whose MatMul weight is also a graph output: the weight stays (a valid file), the
    product is the same."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from moec.export_dense import moec_fp32_matmuls

    W = np.random.default_rng(0).standard_normal((64, 40)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "t",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 40]),
                               helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [64, 40])],
                              [numpy_helper.from_array(W, "W")])
    path = str(tmp_path / "m.onnx")
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)]), path)
    assert moec_fp32_matmuls(path, set(), False) == 1
    onnx.checker.check_model(path)
    so = ort.SessionOptions()
    so.register_custom_ops_library(ort_kernels.library())
    x = np.ones((3, 64), np.float32)
    y, w = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.array_equal(w, W) and np.allclose(y, x @ W, rtol=1e-5, atol=1e-5)


def test_bf16_model_follows_its_dtype_and_takes_bf16_embeddings():
    """The session follows the model's dtype as it is now: a bf16 model made fp32 after compile gives fp32 logits
    (the fp32 model's, fp32 rows), an fp32 one made bf16 runs as its upcast (_Upcast); bf16 inputs_embeds reach the
    upcast in fp32."""
    model = models.tiny_model("mixtral", dtype=torch.bfloat16)
    inputs = models.example_inputs(model, batch=2, seq=5)
    compiled = moec.compile(copy.deepcopy(model), backend="onnxruntime")
    with torch.no_grad():
        compiled(**inputs)
        compiled.float()
        got = compiled(**inputs).logits
        assert got.dtype == torch.float32 and rel_err(got, copy.deepcopy(model).float()(**inputs).logits) < 1e-5
        compiled.to(torch.bfloat16)
        got = compiled(**inputs).logits
        assert got.dtype == torch.bfloat16
        embeds = model.get_input_embeddings()(inputs["input_ids"])  # bf16
        got = compiled(inputs_embeds=embeds, use_cache=False).logits
        want = _Upcast(model)(inputs_embeds=embeds.float(), use_cache=False).logits
        assert got.dtype == torch.bfloat16 and rel_err(got.float(), want.bfloat16().float()) < 1e-3
