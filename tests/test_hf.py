"""HF transformers MoE families built from tiny configs: detection, parity, HF behaviour."""

import copy
import warnings

import pytest
import torch
import transformers

import moec
from moec import examples, models
from moec.canonical import resolve

from conftest import TOL, rel_err

# Families moec does not rewrite yet, and why (each is left unchanged; see test_gaps_left_unchanged).
GAPS = {
    # transformers 5.23 NllbMoeExperts one-hot encodes the already one-hot top-1 mask: every token runs
    # experts 0 and 1 only, whatever the router chose (test_nllb_moe_runs_experts_0_and_1). Not an MoE to match.
    "nllb_moe": "HF bug: every token runs experts 0 and 1 only",
}
# Candidates a family's parity test expects rejected (path suffixes); nothing else may be. JetMoE's
# attention (MoA) routes top-k query/output projections like an MoE but is no FFN block: its
# experts module is only reachable through map/reduce, so moec cannot call (nor rewrite) it.
EXPECTED_REJECTED = {"jetmoe": (".self_attention.experts",)}
SUPPORTED = [f for f in models.FAMILIES if f not in GAPS]
IMPLS = [(f, i) for f in SUPPORTED for i in (models.EXPERTS_IMPLEMENTATIONS if models.supports_experts_implementation(f) else [None])]


def _num_experts(config) -> int:
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(config, key, None):
            return getattr(config, key)
    return config.ffn_config.moe_num_experts  # DBRX


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family,impl", IMPLS, ids=[f"{f}-{i}" for f, i in IMPLS])
def test_family_parity(family, impl):
    model = models.tiny_model(family, experts_implementation=impl)
    ref = copy.deepcopy(model)
    moec.compile(model)
    report = moec.inspect(model)
    n_layers = model.config.num_hidden_layers
    assert len(report.blocks) >= 1, report
    assert all(r.path.endswith(EXPECTED_REJECTED.get(family, ())) for r in report.rejected), report
    assert all(b.num_experts == _num_experts(model.config) for b in report.blocks)
    assert len(report.blocks) <= n_layers
    for batch, seq in [(1, 1), (2, 5), (1, 17)]:
        inputs = models.example_inputs(model, batch=batch, seq=seq, seed=seq)
        assert rel_err(_logits(model, inputs), _logits(ref, inputs)) < TOL[torch.float32]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen2_moe", "gpt_oss", "llama4", "phimoe", "jetmoe",
                                    "dbrx"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 9])
def test_low_precision_block(family, dtype, tokens):
    """Block by block (routing is decided on identical inputs), against the original in the same dtype."""
    model = models.tiny_model(family, dtype=dtype)
    ref = copy.deepcopy(model)
    moec.compile(model)
    assert len(moec.inspect(model).blocks) == model.config.num_hidden_layers, moec.inspect(model)
    for b in moec.inspect(model).blocks:
        x = torch.randn(1, tokens, model.config.hidden_size).to(dtype)
        got, want = resolve(model, b.path)(x), resolve(ref, b.path)(x)
        got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
        assert got.dtype == want.dtype
        assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen3_next", "switch_transformers", "phimoe", "jetmoe",
                                    "dbrx"])
def test_greedy_generation_matches(family):
    model = models.tiny_model(family)
    ref = copy.deepcopy(model)
    moec.compile(model)
    inputs = models.example_inputs(model, batch=2, seq=6)
    kw = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(**inputs, **kw), ref.generate(**inputs, **kw))


def _hf_switch_drops_tokens() -> bool:
    """Whether HF's Switch block drops tokens over capacity. transformers 5.17 routes the flattened [B*S, 1]
    tokens, so its per-expert cumsum never exceeds 1: no token is ever dropped (fixed by 5.23)."""
    model = models.tiny_model("switch_transformers", expert_capacity=1)
    block = next(m for m in model.modules() if hasattr(m, "router") and hasattr(m, "experts"))
    with torch.no_grad():
        y = block(torch.randn(1, 20, model.config.d_model))  # 20 tokens, 8 experts of capacity 1
    return bool((y == 0).all(-1).any())


@pytest.mark.skipif(not _hf_switch_drops_tokens(), reason=f"transformers {transformers.__version__}: its Switch "
                    "block never applies expert capacity (routes flattened tokens), so there is none to detect")
@pytest.mark.parametrize("capacity", [1, 3, 64])
def test_switch_expert_capacity(capacity):
    """Capacity per expert and batch row, first come first served; dropped tokens output 0."""
    model = models.tiny_model("switch_transformers", expert_capacity=capacity)
    ref = copy.deepcopy(model)
    moec.compile(model)
    blocks = moec.inspect(model).blocks
    assert len(blocks) == 2 and all(b.router.endswith(f"capacity {capacity}/row") for b in blocks)
    for b in blocks:
        x = torch.randn(3, 20, model.config.d_model)  # 20 tokens a row: overflows capacities 1 and 3
        with torch.no_grad():
            assert rel_err(resolve(model, b.path)(x), resolve(ref, b.path)(x)) < TOL[torch.float32]


def test_switch_bf16_router_cast_to_fp32():
    """Switch's router casts its classifier to fp32 on first use: the compiled block routes in that dtype."""
    model = models.tiny_model("switch_transformers", dtype=torch.bfloat16)
    inputs = models.example_inputs(model, batch=2, seq=9)
    _logits(model, inputs)  # the classifiers are fp32 from here on
    ref = copy.deepcopy(model)
    moec.compile(model)
    assert len(moec.inspect(model).blocks) == 2
    assert rel_err(_logits(model, inputs), _logits(ref, inputs)) < TOL[torch.bfloat16]


def test_nllb_moe_runs_experts_0_and_1():
    """Why nllb_moe is in GAPS: its block equals expert_1 weighted by the top-1 gate plus expert_0 by the
    top-2 gate (times 1 - moe_token_dropout), for every token."""
    block = next(m for m in models.tiny_model("nllb_moe").modules() if hasattr(m, "router") and hasattr(m, "experts"))
    x = torch.randn(10, block.router.classifier.in_features)
    with torch.no_grad():
        top1, gates, _ = block.router(x)
        g1, g2 = (gates * top1).sum(-1, keepdim=True), (gates * (1 - top1)).sum(-1, keepdim=True)
        ex = block.experts
        buggy = (ex["expert_1"](x) * g1 + ex["expert_0"](x) * g2) * (1 - ex.moe_token_dropout)
        assert rel_err(block(x[None])[0], buggy) < TOL[torch.float32]


def test_jetmoe_rewrites_mlp_not_attention():
    """Every layer's MoE MLP is rewritten; every layer's mixture of attention heads is rejected, with why."""
    model = models.tiny_model("jetmoe")
    moec.compile(model)
    report = moec.inspect(model)
    layers = range(model.config.num_hidden_layers)
    assert [b.path for b in report.blocks] == [f"model.layers.{i}.mlp" for i in layers]
    assert [r.path for r in report.rejected] == [f"model.layers.{i}.self_attention.experts" for i in layers]
    assert all("calling the block with hidden states failed" in r.reason for r in report.rejected)
    assert all(not hasattr(resolve(model, r.path), "_moec_graph") for r in report.rejected)


def test_phimoe_training_mode_runs_the_original():
    """sparsemixer samples experts in training mode: moec proves the eval-mode block, and a compiled block in
    training mode runs its original forward (same random draws, same outputs), gradients included."""
    model = models.tiny_model("phimoe").train()
    ref = copy.deepcopy(model)
    moec.compile(model)
    assert len(moec.inspect(model).blocks) == 2 and model.training  # compile leaves the mode as it was
    inputs = models.example_inputs(model, seq=6)
    torch.manual_seed(0)
    got = model(**inputs).logits
    torch.manual_seed(0)
    want = ref(**inputs).logits
    assert torch.equal(got, want)
    got.sum().backward()
    want.sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), n
    model.eval(), ref.eval()
    assert rel_err(_logits(model, inputs), _logits(ref, inputs)) < TOL[torch.float32]


def test_stays_an_hf_model(tmp_path):
    model = models.tiny_model("qwen2_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moec.compile(model)
    assert model.state_dict().keys() == before.keys()  # moec's canonical copies are not saved
    assert model.config.model_type == "qwen2_moe"
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    for k, v in reloaded.state_dict().items():
        torch.testing.assert_close(v, before[k])


@pytest.mark.parametrize("family", list(GAPS))
def test_gaps_left_unchanged(family):
    """Variants moec cannot prove yet are reported (or not found) and keep their exact outputs."""
    model = models.tiny_model(family)
    ref = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moec.compile(model)
    report = moec.inspect(model)
    assert not report.blocks
    assert all(r.reason for r in report.rejected)
    assert any("no MoE block rewritten" in str(w.message) for w in caught)
    inputs = models.example_inputs(model, batch=2, seq=5)
    assert torch.equal(_logits(model, inputs), _logits(ref, inputs))


@pytest.mark.parametrize("strategy", ["average", "sum"])
@pytest.mark.parametrize("selection", ["softmax", "sigmoid"])
def test_cohere2_moe_blocks_with_their_shared_experts(strategy, selection):
    """Cohere2-MoE's default combine, (routed + shared) / 2: its whole block is compiled (only its experts
    module was), as with "sum"; the logits match at 1 and 17 tokens."""
    cfg = transformers.Cohere2MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, num_experts=8, num_experts_per_tok=2,
        num_shared_experts=1, shared_expert_combination_strategy=strategy, expert_selection_fn=selection,
        initializer_range=0.08, sliding_window=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ref = copy.deepcopy(model)
    moec.compile(model)
    report = moec.inspect(model)
    assert [b.path for b in report.blocks] == [f"model.layers.{i}.mlp" for i in range(2)], report
    assert all(b.shared.endswith(" x0.5") == (strategy == "average") for b in report.blocks), report
    for batch, seq in [(1, 1), (2, 17)]:
        inputs = models.example_inputs(model, batch=batch, seq=seq, seed=seq)
        assert rel_err(_logits(model, inputs), _logits(ref, inputs)) < TOL[torch.float32]


def test_longcat_flash_zero_compute_experts(tmp_path):
    """LongCat-Flash's router chooses among 6 experts and 2 zero-compute ones (the token itself, weighted; HF keeps
    gate/up rows for them too, never read): the block is compiled whole (it was not found), on the torch and
    onnxruntime backends and through export_onnx (ORT's MoE op on log-weights); logits match at 1 and 17 tokens and
    greedy generation matches, also once its selection bias sends most pairs to the zero-compute experts."""
    import onnxruntime as ort

    cfg = transformers.LongcatFlashConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        ffn_hidden_size=96, expert_ffn_hidden_size=32, n_routed_experts=6, zero_expert_num=2, moe_topk=3,
        q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8,
        max_position_embeddings=256, initializer_range=0.1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ref = copy.deepcopy(model)
    moec.compile(model)
    report = moec.inspect(model)
    assert [b.path for b in report.blocks] == ["model.layers.0.mlp"], report
    assert "6 x SwiGLU 64->32->64 + 2 zero-compute (identity) experts" in report.blocks[0].experts
    inputs = models.example_inputs(model, batch=2, seq=17, seed=17)
    ort_model = moec.compile(copy.deepcopy(ref), backend="onnxruntime")
    assert rel_err(_logits(ort_model, inputs), _logits(ref, inputs)) < TOL[torch.float32]
    path = tmp_path / "longcat.onnx"
    exported = moec.export_onnx(ref, (inputs["input_ids"],), path, kv_cache=False)
    assert [b.op for b in exported.blocks] == ["MoE"] and "log-weights" in exported.blocks[0].why, exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: inputs["input_ids"].numpy()})[0])
    assert rel_err(got, _logits(ref, {"input_ids": inputs["input_ids"]})) < TOL[torch.float32]
    for bias in (0.0, 0.5):  # 0.5: most of the k=3 pairs choose the zero-compute experts
        for m in (model, ref):
            m.model.layers[0].mlp.router.e_score_correction_bias[6:] = bias
        for batch, seq in [(1, 1), (2, 17)]:
            inputs = models.example_inputs(model, batch=batch, seq=seq, seed=seq)
            assert rel_err(_logits(model, inputs), _logits(ref, inputs)) < TOL[torch.float32]
        ids = models.example_inputs(model, batch=1, seq=5)["input_ids"]
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                           ref.generate(ids, max_new_tokens=8, do_sample=False))


def test_mimo_v2_flash_layers_of_other_kv_heads(tmp_path):
    """MiMo-V2-Flash's sliding-window layers cache twice the key/value heads of its full-attention layers (and have
    attention sinks; keys and values of other head sizes): compiled on the torch backend, and generating on
    onnxruntime's KV-cache session, whose past is laid out per layer (it crashed at the first step), the original's
    tokens with a padded batch; export_genai, whose config takes one number of kv heads, refuses it."""
    cfg = transformers.MiMoV2FlashConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, v_head_dim=8, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, max_position_embeddings=128, sliding_window=6,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        mlp_layer_types=["dense", "sparse", "sparse"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.08)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model = moec.compile(copy.deepcopy(ref))
    assert [b.path for b in moec.inspect(model).blocks] == ["model.layers.1.mlp", "model.layers.2.mlp"]
    inputs = models.example_inputs(model, batch=2, seq=17, seed=17)
    assert rel_err(_logits(model, inputs), _logits(ref, inputs)) < TOL[torch.float32]
    ort_model = moec.compile(copy.deepcopy(ref), backend="onnxruntime")
    ids = models.example_inputs(model, batch=2, seq=9, seed=3)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        got, want = (m.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
                     for m in (ort_model, ref))
    assert torch.equal(got, want)
    with pytest.raises(NotImplementedError, match="cache 1 or 2 key/value heads and genai_config.json takes one"):
        moec.export_genai(ref, examples.byte_tokenizer(), tmp_path / "genai")


def test_ernie_vl_blocks_that_return_their_output_flattened():
    """ERNIE-4.5-VL's text and vision MoE blocks return [T*H] outputs and [T*E] logits, and its multimodal block
    calls them on the flattened states of the tokens of each modality: both are compiled whole (only their experts
    modules were), proved on [T*H] inputs too, and run compiled there."""
    from moec.canonical import compiled_forward, compiled_graph
    from moec.pass_manager import verify_graph

    vl = pytest.importorskip("transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe")
    cfg = vl.Ernie4_5_VLMoeTextConfig(
        vocab_size=256, hidden_size=256, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=[32, 16],
        moe_num_shared_experts=1, max_position_embeddings=256, initializer_range=0.08)
    torch.manual_seed(0)
    model = vl.Ernie4_5_VLMoeTextModel(cfg).eval()
    for n, p in model.named_parameters():
        if "e_score_correction_bias" in n:
            p.data.normal_(0, 0.05)
    ref = copy.deepcopy(model)
    moec.compile(model)
    report = moec.inspect(model)
    moe = [i for i, layer in enumerate(model.layers) if hasattr(layer.mlp, "text_moe")]
    assert moe and [b.path for b in report.blocks] == [f"layers.{i}.mlp.{m}" for i in moe
                                                      for m in ("text_moe", "vision_moe")], report
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state) < TOL[torch.float32]
        types = torch.zeros(2, 9, dtype=torch.long)
        types[0, 3:7] = 1  # image tokens: the vision experts
        x = torch.randn(2, 9, cfg.hidden_size)
        for i in moe:
            got, want = model.layers[i].mlp(x, moe_mm_token_type_ids=types), ref.layers[i].mlp(x, moe_mm_token_type_ids=types)
            assert all(rel_err(g, w) < TOL[torch.float32] for g, w in zip(got, want))
            for m in ("text_moe", "vision_moe"):
                assert compiled_forward(getattr(model.layers[i].mlp, m)).why_original(x[0].reshape(-1), {}) is None
                # MOEC_LOGS=verify / moec run --verify compare its [1, T, H] with the block's [T*H] (they said inf)
                assert verify_graph(compiled_graph(getattr(model.layers[i].mlp, m)), getattr(ref.layers[i].mlp, m)) < 1e-5
