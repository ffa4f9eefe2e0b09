"""compile(dense=...) on the torch backend (backends/cpu_dense.py): the model's dense nn.Linear layers on quantized
weights. Compiled models against a reference built by hand (torch's GEMM on each layer's dequantized weight, the
rows rounded to int8 where asked), at 1 token and long sequences; which layers are taken and which are left; and
the model through its life (saved and loaded, state dicts, gradients, compiled again, exported)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moec
from moec import models
from moec.backends import cpu_dense
from moec.quant import Int4Experts, Int8Experts, QuantLinear, dequantize, int8_rows, quantize
from conftest import TOL, rel_err

CONFIGS = [Int4Experts(32, activations="int8"), Int4Experts(32, symmetric=False), Int4Experts(64, signed_scale=True),
           Int8Experts(activations="int8"), Int8Experts()]


@pytest.fixture(autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def dense_names(model: nn.Module) -> list[str]:
    """The layers dense= should take in the tiny HF models: every nn.Linear but 1-column gates (their routers are
    not nn.Linear, their experts are stacked)."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and m.out_features > 1]


def reference(model: nn.Module, cfg) -> nn.Module:
    """`model` with each dense layer as torch's GEMM on its dequantized weight (rows rounded to int8 first with
    activations="int8": per group of the int4 group size, per row for int8)."""
    ref = copy.deepcopy(model)
    for name in dense_names(ref):
        m = ref.get_submodule(name)
        w = dequantize(cfg, quantize(cfg, m.weight.detach()[None]))[0]
        group = cfg.group_size if isinstance(cfg, Int4Experts) else m.in_features

        def forward(x, w=w, b=m.bias, group=group):
            if cfg.activations == "int8":
                x = int8_rows(x.reshape(-1, x.shape[-1]), group).reshape(x.shape)
            return F.linear(x, w, b)

        m.forward = forward
    return ref


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("seq", [1, 40])
def test_dense_layers_match_the_reference(cfg, family, seq):
    """Logits of the compiled model (experts unquantized: only dense= changes the numbers) against the hand-built
    reference, to fp32 rounding; every expected layer is a QuantLinear, the 1-column shared-expert gate stays.
    With int8 activations a layer input 1 ulp apart (another order of fp32 sums) can round a row to other int8
    values, which the next layers amplify (1e-2 in the logits on an AVX2 CPU): there each layer is checked on the
    inputs it got in the model, to fp32 rounding."""
    model = models.tiny_model(family)
    ref = reference(model, cfg)
    compiled = moec.compile(model, dense=cfg)
    names = dense_names(ref)
    assert moec.inspect(compiled).dense_layers == len(names) > 0 and not moec.inspect(compiled).dense_left
    assert all(isinstance(compiled.get_submodule(n), QuantLinear) for n in names)
    if family == "qwen2_moe":
        assert type(compiled.model.layers[0].mlp.shared_expert_gate) is nn.Linear
    ids = models.example_inputs(model, seq=seq)["input_ids"]
    if cfg.activations == "int8":
        calls = []
        hooks = [compiled.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: calls.append((n, i[0], o)))
                 for n in names]
        with torch.no_grad():
            compiled(ids)
            assert len(calls) == len(names)
            for name, x, y in calls:
                assert rel_err(y, ref.get_submodule(name).forward(x)) < TOL[torch.float32], name
        for h in hooks:
            h.remove()
    else:
        with torch.no_grad():
            got, want = compiled(ids).logits, ref(ids).logits
        assert rel_err(got, want) < TOL[torch.float32], rel_err(got, want)
    inspect = " ".join(str(moec.inspect(compiled)).split())  # the title as one line
    assert f"{len(names)} dense nn.Linear layers {cfg.describe()}" in inspect


def test_dense_with_quantized_experts_generates_as_its_reference():
    """quantize= and dense= together: greedy generation with the KV cache gives the tokens of the reference
    (the same quantized experts, compiled without dense=, its dense layers replaced by hand)."""
    cfg = Int4Experts(32, activations="int8")
    model = models.tiny_model("qwen2_moe")
    ref = reference(moec.compile(copy.deepcopy(model), quantize=cfg), cfg)
    compiled = moec.compile(model, quantize=cfg, dense=cfg)
    ids = models.example_inputs(model, seq=12)["input_ids"]
    with torch.no_grad():
        assert rel_err(compiled(ids).logits, ref(ids).logits) < TOL[torch.float32]
        out = compiled.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(out, ref.generate(ids, max_new_tokens=8, do_sample=False))


def test_dense_leaves_tied_and_odd_layers_with_a_reason():
    """A tied lm_head (quantizing it would untie it from the embedding) and a layer whose inputs are not a multiple
    of the group size stay nn.Linear, named in moec.inspect with the reason; the rest is quantized."""
    model = models.tiny_model("mixtral", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.extra = nn.Linear(48, 64)  # K 48: not a multiple of 32
    names = dense_names(model)
    compiled = moec.compile(model, dense=Int4Experts(32))
    report = moec.inspect(compiled)
    assert type(compiled.lm_head) is nn.Linear and compiled.lm_head.weight is compiled.model.embed_tokens.weight
    assert type(compiled.extra) is nn.Linear and report.dense_layers == len(names) - 2
    assert sorted(report.dense_left) == ["extra: 48 inputs are not a multiple of the group size 32",
                                         "lm_head: its weight is tied to another module's"]
    assert "dense= left fp32: lm_head" in " ".join(str(report).split())


def test_dense_model_through_save_load_and_state_dicts(tmp_path):
    """moec.save/load keeps the quantized layers (the file's, not the fresh model's re-quantized ones); the
    compiled model's own state_dict loads back; an fp32 checkpoint does not load silently."""
    cfg = Int4Experts(32, activations="int8")
    model = models.tiny_model("qwen2_moe")
    fp32_state = copy.deepcopy(model.state_dict())
    compiled = moec.compile(model, quantize=cfg, dense=cfg)
    ids = models.example_inputs(model, seq=9)["input_ids"]
    with torch.no_grad():
        want = compiled(ids).logits
    moec.save(compiled, tmp_path / "m.safetensors")
    loaded = moec.load(models.tiny_model("qwen2_moe", seed=1), tmp_path / "m.safetensors")  # other weights
    assert moec.inspect(loaded).dense == cfg
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    other = moec.compile(models.tiny_model("qwen2_moe", seed=2), quantize=cfg, dense=cfg)
    other.load_state_dict(compiled.state_dict())
    with torch.no_grad():
        assert torch.equal(other(ids).logits, want)
    with pytest.raises(RuntimeError, match="load_state_dict cannot give it (new expert weights|a new weight)"):
        compiled.load_state_dict(fp32_state)  # (the first quantized module in the model's order says so)
    without_experts = {k: v for k, v in fp32_state.items() if ".experts." not in k}
    with pytest.raises(RuntimeError, match="quantized at compile .* cannot give it a new weight"):  # the dense
        compiled.load_state_dict(without_experts)  # layers' fp32 keys fail too
    with pytest.raises(NotImplementedError, match="moec.save"):
        compiled.save_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("strict", [True, False])
def test_an_fp32_checkpoint_into_dense_layers_loads_nothing(strict):
    """dense= alone (the experts stay fp): an fp32 checkpoint raises, naming the quantized layer, before anything is
    copied. Before, torch's missing-key error came after the embedding, routers and experts were loaded (a caught
    error left a mixed model, 1.5 relative off), and strict=False loaded them silently beside the old layers."""
    model = moec.compile(models.tiny_model("mixtral"), dense=Int4Experts(32))
    ids = models.example_inputs(model, seq=9)["input_ids"]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="layer 'model.layers.0.self_attn.q_proj' was quantized at compile"):
        model.load_state_dict(models.tiny_model("mixtral", seed=7).state_dict(), strict=strict)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model.load_state_dict(before)  # its own state dict loads
    with torch.no_grad():
        model(ids)


def test_dense_layers_refuse_gradients_clearly():
    """Forward with autograd on (eval, or train mode) gives the same values; a backward through a quantized layer
    raises, saying what to do, instead of silently giving no gradient to the layers before it."""
    cfg = Int8Experts(activations="int8")
    compiled = moec.compile(models.tiny_model("mixtral"), dense=cfg)
    ids = models.example_inputs(compiled, seq=5)["input_ids"]
    with torch.no_grad():
        want = compiled(ids).logits
    out = compiled(ids).logits
    assert torch.equal(out.detach(), want)
    with pytest.raises(RuntimeError, match="compute values only, no gradients"):
        out.sum().backward()


def test_dense_compiled_again_exported_and_refused():
    """The same dense= again is kept (the layers counted once); another format, none, or backend onnxruntime is
    refused (the fp32 weights are gone), as is export_onnx; bad configs, GPU-only backends and a model without
    MoE (returned unchanged, dense layers included)."""
    cfg = Int4Experts(32)
    compiled = moec.compile(models.tiny_model("mixtral"), dense=cfg)
    n = moec.inspect(compiled).dense_layers
    assert moec.inspect(moec.compile(compiled, dense=cfg)).dense_layers == n == len(cpu_dense.dense_layers(compiled))
    for again in ({"dense": Int4Experts(64)}, {}, {"dense": cfg, "backend": "onnxruntime"}):
        with pytest.raises(ValueError, match="compiled before with dense="):
            moec.compile(compiled, **again)
    ids = models.example_inputs(compiled, seq=3)["input_ids"]
    with pytest.raises(ValueError, match="export a fresh model"):
        moec.export_onnx(compiled, (ids,), "unused.onnx")
    with pytest.raises(TypeError, match="dense must be"):
        moec.compile(models.tiny_model("mixtral"), dense="int4")
    with pytest.raises(TypeError, match="without shared=/router="):
        moec.compile(models.tiny_model("mixtral"), dense=Int4Experts(32, router=True))
    with pytest.raises(NotImplementedError, match="dense= runs on backend"):
        moec.compile(models.tiny_model("mixtral"), backend="triton", dense=cfg)
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with pytest.warns(UserWarning, match="no MoE block"):
        moec.compile(mlp, dense=cfg)
    assert all(type(m) is nn.Linear for m in (mlp[0], mlp[2]))


def test_code_reading_a_quantized_weight_gets_what_the_layer_computes_with():
    """Jamba's Mamba mixer reads dt_proj.weight instead of calling the layer: a quantized layer's `.weight` is its
    dequantized weight (the model runs, as its weight-only reference with those weights), read-only."""
    cfg = Int8Experts()
    model = models.tiny_model("jamba")
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in dense_names(ref):
            w = ref.get_submodule(name).weight
            w.copy_(dequantize(cfg, quantize(cfg, w[None]))[0])
    compiled = moec.compile(model, dense=cfg)
    mixer = next(m for m in compiled.modules() if hasattr(m, "dt_proj"))
    assert isinstance(mixer.dt_proj, QuantLinear)
    ids = models.example_inputs(model, seq=7)["input_ids"]
    with torch.no_grad():
        assert rel_err(compiled(ids).logits, ref(ids).logits) < TOL[torch.float32]
    with pytest.raises(AttributeError, match="read-only"):
        mixer.dt_proj.weight = torch.zeros_like(mixer.dt_proj.weight)


def test_dense_after_decode_linears_and_what_is_said():
    """A model compiled before (moec's decode_linears on its large layers) takes dense= on those layers too; nn.Linear
    subclasses are left and named; a model without MoE reports no dense format; an int input or a wrong width is
    refused in one line; moec.load with another dense= than the file's says which."""
    from moec.backends import cpu_linear

    model = models.tiny_model("mixtral")
    with pytest.MonkeyPatch.context() as mp:  # the tiny model's layers count as large
        mp.setattr(cpu_linear, "MIN_BYTES", 0)
        mp.setattr(cpu_linear, "MIN_OUT", 0)
        moec.compile(model)
        assert moec.inspect(model).decode_linears == len(dense_names(model))
        class Sub(nn.Linear):
            pass
        model.extra = Sub(64, 64)
        moec.compile(model, dense=Int4Experts(32))
    report = moec.inspect(model)
    assert report.dense_layers == len(dense_names(models.tiny_model("mixtral")))
    assert report.dense_left == ["extra: Sub with a forward of its own"]
    layer = model.lm_head
    with pytest.raises(ValueError, match="floating-point"):
        layer(torch.ones(1, 64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[\.\.\., 64\]"):
        layer(torch.ones(1, 63))
    mlp = nn.Sequential(nn.Linear(64, 64))
    with pytest.warns(UserWarning, match="no MoE block"):
        moec.compile(mlp, dense=Int4Experts(32))
    assert moec.inspect(mlp).dense is None


def test_load_with_another_dense_says_so(tmp_path):
    cfg = Int4Experts(32)
    moec.save(moec.compile(models.tiny_model("mixtral"), dense=cfg), tmp_path / "m.safetensors")
    for other in (None, Int4Experts(64)):
        with pytest.raises(ValueError, match="load it without dense="):
            moec.load(models.tiny_model("mixtral"), tmp_path / "m.safetensors", dense=other)
