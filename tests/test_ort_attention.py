"""moec::CachedAttention (backends/ort_attention.py): the node alone against moec::ort_gqa (what export_gqa proves each
layer against) over batch, new tokens, past, heads, head sizes, sinks, padding, fully masked rows, ties and large
logits, on the one-thread path (decode) and the threaded one (prompts); bad shapes get ORT errors naming the op;
backend="onnxruntime" runs it in fp32 KV-cache sessions (GroupQueryAttention with MOEC_ORT_KERNELS=0), and the
rewrite leaves GroupQueryAttention nodes it does not compute alone."""

import copy

import numpy as np
import pytest
import torch

import moec
from moec import models
from moec.backends import cpu_native, onnx_backend, ort_attention, ort_kernels  # noqa: F401 (onnx_backend: moec::ort_gqa)

from conftest import rel_err

# no compiler or CPU support here: skipped; where moec's C kernels build, the library must build and pass its
# self-test (test_library_builds), else these tests fail rather than skip
pytestmark = pytest.mark.skipif(cpu_native.library() is None, reason="moec's C kernels are not built here")
MIN = torch.finfo(torch.float32).min


def test_library_builds():
    """The library builds and both self-tests (experts, matmul, attention against moec's torch ops) pass."""
    assert ort_kernels.library() is not None


def _session(H, KVH, scale, sinks: bool, rotary_half: int | None = None, outputs=("out", "present_k", "present_v"),
             library: str | None = None, mask: bool = False, bias: bool | None = None):
    """rotary_half: None, no cos/sin inputs; 0, the inputs without the attribute (malformed). outputs ("out",): the
    cache kept in place. library: another build of moec's kernels than the process's. mask: the input `mask` [B, T]
    (bool), without `bias` unless bias=True."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    bias = not mask if bias is None else bias
    names = ["q", "k", "v", "past_k", "past_v", "bias" if bias else "", "sinks" if sinks else "",
             *(["cos", "sin"] * (rotary_half is not None))]
    if mask:
        names += [""] * (9 - len(names)) + ["mask"]
    node = helper.make_node(ort_attention.OP, names, list(outputs), domain="moec",
                            num_heads=H, kv_num_heads=KVH, scale=scale, **({"rotary_half": rotary_half} if rotary_half else {}))
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info(
                                                n, onnx.TensorProto.BOOL if n == "mask" else onnx.TensorProto.FLOAT, None)
                                            for n in names if n],
                              [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                   helper.make_opsetid("moec", 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(library or ort_kernels.library())
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _inputs(B, S, P, H, KVH, D, sinks, seed=0, scale=1.0, pad=0, bias_rows=None):
    """Random q/k/v/past; a causal additive bias (HF's: the float minimum) with the first `pad` positions of rows
    after the first padded (-inf, as a mask may hold)."""
    g = torch.Generator().manual_seed(seed)
    T = P + S
    x = {"q": torch.randn(B, S, H * D, generator=g) * scale, "k": torch.randn(B, S, KVH * D, generator=g),
         "v": torch.randn(B, S, KVH * D, generator=g), "past_k": torch.randn(B, KVH, P, D, generator=g),
         "past_v": torch.randn(B, KVH, P, D, generator=g)}
    bias = torch.zeros(bias_rows or B, 1, S, T)
    bias.masked_fill_(torch.arange(T)[None, :] > P + torch.arange(S)[:, None], MIN)
    if pad:
        bias[1:, ..., :pad] = float("-inf")
    x["bias"] = bias
    if sinks:
        x["sinks"] = torch.randn(H, generator=g)
    return x


def _check(x, H, KVH, tol=1e-5):
    D = x["past_k"].shape[-1]
    sess = _session(H, KVH, D ** -0.5, "sinks" in x)
    got = [torch.from_numpy(o) for o in sess.run(None, {n: t.numpy() for n, t in x.items()})]
    want = torch.ops.moec.ort_gqa(x["q"], x["k"], x["v"], x["past_k"], x["past_v"], x["bias"], x.get("sinks"), H,
                                  KVH, D ** -0.5)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])  # the presents: copies
    assert rel_err(got[0], want[0]) < tol, rel_err(got[0], want[0])
    return got


@pytest.mark.parametrize("B,S,P", [(1, 1, 0), (1, 1, 61), (2, 1, 300), (1, 16, 0), (3, 7, 5), (1, 200, 0),
                                   (2, 64, 100)])
@pytest.mark.parametrize("H,KVH,D", [(8, 2, 64), (4, 4, 20), (6, 1, 128), (6, 2, 40), (4, 4, 16)])
@pytest.mark.parametrize("sinks", [False, True])
def test_node_equals_ort_gqa(B, S, P, H, KVH, D, sinks):
    """Decode steps (one token, past 0 to 300) run on the calling thread; prompts of 64-200 tokens on ORT's pool.
    D=20: a head size that is not a multiple of the 8-float vectors; 6 heads on one kv head: a group of 4 and one of
    2 in the weighted sum; D=40: two passes of 16 channels and one of 8; 4 heads on 4 kv heads (multi-head
    attention): groups of one head."""
    _check(_inputs(B, S, P, H, KVH, D, sinks, pad=2 if B > 1 else 0), H, KVH)


@pytest.mark.parametrize("H,KVH,D", [(8, 2, 64), (4, 4, 20), (3, 1, 24), (2, 2, 32)])
def test_a_prompt_equals_its_tokens_one_at_a_time(H, KVH, D):
    """Each query's numbers are its own: a 37-token prompt over a past of 13 (padded rows, sinks) gives, to the bit,
    what 37 one-token steps give, each over the past and the tokens before it (the keys' blocks of 8 and the heads'
    groups are the same for a query whatever else the call holds)."""
    B, S, P = 2, 37, 13
    x = _inputs(B, S, P, H, KVH, D, sinks=True, pad=3)
    prompt = _session(H, KVH, 0.3, True).run(None, {n: t.numpy() for n, t in x.items()})[0]
    step = _session(H, KVH, 0.3, True)
    past_k = torch.cat([x["past_k"], x["k"].view(B, S, KVH, D).transpose(1, 2)], 2)
    past_v = torch.cat([x["past_v"], x["v"].view(B, S, KVH, D).transpose(1, 2)], 2)
    for s in range(S):
        one = {"q": x["q"][:, s:s + 1], "k": x["k"][:, s:s + 1], "v": x["v"][:, s:s + 1],
               "past_k": past_k[:, :, :P + s], "past_v": past_v[:, :, :P + s],
               "bias": x["bias"][:, :, s:s + 1, :P + s + 1], "sinks": x["sinks"]}
        out = step.run(None, {n: t.contiguous().numpy() for n, t in one.items()})[0]
        assert np.array_equal(out[:, 0], prompt[:, s]), s


@pytest.mark.parametrize("flag", ["-mno-avx512dq", "-mno-avx512f"])
def test_narrower_builds_give_the_same_bits(flag):
    """The library as built for a CPU without AVX-512DQ (logits one head a 256-bit register, not two heads a 512-bit
    one) and without AVX-512 (the AVX2 paths: 8 lanes, value sums 2 vectors a pass, exp8 in two halves) computes the
    same bits as this CPU's: head sizes that are multiples of 8, decode and prompts on the pool, a long past, sinks,
    padding, rotary, large logits, the cache in place."""
    if flag.removeprefix("-mno-") not in cpu_native._cpu_flags().split():
        pytest.skip(f"this CPU has no {flag.removeprefix('-mno-')}: its own build is the narrower one")
    narrow = ort_kernels.build((flag,))
    for i, (B, S, P, H, KVH, D) in enumerate([(1, 1, 0, 8, 2, 64), (2, 1, 300, 6, 1, 128), (3, 7, 5, 6, 2, 40),
                                              (1, 100, 33, 4, 4, 16), (2, 1, 77, 3, 1, 24), (1, 1, 1030, 8, 1, 64)]):
        x = _inputs(B, S, P, H, KVH, D, sinks=i % 2 == 1, seed=i, scale=30.0 if i == 2 else 1.0, pad=2 if B > 1 else 0)
        half = D // 2 if i % 3 == 0 else None
        if half:
            angle = torch.randn(B, S, half, generator=torch.Generator().manual_seed(i)) * 20
            x["cos"], x["sin"] = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        outputs = ("out",) if i % 2 else ("out", "present_k", "present_v")
        got = []
        for library in (ort_kernels.library(), narrow):
            feeds = {n: t.numpy().copy() for n, t in x.items()}
            if len(outputs) == 1:  # in place: room for the new rows
                for name in ("past_k", "past_v"):
                    feeds[name] = np.concatenate([feeds[name], np.zeros((B, KVH, S, D), np.float32)], 2)
            run = _session(H, KVH, D ** -0.5, "sinks" in x, half, outputs, library).run(None, feeds)
            got.append([*run, *(feeds[n] for n in ("past_k", "past_v") if len(outputs) == 1)])
        for mine, theirs in zip(*got):
            assert np.array_equal(mine, theirs), (flag, i)


def test_bias_of_one_row_for_the_batch():
    _check(_inputs(3, 4, 9, 8, 2, 32, False, bias_rows=1), 8, 2)


@pytest.mark.parametrize("sinks", [False, True])
def test_large_logits_and_ties(sinks):
    """Logits in the hundreds (a softmax with one winner per row: the exp's range reduction) and keys that tie
    exactly (equal probabilities)."""
    x = _inputs(2, 5, 40, 8, 2, 64, sinks, scale=40.0)
    x["past_k"][:, :, 10:20] = x["past_k"][:, :, 10:11]  # ten equal keys
    _check(x, 8, 2)


@pytest.mark.parametrize("fill", [MIN, float("-inf")])
def test_a_query_with_nothing_to_attend_to_gets_zeros(fill):
    """A query whose every position is masked (a row of padding), by the float minimum or -inf, with and without
    sinks: zeros, as ORT's GroupQueryAttention gives (the reference's numbers); its other queries are unaffected."""
    for sinks in (False, True):
        x = _inputs(2, 3, 6, 4, 2, 16, sinks, pad=0)
        x["bias"][1, 0, 1] = fill  # query 1 of row 1
        out = _check(x, 4, 2)[0]
        assert torch.equal(out[1, 1], torch.zeros(4 * 16)) and out[1, 0].abs().min() > 0


def test_bad_inputs_are_errors_naming_the_op():
    x = _inputs(1, 2, 3, 8, 2, 16, False)
    sess = _session(8, 2, 0.25, False)
    bad = dict(x, bias=x["bias"][..., :-1])
    with pytest.raises(Exception, match="moec::CachedAttention: q .B, S, H.D., k and v"):
        sess.run(None, {n: t.numpy() for n, t in bad.items()})
    with pytest.raises(Exception, match="moec::CachedAttention: takes q"):
        _session(8, 3, 0.25, False).run(None, {n: t.numpy() for n, t in x.items()})


@pytest.mark.parametrize("B,S,P", [(1, 1, 0), (1, 1, 61), (3, 1, 40), (3, 7, 5), (1, 200, 0), (3, 64, 100)])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("rotary", [False, True])
def test_a_mask_is_the_bias_it_stands_for(B, S, P, in_place, rotary):
    """A mask [B, T] instead of the bias (backends/ort_mask.py's `take`): the same bits as the bias that is 0 where the
    mask is set and -inf where not, for every query; row 1 left-padded with a hole, row 2 masked but for its last
    position (its other queries attend to nothing: zeros); decode on the calling thread, prompts on ORT's pool; with
    and without the cache kept in place."""
    H, KVH, D = 8, 2, 16
    x = _inputs(B, S, P, H, KVH, D, sinks=True)
    T = P + S
    mask = torch.ones(B, T, dtype=torch.bool)
    if B > 1:
        mask[1, :2] = mask[1, T // 2] = False
        mask[2, :T - 1] = False
    if rotary:
        angle = torch.randn(B, S, D // 2, generator=torch.Generator().manual_seed(1)) * 3
        x["cos"], x["sin"] = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    x["bias"] = torch.zeros(B, 1, S, T).masked_fill(~mask[:, None, None, :], float("-inf"))
    outputs = ("out",) if in_place else ("out", "present_k", "present_v")
    half = D // 2 if rotary else None
    outs = []
    for masked in (False, True):
        feeds = {n: t.numpy() for n, t in x.items() if n != "bias" or not masked}
        if masked:
            feeds["mask"] = mask.numpy()
        if in_place:
            for name in ("past_k", "past_v"):
                feeds[name] = np.concatenate([feeds[name], np.zeros((B, KVH, S + 3, D), np.float32)], 2)
        outs.append(_session(H, KVH, 0.25, True, half, outputs, mask=masked).run(None, feeds))
    assert all(np.array_equal(a, b) for a, b in zip(*outs))
    if B > 1:
        assert (outs[1][0][2, :S - 1] == 0).all() and (outs[1][0][2, S - 1] != 0).all()


def test_a_mask_that_does_not_fit_is_an_error():
    x = {n: t.numpy() for n, t in _inputs(2, 2, 3, 8, 2, 16, False).items()}
    mask = np.ones((2, 5), bool)
    with pytest.raises(Exception, match="or else mask .B, P.S."):  # and a bias too
        _session(8, 2, 0.25, False, mask=True, bias=True).run(None, {**x, "mask": mask})
    del x["bias"]
    for bad in (np.ones((2, 4), bool), np.ones((1, 5), bool), np.ones((2, 1, 5), bool)):
        with pytest.raises(Exception, match="or else mask .B, P.S."):
            _session(8, 2, 0.25, False, mask=True).run(None, {**x, "mask": bad})


@pytest.mark.parametrize("B,S,P", [(1, 1, 0), (2, 1, 40), (3, 7, 5), (1, 200, 0), (2, 64, 100)])
@pytest.mark.parametrize("room", [0, 6])
@pytest.mark.parametrize("rotary", [False, True])
def test_in_place_writes_the_new_rows_into_the_past(B, S, P, room, rotary):
    """Without present outputs the node reads its past from the first P = T - S rows of past_k/past_v (R >= T rows)
    and writes the new keys and values into rows P..T-1: the same output as with presents, to the bit, the past
    rows' numbers the presents', the rows past T untouched. Fed as numpy arrays to session.run, as the backend
    does: ORT reads and writes those arrays' memory."""
    H, KVH, D = 8, 2, 16
    x = _inputs(B, S, P, H, KVH, D, sinks=True, pad=2 if B > 1 else 0)
    if rotary:
        angle = torch.randn(B, S, D // 2, generator=torch.Generator().manual_seed(1)) * 3
        x["cos"], x["sin"] = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    feeds = {n: t.numpy() for n, t in x.items()}
    half = D // 2 if rotary else None
    want = _session(H, KVH, 0.25, True, half).run(None, feeds)
    for name in ("past_k", "past_v"):
        feeds[name] = np.full((B, KVH, P + S + room, D), 7.0, np.float32)
        feeds[name][:, :, :P] = x[name].numpy()
    out = _session(H, KVH, 0.25, True, half, outputs=("out",)).run(None, feeds)
    assert len(out) == 1 and np.array_equal(out[0], want[0])
    for name, present in zip(("past_k", "past_v"), want[1:]):
        assert np.array_equal(feeds[name][:, :, :P + S], present) and (feeds[name][:, :, P + S:] == 7.0).all()


def test_in_place_without_room_or_with_one_present_is_an_error():
    x = _inputs(1, 2, 3, 8, 2, 16, False)
    feeds = {n: t.numpy() for n, t in x.items()}  # past_k has P = 3 rows: no room for the 2 new ones
    with pytest.raises(Exception, match="P.S rows or more without present outputs"):
        _session(8, 2, 0.25, False, outputs=("out",)).run(None, feeds)
    with pytest.raises(Exception, match="outputs 2"):
        _session(8, 2, 0.25, False, outputs=("out", "present_k")).run(None, feeds)


def _cache_graph(extra_reader: bool = False, shape_reader: tuple = (2, 3)):
    """input_ids/attention_mask/position_ids and one layer's past -> a CachedAttention node and a Shape of the past
    (its dims start:end) -> logits = out + the shape's sum; extra_reader: an Identity also reads the past"""
    import onnx
    from onnx import helper, numpy_helper

    f = onnx.TensorProto.FLOAT
    start, end = shape_reader
    nodes = [helper.make_node(ort_attention.OP, ["q", "q2", "q2", "pk", "pv", "bias"], ["out", "prk", "prv"],
                              domain="moec", num_heads=2, kv_num_heads=1, scale=0.5),
             helper.make_node("Shape", ["pk"], ["shape"], start=start, end=end),
             helper.make_node("Cast", ["shape"], ["shape_f"], to=f),
             helper.make_node("ReduceSum", ["shape_f"], ["length"], keepdims=0),
             helper.make_node("Add", ["out", "length"], ["logits"])]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["pk"], ["copy"]))
    inputs = [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["B", "S"]),
              helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["B", "T"]),
              helper.make_tensor_value_info("position_ids", onnx.TensorProto.INT64, ["B", "S"]),
              *(helper.make_tensor_value_info(n, f, None) for n in ("pk", "pv"))]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("logits", "prk", "prv", *(["copy"] * extra_reader))]
    g = np.random.default_rng(0)  # one new token's q, k and v after 3 (D = 4), as constants
    consts = {"q": g.standard_normal((1, 2, 8), np.float32), "q2": g.standard_normal((1, 2, 4), np.float32),
              "bias": np.zeros((1, 1, 2, 5), np.float32)}
    graph = helper.make_graph(nodes, "t", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in consts.items()])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                  helper.make_opsetid("moec", 1)])


def test_in_place_graph_measures_the_past_by_the_mask():
    """ort_attention.in_place: a graph whose pasts only CachedAttention and Shape read loses its presents, and a
    Shape of the past says P = mask width - new tokens (the past array now has room: more rows); a past with another
    reader (an Identity), one two attention nodes read, or inputs other than the model's and the pasts: left as it
    was."""
    import onnxruntime as ort

    ort_attention.register_schema()
    for start, end in ((2, 3), (0, 4), (-2, -1), (0, 2)):
        proto = _cache_graph(shape_reader=(start, end))
        base = ort.InferenceSession(proto.SerializeToString(), _options(), providers=["CPUExecutionProvider"])
        assert ort_attention.in_place(proto) == 1
        assert [o.name for o in proto.graph.output] == ["logits"]
        kept = ort.InferenceSession(proto.SerializeToString(), _options(), providers=["CPUExecutionProvider"])
        B, S, P, D = 1, 2, 3, 4
        g = np.random.default_rng(0)
        feeds = {"input_ids": np.zeros((B, S), np.int64), "attention_mask": np.ones((B, P + S), np.int64),
                 "position_ids": np.zeros((B, S), np.int64), "pk": g.standard_normal((B, 1, P, D), np.float32),
                 "pv": g.standard_normal((B, 1, P, D), np.float32)}
        want = base.run(None, feeds)
        for n in ("pk", "pv"):
            feeds[n] = np.concatenate([feeds[n], np.zeros((B, 1, S + 5, D), np.float32)], 2)  # room: 5 rows more
        got = kept.run(None, feeds)
        assert np.array_equal(got[0], want[0])
        assert np.array_equal(feeds["pk"][:, :, :P + S], want[1]) and np.array_equal(feeds["pv"][:, :, :P + S], want[2])
    assert ort_attention.in_place(_cache_graph(extra_reader=True)) == 0
    proto = _cache_graph()  # a second node reading the same past (layers sharing their cache): left as it was
    second = copy.deepcopy(proto.graph.node[0])
    del second.output[:]
    second.output.extend(["out2", "prk2", "prv2"])
    proto.graph.node.append(second)
    proto.graph.output.extend(copy.deepcopy(proto.graph.output[1]) for _ in range(2))
    proto.graph.output[-2].name, proto.graph.output[-1].name = "prk2", "prv2"
    assert ort_attention.in_place(proto) == 0
    proto = _cache_graph()
    proto.graph.input.append(proto.graph.input[-1])
    proto.graph.input[-1].name = "state"
    assert ort_attention.in_place(proto) == 0


def _options():
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.register_custom_ops_library(ort_kernels.library())
    return so


@pytest.mark.parametrize("B,S,P,cos_rows", [(1, 1, 40, 1), (2, 1, 7, 2), (2, 9, 0, 1), (1, 120, 30, 1)])
@pytest.mark.parametrize("H,KVH,D", [(8, 2, 64), (4, 4, 20)])
def test_rotary_inside_equals_hf_rotation(B, S, P, cos_rows, H, KVH, D):
    """rotary_half: q and k rotated as HF's apply_rotary_pos_emb (rotate_half) before attending; the rotated keys
    are what the present holds, to the bit (each product rounded, then the sum, as torch)."""
    x = _inputs(B, S, P, H, KVH, D, False, pad=2 if B > 1 else 0)
    g = torch.Generator().manual_seed(S)
    angle = torch.randn(cos_rows, S, D // 2, generator=g) * 50  # large angles: positions far out
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    sess = _session(H, KVH, D ** -0.5, False, rotary_half=D // 2)
    got = [torch.from_numpy(o) for o in sess.run(None, {n: t.numpy() for n, t in dict(x, cos=cos, sin=sin).items()})]
    q, k = ort_attention.rotate_half(x["q"], cos, sin, H), ort_attention.rotate_half(x["k"], cos, sin, KVH)
    want = torch.ops.moec.ort_gqa(q, k, x["v"], x["past_k"], x["past_v"], x["bias"], None, H, KVH, D ** -0.5)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert rel_err(got[0], want[0]) < 1e-5


def test_rotary_inputs_that_do_not_fit_are_errors():
    x = _inputs(1, 2, 3, 8, 2, 16, False)
    cos = torch.ones(1, 2, 16)
    with pytest.raises(Exception, match="moec::CachedAttention: .*rotary_half 16"):  # not within the head
        _session(8, 2, 0.25, False, rotary_half=16).run(None, {n: t.numpy() for n, t in dict(x, cos=cos, sin=cos).items()})
    with pytest.raises(Exception, match="moec::CachedAttention: .*rotary_half 0"):  # cos, sin but no rotary_half
        _session(8, 2, 0.25, False, rotary_half=0).run(None, {n: t.numpy() for n, t in dict(x, cos=cos, sin=cos).items()})
    with pytest.raises(Exception, match="moec::CachedAttention: .*rotary_half 8"):  # cos for 3 positions, 2 new
        _session(8, 2, 0.25, False, rotary_half=8).run(
            None, {n: t.numpy() for n, t in dict(x, cos=torch.ones(1, 3, 16), sin=torch.ones(1, 3, 16)).items()})


def _rotary_graph(extra_reader: bool = False, half: int = 8):
    """q's and k's rotation as torch.onnx exports HF's rotate-half rotary, feeding a CachedAttention (B 1, S 3, D 16)."""
    import onnx
    from onnx import helper, numpy_helper

    T = onnx.TensorProto
    inits = [numpy_helper.from_array(torch.tensor(v).numpy(), n) for n, v in
             (("one", [1]), ("lo_s", [0]), ("lo_e", [half]), ("hi_s", [half]), ("hi_e", [2 ** 62]), ("ax", [-1]),
              ("shape4", [1, 3, -1, 16]), ("shape3", [1, 3, -1]))]
    nodes = [helper.make_node("Unsqueeze", ["cos", "one"], ["ucos"]), helper.make_node("Unsqueeze", ["sin", "one"], ["usin"])]
    for t in ("q", "k"):
        nodes += [helper.make_node("Reshape", [f"{t}_lin", "shape4"], [f"{t}_4"]),
                  helper.make_node("Transpose", [f"{t}_4"], [f"{t}_x"], perm=[0, 2, 1, 3]),
                  helper.make_node("Slice", [f"{t}_x", "lo_s", "lo_e", "ax"], [f"{t}_lo"]),
                  helper.make_node("Slice", [f"{t}_x", "hi_s", "hi_e", "ax"], [f"{t}_hi"]),
                  helper.make_node("Neg", [f"{t}_hi"], [f"{t}_neg"]),
                  helper.make_node("Concat", [f"{t}_neg", f"{t}_lo"], [f"{t}_turned"], axis=-1),
                  helper.make_node("Mul", [f"{t}_x", "ucos"], [f"{t}_a"]),
                  helper.make_node("Mul", ["usin", f"{t}_turned"], [f"{t}_b"]),
                  helper.make_node("Add", [f"{t}_b", f"{t}_a"], [f"{t}_rot"]),
                  helper.make_node("Transpose", [f"{t}_rot"], [f"{t}_back"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [f"{t}_back", "shape3"], [t])]
    outputs = ["out", "present_k", "present_v"]
    nodes.append(helper.make_node(ort_attention.OP, ["q", "k", "v", "past_k", "past_v", "bias", ""], outputs,
                                  domain="moec", num_heads=2, kv_num_heads=1, scale=0.25))
    if extra_reader:  # the rotation's input read by something else too: the nodes must stay
        nodes.append(helper.make_node("Identity", ["q_x"], ["q_x_copy"]))
        outputs.append("q_x_copy")
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(n, T.FLOAT, None) for n in
                                           ("q_lin", "k_lin", "v", "past_k", "past_v", "bias", "cos", "sin")],
                              [helper.make_tensor_value_info(n, T.FLOAT, None) for n in outputs], inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                  helper.make_opsetid("moec", 1)])


@pytest.mark.parametrize("half", [8, 5])
def test_fuse_rotary_takes_the_rotation_in_and_computes_the_same(half):
    """The exported rotate-half subgraph becomes the op's cos/sin inputs (the ~25 nodes go, their constants too); the
    fused session's numbers are the unfused one's, to the bit, for halves of the head (8 of 16) and others (5).
    Not fused: a rotation whose input has another reader."""
    import onnxruntime as ort

    ort_attention.register_schema()
    x = _inputs(1, 3, 4, 2, 1, 16, False)
    angle = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(1)) * 20
    feed = dict(q_lin=x["q"], k_lin=x["k"], v=x["v"], past_k=x["past_k"], past_v=x["past_v"], bias=x["bias"],
                cos=angle.cos(), sin=angle.sin())
    outs = []
    for fuse in (False, True):
        m = _rotary_graph(half=half)
        if fuse:
            assert ort_attention.fuse_rotary(m) == 1
            assert [n.op_type for n in m.graph.node] == [ort_attention.OP] and not m.graph.initializer
            assert list(m.graph.node[0].input[-2:]) == ["cos", "sin"]
        so = ort.SessionOptions()
        so.register_custom_ops_library(ort_kernels.library())
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {n: t.numpy() for n, t in feed.items()}))
    for a, b in zip(*outs):
        assert (a == b).all()
    assert ort_attention.fuse_rotary(_rotary_graph(extra_reader=True)) == 0


def test_rewrite_leaves_what_the_op_does_not_compute():
    """GroupQueryAttention with rotary, without a bias, with a window, with q/k norms or with its probabilities as an
    output stays ORT's node; pruning the dropped seqlens/total inputs keeps a value a subgraph reads."""
    import onnx
    from onnx import helper

    nodes = [helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sl", "t", "", "", "", "b"], ["o0"],
                              domain="com.microsoft", num_heads=8, kv_num_heads=2, scale=0.1),
             helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sl", "t", "cos", "sin", "", "b"],
                              ["o1"], domain="com.microsoft", num_heads=8, kv_num_heads=2, scale=0.1, do_rotary=1),
             helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sl", "t"], ["o2"],
                              domain="com.microsoft", num_heads=8, kv_num_heads=2, scale=0.1),
             helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sl", "t", "", "", "", "b"], ["o3"],
                              domain="com.microsoft", num_heads=8, kv_num_heads=2, scale=0.1, local_window_size=4),
             helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sl", "t", "", "", "", "b", "", "",
                                                      "", "qn", "kn"], ["o4"],
                              domain="com.microsoft", num_heads=8, kv_num_heads=2, scale=0.1),
             helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sl", "t", "", "", "", "b"],
                              ["o5", "", "", "qk"], domain="com.microsoft", num_heads=8, kv_num_heads=2, scale=0.1,
                              qk_output=1)]
    # seqlens from a chain another node's subgraph also reads (kept), total from one only the first node reads (gone)
    nodes[:0] = [helper.make_node("Shape", ["q"], ["shape"]), helper.make_node("Cast", ["shape"], ["sl"], to=6),
                 helper.make_node("Neg", ["x"], ["t0"]), helper.make_node("Abs", ["t0"], ["t"])]
    branch = helper.make_graph([helper.make_node("Identity", ["sl"], ["y"])], "b", [],
                               [helper.make_tensor_value_info("y", onnx.TensorProto.INT32, None)])
    nodes.append(helper.make_node("If", ["c"], ["o6"], then_branch=branch, else_branch=branch))
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(f"o{i}", onnx.TensorProto.FLOAT, None)
                                               for i in range(7)])
    proto = helper.make_model(graph)
    for n in proto.graph.node[4:]:  # only the first attention node reads total "t": the others read "t2"
        if n.op_type == "GroupQueryAttention" and n.output[0] != "o0":
            n.input[6] = "t2"
    assert ort_attention.rewrite(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["Shape", "Cast", "CachedAttention", *["GroupQueryAttention"] * 5,
                                                     "If"]
    assert list(proto.graph.node[2].input) == ["q", "k", "v", "pk", "pv", "b", ""]


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("padding", [3, 9])
def test_backend_runs_it_and_matches_hf(name, padding, monkeypatch):
    """fp32 KV-cache sessions on CPU run moec::CachedAttention (GPT-OSS: with sinks and sliding windows in the bias)
    with the cache kept in place;
    greedy tokens are HF's (sdpa), with a left-padded row and with a row of padding only (its prompt's queries attend
    to nothing: zeros from this op and ORT's); MOEC_ORT_KERNELS=0 keeps GroupQueryAttention."""
    import onnx

    ref = models.tiny_model(name).eval()
    ids = torch.randint(3, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :padding] = 0
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    for kernels in ("1", "0"):
        monkeypatch.setenv("MOEC_ORT_KERNELS", kernels)
        model = moec.compile(copy.deepcopy(ref), backend="onnxruntime")
        with torch.no_grad():
            got = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert torch.equal(got, want)
        export = moec.inspect(model).export
        ops = {n.op_type for n in onnx.load(export.path, load_external_data=False).graph.node}
        if kernels == "1":
            assert "CachedAttention" in ops and "GroupQueryAttention" not in ops and "moec::CachedAttention" in export.attention
            # Mixtral's rotate-half rotary runs inside the op; GPT-OSS's own rotation (chunks) stays as exported
            assert ("rotary inside" in export.attention) == (name == "mixtral")
            # the cache kept in place: the step hands back logits only (ort_attention.in_place)
            assert "the cache kept in place" in export.attention and export.outputs == ["logits"]
            # HF's causal mask as the 2-D mask inside the op (ort_mask.take); GPT-OSS's sliding-window layers keep
            # HF's mask, expanded
            assert "the 2-D mask inside" in export.attention and "CausalBias" not in ops
            assert ("GatherND" in ops) == (name == "gpt_oss")
        else:
            assert "GroupQueryAttention" in ops and "CachedAttention" not in ops
