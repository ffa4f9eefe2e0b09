"""moec::causal_bias and backends/ort_mask.py: HF's causal mask over a padding mask as one node of the KV-cache
export. The torch op is HF's eager mask to the bit (dtypes, batch, new tokens, past, padding); export_gqa's mask
function makes it only for HF's plain causal mask; `expand` computes it with ONNX's own ops; `take` hands the 2-D mask
to moec::CachedAttention, with the same outputs."""

import numpy as np
import pytest
import torch
from transformers.masking_utils import causal_mask_function, eager_mask, sliding_window_causal_mask_function

from moec import export_gqa
from moec.backends import cpu_native, onnx_backend, ort_attention, ort_kernels, ort_mask  # noqa: F401 (the op)


def _masks(B, T, seed=0):
    """no padding, left padding of every length up to T - 1 (row b: b * T // B positions), random holes"""
    g = torch.Generator().manual_seed(seed)
    left = torch.arange(T)[None, :] >= (torch.arange(B) * T // B)[:, None]
    return [torch.ones(B, T, dtype=torch.bool), left, torch.rand(B, T, generator=g) > 0.4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,S,P", [(1, 1, 0), (1, 1, 9), (3, 1, 7), (2, 5, 0), (3, 4, 6), (2, 16, 16)])
def test_the_op_is_hfs_eager_mask(dtype, B, S, P):
    T = P + S
    for mask in _masks(B, T):
        want = eager_mask(B, S, T, P, 0, causal_mask_function, mask, dtype)
        got = torch.ops.moec.causal_bias(mask, B, S, T, dtype)
        assert got.dtype == dtype and torch.equal(got, want)
        assert torch.equal(export_gqa.mask(B, S, T, P, 0, causal_mask_function, mask, dtype), want)


@pytest.mark.parametrize("args", [
    dict(mask_function=sliding_window_causal_mask_function(3)),
    dict(kv_length=12),  # keys beyond the queries' (a static cache's width): the queries are not the last S
    dict(kv_offset=2, kv_length=6),
    dict(attention_mask=None),
], ids=["sliding_window", "kv_length", "kv_offset", "no_mask"])
def test_other_masks_are_hfs(args):
    """Any mask but HF's plain causal one over a 2-D padding mask whose queries are the last S of T positions is
    HF's eager mask itself (the op would be wrong for each of these)."""
    B, S, P = 2, 3, 5
    kw = dict(batch_size=B, q_length=S, kv_length=P + S, q_offset=P, kv_offset=0, mask_function=causal_mask_function,
              attention_mask=_masks(B, P + S)[1], dtype=torch.float32)
    kw.update(args)
    if kw["attention_mask"] is not None:
        kw["attention_mask"] = _masks(B, kw["kv_length"])[1]
    want = eager_mask(**kw)
    assert torch.equal(export_gqa.mask(**kw), want)
    causal = eager_mask(**dict(kw, mask_function=causal_mask_function, kv_offset=0, q_offset=kw["kv_length"] - S))
    assert not torch.equal(causal, want) or args == dict(attention_mask=None)


def _graph(attention: bool, other_reader: bool, dtype=None):
    """ids [B, S], mask [B, T], pk [B, 1, P, 4] -> bias = CausalBias(Cast(mask), B, S, P + S) -> outputs: the bias,
    or (attention) one moec::CachedAttention over q/k/v [B, S, 2*4] and pasts pk, pv reading it (other_reader: and
    the bias)"""
    import onnx
    from onnx import helper

    f = onnx.TensorProto.FLOAT
    to = helper.np_dtype_to_tensor_dtype(np.dtype(dtype or np.float32))
    nodes = [helper.make_node("Cast", ["mask"], ["mask_b"], to=onnx.TensorProto.BOOL),
             *(helper.make_node("Shape", [x], [f"{n}1"], start=d, end=d + 1)
               for n, x, d in (("B", "ids", 0), ("S", "ids", 1), ("P", "pk", 2))),
             *(helper.make_node("Squeeze", [f"{n}1"], [n]) for n in "BSP"),
             helper.make_node("Add", ["P", "S"], ["T"]),
             helper.make_node(ort_mask.OP, ["mask_b", "B", "S", "T"], ["bias"], domain="moec", to=to)]
    inputs = [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["B", "S"]),
              helper.make_tensor_value_info("mask", onnx.TensorProto.INT64, ["B", "T"]),
              helper.make_tensor_value_info("pk", f, None)]
    outputs = [helper.make_tensor_value_info("bias", to, None)] if other_reader or not attention else []
    if attention:
        nodes.append(helper.make_node(ort_attention.OP, ["q", "k", "v", "pk", "pv", "bias"], ["out", "prk", "prv"],
                                      domain="moec", num_heads=2, kv_num_heads=1, scale=0.5))
        inputs += [helper.make_tensor_value_info(n, f, None) for n in ("q", "k", "v", "pv")]
        outputs = [helper.make_tensor_value_info(n, f, None) for n in ("out", "prk", "prv")] + outputs
    graph = helper.make_graph(nodes, "t", inputs, outputs)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                  helper.make_opsetid("moec", 1)])


def _run(model, feeds, library=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if library:
        so.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("B,S,P", [(1, 1, 0), (3, 1, 7), (2, 5, 0), (3, 4, 6)])
def test_expand_computes_the_op(dtype, B, S, P):
    model = _graph(attention=False, other_reader=True, dtype=dtype)
    assert ort_mask.expand(model) == 1 and ort_mask.OP not in {n.op_type for n in model.graph.node}
    T = P + S
    feeds = {"ids": np.zeros((B, S), np.int64), "pk": np.zeros((B, 1, P, 4), np.float32)}
    for mask in _masks(B, T):
        got = _run(model, {**feeds, "mask": mask.long().numpy()})[0]
        want = torch.ops.moec.causal_bias(mask, B, S, T, getattr(torch, np.dtype(dtype).name))
        assert got.dtype == dtype and np.array_equal(got, want.numpy())
    more = torch.cat([mask, ~mask])  # rows after the first B: not read (HF's)
    assert np.array_equal(_run(model, {**feeds, "mask": more.long().numpy()})[0], got)


@pytest.mark.parametrize("rows,width", [(3, 5), (3, 7), (2, 6)], ids=["narrower", "wider", "fewer_rows"])
def test_a_mask_that_does_not_fit_the_cache_is_an_error(rows, width):
    """A mask narrower or wider than the past and the new tokens (HF would pad or cut it: a caller's mask that does
    not fit the cache, e.g. onnxruntime-genai counting a token it did not run), or with fewer rows than the batch:
    the expanded node refuses it, as the op does, and as moec::CachedAttention does where it takes the mask."""
    model = _graph(attention=False, other_reader=True)
    ort_mask.expand(model)
    B, S, P = 3, 2, 4
    mask = torch.ones(rows, width, dtype=torch.bool)
    with pytest.raises(Exception, match="the attention mask (has a row for each row of the batch|is as wide as)"):
        _run(model, {"ids": np.zeros((B, S), np.int64), "pk": np.zeros((B, 1, P, 4), np.float32),
                     "mask": mask.long().numpy()})
    with pytest.raises(ValueError, match="moec::causal_bias: an attention mask of shape"):
        torch.ops.moec.causal_bias(mask, B, S, P + S, torch.float32)


@pytest.mark.skipif(cpu_native.library() is None, reason="moec's C kernels are not built here")
@pytest.mark.parametrize("other_reader", [False, True])
def test_take_hands_the_mask_to_the_attention(other_reader):
    """The attention node reads the 2-D mask; the CausalBias node goes, or stays for its other reader (then
    expanded); the outputs are those of the graph as it was (expanded), to the bit."""
    import copy

    model = _graph(attention=True, other_reader=other_reader)
    before = copy.deepcopy(model)
    assert ort_mask.take(model) == 1
    attention = next(n for n in model.graph.node if n.op_type == ort_attention.OP)
    assert attention.input[5] == "" and attention.input[9] == "mask_b"
    assert (ort_mask.OP in {n.op_type for n in model.graph.node}) == other_reader
    assert ort_mask.expand(model) == other_reader and ort_mask.expand(before) == 1
    g = np.random.default_rng(0)
    B, S, P = 3, 4, 6
    feeds = {"ids": np.zeros((B, S), np.int64), "mask": _masks(B, P + S)[2].long().numpy(),
             **{n: g.standard_normal((B, S, 8 if n == "q" else 4), np.float32) for n in ("q", "k", "v")},
             **{n: g.standard_normal((B, 1, P, 4), np.float32) for n in ("pk", "pv")}}
    got, want = _run(model, feeds, ort_kernels.library()), _run(before, feeds, ort_kernels.library())
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
