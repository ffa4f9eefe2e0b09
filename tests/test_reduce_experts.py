"""reduce_experts (prune / merge, an approximation asked for by name) against the HF model rebuilt by hand with
fewer experts (pruned) or with each expert's weights replaced by its group's average (merged)."""

import copy

import pytest
import torch
from conftest import TOL, rel_err
from test_generality import RouterForms

import moec
from moec import models
from moec.approx import ExpertPlan

FAMILIES = [("mixtral", {}), ("qwen2_moe", {"norm_topk_prob": False}), ("olmoe", {})]


def _blocks(model):
    return {path: m for path, m in model.named_modules() if hasattr(m, "gate") and hasattr(m, "experts")}


def _pruned_by_hand(model, keep: dict):
    """The HF model with only the kept experts: router rows and expert weights sliced, E lowered."""
    for path, block in _blocks(model).items():
        kept = list(keep[path])
        block.gate.weight.data = block.gate.weight.data[kept]
        for name in ("gate_up_proj", "down_proj"):
            t = getattr(block.experts, name)
            t.data = t.data[kept]
        block.gate.num_experts = block.experts.num_experts = len(kept)
    return model


def _merged_by_hand(model, keep: dict, usage: dict):
    """Each dropped expert joins the kept expert of highest cosine similarity (flattened gate_up and down weights);
    every expert of a group runs the group's mean weighted by load + 1. The router is unchanged."""
    for path, block in _blocks(model).items():
        kept, E = list(keep[path]), block.gate.weight.shape[0]
        gu, down = block.experts.gate_up_proj.data, block.experts.down_proj.data
        flat = torch.cat([gu.flatten(1), down.flatten(1)], 1)
        flat = flat / flat.norm(dim=1, keepdim=True)
        group = {e: kept[int((flat[kept] @ flat[e]).argmax())] if e not in kept else e for e in range(E)}
        w = [usage[path][e] + 1.0 for e in range(E)]
        for t in (gu, down):
            avg = {c: sum(w[e] * t[e] for e in range(E) if group[e] == c) / sum(w[e] for e in range(E) if group[e] == c)
                   for c in kept}
            t.copy_(torch.stack([avg[group[e]] for e in range(E)]))
    return model


def _calibrated(model, seq=32):
    ids = models.example_inputs(model, batch=2, seq=seq, seed=7)["input_ids"]
    return moec.calibrate(copy.deepcopy(model), [ids])


@pytest.mark.parametrize("family,overrides", FAMILIES)
@pytest.mark.parametrize("mode", ["prune", "merge"])
def test_fewer_experts_is_the_model_rebuilt_by_hand(family, overrides, mode):
    model = models.tiny_model(family, num_experts_per_tok=2, **overrides).eval()
    plan = moec.expert_plan(_calibrated(model), keep=5, mode=mode)
    by_hand = _pruned_by_hand(copy.deepcopy(model), plan.keep) if mode == "prune" else \
        _merged_by_hand(copy.deepcopy(model), plan.keep, plan.usage)
    bytes_before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moec.compile(model, experts=plan, approximate=True)
    report = moec.inspect(model)
    assert report.blocks and not report.rejected, report
    assert all(b.approximate.startswith(f"5 of 8 experts ({mode}d)") for b in report.blocks)
    bytes_after = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    expert_bytes = sum(b.experts.gate_up_proj.numel() + b.experts.down_proj.numel() for b in _blocks(by_hand).values())
    if mode == "prune":  # the model holds the kept experts only (+ the map and the router mask)
        assert bytes_before - bytes_after >= expert_bytes * 4 * 3 / 5 - 1024
    for seq in (1, 11):
        inputs = models.example_inputs(model, batch=2, seq=seq, seed=seq)
        with torch.no_grad():
            assert rel_err(model(**inputs).logits, by_hand(**inputs).logits) < TOL[torch.float32]


def test_the_plan_keeps_the_most_loaded_experts():
    model = models.tiny_model("qwen2_moe").eval()
    cal = _calibrated(model)
    plan = moec.expert_plan(cal, keep=0.5)
    for b in cal.blocks:
        kept = plan.keep[b.path]
        assert len(kept) == 4 and min(b.load[e] for e in kept) >= max(b.load[e] for e in range(8) if e not in kept)
    one = moec.expert_plan(cal, keep={cal.blocks[0].path: 3}, mode="merge")
    assert list(one.keep) == [cal.blocks[0].path] and one.mode == "merge"
    with pytest.raises(ValueError, match="keep names no calibrated block"):
        moec.expert_plan(cal, keep={"nope": 3})
    with pytest.raises(ValueError, match="a count in 1..8"):
        moec.expert_plan(cal, keep=9)
    with pytest.raises(ValueError, match="mode must be one of"):
        ExpertPlan("drop", {})


def test_refusals():
    model = models.tiny_model("mixtral", num_experts_per_tok=3).eval()
    paths = list(_blocks(model))
    plan = ExpertPlan("prune", {paths[0]: [0, 1]})
    with pytest.raises(ValueError, match="approximate=True"):
        moec.compile(model, experts=plan)
    with pytest.raises(TypeError, match="moec.ExpertPlan"):
        moec.compile(model, experts={paths[0]: [0]}, approximate=True)
    with pytest.raises(NotImplementedError, match="offload"):
        moec.compile(model, experts=plan, approximate=True, offload=moec.Offload(budget="50%"))
    with pytest.raises(ValueError, match="experts names no block"):
        moec.compile(model, experts=ExpertPlan("prune", {"model.layers.7.mlp": [0]}), approximate=True)
    ref = copy.deepcopy(model)
    moec.compile(model, experts=plan, approximate=True)  # 2 experts kept for a top-3 router: left alone
    report = moec.inspect(model)
    assert [r.path for r in report.rejected] == paths[:1] and "fewer than the block's k=3" in report.rejected[0].reason
    inputs = models.example_inputs(model, seq=5)
    with torch.no_grad():
        assert rel_err(model(**inputs).logits, ref(**inputs).logits) < TOL[torch.float32]


def test_hand_written_block_merged_and_quantized():
    """ModuleList experts (stacked by moec), merged, then int8: the reference is the canonical block on the
    dequantized merged experts (the proof); here the merge's effect is checked against the unquantized merge."""
    block = RouterForms("@W.T", E=8, k=2).eval()
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(1))
    cal = moec.calibrate(copy.deepcopy(block), [x])
    plan = moec.expert_plan(cal, keep=4, mode="merge")
    fp, q = copy.deepcopy(block), copy.deepcopy(block)
    moec.compile(fp, experts=plan, approximate=True)
    moec.compile(q, experts=plan, approximate=True, quantize=moec.Int8Experts())
    for m in (fp, q):
        (b,) = moec.inspect(m).blocks
        assert b.approximate.startswith("4 of 8 experts (merged)")
    with torch.no_grad():
        assert rel_err(q(x), fp(x)) < 2e-2  # int8 weights
        assert rel_err(fp(x), block(x)) > 1e-3  # the merge changed the block


def test_a_pruned_model_saves_and_loads(tmp_path):
    model = models.tiny_model("qwen2_moe").eval()
    plan = moec.expert_plan(_calibrated(model), keep=6)
    moec.compile(model, experts=plan, approximate=True, quantize=moec.Int4Experts(group_size=32))
    moec.save(model, tmp_path / "m.safetensors")
    loaded = moec.load(models.tiny_model("qwen2_moe", seed=1).eval(), tmp_path / "m.safetensors")
    assert moec.inspect(loaded).experts == plan
    with pytest.raises(ValueError, match="fewer experts.*load it without experts="):  # it has the kept experts only
        moec.load(models.tiny_model("qwen2_moe").eval(), tmp_path / "m.safetensors", experts=None)
    inputs = models.example_inputs(model, seq=6)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    with pytest.raises(ValueError, match="fewer experts"):
        moec.compile(loaded, approximate=True)
    loaded.train()  # the original forward would run the released experts: refused, with the reason
    with pytest.raises(NotImplementedError, match="training mode"):
        loaded(**inputs)


def test_group_limited_routers_are_merged_not_pruned():
    """DeepSeek-V3: a pruned expert's -inf would sink its group's top-2 score (kept experts unreachable), so
    pruning is refused with the reason; merging keeps the router and works."""
    model = models.tiny_model("deepseek_v3").eval()
    cal = _calibrated(model)
    pruned = copy.deepcopy(model)
    moec.compile(pruned, experts=moec.expert_plan(cal, keep=4), approximate=True)
    assert all("group-limited" in r.reason for r in moec.inspect(pruned).rejected) and moec.inspect(pruned).rejected
    merged = copy.deepcopy(model)
    moec.compile(merged, experts=moec.expert_plan(cal, keep=4, mode="merge"), approximate=True)
    report = moec.inspect(merged)
    assert report.blocks and not report.rejected and all("merged" in b.approximate for b in report.blocks)


def test_a_failed_recompile_leaves_the_model_as_it_was():
    """A recompile refused on a later block gives the earlier blocks their compiled graphs back."""
    model = models.tiny_model("qwen2_moe", num_experts_per_tok=3).eval()
    paths = list(_blocks(model))
    plan = ExpertPlan("prune", {paths[1]: [0, 1, 2, 3, 4]})
    moec.compile(model, topk={paths[0]: 1}, experts=plan, approximate=True)
    inputs = models.example_inputs(model, seq=5)
    with torch.no_grad():
        before = model(**inputs).logits
    with pytest.raises(ValueError, match="fewer experts"):
        moec.compile(model, topk=2, experts=plan, approximate=True)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


def test_copies_bad_plans_and_odd_modules():
    model = models.tiny_model("qwen2_moe").eval()
    moec.compile(model, experts=ExpertPlan("prune", {"model.layers.0.mlp": [0, 1, 2, 3, 4]}), approximate=True)
    twin = copy.deepcopy(model)  # the kept experts are plain buffers (no autograd history)
    inputs = models.example_inputs(model, seq=4)
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, model(**inputs).logits)
    for bad, error, match in (({"": 5}, ValueError, "must be a list of distinct expert ids"),
                              ([0, 1], TypeError, "keep must be a dict")):
        with pytest.raises(error, match=match):
            ExpertPlan("prune", bad)
    with pytest.raises(ValueError, match=r"usage\[''\] must be a list of per-expert loads >= 0"):
        ExpertPlan("merge", {"": [0, 1]}, usage={"": [-1] * 8})
    odd = models.tiny_model("qwen2_moe").eval()
    odd.model.layers[0].mlp.shared_expert.installed = "yes"  # a user attribute moec must not call
    moec.compile(odd)
    assert moec.inspect(odd).blocks and odd.model.layers[0].mlp.shared_expert.installed == "yes"
