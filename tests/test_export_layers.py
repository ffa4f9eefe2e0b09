"""moec.export_layers: the KV-cache export traces each kind of decoder layer once and repeats its nodes with each later
layer's own weights and cache. The file must be the one a trace of every layer gives: same inputs and outputs, same
ops, the same numbers in ONNX Runtime; a layer that computes anything else is traced; a graph that is not a chain of
layers falls back to tracing them all."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

import moec
from moec import export_layers, models
from moec.log import log

from conftest import TOL, rel_err
from test_onnx_cache import _step_by_step

HYBRID = ["linear_attention", "full_attention"] * 3
CASES = {  # family -> (overrides for 6 layers, the layers repeated -> the traced layer they repeat)
    "mixtral": (dict(num_hidden_layers=6), {2: 1, 3: 1, 4: 1, 5: 1}),
    "gpt_oss": (dict(num_hidden_layers=6, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 3),
                {3: 1, 4: 2, 5: 1}),
    "qwen3_next": (dict(num_hidden_layers=6, layer_types=HYBRID), {3: 1, 4: 2, 5: 1}),
    "jamba": (dict(num_hidden_layers=6), {3: 1, 4: 2, 5: 1}),
    "deepseek_v3": (dict(num_hidden_layers=5, first_k_dense_replace=1), {2: 1, 3: 1, 4: 1}),  # dense layer 0
}
SLOW = {"jamba", "deepseek_v3"}


def _run(path, vocab: int) -> list[np.ndarray]:
    """Every output of the file for a decode step (batch 2, past 4) and a prompt after a past (batch 1, 5 tokens)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng, outs = np.random.RandomState(0), []
    for batch, seq in ((2, 1), (1, 5)):
        feeds = {"input_ids": rng.randint(0, vocab, (batch, seq)), "attention_mask": np.ones((batch, 4 + seq)),
                 "position_ids": np.tile(np.arange(4, 4 + seq), (batch, 1))}
        feeds = {k: v.astype(np.int64) for k, v in feeds.items()}
        for i in sess.get_inputs()[3:]:  # key/value: a past of 4 positions; states: their own static shape
            shape = [batch] + [d if isinstance(d, int) else 4 for d in i.shape[1:]]
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        outs += sess.run(None, feeds)
    return outs


def _both(model, tmp_path, **kw):
    """The export with layers repeated and with every layer traced: (report, outputs) of each."""
    example = models.example_inputs(model, batch=2, seq=5)
    got = []
    for repeat in (True, False):
        path = tmp_path / f"repeat-{repeat}.onnx"
        report = moec.export_onnx(model, example, path, kv_cache=True, _repeat_layers=repeat, **kw)
        got.append((report, _run(path, model.config.vocab_size)))
    return got


def _same_file(repeated, traced) -> None:
    import onnx
    from collections import Counter

    (r1, o1), (r2, o2) = repeated, traced
    assert (r1.inputs, r1.outputs) == (r2.inputs, r2.outputs)
    ops = [Counter((n.domain, n.op_type) for n in onnx.load(r.path, load_external_data=False).graph.node)
           for r in (r1, r2)]
    # the same contrib ops (MoE, attention, norms); ordinary ones the same or fewer: nodes under a layer's scope that
    # depend on nothing of the layer (sizes of the inputs) are computed once for its copies, once per layer traced
    assert {k: v for k, v in ops[0].items() if k[0]} == {k: v for k, v in ops[1].items() if k[0]}
    assert ops[0] <= ops[1]
    assert [b.path for b in r1.blocks] == [b.path for b in r2.blocks]
    for a, b in zip(o1, o2, strict=True):
        assert a.shape == b.shape and rel_err(torch.from_numpy(a), torch.from_numpy(b)) < 1e-6


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in CASES])
def test_repeated_layers_equal_every_layer_traced(family, tmp_path):
    overrides, repeated = CASES[family]
    model = models.tiny_model(family, **overrides).eval()
    before = (model.config.num_hidden_layers, list(getattr(model.config, "layer_types", None) or []))
    (r1, o1), (r2, o2) = _both(model, tmp_path)
    assert r1.repeated == repeated, str(r1)
    assert r2.repeated == {}
    assert "layers repeat a traced one's nodes" in str(r1)
    _same_file((r1, o1), (r2, o2))
    assert (model.config.num_hidden_layers, list(getattr(model.config, "layer_types", None) or [])) == before
    assert len(export_layers.decoder_layers(model)[1]) == before[0]  # the user's model keeps its layers


@pytest.mark.parametrize("quantize", [moec.Int4Experts(32), pytest.param(moec.Int8Experts(), marks=pytest.mark.slow)])
def test_repeated_quantized_experts_equal_every_layer_traced(quantize, tmp_path):
    """QMoE weights are constants moec made (not parameters): each repeated layer gets its own."""
    model = models.tiny_model("mixtral", num_hidden_layers=4, hidden_size=64, intermediate_size=64).eval()
    repeated, traced = _both(model, tmp_path, quantize=quantize)
    assert repeated[0].repeated == {2: 1, 3: 1}
    _same_file(repeated, traced)


def test_repeated_layers_generate_like_hf(tmp_path):
    model = models.tiny_model("mixtral", num_hidden_layers=5).eval()
    report = _step_by_step(model, model, tmp_path / "lm.onnx", TOL[torch.float32])
    assert report.repeated == {2: 1, 3: 1, 4: 1}


def test_a_layer_that_computes_otherwise_is_traced(tmp_path):
    """Layer 3's attention scaled otherwise (same weights' shapes, same classes): its record differs, so it is
    traced, and the layers after it repeat layer 1; the file still steps like HF."""
    model = models.tiny_model("mixtral", num_hidden_layers=6).eval()
    model.model.layers[3].self_attn.scaling = 0.5
    report = _step_by_step(model, model, tmp_path / "lm.onnx", TOL[torch.float32])
    assert report.repeated == {4: 1, 5: 1}, str(report)


def test_a_graph_that_is_no_chain_traces_every_layer(tmp_path, monkeypatch):
    """What the copies cannot repeat (here: the check refuses) is traced whole, and the export says why."""
    def refuse(program, plan):
        raise export_layers.LayersUnfit("node x outside the layers reads inside one")

    monkeypatch.setattr(export_layers, "repeat", refuse)
    said = []
    monkeypatch.setattr(log, "info", said.append)
    model = models.tiny_model("mixtral", num_hidden_layers=4).eval()
    report = _step_by_step(model, model, tmp_path / "lm.onnx", TOL[torch.float32])
    assert report.repeated == {}
    assert "moec.export_onnx: tracing every layer (LayersUnfit: node x outside the layers reads inside one)" in said


def test_whose_tensor_an_initializer_is():
    """By name (parameters), by storage (constants torch.export lifted from a layer's tensors); a constant equal to a
    layer's tensor without being it is refused rather than guessed (sharing it would give every layer layer t's)."""
    import onnx_ir as ir
    from torch.onnx._internal.exporter._core import TorchTensor

    w, b = torch.randn(4, 3), torch.randn(4)
    owners = export_layers._Owners("model.model.layers", [{}, {"mlp:fc1": w, "mlp.bias": b}], {"model.model.norm.b"})
    assert owners(ir.Value(name="model.model.layers.1.mlp.bias", const_value=TorchTensor(b))) == (1, "mlp.bias")
    assert owners(ir.Value(name="model.model.layers.1.mlp.lifted_tensor_0", const_value=TorchTensor(w))) == \
        (1, "mlp:fc1")
    assert owners(ir.Value(name="val_3", const_value=TorchTensor(torch.ones(4)))) is None
    assert owners(ir.Value(name="model.model.norm.b", const_value=TorchTensor(b.clone()))) is None  # a parameter
    with pytest.raises(export_layers.LayersUnfit, match="equals layer 1's mlp:fc1 without being it"):
        owners(ir.Value(name="lifted_tensor_1", const_value=TorchTensor(w.clone())))


def test_a_layers_own_hook_is_part_of_it(tmp_path):
    """A pre-hook on layer 3 (a steering vector) runs inside that layer's record: layer 3 is traced, not a copy of
    layer 1 without it (found by a review: the hook ran before the record started)."""
    model = models.tiny_model("mixtral", num_hidden_layers=5).eval()
    steer = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 3
    model.model.layers[3].register_forward_pre_hook(lambda module, args: (args[0] + steer, *args[1:]))
    report = _step_by_step(model, model, tmp_path / "lm.onnx", TOL[torch.float32])
    assert report.repeated == {4: 1}, str(report)


def test_what_a_layer_hands_on_is_part_of_it(tmp_path):
    """Layer 3 runs the same ops as the others but hands on its input: the record says so, so it is no copy of layer
    1. (Its MoE output then goes nowhere and the export refuses the file, as when every layer is traced.)"""
    model = models.tiny_model("mixtral", num_hidden_layers=5).eval()
    layer = model.model.layers[3]
    own = type(layer).forward

    def hands_on_its_input(self, hidden_states, *args, **kwargs):
        own(self, hidden_states, *args, **kwargs)
        return hidden_states

    layer.forward = hands_on_its_input.__get__(layer)
    with pytest.raises(RuntimeError, match=r"4 MoE/QMoE node\(s\) for 5 block\(s\)"):
        moec.export_onnx(model, models.example_inputs(model, batch=2, seq=5), tmp_path / "lm.onnx", kv_cache=True)


def test_layers_traced_under_the_models_own_config(tmp_path):
    """Layers whose forward reads the config at call time (a residual scaled by the depth) are traced with the
    config as recorded: the shortened trace edits no config (found by a review: it once set num_hidden_layers to the
    traced count, and every copy scaled by the wrong depth)."""
    model = models.tiny_model("mixtral", num_hidden_layers=4).eval()
    own = type(model.model.layers[0]).forward

    def depth_scaled(self, hidden_states, *args, **kwargs):
        out = own(self, hidden_states, *args, **kwargs)
        return hidden_states + (out - hidden_states) * 1.4 / self.self_attn.config.num_hidden_layers ** 0.5

    for layer in model.model.layers:
        layer.forward = depth_scaled.__get__(layer)
    report = _step_by_step(model, model, tmp_path / "lm.onnx", TOL[torch.float32])
    assert report.repeated == {2: 1, 3: 1}, str(report)


def test_attention_as_ordinary_ops_repeats_too(tmp_path):
    model = models.tiny_model("mixtral", num_hidden_layers=4).eval()
    repeated, traced = _both(model, tmp_path, attention="ops")
    assert repeated[0].repeated == {2: 1, 3: 1} and repeated[0].gqa_layers == 0
    _same_file(repeated, traced)
