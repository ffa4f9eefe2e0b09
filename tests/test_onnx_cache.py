"""moec.export_onnx(kv_cache=True): HF decoder LMs exported with their KV cache, run step by step in a plain ONNX
Runtime session (a prompt of batch 2 with left padding, then one token at a time), compared at every step with
HF's own cached forward: logits (fp32 tight; fp16 at fp16's tolerance; int8/int4 QMoE against the model with its
experts dequantized) and greedy tokens."""

import copy
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import moec
from moec import models

from conftest import TOL, rel_err

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "glm4_moe", "deepseek_v2", "deepseek_v3",
            "llama4", "qwen3_next", "jamba", "ernie4_5_moe"]
OVERRIDES = {"llama4": dict(num_experts_per_tok=1),  # as its checkpoints: ORT's op takes top-1 input weighting
             "deepseek_v2": dict(q_lora_rank=None)}  # as DeepSeek-V2-Lite (one q_proj); DeepSeek-V3 has q LoRA
# with -m slow: GLM4-MoE's and DeepSeek-V3's exports are stepped through in test_onnx / test_genai by default
SLOW_FAMILIES = {"glm4_moe", "deepseek_v3"}
QSIZES = dict(hidden_size=64, intermediate_size=64)  # int4 groups of 32 divide every K


def _positions(mask: torch.Tensor, new: int) -> torch.Tensor:
    """Position ids as HF's generate computes them from the attention mask (left padding), for the last `new`."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)[:, -new:]


def _empty_past(sess, batch: int) -> list[np.ndarray]:
    """The first step's past: no key/value position; linear-attention states (static shapes) at zero."""
    return [np.zeros([batch] + [d if isinstance(d, int) else 0 for d in i.shape[1:]],
                     np.float16 if i.type == "tensor(float16)" else np.float32) for i in sess.get_inputs()[3:]]


def _step_by_step(model, ref, path, tol, quantize=None, attention="gqa", fused=None, prompt=6):
    """Export `model` with its cache, run it in a plain ORT session (a prompt of `prompt` tokens, batch 2 with left
    padding, then one token at a time) and compare every step with `ref`'s own cached forward: logits within `tol`,
    greedy tokens. fused: how many layers' attention must be GroupQueryAttention nodes (None: all key/value layers
    with attention="gqa"). Returns the export's report."""
    report = moec.export_onnx(model, models.example_inputs(model, batch=2, seq=5), path, quantize=quantize,
                              kv_cache=True, attention=attention)
    assert report.inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    kinds = [("key", "value") if name.endswith(".key") else ("conv_state", "recurrent_state")
             for name in report.inputs[3::2]]  # a key/value pair, or a linear-attention layer's two states
    assert report.inputs[3:] == [f"past_key_values.{i}.{p}" for i, pair in enumerate(kinds) for p in pair]
    assert report.outputs == ["logits", *(f"present.{i}.{p}" for i, pair in enumerate(kinds) for p in pair)]
    assert report.blocks and all(b.op == ("QMoE" if quantize else "MoE") for b in report.blocks), str(report)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shapes = {v.name: v.shape for v in (*sess.get_inputs(), *sess.get_outputs())}  # the axes named as genai's
    assert shapes["input_ids"] == shapes["position_ids"] == ["batch_size", "sequence_length"]
    assert shapes["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert all(shape[0] == "batch_size" for shape in shapes.values()), shapes
    assert all(shapes[f"past_key_values.{n}"][2] == "past_sequence_length" and
               shapes[f"present.{n}"][2] == "past_sequence_length + sequence_length"
               for i, pair in enumerate(kinds) if pair == ("key", "value") for n in (f"{i}.key", f"{i}.value")), shapes
    layers = kinds.count(("key", "value"))
    assert report.gqa_layers == (fused if fused is not None else layers if attention == "gqa" else 0), str(report)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, prompt), generator=gen)
    mask = torch.ones(2, prompt, dtype=torch.long)
    mask[1, :2] = 0  # row 1: left padding
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, position_ids=_positions(mask, prompt), use_cache=True)
    cache = out.past_key_values
    past = _empty_past(sess, 2)
    feed, want = ids, out.logits
    for step in range(4):
        got = sess.run(None, {"input_ids": feed.numpy(), "attention_mask": mask.numpy(),
                              "position_ids": _positions(mask, feed.shape[1]).numpy(),
                              **{n: p for n, p in zip(report.inputs[3:], past)}})
        real = mask[:, -feed.shape[1]:].bool()  # padded positions' logits mean nothing (they differ)
        assert rel_err(torch.from_numpy(got[0])[real].float(), want[real].float()) < tol, step
        past = got[1:]
        token = want[:, -1].argmax(-1, keepdim=True)  # the reference's greedy token ...
        top2 = want[:, -1].float().topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tol * want[:, -1].float().abs().amax(-1)  # not a tie within tol
        got_token = torch.from_numpy(got[0][:, -1]).argmax(-1, keepdim=True)
        assert torch.equal(got_token[clear], token[clear]), step  # ... is ORT's too
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        feed = token
        with torch.no_grad():
            out = ref(input_ids=feed, attention_mask=mask, position_ids=_positions(mask, 1), past_key_values=cache,
                      use_cache=True)
        cache, want = out.past_key_values, out.logits
    return report


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_FAMILIES else f
                                    for f in FAMILIES])
def test_generates_step_by_step_like_hf(family, tmp_path):
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import slice_split_rule

    model = models.tiny_model(family, **OVERRIDES.get(family, {})).eval()
    report = _step_by_step(model, model, tmp_path / "lm.onnx", TOL[torch.float32])
    assert report.fusions.get("rms_normalization"), str(report)  # every family here norms with RMSNorm
    assert slice_split_rule in rewriter._DEFAULT_REWRITE_RULES  # the rule export leaves out is back for others


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_sliding_window_steps_like_hf(family, tmp_path):
    """A window of 4 positions, shorter than the prompt + steps: the fused attention keeps HF's window mask."""
    kw = dict(layer_types=["sliding_attention", "full_attention"]) if family == "gpt_oss" else {}
    model = models.tiny_model(family, sliding_window=4, **kw).eval()
    _step_by_step(model, model, tmp_path / "lm.onnx", TOL[torch.float32])


@pytest.mark.parametrize("family", [pytest.param("mixtral", marks=pytest.mark.slow), "gpt_oss"])
def test_attention_as_ordinary_ops(family, tmp_path):
    model = models.tiny_model(family).eval()
    _step_by_step(model, model, tmp_path / "lm.onnx", TOL[torch.float32], attention="ops")


@pytest.mark.parametrize("family, fused, says", [
    ("mixtral", 1, "layers 1 in ordinary ops: fused attention differs from MixtralAttention's"),
    ("deepseek_v3", 0, "DeepseekV3Attention (layer 1), absorbed: fused attention differs"),  # MLA: all or none
])
def test_a_layer_whose_fused_attention_differs_keeps_its_own(family, fused, says, tmp_path, monkeypatch):
    """The proof on the example: a family whose eager attention computes something else than the fused op (here
    its output scaled by 1.01 in layer 1) keeps that attention in that layer (MLA's absorbed form: in every layer),
    says so, and the file still equals the model."""
    module = sys.modules[type(models.tiny_model(family)).__module__]
    eager = module.eager_attention_forward

    def odd(module, *args, **kwargs):
        out, w = eager(module, *args, **kwargs)
        return (out * 1.01 if module.layer_idx == 1 else out), w

    monkeypatch.setattr(module, "eager_attention_forward", odd)
    model = models.tiny_model(family).eval()
    model.set_attn_implementation("eager")
    report = _step_by_step(model, model, tmp_path / "lm.onnx", TOL[torch.float32], fused=fused)
    assert says in report.attention, report.attention


def test_mla_with_two_linears_that_could_expand_its_latents_keeps_its_own_ops(tmp_path):
    """q_b_proj of kv_b_proj's shape (q_lora_rank = kv_lora_rank, v_head_dim = qk_rope_head_dim): which one expands
    the latents is not proved, so MLA is not absorbed, the report says why, and the file equals the model."""
    model = models.tiny_model("deepseek_v3", q_lora_rank=16, v_head_dim=8).eval()
    report = _step_by_step(model, model, tmp_path / "lm.onnx", TOL[torch.float32], fused=0)
    assert "2 bias-free linears [64, 16] could expand its latents, not one" in report.attention, report.attention


def test_gqa_says_what_the_node_cannot_express():
    """The reasons a layer keeps its own attention before any numeric proof (moec.export_gqa._why_not)."""
    import types

    from moec import export_gqa

    module = types.SimpleNamespace(layer_idx=0, training=False)
    q, k, mask = torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 2, 8), torch.zeros(1, 1, 2, 5)  # past 3 + 2 new

    def why(q=q, k=k, v=k, mask=mask, **kwargs):
        return export_gqa._why_not(module, q, k, v, mask, 0.0, 0.125, kwargs)

    with export_gqa.fused([(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))], True, {}, "eager"):
        assert why() is None
        assert why(output_router_logits=True, sliding_window=4, s_aux=torch.zeros(4)) is None
        assert "head sizes differ" in why(v=torch.zeros(1, 2, 2, 4))
        assert "do not share" in why(q=torch.zeros(1, 3, 2, 8))
        assert "mask" in why(mask=None) and "mask" in why(mask=mask.bool()) and "mask" in why(mask=mask[..., :4])
        assert "softcap" in why(softcap=30.0)
        assert "sinks" in why(s_aux=torch.zeros(2))


@pytest.mark.parametrize("heads", [(4, 2, 16), (4, 4, 8), (4, 1, 24)], ids=lambda h: "x".join(map(str, h)))
@pytest.mark.parametrize("sinks", [False, True], ids=["no_sinks", "sinks"])
def test_gqa_node_computes_the_reference(heads, sinks, tmp_path):
    """moec::ort_gqa's torch reference against ORT's GroupQueryAttention as export_onnx writes it (seqlens and total
    length derived from the bias): 1 token and 6, with and without a past, left padding, large logits."""
    H, KVH, D = heads

    class Attend(torch.nn.Module):
        def forward(self, q, k, v, pk, pv, bias, sink):
            return torch.ops.moec.ort_gqa(q, k, v, pk, pv, bias, sink if sinks else None, H, KVH, 0.25)

    def example(B, S, P, scale=1.0, gen=torch.Generator().manual_seed(0)):
        r = lambda *shape: torch.randn(*shape, generator=gen) * scale  # noqa: E731
        mask = torch.ones(B, P + S, dtype=torch.bool)
        mask[-1, :2] = B == 1  # the last row left-padded
        allowed = torch.ones(S, P + S, dtype=torch.bool).tril(P)[None] & mask[:, None]
        bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]  # [B, 1, S, P+S]
        return (r(B, S, H * D), r(B, S, KVH * D), r(B, S, KVH * D), r(B, KVH, P, D), r(B, KVH, P, D), bias, r(H)), allowed

    from moec.backends.onnx_backend import translations

    d = torch.export.Dim.DYNAMIC
    program = torch.onnx.export(
        Attend(), example(2, 3, 4)[0], dynamo=True, custom_translation_table=translations(),
        dynamic_shapes=({0: d, 1: d}, {0: d, 1: d}, {0: d, 1: d}, {0: d, 2: d}, {0: d, 2: d}, {0: d, 2: d, 3: d},
                        None))
    program.save(tmp_path / "gqa.onnx")
    sess = ort.InferenceSession(str(tmp_path / "gqa.onnx"), providers=["CPUExecutionProvider"])
    for B, S, P, scale in ((1, 1, 0, 1.0), (2, 1, 5, 1.0), (2, 6, 0, 1.0), (1, 6, 4, 1.0), (2, 1, 7, 30.0)):
        inputs, allowed = example(B, S, P, scale)
        want = Attend()(*inputs)
        got = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})
        rows = allowed.any(-1)  # [B, S]: query rows with a key to attend to
        assert rel_err(torch.from_numpy(got[0])[rows], want[0][rows]) < 1e-5, (B, S, P, scale)
        assert torch.equal(torch.from_numpy(got[1]), want[1]) and torch.equal(torch.from_numpy(got[2]), want[2])


def test_a_model_on_its_own_attention_function_exports_it_as_it_is(tmp_path):
    """A user's attention implementation (here sdpa at temperature 2, registered with transformers) is neither
    fused nor replaced by eager: the file computes what the model does."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def tempered(module, query, key, value, mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, mask, **{**kwargs, "scaling": module.scaling / 2})

    AttentionInterface.register("moec_test_tempered", tempered)
    AttentionMaskInterface.register("moec_test_tempered", sdpa_mask)
    model = models.tiny_model("mixtral").eval()
    model.set_attn_implementation("moec_test_tempered")
    _step_by_step(model, model, tmp_path / "lm.onnx", TOL[torch.float32], fused=0)
    assert model.config._attn_implementation == "moec_test_tempered"


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3",
                                    pytest.param("qwen3_next", marks=pytest.mark.slow), "jamba"])
def test_fp16_steps_like_hf_fp16(family, tmp_path):
    model = models.tiny_model(family, dtype=torch.float16).eval()
    _step_by_step(model, model, tmp_path / "lm.onnx", TOL[torch.float16])


@pytest.mark.parametrize("cfg", [moec.Int4Experts(32), moec.Int4Experts(32, signed_scale=True), moec.Int8Experts()],
                         ids=lambda c: c.describe())
def test_quantized_steps_like_the_dequantized_model(cfg, tmp_path):
    """QMoE with the cache against HF's cached forward of the same model with its experts' weights dequantized."""
    from test_quant import _dequantized_twin

    model = models.tiny_model("mixtral", **QSIZES).eval()
    twin = _dequantized_twin(model, moec.compile(copy.deepcopy(model), quantize=cfg), cfg)
    _step_by_step(model, twin, tmp_path / "lm.onnx", 1e-4, quantize=cfg)


@pytest.mark.parametrize("family, quantize", [("mixtral", moec.Int4Experts(32)), ("qwen2_moe", None)])
def test_export_leaves_the_model_as_it_was(family, quantize, tmp_path):
    """export compiles a copy that shares the model's weights (not held twice): quantizing, stacking and emptying
    the copy's experts leave the model's tensors with their values, storage and flags, and its modules as they
    were (the same outputs, nothing compiled)."""
    model = models.tiny_model(family, tie_word_embeddings=True, **QSIZES).eval()
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    ids = models.example_inputs(model, batch=2, seq=5)
    before = {k: (v.clone(), v.data_ptr(), v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()}
    with torch.no_grad():
        want = model(**ids).logits
    moec.export_onnx(model, ids, tmp_path / "lm.onnx", quantize=quantize, dense=quantize)
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for k, (value, ptr, grad) in before.items():
        assert torch.equal(after[k], value) and after[k].data_ptr() == ptr and after[k].requires_grad == grad, k
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any("_moec_graph" in m.__dict__ for m in model.modules()) and "_moec_report" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, want)


def test_a_state_no_substitute_computes_is_refused(tmp_path, monkeypatch):
    """A layer whose state is updated by a function moec does not substitute (here Jamba's Mamba scan, with its
    substitute taken away) refuses the cached export and says why."""
    from moec import export_state

    monkeypatch.delitem(export_state._SUBSTITUTES, "mamba_selective_scan")
    model = models.tiny_model("jamba").eval()
    with pytest.raises(NotImplementedError, match="layer 0: its recurrent state is not computed by a function moec "
                                                  "substitutes.*kv_cache=False"):
        moec.export_onnx(model, models.example_inputs(model, batch=2, seq=5), tmp_path / "j.onnx", kv_cache=True)


def _greedy_batch(model, seed: int, row: int, pads: int, new: int) -> tuple[torch.Tensor, dict]:
    """(ids [2, 6], generate's kwargs) of a greedy batch of two prompts, `row` left-padded by `pads` tokens."""
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[row, :pads] = 0
    return ids, dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen3_next", pytest.param("jamba", marks=pytest.mark.slow)])
def test_backend_onnxruntime_generates_with_the_cache(family):
    """model.generate on backend="onnxruntime" feeds the session its past: the same tokens as HF's cached
    generate, batch 2 with left padding; each step runs only the new token."""
    model = models.tiny_model(family).eval()
    ref = models.tiny_model(family).eval()
    ref.load_state_dict(model.state_dict())
    moec.compile(model, backend="onnxruntime", session_options={"intra_op_num_threads": 2})
    ids, kw = _greedy_batch(model, seed=1, row=1, pads=3, new=8)
    with torch.no_grad():
        got, want = model.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(got, want)
    assert "kv_cache" in str(list(model.forward.sessions)) and model.generation_config.use_cache
    if family in ("qwen3_next", "jamba"):  # recurrent layers keep their state over a pad, HF's do not: refused
        for row in ([1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1]):  # right padding, a gap
            mask = torch.tensor([[1] * 6, row])
            with pytest.raises(NotImplementedError, match="recurrent"):
                model.generate(ids, **{**kw, "attention_mask": mask})


def test_backend_onnxruntime_several_tokens_after_a_past():
    """Several new tokens after a past at batch 2 (ORT's GroupQueryAttention refuses them in one call): the backend
    runs the rows one by one, and the logits are HF's."""
    model = models.tiny_model("mixtral").eval()
    ref = copy.deepcopy(model)
    moec.compile(model, backend="onnxruntime")
    gen = torch.Generator().manual_seed(2)
    ids, more = (torch.randint(0, model.config.vocab_size, (2, n), generator=gen) for n in (5, 3))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :2] = 0
    logits = []
    for m in (model, ref):
        with torch.no_grad():
            cache = m(input_ids=ids, attention_mask=mask[:, :5], position_ids=_positions(mask[:, :5], 5),
                      use_cache=True).past_key_values
            logits.append(m(input_ids=more, attention_mask=mask, position_ids=_positions(mask, 3),
                            past_key_values=cache, use_cache=True).logits)
    assert model.forward.sessions and next(iter(model.forward.sessions.values()))[3]  # the session has GQA nodes
    assert rel_err(*logits) < TOL[torch.float32]


def _dequantized_matmulnbits(init: dict, node) -> np.ndarray:
    """The [K, N] weight a MatMulNBits node stands for: W[k, n] = (q[n, k] - zero) * scale[n, k // block], zero 8
    (4 bits) or 128 (8 bits) when the node has none (ONNX Runtime's format)."""
    from onnx import helper, numpy_helper

    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    K, N, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
    blocks = -(-K // block)
    nibbles = lambda t: np.stack([t & 15, t >> 4], axis=-1).reshape(N, -1)  # noqa: E731  low nibble first
    q = numpy_helper.to_array(init[node.input[1]]).reshape(N, -1)
    q = (nibbles(q) if bits == 4 else q)[:, :K].astype(np.float32)
    scale = numpy_helper.to_array(init[node.input[2]]).reshape(N, blocks).astype(np.float32)
    if len(node.input) > 3 and node.input[3]:
        z = numpy_helper.to_array(init[node.input[3]]).reshape(N, -1)
        zero = (nibbles(z) if bits == 4 else z)[:, :blocks].astype(np.float32)
    else:
        zero = np.full((N, blocks), 8.0 if bits == 4 else 128.0, np.float32)
    return ((q - np.repeat(zero, block, 1)[:, :K]) * np.repeat(scale, block, 1)[:, :K]).T.copy()


@pytest.mark.parametrize("family,dense", [("mixtral", moec.Int4Experts(32)),
                                          ("mixtral", moec.Int4Experts(32, symmetric=False)),
                                          ("mixtral", moec.Int8Experts()), ("qwen2_moe", moec.Int4Experts(32))],
                         ids=lambda c: c if isinstance(c, str) else c.describe())
def test_dense_matmuls_as_matmulnbits(family, dense, tmp_path):
    """export_onnx(dense=...): attention, lm_head and shared-expert MatMuls (Gemms on token rows) become MatMulNBits,
    routers and the shared experts' one-column gates stay fp; the file computes what its dequantized weights say
    (the same file with each MatMulNBits a MatMul of those weights), step by step."""
    import onnx
    from onnx import helper, numpy_helper

    model = models.tiny_model(family, **QSIZES).eval()
    path = tmp_path / "dense.onnx"
    report = moec.export_onnx(model, models.example_inputs(model, batch=2, seq=5), path, kv_cache=True, dense=dense)
    proto = onnx.load(path)
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    layers = model.config.num_hidden_layers
    shared = 3 if getattr(model.config, "shared_expert_intermediate_size", 0) else 0  # gate, up, down
    assert len(nbits) == report.dense_matmuls == (4 + shared) * layers + 1  # q, k, v, o per layer and the lm_head
    sizes = {a.name: helper.get_attribute_value(a) for a in nbits[0].attribute}
    assert sizes["bits"] == dense.bits and sizes["block_size"] == getattr(dense, "group_size", 32)
    said = " ".join(str(report.__rich__().title).split())  # the report says what the nodes hold
    assert (f"{report.dense_matmuls} dense MatMuls quantized ("
            + ("int8 in blocks of 32 inputs" if dense.bits == 8 else dense.describe())) in said, said
    init = {t.name: t for t in proto.graph.initializer}
    E = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    assert sum(n.op_type in ("MatMul", "Gemm") and E in init[n.input[1]].dims
               for n in proto.graph.node if len(n.input) > 1 and n.input[1] in init) == layers  # routers: fp

    ref = onnx.load(path)  # MatMulNBits -> MatMul of the dequantized weight
    for node in [n for n in ref.graph.node if n.op_type == "MatMulNBits"]:
        w = numpy_helper.from_array(_dequantized_matmulnbits(init, node), f"{node.name}_dequantized")
        ref.graph.initializer.append(w)
        ref.graph.node.insert(list(ref.graph.node).index(node),
                              helper.make_node("MatMul", [node.input[0], w.name], node.output, name=f"{node.name}_ref"))
        ref.graph.node.remove(node)
    onnx.save(ref, tmp_path / "ref.onnx", save_as_external_data=True)
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (path, tmp_path / "ref.onnx")]
    names = report.inputs
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    k = model.config.num_key_value_heads
    dim = model.config.hidden_size // model.config.num_attention_heads
    pasts = [[np.zeros((2, k, 0, dim), np.float32)] * (2 * layers) for _ in sessions]
    for step in range(4):
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": _positions(mask, ids.shape[1]).numpy()}
        got, want = (s.run(None, {**feed, **dict(zip(names[3:], p))}) for s, p in zip(sessions, pasts))
        assert rel_err(torch.from_numpy(got[0]), torch.from_numpy(want[0])) < 1e-4, step
        assert np.array_equal(got[0][:, -1].argmax(-1), want[0][:, -1].argmax(-1))
        pasts = [got[1:], want[1:]]
        ids = torch.from_numpy(want[0][:, -1].argmax(-1))[:, None]
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)


@pytest.mark.parametrize("family,attention", [("mixtral", "gqa"), ("gpt_oss", "gqa"), ("qwen3_next", "gqa"),
                                              ("llama4", "gqa"), pytest.param("jamba", "gqa", marks=pytest.mark.slow),
                                              pytest.param("gpt_oss", "ops", marks=pytest.mark.slow)])
def test_right_padded_rows_step_like_each_row_alone(family, attention, tmp_path):
    """onnxruntime-genai pads a batch on the right and appends each new token after the pads. The window (4
    positions here) counts the row's tokens, not cache slots, so each row equals that row run alone by HF (HF's own
    window counts slots: such a row would lose tokens from it); so do Llama 4's attention chunks (4 tokens here; HF's
    chunks count slots after the left padding: the pads would move them). Qwen3-Next's and Jamba's states skip the
    pads (the convolution keeps the row's own last columns; the recurrence neither decays nor updates on a pad)."""
    kw = {"gpt_oss": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4),
          "mixtral": dict(sliding_window=4), "llama4": dict(attention_chunk_size=4, num_experts_per_tok=1)}.get(family, {})
    model = models.tiny_model(family, **kw).eval()
    path = tmp_path / "lm.onnx"
    report = moec.export_onnx(model, models.example_inputs(model, batch=2, seq=5), path, kv_cache=True,
                              attention=attention)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    past = _empty_past(sess, 2)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4])  # row 1: 3 tokens, then 4 pads
    positions = (mask.cumsum(-1) - 1) * mask
    rows, newest = [ids[0], ids[1, :3]], [6, 2]  # each row alone; where its newest token sits in the step
    for step in range(5):
        got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                              "position_ids": positions.numpy(), **dict(zip(report.inputs[3:], past))})
        past = got[1:]
        for r in range(2):
            with torch.no_grad():
                want = model(rows[r][None]).logits[0, -1]
            assert rel_err(torch.from_numpy(got[0][r, newest[r]]), want) < TOL[torch.float32], (step, r)
            rows[r] = torch.cat([rows[r], want.argmax()[None]])
        ids = torch.stack([row[-1:] for row in rows])  # [2, 1]: each row's greedy token
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        positions, newest = torch.tensor([[len(row) - 1] for row in rows]), [0, 0]


def test_linear_attention_state_over_a_prompt_longer_than_a_chunk(tmp_path):
    """Qwen3-Next's gated delta rule runs a prompt of 70 tokens through transformers' chunked scan (chunks of 64) and
    each step through its per-token loop; the exported LinearAttention node carries the same state across both."""
    model = models.tiny_model("qwen3_next").eval()
    report = _step_by_step(model, model, tmp_path / "lm.onnx", TOL[torch.float32], prompt=70)
    assert "past_key_values.0.recurrent_state" in report.inputs and report.gqa_layers == 1


@pytest.mark.parametrize("family, function", [("qwen3_next", "torch_chunk_gated_delta_rule"),
                                              ("jamba", "mamba_selective_scan")])
def test_a_state_rule_that_differs_refuses_the_cached_export(family, function, tmp_path, monkeypatch):
    """The proof on the example: a model whose rule computes something else than moec's substitute (here
    transformers' output scaled by 1.01) is refused with the cache, and without it (the same substitute runs from
    a zero state), with the reason; by default, after a warning that the cache is left out."""
    model = models.tiny_model(family).eval()
    module = sys.modules[type(model).__module__]
    rule = getattr(module, function)

    def odd(*args, **kwargs):
        out = rule(*args, **kwargs)
        return (out[0] * 1.01, *out[1:]) if isinstance(out, tuple) else out * 1.01

    monkeypatch.setattr(module, function, odd)
    example = models.example_inputs(model, batch=2, seq=5)
    with pytest.raises(NotImplementedError, match="layer 0: the substituted .* differs from transformers'"
                                                  ".*kv_cache=False"):
        moec.export_onnx(model, example, tmp_path / "a.onnx", kv_cache=True)
    assert getattr(module, function) is odd  # the substitution is undone
    with pytest.raises(NotImplementedError, match="scan cannot be exported: the substituted .* differs"):
        moec.export_onnx(model, example, tmp_path / "b.onnx", kv_cache=False)
    with pytest.warns(UserWarning, match="exported without its cache"), pytest.raises(NotImplementedError):
        moec.export_onnx(model, example, tmp_path / "c.onnx")
    assert not any((tmp_path / f).exists() for f in ("a.onnx", "b.onnx", "c.onnx"))


def test_backend_onnxruntime_feeds_linear_attention_states_through_hf_generate():
    """HF's generate (beam search; return_dict_in_generate) on a Qwen3-Next: the backend mirrors the session's
    states into HF's cache and reorders them with the beams: HF's tokens."""
    model = models.tiny_model("qwen3_next").eval()
    ref = copy.deepcopy(model)
    moec.compile(model, backend="onnxruntime")
    ids, kw = _greedy_batch(model, seed=3, row=0, pads=2, new=6)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, num_beams=3, **kw), ref.generate(ids, num_beams=3, **kw))
        got = model.generate(ids, return_dict_in_generate=True, output_logits=True, **kw)
        want = ref.generate(ids, return_dict_in_generate=True, output_logits=True, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        assert rel_err(a, b) < TOL[torch.float32]


def test_backend_onnxruntime_continues_a_cache_the_eager_model_filled():
    """A Qwen3-Next cache filled by the eager model (its conv and recurrent states, its key/values) fed to the
    backend: the session reads the states from HF's cache and the next step's logits are the eager model's."""
    model = models.tiny_model("qwen3_next").eval()
    ref = copy.deepcopy(model)
    moec.compile(model, backend="onnxruntime")
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = ref(input_ids=ids[:, :6], use_cache=True).past_key_values
        want = ref(input_ids=ids[:, 6:], past_key_values=copy.deepcopy(cache), use_cache=True).logits
        got = model(input_ids=ids[:, 6:], past_key_values=cache, use_cache=True).logits
    assert rel_err(got, want) < TOL[torch.float32]
