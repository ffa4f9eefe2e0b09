"""Model-level passes (approximations asked for by name): reduce_topk against the original module with its k
lowered (the router's own rule at the new k), per-block schedules, refusals, the measured error in the report."""

import copy

import pytest
import torch
from conftest import TOL, rel_err
from test_generality import GroupsWithBatchDims, RouterForms, _dispatch

import moec
from moec import models

FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "olmoe", "qwen3_moe"]


def _with_k(model, k_old: int, k_new: int, blocks=None):
    """The HF reference of the rule: each router module's own top_k lowered (its renormalisation, if any, runs as
    written at the new k)."""
    for path, m in model.named_modules():
        if blocks is not None and not any(path.startswith(b) for b in blocks):
            continue
        if getattr(m, "top_k", None) == k_old:
            m.top_k = k_new
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_reduce_topk_is_the_router_at_a_lower_k(family):
    model = models.tiny_model(family, num_experts_per_tok=3).eval()
    ref = _with_k(copy.deepcopy(model), 3, 2)
    moec.compile(model, topk=2, approximate=True)
    report = moec.inspect(model)
    assert report.blocks and not report.rejected, report
    assert all(b.top_k == 2 and b.approximate.startswith("top-2 of 3: max relative error") for b in report.blocks)
    for seq in (1, 9):
        inputs = models.example_inputs(model, batch=2, seq=seq, seed=seq)
        with torch.no_grad():
            assert rel_err(model(**inputs).logits, ref(**inputs).logits) < TOL[torch.float32]


def test_a_schedule_per_block():
    model = models.tiny_model("qwen2_moe", num_experts_per_tok=3).eval()
    paths = [b.path for b in moec.inspect(copy.deepcopy(model)).blocks]
    ref = _with_k(copy.deepcopy(model), 3, 1, blocks=paths[:1])
    moec.compile(model, topk={paths[0]: 1}, approximate=True)
    ks = {b.path: b.top_k for b in moec.inspect(model).blocks}
    assert ks == {p: 1 if p == paths[0] else 3 for p in paths}
    inputs = models.example_inputs(model, seq=7)
    with torch.no_grad():
        assert rel_err(model(**inputs).logits, ref(**inputs).logits) < TOL[torch.float32]


@pytest.mark.parametrize("form", ["@W.T", "flat"])
def test_hand_written_blocks(form):
    block = RouterForms(form, E=8, k=3).eval()
    ref = copy.deepcopy(block)
    ref.k = 2  # its own rule at k=2: softmax over all, the top 2 weights as they are (no renormalisation)
    groups = GroupsWithBatchDims().eval()  # DeepSeek-style groups on [B, S, H], k=4
    ref_groups = copy.deepcopy(groups)
    ref_groups.k = 3
    moec.compile(block, topk=2, approximate=True)
    moec.compile(groups, topk=3, approximate=True)
    for m, r, x in ((block, ref, torch.randn(300, 32)), (groups, ref_groups, torch.randn(2, 9, 32))):
        (b,) = moec.inspect(m).blocks
        assert b.approximate and not moec.inspect(m).rejected
        with torch.no_grad():
            assert rel_err(m(x), r(x)) < TOL[torch.float32]


def test_an_approximation_is_asked_for_by_name():
    model = models.tiny_model("mixtral").eval()
    with pytest.raises(ValueError, match="approximate=True"):
        moec.compile(model, topk=1)
    for bad, error in ((0, ValueError), ({"model.layers.0.mlp": -1}, ValueError), (1.5, TypeError),
                       (True, TypeError), ({0: 1}, TypeError)):
        with pytest.raises(error, match="topk must be"):
            moec.compile(model, topk=bad, approximate=True)
    moec.compile(model, passes="detect_moe,fuse_gate,reduce_topk,batch_experts", topk=1)  # named in the pipeline
    assert all(b.top_k == 1 for b in moec.inspect(model).blocks)
    with pytest.raises(NotImplementedError, match="onnxruntime"):
        moec.compile(models.tiny_model("mixtral"), topk=1, approximate=True, backend="onnxruntime")


def test_a_k_at_or_above_the_blocks_leaves_them_exact():
    model = models.tiny_model("mixtral").eval()
    ref = copy.deepcopy(model)
    moec.compile(model, topk=5, approximate=True)
    report = moec.inspect(model)
    assert report.blocks and not report.rejected and all(b.top_k == 2 and not b.approximate for b in report.blocks)
    inputs = models.example_inputs(model, seq=4)
    with torch.no_grad():
        assert rel_err(model(**inputs).logits, ref(**inputs).logits) < TOL[torch.float32]


def test_recompiling_with_another_k_and_unknown_blocks():
    model = models.tiny_model("qwen3_moe").eval()
    paths = [b.path for b in moec.inspect(copy.deepcopy(model)).blocks]
    moec.compile(model, topk=1, approximate=True)
    moec.compile(model, topk={paths[0]: 1}, approximate=True)  # the second block gets its own k back
    assert [b.top_k for b in moec.inspect(model).blocks] == [1, 2]
    ref = _with_k(copy.deepcopy(models.tiny_model("qwen3_moe").eval()), 2, 1, blocks=paths[:1])
    inputs = models.example_inputs(model, seq=5)
    with torch.no_grad():
        assert rel_err(model(**inputs).logits, ref(**inputs).logits) < TOL[torch.float32]
    with pytest.raises(ValueError, match=r"topk names no block at \['model.layers.9.mlp'\]"):
        moec.compile(model, topk={"model.layers.9.mlp": 1}, approximate=True)
    moec.compile(models.tiny_model("mixtral").eval(), topk=1, passes="detect_moe, fuse_gate, reduce_topk")  # spaced


def test_a_reduced_model_refuses_training_mode():
    """In train() a compiled block runs its original forward: for a reduced block that would silently undo the
    approximation, so it raises instead."""
    model = models.tiny_model("mixtral").eval()
    moec.compile(model, topk=1, approximate=True)
    model.train()
    with pytest.raises(NotImplementedError, match="approximation"):
        model(**models.example_inputs(model, seq=3))
    model.eval()
    with torch.no_grad():
        model(**models.example_inputs(model, seq=3))


def test_quantized_and_reduced():
    model = models.tiny_model("qwen2_moe", num_experts_per_tok=3).eval()
    moec.compile(model, topk=2, approximate=True, quantize=moec.Int8Experts())
    (b, *_) = moec.inspect(model).blocks
    assert b.top_k == 2 and "int8" in b.experts and b.approximate


def test_a_reduced_model_saves_and_loads_reduced(tmp_path):
    model = models.tiny_model("qwen2_moe", num_experts_per_tok=3).eval()
    paths = [b.path for b in moec.inspect(copy.deepcopy(model)).blocks]
    schedule = {paths[0]: 1, paths[-1]: 2}
    moec.compile(model, topk=schedule, approximate=True, quantize=moec.Int8Experts())
    moec.save(model, tmp_path / "m.safetensors")
    loaded = moec.load(models.tiny_model("qwen2_moe", num_experts_per_tok=3, seed=1).eval(), tmp_path / "m.safetensors")
    assert {b.path: b.top_k for b in moec.inspect(loaded).blocks} == {b.path: b.top_k for b in moec.inspect(model).blocks}
    # the errors measured on the saved weights, not on the fresh model's (a load compiles before reading the file)
    said = {b.path: b.approximate for b in moec.inspect(model).blocks}
    assert said and {b.path: b.approximate for b in moec.inspect(loaded).blocks} == said
    inputs = models.example_inputs(model, seq=6)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_calibration_leaves_the_padding_out():
    """A left-padded batch with its attention_mask counts what the same sequences count unpadded, pads left out."""
    model = models.tiny_model("mixtral").eval()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(4, 200, (n,), generator=g) for n in (24, 3, 7)]
    ids, mask = torch.zeros(len(rows), 24, dtype=torch.long), torch.zeros(len(rows), 24, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, -len(r):], mask[i, -len(r):] = r, 1
    padded = moec.calibrate(model, [{"input_ids": ids, "attention_mask": mask}])
    alone = moec.calibrate(model, [r[None] for r in rows])
    for a, b in zip(padded.blocks, alone.blocks, strict=True):
        assert a.tokens == b.tokens == sum(map(len, rows)) and a.load == b.load
        assert a.mass == pytest.approx(b.mass, rel=1e-5) and a.entropy == pytest.approx(b.entropy, rel=1e-5)


def test_calibration_counts_the_routing_exactly():
    """A hand-written block run on known tokens: load, co-activation, top-j mass and entropy equal a direct
    computation from the block's own router."""
    block = RouterForms("@W.T", E=8, k=3).eval()
    batches = [torch.randn(40, 32, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    cal = moec.calibrate(block, batches)
    (b,) = cal.blocks
    x = torch.cat(batches)
    with torch.no_grad():
        probs = block.logits(x).float().softmax(-1)  # [T, E]
    ids = probs.topk(3).indices
    onehot = torch.zeros(len(x), 8).scatter_(1, ids, 1.0)
    assert b.tokens == 120 and b.top_k == 3
    assert b.load == torch.bincount(ids.reshape(-1), minlength=8).tolist()
    assert b.coactivation == (onehot.T @ onehot).long().tolist()
    assert b.mass == pytest.approx(probs.sort(-1, descending=True).values[:, :3].cumsum(-1).mean(0).tolist())
    assert b.entropy == pytest.approx(float(-(probs * probs.log()).sum(-1).mean()), rel=1e-5)
    assert moec.inspect(block).calibration is cal and "top-3 mass" in str(cal)


def test_schedule_lowers_k_where_the_dropped_expert_holds_least_mass():
    from moec.calibrate import BlockRouting, Calibration

    def routing(path, mass):
        return BlockRouting(path, 8, 3, 10, [0] * 8, mass, 1.0, [[0] * 8] * 8)

    cal = Calibration([routing("a", [0.5, 0.6, 0.62]), routing("b", [0.3, 0.5, 0.7])])
    assert moec.topk_schedule(cal, 3) == {"a": 3, "b": 3}
    assert moec.topk_schedule(cal, 2.5) == {"a": 2, "b": 3}  # a's third expert holds 0.02, b's 0.2
    assert moec.topk_schedule(cal, 2) == {"a": 1, "b": 3}  # then a's second (0.1) before b's third (0.2)
    assert moec.topk_schedule(cal, 1) == {"a": 1, "b": 1}
    with pytest.raises(ValueError, match="average"):
        moec.topk_schedule(cal, 0.5)


def test_calibration_of_an_hf_model_is_saved_with_it(tmp_path):
    model = models.tiny_model("qwen2_moe").eval()
    moec.compile(model)
    ids = models.example_inputs(model, seq=12)["input_ids"]
    cal = moec.calibrate(model, [ids, {"input_ids": ids[:, :5]}])
    assert [b.path for b in cal.blocks] == [b.path for b in moec.inspect(model).blocks]
    assert all(b.tokens == ids.numel() + ids[:, :5].numel() and sum(b.load) == b.tokens * b.top_k for b in cal.blocks)
    moec.save(model, tmp_path / "m.safetensors")
    loaded = moec.load(models.tiny_model("qwen2_moe").eval(), tmp_path / "m.safetensors")
    assert moec.inspect(loaded).calibration == cal
    with pytest.raises(ValueError, match="no MoE block"):
        moec.calibrate(torch.nn.Linear(4, 4), [torch.randn(2, 4)])


def test_the_load_heatmap(tmp_path):
    pytest.importorskip("matplotlib")
    cal = moec.calibrate(RouterForms("@W.T", E=8).eval(), [torch.randn(30, 32)])
    cal.plot(tmp_path / "routing.png")
    assert (tmp_path / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _top_p_count(top: list[float], p: float, min_k: int) -> int:
    """The rule written plainly: walk a token's k weights from the heaviest, keep one while the kept ones hold less
    than p of their sum (or fewer than min_k are kept)."""
    total, held, n = sum(top), 0.0, 0
    for v in sorted(top, reverse=True):
        if held >= p * total and n >= min_k:
            break
        held, n = held + v, n + 1
    return n


@pytest.mark.parametrize("family,overrides", [("mixtral", {}), ("qwen2_moe", {"norm_topk_prob": False}),
                                              ("olmoe", {"norm_topk_prob": True})])
@pytest.mark.parametrize("p,min_k", [(0.5, 1), (0.8, 2)])
def test_top_p_is_the_block_at_each_tokens_own_k(family, overrides, p, min_k):
    """Each token against the original block run alone at the k the rule gives it (the router's own weights at
    that k: renormalised for Mixtral and OLMoE with norm_topk_prob, raw for Qwen2-MoE without)."""
    model = models.tiny_model(family, num_experts_per_tok=4, **overrides).eval()
    block = model.model.layers[0].mlp
    ref = copy.deepcopy(block)
    x = torch.randn(1, 24, block.gate.weight.shape[1], generator=torch.Generator().manual_seed(3)) * 0.3
    moec.compile(model, topk=moec.TopP(p, min_k=min_k), approximate=True)
    assert all(b.approximate.startswith(f"top-p {p:g} (k {min_k}..4) of top-4") for b in moec.inspect(model).blocks)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731  (blocks that also return logits)
    with torch.no_grad():
        got = first(block(x))
        probs = (x[0] @ ref.gate.weight.T).float().softmax(-1)  # [T, E]
        counts = [_top_p_count(probs[t].topk(4).values.tolist(), p, min_k) for t in range(x.shape[1])]
        assert len(set(counts)) > 1, counts  # the tokens keep different numbers of experts
        want = []
        for t, k in enumerate(counts):
            for m in ref.modules():
                if hasattr(m, "top_k"):
                    m.top_k = k
            want.append(first(ref(x[:, t:t + 1])))
    assert rel_err(got, torch.cat(want, dim=1)) < TOL[torch.float32]


def test_top_p_hand_written_block_and_its_limits():
    """A block without renormalisation: the kept pairs keep their softmax weights. max_k caps the experts
    (top-p over the best max_k); p=1 at the block's k is the block itself (exact, not an approximation)."""
    block = RouterForms("@W.T", E=8, k=4).eval()
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = block.logits(x).softmax(-1)
        want = torch.zeros_like(x)
        for t in range(len(x)):
            top = probs[t].topk(3)  # max_k=3
            n = _top_p_count(top.values.tolist(), 0.7, 1)
            for w, e in zip(top.values[:n], top.indices[:n]):
                want[t] += w * block.experts.run(int(e), x[t:t + 1])[0]
    exact = copy.deepcopy(block)
    moec.compile(block, topk=moec.TopP(0.7, max_k=3), approximate=True)
    assert moec.inspect(block).blocks[0].approximate
    with torch.no_grad():
        assert rel_err(block(x), want) < TOL[torch.float32]
    ref = copy.deepcopy(exact)
    moec.compile(exact, topk=moec.TopP(1.0), approximate=True)
    (b,) = moec.inspect(exact).blocks
    assert not b.approximate and b.top_k == 4
    with torch.no_grad():
        assert rel_err(exact(x), ref(x)) < TOL[torch.float32]
    with pytest.raises(ValueError, match="p must be in"):
        moec.TopP(0)
    with pytest.raises(ValueError, match="min_k=3 is above max_k=2"):
        moec.TopP(0.5, min_k=3, max_k=2)
    capped = RouterForms("@W.T", E=8, k=2).eval()  # a max_k above the block's k: its own k, as an int k does
    moec.compile(capped, topk=moec.TopP(0.5, max_k=3), approximate=True)
    assert moec.inspect(capped).blocks[0].approximate.startswith("top-p 0.5 (k 1..2) of top-2")
    all_kept = RouterForms("@W.T", E=8, k=2).eval()  # min_k = k keeps every pair: exact
    moec.compile(all_kept, topk=moec.TopP(0.5, min_k=2), approximate=True)
    assert not moec.inspect(all_kept).blocks[0].approximate

    class RawLogitWeights(RouterForms):  # combine weights that may be negative: top-p has no meaning
        def forward(self, x):
            w, ids = self.logits(x).topk(self.k)
            return _dispatch(self.experts.run, x, ids, w, self.E)

    raw = RawLogitWeights("@W.T", E=8, k=3).eval()
    moec.compile(raw, topk=moec.TopP(0.5), approximate=True)
    assert "non-negative combine weights" in moec.inspect(raw).rejected[0].reason


def test_top_p_follows_new_weights_and_saves(tmp_path):
    model = models.tiny_model("qwen3_moe", num_experts_per_tok=2).eval()
    fresh = models.tiny_model("qwen3_moe", num_experts_per_tok=2, seed=5).eval()
    moec.compile(model, topk=moec.TopP(0.6), approximate=True)
    model.load_state_dict(fresh.state_dict())  # weights changed after compile
    ref = moec.compile(copy.deepcopy(fresh), topk=moec.TopP(0.6), approximate=True)
    inputs = models.example_inputs(model, seq=9)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref(**inputs).logits)
    moec.save(model, tmp_path / "m.safetensors")
    loaded = moec.load(models.tiny_model("qwen3_moe", num_experts_per_tok=2, seed=1).eval(), tmp_path / "m.safetensors")
    assert moec.inspect(loaded).topk == moec.TopP(0.6)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, ref(**inputs).logits)


def test_calibration_of_top_p_and_pruned_models_counts_what_runs():
    """Under top-p a token's dropped pairs (weight 0) are not load; a pruned block's dropped experts get none."""
    block = RouterForms("@W.T", E=8, k=4).eval()
    x = torch.randn(60, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        probs = block.logits(x).softmax(-1)
    top = probs.topk(4)
    counts = [_top_p_count(top.values[t].tolist(), 0.6, 1) for t in range(len(x))]
    want = torch.zeros(8, dtype=torch.long)
    for t, n in enumerate(counts):
        want[top.indices[t, :n]] += 1
    moec.compile(block, topk=moec.TopP(0.6), approximate=True)
    (b,) = moec.calibrate(block, [x]).blocks
    assert b.load == want.tolist() and b.pairs == pytest.approx(sum(counts) / len(x)) and b.pairs < 4
    assert [b.coactivation[e][e] for e in range(8)] == want.tolist()
    pruned = RouterForms("@W.T", E=8, k=2).eval()
    moec.compile(pruned, experts=moec.ExpertPlan("prune", {"": [0, 2, 4, 6]}), approximate=True)
    (b,) = moec.calibrate(pruned, [x]).blocks
    assert b.pairs == 2 and all(b.load[e] == 0 for e in (1, 3, 5, 7)) and sum(b.load) == 120


def test_topk_search_lowers_k_where_the_loss_rises_least():
    """A loss that only block 1 of 2 raises when its k falls: the search lowers block 0 first, and the model the
    user passed is left as it was."""
    model = models.tiny_model("qwen2_moe", num_experts_per_tok=3).eval()
    paths = [b.path for b in moec.inspect(copy.deepcopy(model)).blocks]
    loss = lambda m: 10 - {b.path: b.top_k for b in moec.inspect(m).blocks}[paths[1]]  # noqa: E731
    assert moec.topk_search(model, 2.5, loss) == {paths[0]: 2, paths[1]: 3}
    assert moec.topk_search(model, 1.5, loss) == {paths[0]: 1, paths[1]: 2}
    assert not moec.inspect(model).blocks or all(not b.approximate for b in moec.inspect(model).blocks)
    with pytest.raises(ValueError, match="average"):
        moec.topk_search(model, 0, loss)
    quantized = moec.compile(copy.deepcopy(model), quantize=moec.Int8Experts())  # its fp experts were released
    with pytest.raises(NotImplementedError, match="topk_search .*before compiling it"):
        moec.topk_search(quantized, 2.5, loss)


def test_top_p_with_a_selection_bias_keeps_the_heaviest_weights():
    """DeepSeek-style: experts chosen by score + bias, weighted by the (renormalised) scores, so the chosen order is
    not the weight order; top-p keeps the heaviest weights, renormalised among themselves."""
    block = GroupsWithBatchDims().eval()
    x = torch.randn(2, 20, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        flat = x.reshape(-1, 32)
        scores = block.gate(flat).sigmoid()
        choice = (scores + block.bias).view(-1, 4, 4)
        keep = torch.zeros(len(flat), 4).scatter_(-1, choice.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices, 1.0)
        masked = (scores + block.bias).masked_fill(keep.repeat_interleave(4, dim=-1) == 0, float("-inf"))
        ids = masked.topk(4, dim=-1).indices
        w = scores.gather(-1, ids)
        reordered = 0
        for t in range(len(flat)):
            n = _top_p_count(w[t].tolist(), 0.6, 1)
            heaviest = w[t].argsort(descending=True)[:n]
            reordered += int(not torch.equal(heaviest.sort().values, torch.arange(n)))
            kept = torch.zeros(4, dtype=torch.bool)
            kept[heaviest] = True
            w[t] = torch.where(kept, w[t], 0) / w[t][kept].sum()
        assert reordered  # some token's heaviest weights are not its first choices
        want = _dispatch(block.experts.run, flat, ids, w, 16).reshape(x.shape)
    moec.compile(block, topk=moec.TopP(0.6), approximate=True)
    assert moec.inspect(block).blocks[0].approximate
    with torch.no_grad():
        assert rel_err(block(x), want) < TOL[torch.float32]


def test_inspect_counts_the_pairs_top_p_runs():
    block = RouterForms("@W.T", E=8, k=4).eval()
    x = torch.randn(60, 32, generator=torch.Generator().manual_seed(2))
    moec.compile(block, topk=moec.TopP(0.5), approximate=True)
    (b,) = moec.calibrate(block, [x]).blocks
    (shown,) = moec.inspect(block, x).blocks
    assert shown.expert_load == b.load and sum(shown.expert_load) == round(b.pairs * 60) < 4 * 60
