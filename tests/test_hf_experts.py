"""moec as a transformers experts implementation (moec.hf): `set_experts_implementation("moec")` gives the eager
numbers, the form of the experts is proved on the first call, and an expert moec does not know keeps its own
forward with a warning."""

import copy
import warnings

import pytest
import torch
from conftest import TOL, rel_err

import moec.hf  # noqa: F401  registers "moec"
from moec import models


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "ernie4_5_moe"])
def test_the_moec_experts_implementation_gives_the_eager_numbers(family):
    model = models.tiny_model(family).eval()
    ref = copy.deepcopy(model)
    model.set_experts_implementation("moec")
    with torch.no_grad():
        for seq in (1, 9):
            inputs = models.example_inputs(model, batch=2, seq=seq, seed=seq)
            assert rel_err(model(**inputs).logits, ref(**inputs).logits) < TOL[torch.float32]
        ids = models.example_inputs(model, seq=5)["input_ids"]
        kw = dict(max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))
    forms = {m.__dict__["_moec_form"] for m in model.modules() if "_moec_form" in m.__dict__}
    assert forms == ({("swiglu_oai", "interleave")} if family == "gpt_oss" else {("silu", "halves")})


def test_training_and_gradients_run_the_module_own_forward():
    model = models.tiny_model("mixtral")
    model.set_experts_implementation("moec")
    model.train()
    ids = models.example_inputs(model, seq=4)["input_ids"]
    loss = model(ids, labels=ids).loss
    loss.backward()  # moec's op computes no gradients: the eager forward ran
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts" in n)
    assert not any("_moec_form" in m.__dict__ for m in model.modules())


def test_an_expert_moec_does_not_know_keeps_its_forward():
    model = models.tiny_model("qwen2_moe").eval()
    experts = [m for m in model.modules() if type(m).__name__ == "Qwen2MoeExperts"]
    for m in experts:  # tanh(gate) * up: no activation moec knows
        m.act_fn = torch.nn.Tanh()
    ref = copy.deepcopy(model)
    model.set_experts_implementation("moec")
    inputs = models.example_inputs(model, seq=6)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = model(**inputs).logits
    assert any("keeps its own forward" in str(w.message) for w in caught)
    assert all(isinstance(m.__dict__["_moec_form"], str) for m in experts)
    with torch.no_grad():  # the module's own loop (ref: the model's default implementation, same numbers)
        assert rel_err(got, ref(**inputs).logits) < TOL[torch.float32]
