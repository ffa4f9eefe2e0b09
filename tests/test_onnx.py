"""moec.export_onnx: HF families and hand-written blocks exported to ONNX, run in ONNX Runtime (CPU)
and compared with eager torch at shapes other than the export example (1 token included: dynamic
axes, no expert baked in); which blocks became com.microsoft::MoE / QMoE and which fell back, and why;
ORT's known CPU faults kept away from the user; the file runs in a fresh process without torch."""

import copy
import dataclasses
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import handwritten as hw
import moec
from moec import models
from moec.canonical import resolve

from conftest import TOL, rel_err
from test_hf import SUPPORTED
from test_quant import _dequantized_twin

HF = list(SUPPORTED)
OVERRIDES = {"llama4": dict(num_experts_per_tok=1)}  # as its checkpoints (top-2: test_llama4_weights_the_expert_input)
# What each family's blocks become (router features the op lacks use log-weights; see lower_onnx)
# routers ORT's own (softmax over all, then top-k) does not compute exactly: selection on the logits (GPT-OSS,
# GraniteMoE, JetMoE: top-k of the logits, softmax of the chosen), a bias, groups, capacity, sparsemixer
HF_LOG_WEIGHTS = {"glm4_moe", "phimoe", "switch_transformers", "gpt_oss", "granitemoe", "jetmoe", "deepseek_v2",
                  "deepseek_v3", "llama4", "jamba"}
SHAPES = [(1, 1), (3, 7)]  # (batch, seq); every export's example is (2, 5)
QUANT = [moec.Int8Experts(), moec.Int4Experts(32), moec.Int4Experts(64, symmetric=False),
         moec.Int4Experts(32, signed_scale=True)]
QSIZES = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=64)  # int4 groups divide every K


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, inputs: dict) -> torch.Tensor:
    return torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0])


def _nodes(path, op: str) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path)).graph.node if n.domain == "com.microsoft" and n.op_type == op]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(family, quantize) -> (model, report, path); each model exported once per test module."""
    cache = {}

    def get(family, quantize=None, slices=None, **overrides):
        key = (family, quantize, slices, tuple(sorted(overrides.items())))
        if key not in cache:
            model = models.tiny_model(family, **overrides)
            path = tmp_path_factory.mktemp("onnx") / f"{family}.onnx"
            report = moec.export_onnx(model, models.example_inputs(model, batch=2, seq=5), path, quantize=quantize,
                                      kv_cache=False, expert_slices=slices)  # the cache's form: test_onnx_cache.py
            cache[key] = model, report, path
        return cache[key]

    return get


# ---------------------------------------------------------------- HF families


# whole experts in the default run: ORT's native routing, shared experts, log-weights, biased SwiGLU; the other
# families' whole exports run with `pytest -m slow`
WHOLE = {"mixtral", "qwen2_moe", "glm4_moe", "gpt_oss"}
# families whose cached export (the default for decoder LMs) test_onnx_cache steps through (Qwen3-Next's and Jamba's
# scans without the cache: test_scans_export_without_the_cache)
SLOW = {"qwen3_next", "jamba", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "llama4"}
CASES = [pytest.param(f, s, id=f"{f}-{'whole' if s == 1 else 'sliced'}",
                      marks=[pytest.mark.slow] if f in SLOW or (s == 1 and f not in WHOLE) else [])
         for f in HF for s in (1, None)]


@pytest.mark.parametrize("batch,seq", SHAPES)
@pytest.mark.parametrize("family,slices", CASES)
def test_hf_family(exported, family, batch, seq, slices):
    """Whole experts (ORT routes where it can), and the CPU default: each expert as 2 slices of its intermediate
    units, k*2 of them per token, routed by moec's ops (lower_onnx)."""
    model, report, path = exported(family, slices=slices, **OVERRIDES.get(family, {}))
    assert report.blocks and all(b.op == "MoE" for b in report.blocks), str(report)
    nodes = _nodes(path, "MoE")
    assert len(nodes) == len(report.blocks)
    if slices == 1:
        assert all(("log-weights" in b.why) == (family in HF_LOG_WEIGHTS) for b in report.blocks)
    else:
        assert all("log-weights" in b.why and "2 slices" in b.why for b in report.blocks), str(report)
    if slices is None and family in WHOLE:  # the slices' shapes against the whole experts'
        whole_path = exported(family, slices=1, **OVERRIDES.get(family, {}))[2]
        def dims(p):  # name -> shape, of the weights and of what the graph computes from them
            g = onnx.shape_inference.infer_shapes(onnx.load(str(p))).graph
            return {**{v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in g.value_info},
                    **{t.name: list(t.dims) for t in g.initializer}}

        got, want = dims(path), dims(whole_path)
        for n, w in zip(nodes, _nodes(whole_path, "MoE")):  # [E, 2I, H] -> [2E, I, H]; [E, H, I] -> [2E, H, I/2]
            assert _attrs(n)["k"] == 2 * _attrs(w)["k"]
            (e1, n1, h1), (e2, h2, i2) = want[w.input[2]], want[w.input[4]]
            assert got[n.input[2]] == [2 * e1, n1 // 2, h1] and got[n.input[4]] == [2 * e2, h2, i2 // 2]
    inputs = models.example_inputs(model, batch=batch, seq=seq, seed=seq)
    with torch.no_grad():
        want = model(**inputs).logits
    assert rel_err(_run(_session(path), inputs), want) < TOL[torch.float32]


def test_dynamic_axes_and_no_baked_in_experts(exported):
    """Inputs are (batch, seq) symbols, named as genai's, and a long input (every expert hit) still matches."""
    model, report, path = exported("mixtral")
    assert "model.layers.1.mlp" in str(report) and "com.microsoft::MoE" in str(report)
    dims = [d for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert [d.dim_param for d in dims] == ["batch_size", "sequence_length"] and not any(d.dim_value for d in dims)
    inputs = models.example_inputs(model, batch=4, seq=33, seed=7)
    with torch.no_grad():
        want = model(**inputs).logits
    assert rel_err(_run(_session(path), inputs), want) < TOL[torch.float32]


@pytest.mark.parametrize("capacity", [1])
def test_switch_capacity_drops_match(exported, capacity):
    """Tokens past an expert's capacity output 0 in ORT too (log-weights give them weight 0)."""
    model, report, path = exported("switch_transformers", expert_capacity=capacity)
    assert all(b.op == "MoE" and f"capacity {capacity}" in b.router for b in report.blocks)
    inputs = models.example_inputs(model, batch=3, seq=12, seed=3)  # 12 tokens a row: capacity 1 drops most
    with torch.no_grad():
        want = model(**inputs).logits
    assert rel_err(_run(_session(path), inputs), want) < TOL[torch.float32]


def test_mla_with_fewer_kv_heads_is_refused(tmp_path):
    """MLA with num_key_value_heads != num_attention_heads fails torch.export inside transformers' attention:
    refused up front with what to set (the tiny DeepSeek families, which test_hf_family exports, set it)."""
    model = models.tiny_model("deepseek_v3", num_key_value_heads=2)
    with pytest.raises(NotImplementedError, match="num_key_value_heads = model.config.num_attention_heads"):
        moec.export_onnx(model, models.example_inputs(model, batch=2, seq=5), tmp_path / "m.onnx")
    with pytest.raises(NotImplementedError, match="num_key_value_heads"):
        moec.compile(model, backend="onnxruntime")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("family", ["qwen3_next", "jamba"])
def test_scans_export_without_the_cache(exported, family):
    """Without the cache, Qwen3-Next's gated delta rule (a Python loop over chunks of 64 tokens in transformers) and
    Jamba's Mamba scan (over tokens) run as moec.export_state's substitutes from a zero state: one graph for 1 token
    and for sequences of several chunks, equal to the model."""
    model, report, path = exported(family, slices=1)
    assert report.inputs == ["input_ids"] and _nodes(path, "LinearAttention")
    session = _session(path)
    for batch, seq in [(1, 1), (2, 7), (1, 150)]:
        inputs = {"input_ids": torch.randint(0, model.config.vocab_size, (batch, seq),
                                             generator=torch.Generator().manual_seed(seq))}
        with torch.no_grad():
            want = model(**inputs, use_cache=False).logits
        assert rel_err(_run(session, inputs), want) < TOL[torch.float32], (batch, seq)


@pytest.mark.parametrize("k,cfg", [(1, None), (1, moec.Int8Experts()), (1, moec.Int4Experts(32, symmetric=False)),
                                   (2, None), (2, moec.Int4Experts(32)), (2, moec.Int8Experts(activations="int8")),
                                   (2, moec.Int4Experts(32, activations="int8"))], ids=str)
def test_llama4_weights_the_expert_input(k, cfg, tmp_path):
    """Llama 4 weights the expert *input*. Top-1 (its checkpoints' k): the token is scaled by its one weight before
    ORT's op, which weights the output by 1. Top-2: ORT's op cannot, so the block falls back to standard ops
    (quantized: dequantized in the graph, activations in fp32 whatever the config asks) and says so."""
    block = resolve(models.tiny_model("llama4", num_experts_per_tok=k, **QSIZES), "model.layers.0.feed_forward")
    report = _export_block(block, 64, tmp_path / "b.onnx", quantize=cfg, expert_slices=2)
    if k == 1:
        assert report.blocks[0].op == ("QMoE" if cfg else "MoE"), str(report)
        assert "scales the expert input" in report.blocks[0].why and (cfg or "2 slices" in report.blocks[0].why)
    else:
        assert report.blocks[0].op == "fallback" and "k > 1" in report.blocks[0].why, str(report)
        assert not _nodes(tmp_path / "b.onnx", "MoE") and not _nodes(tmp_path / "b.onnx", "QMoE")
    weights = dataclasses.replace(cfg, activations="fp32") if cfg else None  # the same quantized weights
    ref = _dequantized_twin(block, moec.compile(copy.deepcopy(block), quantize=weights), weights) if cfg else block
    _block_parity(block, tmp_path / "b.onnx", 64, torch.float32, TOL[torch.float32], ref=ref)


# ---------------------------------------------------------------- hand-written blocks

# presets whose experts ORT's MoE cannot compute exactly, and the reason the report gives
HW_FALLBACK = {"biased_gelu_experts": "GELU", "dense_scatter_modules": "GELU", "einsum_gather_t_geglu": "GeGLU",
               "moduledict_geglu": "GeGLU"}


def _export_block(block, hidden, path, dtype=torch.float32, **kw):
    x = torch.randn(2, 5, hidden).to(dtype)
    return moec.export_onnx(block, (x,), path, **kw)


def _block_parity(block, path, hidden, dtype, tol, ref=None):
    sess = _session(path)
    for shape in [(1, 1, hidden), (3, 7, hidden)]:
        x = torch.randn(shape).to(dtype)
        with torch.no_grad():
            want = (ref or block)(x)
        want = want[0] if isinstance(want, tuple) else want
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        assert got.dtype == want.dtype and rel_err(got, want) < tol


@pytest.mark.parametrize("inter,slices,sliced", [(4, 4, False), (2, None, False), (6, 4, False), (6, 3, True),
                                                  (48, 4, True)])
def test_expert_slices_that_do_not_divide(inter, slices, sliced, tmp_path):
    """Experts are sliced only into equal slices of 2 units or more; otherwise they stay whole, the report says
    why, and the file still matches (1-unit slices made moec reject the block: torch._grouped_mm refuses a
    1-column weight, which _grouped_mm_takes now checks)."""
    from moec.backends.torch_backend import _grouped_mm_takes

    assert not _grouped_mm_takes(torch.zeros(8, 32, 1)) and _grouped_mm_takes(torch.zeros(8, 32, 4))
    spec = dataclasses.replace(hw.PRESETS["mixtral_loop"], inter=inter)
    block = hw.make_block(spec)
    report = _export_block(block, spec.hidden, tmp_path / "b.onnx", expert_slices=slices)
    (b,) = report.blocks
    assert b.op == "MoE", str(report)
    assert ("experts in" in b.why) == sliced and ("not sliced" in b.why) == (not sliced and slices != 1), b.why
    _block_parity(block, tmp_path / "b.onnx", spec.hidden, torch.float32, TOL[torch.float32])


@pytest.mark.parametrize("name", list(hw.PRESETS))
def test_handwritten_preset(name, tmp_path):
    spec = hw.PRESETS[name]
    block = hw.make_block(spec)
    report = _export_block(block, spec.hidden, tmp_path / "b.onnx")
    (b,) = report.blocks
    if name in HW_FALLBACK:
        assert b.op == "fallback" and HW_FALLBACK[name] in b.why, str(report)
    else:
        assert b.op == "MoE", str(report)
    _block_parity(block, tmp_path / "b.onnx", spec.hidden, torch.float32, TOL[torch.float32])


@pytest.mark.parametrize("quantize", [None, moec.Int8Experts()], ids=["fp32", "int8"])
def test_handwritten_block_stays_as_it_was(quantize, tmp_path):
    """Experts in a ModuleList: the export's copy stacks them (int8: quantizes them and empties its own expert
    tensors); the block's tensors keep their values and storage, and it is not compiled."""
    spec = hw.PRESETS["mixtral_loop"]
    block = hw.make_block(spec)
    before = {k: (v.clone(), v.data_ptr()) for k, v in block.state_dict().items()}
    _export_block(block, spec.hidden, tmp_path / "b.onnx", quantize=quantize)
    after = block.state_dict()
    assert after.keys() == before.keys()
    for k, (value, ptr) in before.items():
        assert torch.equal(after[k], value) and after[k].data_ptr() == ptr, k
    assert not any("_moec_graph" in m.__dict__ for m in block.modules())


@pytest.mark.parametrize("name", ["mixtral_loop", "qwen_shared_gated", "deepseek_v3_groups", "switch_argmax",
                                  "moduledict_geglu"])
def test_handwritten_fp16(name, tmp_path):
    """fp16 blocks (against the eager fp16 block). qwen_shared_gated does not renormalise: ORT's fp16 MoE
    returns zeros with normalize_routing_weights=0, so the export never emits it (log-weights instead)."""
    spec = hw.PRESETS[name]
    block = hw.make_block(spec).half()
    report = _export_block(block, spec.hidden, tmp_path / "b.onnx", torch.float16)
    for node in _nodes(tmp_path / "b.onnx", "MoE"):
        assert _attrs(node)["normalize_routing_weights"] == 1 and _attrs(node).get("use_sparse_mixer", 0) == 0
    assert report.blocks[0].op == ("fallback" if name in HW_FALLBACK else "MoE")
    _block_parity(block, tmp_path / "b.onnx", spec.hidden, torch.float16, TOL[torch.float16])


def test_blocks_inside_a_model(tmp_path):
    spec = hw.PRESETS["deepseek_v3_groups"]
    lm = hw.TinyLM(vocab=64, hidden=spec.hidden, n_layers=2, block_fn=lambda: hw.make_block(spec))
    report = moec.export_onnx(lm, (torch.randint(0, 64, (2, 5)),), tmp_path / "lm.onnx")
    assert [b.op for b in report.blocks] == ["MoE", "MoE"]
    sess = _session(tmp_path / "lm.onnx")
    for shape in [(1, 1), (3, 9)]:
        ids = torch.randint(0, 64, shape)
        assert rel_err(_run(sess, {"input_0": ids}), lm(ids)) < TOL[torch.float32]


def test_lower_onnx_pass_alone():
    """The lowered graph (ORT ops run by their torch reference) equals the original block (verify=True)."""
    for name in ("deepseek_v3_groups", "biased_gelu_experts"):
        block = hw.make_block(hw.PRESETS[name])
        moec.compile(block, passes="detect_moe,fuse_gate,batch_experts,lower_onnx", verify=True)
        assert moec.inspect(block).blocks


# ---------------------------------------------------------------- errors


def test_refusals(tmp_path):
    model = models.tiny_model("mixtral")
    inputs = models.example_inputs(model, batch=2, seq=5)
    with pytest.raises(NotImplementedError, match="pre-packed"):
        moec.export_onnx(model, inputs, tmp_path / "m.onnx", quantize=moec.Int8Experts(), provider="cuda")
    with pytest.raises(ValueError, match="provider"):
        moec.export_onnx(model, inputs, tmp_path / "m.onnx", provider="tpu")
    with pytest.raises(NotImplementedError, match="bf16"):
        moec.export_onnx(copy.deepcopy(model).to(torch.bfloat16), inputs, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="sizes >= 2"):
        moec.export_onnx(model, models.example_inputs(model, batch=1, seq=5), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="original model"):
        moec.export_onnx(moec.compile(copy.deepcopy(model)), inputs, tmp_path / "m.onnx")
    dynamic = models.tiny_model("mixtral", head_dim=16, max_position_embeddings=32,
                                rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(NotImplementedError, match="rotary scaling 'dynamic'"):  # (was torch.export's long trace)
        moec.export_onnx(dynamic, inputs, tmp_path / "m.onnx")
    with pytest.raises(NotImplementedError, match="rotary scaling 'dynamic'"):  # at compile, not at the first call
        moec.compile(dynamic, backend="onnxruntime")
    odd = models.tiny_model("mixtral", hidden_size=48, intermediate_size=48)  # int8 activations take groups of 32
    with pytest.raises(RuntimeError, match="not a multiple of 32"):  # the exporter fails on the block left alone
        moec.export_onnx(odd, models.example_inputs(odd, batch=2, seq=5), tmp_path / "m.onnx",
                         quantize=moec.Int8Experts(activations="int8"))


def test_a_model_in_training_mode_exports_its_eval_forward(tmp_path):
    """A model left in train() (router jitter, dropout) exports what it computes in eval mode, with a warning, and
    stays in training mode itself (the export used to fail inside the ONNX converter)."""
    import onnxruntime as ort

    model = models.tiny_model("mixtral", router_jitter_noise=0.5, attention_dropout=0.3).train()
    with pytest.warns(UserWarning, match="training mode; exported in eval mode"):
        moec.export_onnx(model, models.example_inputs(model, batch=2, seq=5), tmp_path / "m.onnx", kv_cache=False)
    assert model.training
    ids = models.example_inputs(model, batch=1, seq=7, seed=3)["input_ids"]
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(ids).logits
    assert rel_err(torch.from_numpy(got), want) < TOL[torch.float32]


# ---------------------------------------------------------------- quantized experts (QMoE)



QUANT_CASES = [("mixtral", c) for c in QUANT] + [("glm4_moe", QUANT[2]), ("gpt_oss", QUANT[0])]


@pytest.mark.parametrize("family,cfg", QUANT_CASES, ids=lambda v: v if isinstance(v, str) else v.describe())
def test_quantized_against_dequantized_model(exported, family, cfg):
    """QMoE nodes equal the model with dequantized experts."""
    model, report, path = exported(family, cfg, **QSIZES)
    assert report.blocks and all(b.op == "QMoE" for b in report.blocks), str(report)
    for node in _nodes(path, "QMoE"):  # never a layout ORT's CPU kernel gets wrong, never its int8 activations
        a = _attrs(node)
        assert a["expert_weight_bits"] == cfg.bits and a["normalize_routing_weights"] == 1
        assert a["weights_prepacked"] == 0 and a.get("accuracy_level", 0) == 0
        assert a.get("block_size", 0) == (cfg.group_size if cfg.bits == 4 else 0)  # 4-bit: block-wise only
        zero_points = [i for i in node.input[11:13] if i]
        assert bool(zero_points) == (cfg.bits == 4 and not cfg.symmetric)
    twin = _dequantized_twin(model, moec.compile(copy.deepcopy(model), quantize=cfg), cfg)
    sess = _session(path)
    for batch, seq in SHAPES:
        inputs = models.example_inputs(model, batch=batch, seq=seq, seed=seq)
        with torch.no_grad():
            want = twin(**inputs).logits
        assert rel_err(_run(sess, inputs), want) < TOL[torch.float32]


@pytest.mark.parametrize("cfg,gated", [(moec.Int4Experts(32, activations="int8"), True),
                                       (moec.Int4Experts(64, activations="int8"), False),
                                       (moec.Int8Experts(activations="int8"), True)], ids=lambda v: str(v)[:30])
def test_int8_activations_node_computes_the_reference(cfg, gated, tmp_path):
    """QMoE with int8 activations (accuracy_level=4; int8 experts block-wise) against moec::ort_qmoe's torch
    reference, which rounds each GEMM's input rows to int8 per group (moec.quant.int8_rows): 1 token and 9, large
    magnitudes, a group of zeros; and the weight-only node, which must differ from that reference by more."""
    from moec.backends.onnx_backend import ort_quantized, translations
    from moec.passes.lower_onnx import _block_size
    from moec.quant import quantize

    E, H, I, k = 4, 128, 64, 2
    gen = torch.Generator().manual_seed(cfg.bits)
    w1, w2 = torch.randn(E, 2 * I if gated else I, H, generator=gen) / 8, torch.randn(E, H, I, generator=gen) / 8
    bias = torch.randn(E, 2 * I if gated else I, generator=gen) / 4

    class Experts(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c, self.fc1 = c, ort_quantized(c, quantize(c, w1), gated)
            self.fc2 = ort_quantized(c, quantize(c, w2), False)

        def forward(self, x, probs):
            return torch.ops.moec.ort_qmoe(x, probs, self.fc1["q"], self.fc1["scales"], bias, self.fc2["q"],
                                           self.fc2["scales"], None, None, None, self.c.bits, _block_size(self.c),
                                           self.c.activations == "int8", k, "silu" if gated else "relu", gated, 1.0,
                                           0.0)

    modules = [Experts(cfg), Experts(dataclasses.replace(cfg, activations="fp32"))]
    example = (torch.randn(5, H), torch.randn(5, E))
    d = torch.export.Dim.DYNAMIC
    sessions = []
    for i, module in enumerate(modules):
        program = torch.onnx.export(module, example, dynamo=True, custom_translation_table=translations(),
                                    dynamic_shapes=({0: d}, {0: d}))
        program.save(tmp_path / f"q{i}.onnx")
        sessions.append(_session(tmp_path / f"q{i}.onnx"))
    assert _attrs(_nodes(tmp_path / "q0.onnx", "QMoE")[0])["accuracy_level"] == 4
    for T, scale in ((1, 1.0), (9, 1.0), (9, 40.0)):
        x, probs = torch.randn(T, H, generator=gen) * scale, torch.randn(T, E, generator=gen)
        x[-1, :64] = 0  # whole groups of zeros (scale 0)
        want = modules[0](x, probs)
        got, weight_only = (torch.from_numpy(s.run(None, {"x": x.numpy(), "probs": probs.numpy()})[0])
                            for s in sessions)
        assert rel_err(got, want) < 1e-5, (T, scale)
        assert rel_err(weight_only, want) > 1e-3, (T, scale)  # the reference is not the weight-only result


def test_quantized_fp16_block(tmp_path):
    spec = dataclasses.replace(hw.PRESETS["sorted_interleaved"], inter=64)  # biased experts, top-k then softmax
    block = hw.make_block(spec).half()
    cfg = moec.Int4Experts(32, symmetric=False)
    report = _export_block(block, spec.hidden, tmp_path / "b.onnx", torch.float16, quantize=cfg)
    assert report.blocks[0].op == "QMoE"
    twin = _dequantized_twin(block, moec.compile(copy.deepcopy(block), quantize=cfg), cfg)
    _block_parity(block, tmp_path / "b.onnx", spec.hidden, torch.float16, TOL[torch.float16], ref=twin)


# ---------------------------------------------------------------- the file on its own

_FRESH = """
import sys
sys.modules["torch"] = None  # importing torch now fails: the file must run without it
import numpy as np, onnxruntime as ort
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
feeds = dict(np.load(sys.argv[2]))
np.save(sys.argv[3], sess.run(None, feeds)[0])
print(sess.get_providers()[0])
"""


@pytest.mark.parametrize("external", [False, True])
def test_runs_in_a_fresh_process_without_torch(tmp_path, external):
    spec = hw.PRESETS["qwen_shared_gated"]
    lm = hw.TinyLM(vocab=64, hidden=spec.hidden, n_layers=2, block_fn=lambda: hw.make_block(spec))
    path = tmp_path / "lm.onnx"
    report = moec.export_onnx(lm, (torch.randint(0, 64, (2, 5)),), path, external_data=external)
    assert report.external_data == external and (tmp_path / "lm.onnx.data").exists() == external
    ids = torch.randint(0, 64, (3, 4))
    np.savez(tmp_path / "in.npz", **{report.inputs[0]: ids.numpy()})
    run = subprocess.run([sys.executable, "-c", _FRESH, str(path), str(tmp_path / "in.npz"), str(tmp_path / "out.npy")],
                         capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "CPUExecutionProvider"
    assert rel_err(torch.from_numpy(np.load(tmp_path / "out.npy")), lm(ids)) < TOL[torch.float32]
