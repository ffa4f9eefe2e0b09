"""moec::CachedAttention (backends/ort_attention.py): the node alone against moec::ort_gqa (what export_gqa proves each
layer against) over batch, new tokens, past, heads, head sizes, sinks, padding, fully masked rows, ties and large
logits, on the one-thread path (decode) and the threaded one (prompts); bad shapes get ORT errors naming the op;
backend="onnxruntime" runs it in fp32 KV-cache sessions (GroupQueryAttention with MOEC_ORT_KERNELS=0), and the
rewrite leaves GroupQueryAttention nodes it does not compute alone."""

import copy

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


def _session(H, KVH, scale, sinks: bool):
    import onnx
    import onnxruntime as ort
    from onnx import helper

    names = ["q", "k", "v", "past_k", "past_v", "bias", "sinks" if sinks else ""]
    node = helper.make_node(ort_attention.OP, names, ["out", "present_k", "present_v"], domain="moec",
                            num_heads=H, kv_num_heads=KVH, scale=scale)
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                            for n in names if n],
                              [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                               for n in ("out", "present_k", "present_v")])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                   helper.make_opsetid("moec", 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(ort_kernels.library())
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
@pytest.mark.parametrize("H,KVH,D", [(8, 2, 64), (4, 4, 20), (6, 1, 128)])
@pytest.mark.parametrize("sinks", [False, True])
def test_node_equals_ort_gqa(B, S, P, H, KVH, D, sinks):
    """Decode steps (one token, past 0 to 300) run on the calling thread; prompts of 64-200 tokens on ORT's pool.
    D=20: a head size that is not a multiple of the 8-float vectors."""
    _check(_inputs(B, S, P, H, KVH, D, sinks, pad=2 if B > 1 else 0), H, KVH)


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
    """fp32 KV-cache sessions on CPU run moec::CachedAttention (GPT-OSS: with sinks and sliding windows in the bias);
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
        else:
            assert "GroupQueryAttention" in ops and "CachedAttention" not in ops
