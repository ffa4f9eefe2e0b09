"""backend="onnxruntime": the whole model runs in an ONNX Runtime session (CPU here) with the
model's call signature and outputs, at any batch/sequence size; providers and session options
pass through and the provider that ran is reported; the first call refuses a wrong session."""

import copy
import os
import dataclasses

import numpy as np
import pytest
import torch

import handwritten as hw
import moec
from moec import models
from moec.report import Rejection
from moec.backends import cpu_native, ort_kernels, ort_session
from moec.export import ExportReport

from conftest import TOL, rel_err
from test_quant import _dequantized_twin

SHAPES = [(1, 1), (2, 7), (3, 2)]  # (batch, seq): the first call exports at (1, 1), widened to 2


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    model = models.tiny_model("mixtral")
    opt = tmp_path_factory.mktemp("ort") / "optimized.onnx"
    compiled = moec.compile(copy.deepcopy(model), backend="onnxruntime",
                            providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                            session_options={"intra_op_num_threads": 1, "graph_optimization_level": "ORT_ENABLE_ALL",
                                             "optimized_model_filepath": str(opt)})
    return model, compiled, opt


@pytest.mark.parametrize("batch,seq", SHAPES)
def test_hf_model_matches_eager(mixtral, batch, seq):
    model, compiled, _ = mixtral
    inputs = models.example_inputs(model, batch=batch, seq=seq, seed=batch * 10 + seq)
    with torch.no_grad():
        out, ref = compiled(**inputs), model(**inputs)
    assert type(out) is type(ref) and out.logits.shape == ref.logits.shape
    assert rel_err(out.logits, ref.logits) < TOL[torch.float32]
    assert len(compiled.forward.sessions) == 1  # one session serves every size


def test_return_dict_false_gives_hfs_tuple(mixtral):
    """The model keeps its call signature: return_dict=False gives the tuple HF's forward gives (it raised)."""
    model, compiled, _ = mixtral
    ids = models.example_inputs(model, batch=2, seq=5)["input_ids"]
    with torch.no_grad():
        for kw in ({}, {"use_cache": False}):
            got, want = compiled(input_ids=ids, return_dict=False, **kw), model(input_ids=ids, return_dict=False, **kw)
            assert type(got) is tuple and [type(t) for t in got] == [type(t) for t in want]
            assert rel_err(got[0], want[0]) < TOL[torch.float32]


def test_providers_and_session_options(mixtral):
    model, compiled, opt = mixtral
    compiled(**models.example_inputs(model))
    report = moec.inspect(compiled)
    assert report.backend == "onnxruntime (CPUExecutionProvider)"  # CUDA asked first, none here
    assert [b.op for b in report.export.blocks] == ["MoE"] * len(report.blocks)
    assert opt.exists()  # optimized_model_filepath reached the session
    with pytest.raises(ValueError, match="unknown onnxruntime session option"):
        ort_session.session_options({"threads": 2})


def test_generate(mixtral):
    model, compiled, _ = mixtral
    inputs = models.example_inputs(model, batch=1, seq=4)
    ref = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(compiled.generate(**inputs, max_new_tokens=4, do_sample=False), ref)
    with pytest.raises(NotImplementedError, match="output_hidden_states=True"):
        compiled(**inputs, output_hidden_states=True)


@pytest.mark.parametrize("bad", [-5, -1, 256, 10**6])
def test_ids_outside_the_vocabulary_raise(mixtral, bad):
    """As the eager model's embedding does. ONNX's Gather reads a negative id from the end of the table: once a
    session existed, generate(-5) gave the tokens of id 251, silently."""
    model, compiled, _ = mixtral
    ids = models.example_inputs(model, batch=2, seq=5)["input_ids"]
    with torch.no_grad():
        compiled.generate(ids, max_new_tokens=2, do_sample=False)  # the sessions exist
        ids[1, 2] = bad
        with pytest.raises(IndexError):
            model(input_ids=ids)
        for call in (lambda: compiled(input_ids=ids), lambda: compiled(input_ids=ids, use_cache=False),
                     lambda: compiled.generate(ids, max_new_tokens=2, do_sample=False),
                     lambda: compiled.generate(input_ids=ids, max_new_tokens=2, do_sample=True)):
            with pytest.raises(IndexError, match=f"input_ids holds {bad}, outside the vocabulary"):
                call()
        with pytest.raises(ValueError, match=r"must be \[batch, sequence\]"):
            compiled(input_ids=ids[0])


class _ScaledEmbedding(torch.nn.Embedding):
    """Looks ids up as nn.Embedding does, then scales (as Gemma's embeddings do)."""

    def forward(self, ids):
        return super().forward(ids) * 2.0


class _WrappedEmbedding(torch.nn.Embedding):
    """Maps every id into the table first: ids outside it are the model's to take."""

    def forward(self, ids):
        return super().forward(ids % self.num_embeddings)


@pytest.mark.parametrize("kind", [_ScaledEmbedding, _WrappedEmbedding])
def test_ids_outside_an_embedding_subclass(kind):
    """A subclass with its own forward: ids it cannot look up raise as in the eager model (the check skipped
    such tables, and a negative id read the table's end); ids it maps into the table give the eager logits."""
    model = models.tiny_model("mixtral")
    old = model.get_input_embeddings()
    table = kind(old.num_embeddings, old.embedding_dim)
    table.weight.data.copy_(old.weight.data)
    model.set_input_embeddings(table)
    compiled = moec.compile(copy.deepcopy(model), backend="onnxruntime", session_options={"intra_op_num_threads": 1})
    ids = models.example_inputs(model, batch=2, seq=5)["input_ids"]
    with torch.no_grad():
        compiled(input_ids=ids)  # the session exists
        ids[1, 2] = -5
        if kind is _ScaledEmbedding:
            with pytest.raises(IndexError):
                model(input_ids=ids)
            with pytest.raises(IndexError, match="input_ids holds -5, outside the vocabulary"):
                compiled(input_ids=ids)
        else:
            assert rel_err(compiled(input_ids=ids).logits, model(input_ids=ids).logits) < TOL[torch.float32]


@pytest.mark.parametrize("keep", [1, 3, 0, torch.tensor([1]), torch.tensor([3]), torch.tensor([0, 5]),
                                  torch.tensor([6, 6, 2])], ids=str)
@pytest.mark.parametrize("use_cache", [True, False])
def test_logits_to_keep_as_hf_reads_it(mixtral, keep, use_cache):
    """An int n keeps the last n positions (0: all), a tensor the positions it indexes (tensor([1]): position 1,
    not the last one), with the cache and without."""
    model, compiled, _ = mixtral
    inputs = models.example_inputs(model, batch=2, seq=7, seed=5)
    with torch.no_grad():
        got = compiled(**inputs, logits_to_keep=keep, use_cache=use_cache).logits
        want = model(**inputs, logits_to_keep=keep, use_cache=use_cache).logits
    assert got.shape == want.shape and rel_err(got, want) < TOL[torch.float32]


def test_train_mode_runs_the_models_own_forward():
    """In train() the model's own forward runs (router jitter, dropout, gradients), also as the first call (nothing
    exported); back in eval mode the session runs, and a backward through its logits raises, saying why."""
    ref = models.tiny_model("mixtral", router_jitter_noise=0.5, attention_dropout=0.3)
    model = moec.compile(copy.deepcopy(ref), backend="onnxruntime", session_options={"intra_op_num_threads": 1})
    ids = models.example_inputs(ref, batch=2, seq=6, seed=3)["input_ids"]
    model.train(), ref.train()
    for use_cache in (False, True):
        torch.manual_seed(0)
        got = model(input_ids=ids, use_cache=use_cache).logits
        torch.manual_seed(0)
        want = ref(input_ids=ids, use_cache=use_cache).logits
        assert torch.equal(got, want)
    assert not model.forward.sessions
    got.sum().backward()
    assert model.lm_head.weight.grad is not None and model.model.layers[0].mlp.gate.weight.grad is not None
    torch.manual_seed(1)
    sampled = model.generate(ids, max_new_tokens=4, do_sample=True)
    torch.manual_seed(1)
    assert torch.equal(sampled, ref.generate(ids, max_new_tokens=4, do_sample=True))
    model.eval(), ref.eval()
    for kw in ({}, {"use_cache": False}, {"logits_to_keep": 1}):
        out = model(input_ids=ids, **kw).logits
        assert rel_err(out.detach(), ref(input_ids=ids, **kw).logits.detach()) < TOL[torch.float32]
        out[..., 3] = -float("inf")  # written in place, as eager logits may be (the mark is not a view)
        out /= 2
        with pytest.raises(RuntimeError, match="computes no gradients in eval mode"):
            out.sum().backward()
    # every parameter frozen, the embeddings asking for gradients (attribution): said too, not grad=None
    model.requires_grad_(False)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    with pytest.raises(RuntimeError, match="computes no gradients in eval mode"):
        model(inputs_embeds=embeds, use_cache=False).logits.sum().backward()


@pytest.mark.parametrize("flag", ["output_router_logits", "output_hidden_states", "output_attentions"])
def test_config_output_flags(flag, monkeypatch):
    """A config that turns on extra outputs (as fine-tuned MoE checkpoints ship output_router_logits=True): the
    session still computes the model's logits and tokens, and says once that those outputs are None."""
    said = []
    monkeypatch.setattr(ort_session.log, "warning", lambda msg, *a: said.append(msg))
    ref = models.tiny_model("mixtral", **{flag: True})
    model = moec.compile(copy.deepcopy(ref), backend="onnxruntime", session_options={"intra_op_num_threads": 1})
    ids = models.example_inputs(ref, batch=2, seq=6, seed=4)["input_ids"]
    field = {"output_router_logits": "router_logits", "output_hidden_states": "hidden_states",
             "output_attentions": "attentions"}[flag]
    with torch.no_grad():
        for use_cache in (True, False):
            got, want = model(input_ids=ids, use_cache=use_cache), ref(input_ids=ids, use_cache=use_cache)
            assert rel_err(got.logits, want.logits) < TOL[torch.float32]
            assert getattr(want, field) is not None and getattr(got, field) is None  # as the warning says
        if flag == "output_router_logits":
            want = ref.generate(ids, max_new_tokens=5, do_sample=False)
            assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), want)
        else:  # HF's generate then returns them (return_dict_in_generate from the config): refused, naming the flag
            with pytest.raises(NotImplementedError, match=flag):
                model.generate(ids, max_new_tokens=5, do_sample=False)
            want = ref.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=False)
            got = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=False)
            assert torch.equal(got, want)  # the tokens alone: moec's loop
    assert sum(flag in m for m in said) == 1


def test_an_output_flag_on_the_text_config(monkeypatch):
    """A multimodal MoE (Qwen3-VL-MoE) reads its language model's output flags from config.text_config: one set
    there is passed as False to the export too (it traced HF's router-logits hooks and failed to convert), and the
    warning names where it is set."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3VLMoeConfig"):
        pytest.skip("transformers without Qwen3-VL-MoE")
    said = []
    monkeypatch.setattr(ort_session.log, "warning", lambda msg, *a: said.append(msg))
    text = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                vocab_size=256, decoder_sparse_step=1, output_router_logits=True,
                rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  deepstack_visual_indexes=[0])
    torch.manual_seed(0)
    config = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision)
    ref = transformers.Qwen3VLMoeForConditionalGeneration(config).eval()
    model = moec.compile(copy.deepcopy(ref), backend="onnxruntime", session_options={"intra_op_num_threads": 1})
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = model(input_ids=ids), ref(input_ids=ids)
    assert rel_err(got.logits, want.logits) < TOL[torch.float32]
    assert want.router_logits is not None and got.router_logits is None
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False),
                       ref.generate(ids, max_new_tokens=5, do_sample=False))
    assert sum("model.config.text_config.output_router_logits = False" in m for m in said) == 1


def test_an_experts_module_rewritten_alone():
    """A block moec cannot prove whole (Cohere2-MoE's, its output scaled by a learned 0-d tensor: a form the
    detector does not know) has its experts module rewritten alone; the export's check of the routers skips it (a
    KeyError at every first call)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Cohere2MoeConfig"):
        pytest.skip("transformers without Cohere2-MoE")
    torch.manual_seed(0)
    config = transformers.Cohere2MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
        shared_expert_combination_strategy="average", sliding_window=4, logit_scale=1.0,
        layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["sparse", "sparse"])
    ref = transformers.Cohere2MoeForCausalLM(config).eval()
    models._make_routing_decisive(ref, 64)
    for layer in ref.model.layers:
        block = layer.mlp

        class Mixed(type(block)):
            def forward(self, hidden_states):
                return super().forward(hidden_states) * self.mix

        block.__class__, block.mix = Mixed, torch.nn.Parameter(torch.tensor(0.7))
    model = moec.compile(copy.deepcopy(ref), backend="onnxruntime", session_options={"intra_op_num_threads": 1})
    report = moec.inspect(model)
    assert report.blocks and all("caller" in b.router for b in report.blocks), report
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(3))  # no pad (0) ids
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, ref(input_ids=ids).logits) < TOL[torch.float32]
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False),
                       ref.generate(ids, max_new_tokens=5, do_sample=False))


def test_a_cache_the_export_cannot_stand_in_for_is_refused_clearly():
    """MiniMax keeps its cache in a class of its own (MiniMaxCache), GLM-MoE-DSA its indexer's keys in each layer:
    the KV-cache export does not stand in for them, so the session runs without the cache; where that session
    cannot run either (MiniMax's graph holds the example's length), the call says so in one line, with what to do
    (ORT's or HF's own errors came out before, at every call)."""
    transformers = pytest.importorskip("transformers")
    from moec.export import layer_layout

    cases = {"MiniMaxConfig": ("MiniMaxForCausalLM", "MiniMaxCache", dict(
                 num_local_experts=8, num_experts_per_tok=2, head_dim=16, num_key_value_heads=2,
                 layer_types=["full_attention", "linear_attention"], block_size=4)),
             "GlmMoeDsaConfig": ("GlmMoeDsaForCausalLM", "DynamicIndexedLayer", dict(
                 num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                 moe_intermediate_size=32, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                 v_head_dim=16, head_dim=8, mlp_layer_types=["sparse", "sparse"], first_k_dense_replace=0,
                 layer_types=["indexed_attention"] * 2, index_topk=4, index_head_dim=16, index_n_heads=2))}
    ids = torch.randint(3, 256, (1, 3), generator=torch.Generator().manual_seed(0))
    for config_class, (model_class, kind, kw) in cases.items():
        if not hasattr(transformers, config_class):
            pytest.skip(f"transformers without {config_class}")
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(vocab_size=256, hidden_size=64, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=4, **kw)
        model = getattr(transformers, model_class)(config).eval()
        with pytest.raises(NotImplementedError, match=f"keeps its cache as .*{kind}.*kv_cache=False\\) exports it"):
            layer_layout(model, ids)
        compiled = moec.compile(model, backend="onnxruntime", session_options={"intra_op_num_threads": 1})
        assert not compiled.forward.cached
        with pytest.raises((NotImplementedError, RuntimeError), match="moec backend='onnxruntime'") as e:
            compiled(input_ids=ids)
        assert "\n" not in str(e.value)


def test_hand_written_model_returns_a_tensor():
    spec = hw.PRESETS["deepseek_v3_groups"]
    lm = hw.TinyLM(vocab=64, hidden=spec.hidden, n_layers=2, block_fn=lambda: hw.make_block(spec))
    compiled = moec.compile(copy.deepcopy(lm), backend="onnxruntime")
    for batch, seq in SHAPES:
        ids = torch.randint(0, 64, (batch, seq))
        with torch.no_grad():
            out = compiled(ids)
        assert isinstance(out, torch.Tensor) and rel_err(out, lm(ids)) < TOL[torch.float32]


def test_quantized_equals_dequantized_model():
    model = models.tiny_model("mixtral")
    cfg = moec.Int4Experts(32)
    compiled = moec.compile(copy.deepcopy(model), backend="onnxruntime", quantize=cfg)
    twin = _dequantized_twin(model, moec.compile(copy.deepcopy(model), quantize=cfg), cfg)
    for batch, seq in SHAPES[:2]:
        inputs = models.example_inputs(model, batch=batch, seq=seq)
        with torch.no_grad():
            assert rel_err(compiled(**inputs).logits, twin(**inputs).logits) < 1e-4
    op = "QMoE" if ort_kernels.library() is None else "moec::Int4Experts"  # moec's kernels where they build
    assert [b.op for b in moec.inspect(compiled).export.blocks] == [op] * 2


@pytest.mark.parametrize("cfg", [moec.Int4Experts(32, activations="int8"), moec.Int8Experts(activations="int8")],
                         ids=lambda c: c.describe())
def test_int8_activations_equal_their_reference(cfg):
    """activations="int8": the session (QMoE accuracy_level=4) equals the model whose blocks run ORT's ops by their
    torch reference (int8 rows per group: moec.quant.int8_rows), logits and generated tokens; the report says
    which numerics run and what they cost; the torch backend, which rounds int4 experts' rows as ORT does, gives
    the reference's logits within the same spread. Int8Experts on a CPU with AVX512-VNNI: the session runs moec's
    int8 kernels, which round each row as the torch backend does: the torch backend is the reference.
    Rounding to int8 is discontinuous: the session's fp32 parts (attention, norms) differ from torch's by ~1e-7,
    which flips an activation that sits on a rounding boundary (seen on an AVX2 CPU: 1.5e-3 at the logits). So the
    logits must be within the reference's own spread under 1e-6 noise on its input (exact where nothing flips;
    the node alone is compared exactly in test_onnx.py), and farther from the weight-only model than that."""
    from moec.pass_manager import DEFAULT_PIPELINE

    model = models.tiny_model("mixtral", hidden_size=64, intermediate_size=64)
    compiled = moec.compile(copy.deepcopy(model), backend="onnxruntime", quantize=cfg)
    rows = isinstance(cfg, moec.Int8Experts) and cpu_native.has_vnni512()  # moec::ExpertsInt8, a step a row
    reference = moec.compile(copy.deepcopy(model), quantize=cfg,
                             passes=DEFAULT_PIPELINE + ",quantize_experts" + ",lower_onnx" * (not rows))
    weight_only = dataclasses.replace(cfg, activations="fp32")
    twin = _dequantized_twin(model, moec.compile(copy.deepcopy(model), quantize=weight_only), weight_only)
    gen = torch.Generator().manual_seed(0)
    for batch, seq in SHAPES[:2]:
        inputs = models.example_inputs(model, batch=batch, seq=seq)
        with torch.no_grad():
            got, want, dequantized = (m(**inputs).logits for m in (compiled, reference, twin))
            embeds = reference.get_input_embeddings()(inputs["input_ids"])
            spread = max(rel_err(reference(inputs_embeds=embeds * (1 + 1e-6 * torch.randn(embeds.shape, generator=gen)),
                                           attention_mask=inputs.get("attention_mask")).logits, want)
                         for _ in range(8))
        assert rel_err(got, want) < max(1e-5, 1.5 * spread) < rel_err(want, dequantized), (spread, rel_err(got, want))
    inputs = models.example_inputs(model, batch=1, seq=4)
    assert torch.equal(compiled.generate(**inputs, max_new_tokens=6, do_sample=False),
                       reference.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False))
    report = moec.inspect(reference)
    assert "with int8 activations: max relative error" in report.blocks[0].proof
    said = " ".join(str(moec.inspect(compiled)).split())  # the table's header wraps where the console ends
    assert ("one scale per row" if rows else "int8 activations per group of 32") in said
    if isinstance(cfg, moec.Int4Experts):  # the torch backend rounds int4 experts' rows per group too
        torch_a8 = moec.compile(copy.deepcopy(model), quantize=cfg)
        for batch, seq in SHAPES[:2]:
            inputs = models.example_inputs(model, batch=batch, seq=seq)
            with torch.no_grad():
                got, want = torch_a8(**inputs).logits, reference(**inputs).logits
            assert rel_err(got, want) < max(1e-5, 1.5 * spread), (batch, seq, rel_err(got, want))


@pytest.mark.parametrize("dense", [moec.Int4Experts(32), moec.Int4Experts(32, signed_scale=True),
                                   moec.Int4Experts(32, symmetric=False),
                                   pytest.param(moec.Int8Experts(activations="int8"), marks=pytest.mark.slow)],
                         ids=lambda c: c.describe())
def test_dense_matmuls(dense, tmp_path):
    """dense=: the session runs the file export_onnx(dense=) writes (MatMulNBits, tested against its dequantized
    weights in test_onnx_cache.py), or with int8 rows on a CPU with AVX512-VNNI, moec::LinearInt8. int4 on every
    grid holds the torch backend's numbers, in the session and in the file under a plain ORT session (ORT's own
    quantizer wrote its one grid before: 0.4 relative apart); refused by the other backends and for anything but
    Int4/Int8Experts."""
    import numpy as np
    import onnxruntime as ort

    model = models.tiny_model("mixtral", hidden_size=64, intermediate_size=64)
    compiled = moec.compile(copy.deepcopy(model), backend="onnxruntime", dense=dense)
    inputs = models.example_inputs(model, batch=2, seq=5)
    with torch.no_grad():
        got, fp = compiled(**inputs).logits, model(**inputs).logits
    assert moec.inspect(compiled).export.dense_matmuls > 0
    assert moec.inspect(compiled).dense_left == []  # every dense layer quantized (the routers are left by design)
    report = moec.export_onnx(model, inputs, tmp_path / "d.onnx", dense=dense, kv_cache=False)
    sess = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    want = torch.from_numpy(np.asarray(sess.run(None, {n: inputs[n].numpy() for n in report.inputs})[0]))
    with torch.no_grad():
        torch_backend = moec.compile(copy.deepcopy(model), dense=dense)(**inputs).logits
    if isinstance(dense, moec.Int4Experts):
        assert rel_err(want, torch_backend) < 1e-5, rel_err(want, torch_backend)
    elif cpu_native.has_vnni512():  # a step a row, as the torch backend
        want = torch_backend
    assert rel_err(got, want) < 1e-6 and rel_err(got, fp) > 1e-4  # quantized
    with pytest.raises(NotImplementedError, match="dense= runs on backend 'torch'"):  # torch: tests/test_dense.py
        moec.compile(copy.deepcopy(model), backend="triton", dense=dense)
    with pytest.raises(TypeError, match="dense must be"):
        moec.compile(copy.deepcopy(model), backend="onnxruntime", dense="int4")


def _text(report) -> str:
    from rich.console import Console

    console = Console(width=400, record=True, file=open(os.devnull, "w"))
    console.print(report)
    return console.export_text()


def test_dense_left_fp32_is_reported(monkeypatch, tmp_path):
    """An MLA model's attention (DeepSeek-V3) keeps MatMuls with a weight per head, which dense= on onnxruntime does
    not quantize (the torch backend quantizes kv_b_proj as one nn.Linear): inspect lists each, naming its layer, and
    the compile says so in a warning; the export report counts them."""
    from moec.export_dense import left_fp32

    model = models.tiny_model("deepseek_v3")
    cfg = moec.Int4Experts(32)
    compiled = moec.compile(copy.deepcopy(model), backend="onnxruntime", quantize=cfg, dense=cfg)
    inputs = models.example_inputs(model, batch=1, seq=5)
    said = []
    monkeypatch.setattr(ort_session.log, "warning", lambda msg, *a: said.append(msg))
    with torch.no_grad():
        compiled(**inputs)
        compiled.generate(**inputs, max_new_tokens=2, do_sample=False)  # the cache session: nothing listed twice
    report = moec.inspect(compiled)
    layers = model.config.num_hidden_layers
    assert len(report.dense_left) == 2 * layers and len(set(report.dense_left)) == len(report.dense_left)
    for i in range(layers):
        assert sum(why.startswith(f"model.layers.{i}.self_attn MatMul ") and "one matrix per head" in why
                   for why in report.dense_left) == 2
    assert sum("dense= leaves a MatMul in fp32" in msg for msg in said) == 2 * layers
    assert report.export.dense_left == report.dense_left and "left fp32 (.dense_left)" in _text(report.export)
    assert "dense= left fp32: model.layers.0.self_attn" in _text(report)
    # quantize_dense quantizes the dense MatMuls alone: not a router (N = its experts), a one-column gate or a K the
    # blocks do not divide (left_fp32 lists that one; routers and gates are left by design)
    import onnx
    from onnx import helper, numpy_helper

    from moec.export_dense import quantize_dense

    shapes = {"dense": (64, 64), "router": (64, 8), "gate": (64, 1), "k48": (48, 64)}
    graph = helper.make_graph(
        [helper.make_node("MatMul", [f"x{k}", w], [f"y{w}"], name=w) for w, (k, _) in shapes.items()], "g",
        [helper.make_tensor_value_info(f"x{k}", onnx.TensorProto.FLOAT, [None, k]) for k in (64, 48)],
        [helper.make_tensor_value_info(f"y{w}", onnx.TensorProto.FLOAT, None) for w in shapes],
        [numpy_helper.from_array(np.ones(shape, np.float32), w) for w, shape in shapes.items()])
    path = str(tmp_path / "m.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    assert quantize_dense(path, cfg, {8}, False) == 1
    proto = onnx.load(path)
    assert sorted(n.op_type for n in proto.graph.node) == ["MatMul"] * 3 + ["MatMulNBits"]
    assert left_fp32(proto, cfg, {8}) == ["a MatMul k48: K 48 is not a multiple of 32"]


def test_tied_lm_head_left_fp32_is_reported():
    """A tied lm_head (its weight the embedding's) stays fp32 under dense= on both backends, each saying so."""
    model = models.tiny_model("mixtral", tie_word_embeddings=True)
    cfg = moec.Int4Experts(32)
    compiled = moec.compile(copy.deepcopy(model), backend="onnxruntime", quantize=cfg, dense=cfg)
    with torch.no_grad():
        compiled(**models.example_inputs(model, batch=1, seq=3))
    [why] = moec.inspect(compiled).dense_left
    assert why.startswith("lm_head ") and why.endswith(": its weight is the embedding's too (tied)"), why
    assert moec.inspect(moec.compile(copy.deepcopy(model), quantize=cfg, dense=cfg)).dense_left == [
        "lm_head: its weight is tied to another module's"]


def test_save_and_load_keep_the_backend(tmp_path):
    """moec.load compiles for the backend the saved model ran on (here onnxruntime, with its dense= format), unless
    told otherwise."""
    a8 = moec.Int4Experts(32, activations="int8")
    model = moec.compile(models.tiny_model("mixtral", hidden_size=64, intermediate_size=64), backend="onnxruntime",
                         quantize=a8, dense=moec.Int8Experts())
    moec.save(model, tmp_path / "m.safetensors")
    fresh = moec.load(models.tiny_model("mixtral", hidden_size=64, intermediate_size=64, seed=1),
                      tmp_path / "m.safetensors")
    report = moec.inspect(fresh)
    assert report.backend.startswith("onnxruntime") and report.quantize == a8 and report.dense == moec.Int8Experts()
    inputs = models.example_inputs(model, batch=2, seq=5)
    with torch.no_grad():
        assert rel_err(fresh(**inputs).logits, model(**inputs).logits) < 1e-6
    # told otherwise: the torch backend quantizes the file's weights as the session did and rounds the same rows
    # (its dense layers in moec's own int8 format: per channel, where ORT's quantizer writes blocks of 32)
    on_torch = moec.load(models.tiny_model("mixtral", hidden_size=64, intermediate_size=64, seed=2),
                         tmp_path / "m.safetensors", backend="torch")
    twin = moec.compile(models.tiny_model("mixtral", hidden_size=64, intermediate_size=64), quantize=a8,
                        dense=moec.Int8Experts())
    report = moec.inspect(on_torch)
    assert report.backend == "torch" and report.quantize == a8 and report.blocks and report.dense_layers
    with torch.no_grad():
        assert torch.equal(on_torch(**inputs).logits, twin(**inputs).logits)
    # its weights are unquantized: another quantize= applies to them
    w8 = moec.load(models.tiny_model("mixtral", hidden_size=64, intermediate_size=64, seed=2),
                   tmp_path / "m.safetensors", backend="torch", quantize=moec.Int8Experts())
    twin = moec.compile(models.tiny_model("mixtral", hidden_size=64, intermediate_size=64), quantize=moec.Int8Experts(),
                        dense=moec.Int8Experts())
    assert moec.inspect(w8).quantize == moec.Int8Experts()
    with torch.no_grad():
        assert torch.equal(w8(**inputs).logits, twin(**inputs).logits)


def test_a_group_size_that_does_not_divide_is_refused_at_compile():
    """As on the torch backend: the blocks are rejected at compile, with the reason, and the model comes back
    unchanged with a warning that gives the reason (it used to compile, report the blocks, and fail at its first
    call's export); the model keeps no report, so the warning does not point to moec.inspect."""
    ref = models.tiny_model("qwen2_moe")  # experts of 32 units: no group of 64 in their second matrix
    model = copy.deepcopy(ref)
    with pytest.warns(UserWarning, match=r"not a multiple of the int4 group size 64 .*; and 1 more candidate\(s\) "
                                         r"rejected\); returned unchanged"):
        moec.compile(model, backend="onnxruntime", quantize=moec.Int4Experts(64))
    assert "forward" not in model.__dict__ and "_moec_report" not in model.__dict__
    after, before = model.state_dict(), ref.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_session_that_differs_from_eager_is_refused(monkeypatch):
    model = models.tiny_model("mixtral")
    compiled = moec.compile(model, backend="onnxruntime")
    monkeypatch.setitem(ort_session.CHECK_TOL, torch.float32, -1.0)  # any difference at all is too much
    with pytest.raises(RuntimeError, match="differs from the eager model"):
        compiled(**models.example_inputs(model))


def test_what_the_export_changes_is_said(monkeypatch):
    """A block that falls back to standard ops (Llama 4 at k=2) runs fp32 activations whatever the config asks: said,
    once per block. A block the export leaves as it was runs its own code, unquantized: listed as rejected, said
    once (an export report saying so, fed to the session: HF's own experts code does not export)."""
    said = []
    monkeypatch.setattr(ort_session.log, "warning", lambda msg, *a: said.append(msg))
    kw = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=64)
    model = moec.compile(models.tiny_model("llama4", num_experts_per_tok=2, **kw), backend="onnxruntime",
                         quantize=moec.Int8Experts(activations="int8"))
    inputs = models.example_inputs(model, batch=1, seq=4)
    with torch.no_grad():
        model(**inputs)
        model(**models.example_inputs(model, batch=2, seq=3))  # another session: nothing said twice
    fallback = [m for m in said if "fp32 activations, not int8 ones" in m]
    assert len(fallback) == len(moec.inspect(model).blocks) > 0, said

    # a block the export left as it was (whose own code exported): listed as rejected, said once
    said.clear()
    left = ExportReport("m.onnx", "cpu", rejected=[Rejection("model.layers.0.feed_forward", "no lowering today")])
    for _ in range(2):
        model.forward._take_export(left)
    report = moec.inspect(model)
    assert [r.path for r in report.rejected] == ["model.layers.0.feed_forward"] and \
        "no lowering today" in report.rejected[0].reason
    assert len([m for m in said if "unquantized" in m]) == 1, said


def test_bad_options():
    model = models.tiny_model("mixtral")
    with pytest.raises(TypeError, match="options of backend='onnxruntime'"):
        moec.compile(copy.deepcopy(model), backend="torch", providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="takes no passes"):
        moec.compile(copy.deepcopy(model), backend="onnxruntime", passes="detect_moe")
    with pytest.raises(NotImplementedError, match="bf16 models are not supported"):  # at compile, not first call
        with pytest.MonkeyPatch.context() as mp:  # without moec's kernels (else bf16 runs: test_ort_kernels)
            mp.setenv("MOEC_ORT_KERNELS", "0")
            moec.compile(models.tiny_model("mixtral", dtype=torch.bfloat16), backend="onnxruntime")
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="returned unchanged"):
        assert moec.compile(plain, backend="onnxruntime").forward.__self__ is plain  # not wrapped


def test_report_names_the_provider_and_calibrate_refuses_before_and_after_a_call():
    """The report says which provider and passes run from compile on (the one ORT will pick, the export's
    pipeline; the session's own provider once it opens), so inspect's numerics are right before the first call, and
    calibrate refuses the model either way."""
    model = moec.compile(models.tiny_model("mixtral"), backend="onnxruntime", quantize=moec.Int8Experts())
    inputs = models.example_inputs(model, batch=1, seq=4)
    for call in (False, True):
        if call:
            with torch.no_grad():
                model(**inputs)
        assert moec.inspect(model).backend == "onnxruntime (CPUExecutionProvider)"
        assert moec.inspect(model).pipeline == "detect_moe,fuse_gate,batch_experts,quantize_experts,lower_onnx"
        with pytest.raises(NotImplementedError, match="ONNX Runtime session"):
            moec.calibrate(model, inputs["input_ids"])


def test_right_padding_is_refused_where_windows_or_chunks_count_tokens():
    """The session counts sliding windows and Llama 4's attention chunks in each row's tokens, HF in cache slots:
    right padding would make them differ, so the backend refuses it on such models (and only on them)."""
    assert ort_session._slides(models.tiny_config("gpt_oss")) and ort_session._slides(models.tiny_config("llama4"))
    assert not ort_session._slides(models.tiny_config("mixtral"))
