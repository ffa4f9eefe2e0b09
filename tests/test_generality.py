"""Generality: MoE blocks written the ways public libraries write them (GShard/Switch-style gates, routers
in every form, group-limited routing with batch dims, capacity, expert shapes, input layouts), each
compared with the original at several shapes, with the original's code asserted not to run after the
rewrite; and look-alikes that must stay untouched (Soft MoE, hyper-connections).

Every block here is written for this test from the pattern, not copied from a library.
"""

import copy
import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings
import torch.nn.functional as F
from torch import nn

import moec

from conftest import TOL, rel_err

RUNS = {"count": 0}  # forward calls of the original code (a compiled block must not add to it)


def _mlp(H, I, act=nn.ReLU):
    return nn.Sequential(nn.Linear(H, I), act(), nn.Linear(I, H))


class _Experts(nn.Module):
    """E experts as a ModuleList of nn.Sequential (Linear, activation module, Linear), or stacked tensors."""

    def __init__(self, E, H, I, stacked=False):
        super().__init__()
        self.stacked = stacked
        if stacked:
            self.w_in = nn.Parameter(torch.randn(E, H, I) / H**0.5)
            self.w_out = nn.Parameter(torch.randn(E, I, H) / I**0.5)
        else:
            self.ffn = nn.ModuleList(_mlp(H, I) for _ in range(E))

    def run(self, e, x):
        if self.stacked:
            return F.relu(x @ self.w_in[e]) @ self.w_out[e]
        return self.ffn[e](x)


def _dispatch(run, x, ids, w, E):
    """sum_j w[t, j] * expert ids[t, j] (x[t]): the per-expert loop every block below uses."""
    out = torch.zeros_like(x)
    for e in range(E):
        t, s = torch.where(ids == e)
        out.index_add_(0, t, run(e, x[t]) * w[t, s, None])
    return out


class GShardTop2(nn.Module):
    """Top-2 as two argmax picks: the first over the softmax gates, the second over the logits with the first
    masked out (or the gates multiplied by 1 - mask); gates from the softmax, renormalised or not; optional
    capacity per expert with one-hot cumsum locations (second choices queue after all first choices);
    dispatch and combine as einsums over [T, E, C] tensors."""

    def __init__(self, H=32, E=8, I=40, normalize=True, mask="inf", capacity=None, stacked=False, pick="argmax",
                 aux=False):
        super().__init__()
        self.E, self.normalize, self.mask, self.capacity, self.pick, self.aux = E, normalize, mask, capacity, pick, aux
        self.wg = nn.Linear(H, E, bias=False)
        nn.init.normal_(self.wg.weight, std=2 / H**0.5)
        self.experts = _Experts(E, H, I, stacked)

    def forward(self, x):
        RUNS["count"] += 1
        shape, E = x.shape, self.E
        x = x.reshape(-1, shape[-1])  # [T, H]
        T = x.shape[0]
        logits = self.wg(x)
        gates = F.softmax(logits, dim=1)
        top1 = (lambda t: torch.argmax(t, dim=1)) if self.pick == "argmax" else (  # noqa: E731
            lambda t: t.topk(1, dim=1).indices.squeeze(1))  # (lucidrains' mixture-of-experts: top1 = topk(k=1))
        i1 = top1(gates)
        mask1 = F.one_hot(i1, E)
        if self.mask == "inf":
            i2 = top1(logits.masked_fill(mask1.bool(), float("-inf")))
        else:
            i2 = top1(gates * (1 - mask1))
        mask2 = F.one_hot(i2, E)
        C = T if self.capacity is None else self.capacity
        locations1 = torch.cumsum(mask1, dim=0) - 1
        locations2 = torch.cumsum(mask2, dim=0) - 1 + torch.sum(mask1, dim=0, keepdim=True)
        mask1 = mask1 * torch.lt(locations1, C)
        mask2 = mask2 * torch.lt(locations2, C)
        g1 = (gates * mask1).sum(dim=1)
        g2 = (gates * mask2).sum(dim=1)
        if self.normalize:
            denom = torch.clamp(g1 + g2, min=torch.finfo(g1.dtype).eps)
            g1, g2 = g1 / denom, g2 / denom
        loc1 = (locations1 * mask1).sum(dim=1)
        loc2 = (locations2 * mask2).sum(dim=1)
        combine = (g1[:, None, None] * mask1[:, :, None] * F.one_hot(loc1, C)[:, None, :]
                   + g2[:, None, None] * mask2[:, :, None] * F.one_hot(loc2, C)[:, None, :])  # [T, E, C]
        dispatched = torch.einsum("sec,sm->ecm", combine.bool().to(x.dtype), x)  # [E, C, H]
        out = torch.stack([self.experts.run(e, dispatched[e]) for e in range(E)])  # [E, C, H]
        out = torch.einsum("sec,ecm->sm", combine, out).reshape(shape)
        if self.aux:  # GShard's load-balancing loss
            return out, (gates.mean(0) * mask1.float().mean(0)).mean() * E * E
        return out


class RouterForms(nn.Module):
    """Top-k with the router as a bare parameter used in one of many ways, next to the experts."""

    def __init__(self, form, H=32, E=8, I=40, k=2):
        super().__init__()
        self.form, self.k, self.E = form, k, E
        w = torch.randn(E, H) * 2 / H**0.5
        if form in ("@W", "matmul", "einsum_he"):
            self.router = nn.Parameter(w.T.contiguous())  # [H, E]
        elif form == "flat":
            self.router = nn.Parameter(w.flatten())  # [E*H], viewed at run time
        else:
            self.router = nn.Parameter(w)  # [E, H]
        self.experts = _Experts(E, H, I)

    def logits(self, x):
        W, f = self.router, self.form
        return {"@W.T": lambda: x @ W.T, "@W.t()": lambda: x @ W.t(), "@W": lambda: x @ W,
                "matmul": lambda: torch.matmul(x, W), "einsum": lambda: torch.einsum("th,eh->te", x, W),
                "einsum_he": lambda: torch.einsum("th,he->te", x, W),
                "flat": lambda: x @ W.view(self.E, -1).T}[f]()

    def forward(self, x):
        RUNS["count"] += 1
        w, ids = self.logits(x).softmax(-1).topk(self.k)
        return _dispatch(self.experts.run, x, ids, w, self.E)


class GroupsWithBatchDims(nn.Module):
    """DeepSeek-style group-limited routing computed on [B, S, ...] without flattening the tokens."""

    def __init__(self, H=32, E=16, G=4, topk_group=2, k=4, I=24):
        super().__init__()
        self.E, self.G, self.tg, self.k = E, G, topk_group, k
        self.gate = nn.Linear(H, E, bias=False)
        nn.init.normal_(self.gate.weight, std=2 / H**0.5)
        self.register_buffer("bias", torch.randn(E) * 0.1)
        self.experts = _Experts(E, H, I, stacked=True)

    def forward(self, x):  # [B, S, H]
        RUNS["count"] += 1
        B, S, H = x.shape
        scores = self.gate(x).sigmoid()  # [B, S, E]
        choice = scores + self.bias
        grouped = choice.view(B, S, self.G, self.E // self.G)  # [B, S, G, E/G]
        gscore = grouped.topk(2, dim=-1).values.sum(-1)  # [B, S, G]
        keep = torch.zeros_like(gscore).scatter_(-1, gscore.topk(self.tg, dim=-1).indices, 1.0)
        masked = choice.masked_fill(keep.repeat_interleave(self.E // self.G, dim=-1) == 0, float("-inf"))
        ids = masked.topk(self.k, dim=-1).indices  # [B, S, k]
        w = scores.gather(-1, ids)
        w = w / w.sum(-1, keepdim=True)
        out = _dispatch(self.experts.run, x.reshape(-1, H), ids.reshape(-1, self.k), w.reshape(-1, self.k), self.E)
        return out.reshape(B, S, H)


def _check(block, shapes, dtype=torch.float32):
    block.eval()  # in training mode a compiled block runs its original forward
    ref = copy.deepcopy(block)
    moec.compile(block)
    report = moec.inspect(block)
    assert [b.path for b in report.blocks] == [""], report
    for shape in shapes:
        x = torch.randn(shape).to(dtype)
        with torch.no_grad():
            want = ref(x)
            before = RUNS["count"]
            got = block(x)
            assert RUNS["count"] == before  # the original's code did not run
        assert rel_err(got, want) < TOL[dtype], shape
    return report.blocks[0]


SEQ = [(1, 32), (7, 32), (300, 32)]  # [T, H]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mask", ["inf", "mul"])
@pytest.mark.parametrize("stacked", [False, True])
def test_gshard_top2_as_two_argmax_picks(normalize, mask, stacked):
    b = _check(GShardTop2(normalize=normalize, mask=mask, stacked=stacked), SEQ)
    assert b.top_k == 2 and "argmax picks" in b.router


@pytest.mark.parametrize("pick", ["argmax", "topk"])
def test_gshard_top2_returning_its_aux_loss_is_refused_for_it(pick):
    """lucidrains' mixture-of-experts returns (out, aux loss), its top-2 as two topk(k=1) picks: the reason is the aux
    loss (a misreading of its router was said instead); the block runs as it is."""
    m = GShardTop2(pick=pick, aux=True).eval()
    ref = copy.deepcopy(m)
    with pytest.warns(UserWarning, match="no MoE block rewritten"):
        moec.compile(m)
    assert "returns an extra output moec does not compute (shape ()" in moec.inspect(m).rejected[0].reason
    x = torch.randn(30, 32)
    assert all(map(torch.equal, m(x), ref(x)))


def test_gshard_sequence_first_with_a_group_dim():
    _check(GShardTop2(), [(5, 2, 32), (150, 2, 32)])  # [S, B, H]


ROUTER_FORMS = ["@W.T", "@W.t()", "@W", "matmul", "einsum", "einsum_he", "flat"]


@pytest.mark.parametrize("form", ROUTER_FORMS)
def test_routers_in_every_form(form):
    _check(RouterForms(form), SEQ)


class SelectionBiases(RouterForms):
    """Top-k of softmax(logits + shift) + bias, the bias of shape [E] or [1, E] (ERNIE 4.5 keeps it [1, E]), steering
    the selection only; the shift a 0-d tensor (a constant under softmax: not a selection bias)."""

    def __init__(self, bias_shape):
        super().__init__("@W.T")
        self.shift = nn.Parameter(torch.tensor(0.5))
        self.bias = nn.Parameter(torch.randn(bias_shape) * 0.05)

    def forward(self, x):
        RUNS["count"] += 1
        p = (self.logits(x) + self.shift).softmax(-1)
        ids = (p + self.bias).topk(self.k).indices
        w = p.gather(-1, ids)
        return _dispatch(self.experts.run, x, ids, w / w.sum(-1, keepdim=True), self.E)


@pytest.mark.parametrize("bias_shape", [(8,), (1, 8)])
def test_a_selection_bias_of_e_or_1_by_e_next_to_a_scalar_shift(bias_shape):
    block = SelectionBiases(bias_shape).eval()
    _check(block, SEQ)
    assert "+bias(select)" in moec.inspect(block).blocks[0].router


@pytest.mark.parametrize("form", ROUTER_FORMS)
def test_routers_in_every_form_after_a_cast(form):
    """A router read through a view (flat, or [H, E] transposed) cast the tokens to the dtype it had at compile
    (a constant of the graph): after .to(bfloat16) the compiled block raised where the original ran."""
    block = RouterForms(form).eval()
    ref = copy.deepcopy(block)
    moec.compile(block)
    block.to(torch.bfloat16), ref.to(torch.bfloat16)
    for shape in SEQ:
        x = torch.randn(shape, dtype=torch.bfloat16)
        with torch.no_grad():
            before = RUNS["count"]
            got = block(x)
            assert RUNS["count"] == before  # compiled, not the original's code
            assert got.dtype == torch.bfloat16 and rel_err(got, ref(x)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("shape", [(1, 1, 32), (2, 7, 32), (1, 300, 32)])
def test_group_limited_routing_with_batch_dims(shape):
    b = _check(GroupsWithBatchDims(), [shape])
    assert "group-limited 2/4" in b.router


@pytest.mark.parametrize("I", [13, 37])
def test_odd_expert_sizes(I):
    block = RouterForms("@W.T", I=I)
    _check(block, SEQ)


class ScaledSum(RouterForms):
    """Routed and shared experts summed, then the sum scaled: (routed + shared) / 2 (Cohere2-MoE's "average",
    its default) or * 0.25, the shared expert gated or not."""

    def __init__(self, combine, gated):
        super().__init__("@W.T")
        self.combine = combine
        self.shared = _mlp(32, 48, nn.SiLU)
        self.shared_gate = nn.Linear(32, 1) if gated else None

    def forward(self, x):
        RUNS["count"] += 1
        w, ids = self.logits(x).softmax(-1).topk(self.k)
        y, s = _dispatch(self.experts.run, x, ids, w, self.E), self.shared(x)
        if self.shared_gate is not None:
            s = s * torch.sigmoid(self.shared_gate(x))
        return (y + s) / 2 if self.combine == "average" else (y + s) * 0.25


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("combine,scale", [("average", 0.5), ("quarter", 0.25)])
def test_routed_plus_shared_then_scaled(combine, scale, gated):
    """The whole block is compiled (only its experts were: "average" is Cohere2-MoE's default), and follows its
    weights when they change after compile, the shared expert's included."""
    block = ScaledSum(combine, gated)
    orig = copy.deepcopy(block).eval()
    b = _check(block, SEQ)
    assert b.shared.endswith(f"x{scale:g}") and f"x{scale:g}" in b.router, b
    with torch.no_grad():
        for m in (block, orig):
            m.shared[0].weight.mul_(-1.5)
            m.router.mul_(0.5)
        for shape in SEQ:
            x = torch.randn(shape)
            assert rel_err(block(x), orig(x)) < TOL[torch.float32]


class ZeroComputeExperts(nn.Module):
    """LongCat-Flash's pattern: the router chooses among E experts and Z zero-compute ones, which return the token
    (times its weight): nn.Identity members of the expert list, or ids past the down tensor's E, whose rows in the
    fused gate/up tensor [E+Z, 2I, H] are never read (HF's LongCat-Flash)."""

    def __init__(self, form, E=6, Z=3, k=3, H=32, I=24):
        super().__init__()
        self.E, self.Z, self.k, self.form = E, Z, k, form
        self.router = nn.Linear(H, E + Z, bias=False)
        if form == "modules":
            self.experts = nn.ModuleList([_mlp(H, I, nn.SiLU) for _ in range(E)] + [nn.Identity() for _ in range(Z)])
        else:
            self.gate_up = nn.Parameter(torch.randn(E + Z, 2 * I, H) / H**0.5)
            self.down = nn.Parameter(torch.randn(E, H, I) / I**0.5)

    def run(self, e, x):
        if e >= self.E:
            return x
        if self.form == "modules":
            return self.experts[e](x)
        gate, up = F.linear(x, self.gate_up[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down[e])

    def forward(self, x):
        RUNS["count"] += 1
        w, ids = F.linear(x.float(), self.router.weight.float()).softmax(-1).topk(self.k)  # (in fp32, as LongCat)
        return _dispatch(self.run, x, ids, w.to(x.dtype), self.E + self.Z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["modules", "stacked"])
def test_zero_compute_experts(form, dtype):
    """The whole block is compiled; tokens whose k choices are all zero-compute experts, or none, match too, at
    large magnitudes, and after the router changes to send every token to them."""
    torch.manual_seed(0)
    block = ZeroComputeExperts(form).to(dtype)
    orig = copy.deepcopy(block).eval()
    b = _check(block, SEQ, dtype)
    assert "3 zero-compute (identity) experts" in b.experts and b.num_experts == 6, b
    x = torch.randn(300, 32).to(dtype)
    with torch.no_grad():
        assert rel_err(block(100 * x), orig(100 * x)) < TOL[dtype]
        for m in (block, orig):
            m.router.weight[6:] *= 20  # most tokens choose only zero-compute experts, the others some
        _, ids = F.linear(x.float(), orig.router.weight.float()).topk(3)
        assert (ids >= 6).all(-1).any() and not (ids >= 6).all(-1).all()
        assert rel_err(block(x), orig(x)) < TOL[dtype]


class TokenCounting(nn.Module):
    """torchtitan's pattern: a router that also returns each expert's token count (histc of the choices), the
    pairs sorted by expert (argsort), experts run on contiguous groups (split by the counts, or torch._grouped_mm),
    the score applied before or after the experts, a shared expert, scatter_add back; and the counts added to a
    tokens_per_expert buffer in every forward (load balancing); `count` other than "counts": a buffer written
    otherwise (doubled counts, a decaying average, the last call's counts)."""

    def __init__(self, grouped=False, before=False, count="counts", H=32, E=8, I=24, k=2):
        super().__init__()
        self.E, self.k, self.grouped, self.before, self.count = E, k, grouped, before, count
        self.gate = nn.Linear(H, E, bias=False)
        self.w1, self.w3 = (nn.Parameter(torch.randn(E, I, H) / H**0.5) for _ in range(2))
        self.w2 = nn.Parameter(torch.randn(E, H, I) / I**0.5)
        self.shared = _mlp(H, 2 * I, nn.SiLU)
        self.register_buffer("expert_bias", torch.randn(E) * 0.05)
        self.register_buffer("tokens_per_expert", torch.zeros(E), persistent=False)

    def experts(self, x, counts):
        if self.grouped:
            offs = torch.cumsum(counts.to(torch.int32), 0, dtype=torch.int32)
            mm = lambda a, w: torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)  # noqa: E731
            return mm(F.silu(mm(x, self.w1)) * mm(x, self.w3), self.w2)
        parts = torch.split(x, counts.to(torch.int64).tolist())
        return torch.cat([(F.silu(p @ self.w1[e].T) * (p @ self.w3[e].T)) @ self.w2[e].T for e, p in enumerate(parts)])

    def forward(self, x):  # [B, S, H]
        RUNS["count"] += 1
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        scores = torch.sigmoid(self.gate(x).float())
        ids = torch.topk(scores + self.expert_bias, self.k, dim=1).indices
        top = scores.gather(1, ids)
        top = top / (top.sum(-1, keepdim=True) + 1e-20)
        counts = torch.histc(ids.flatten().float(), bins=self.E, min=0, max=self.E)
        with torch.no_grad():
            if self.count == "decay":  # a running average: counts added to zeros look like counts
                self.tokens_per_expert.mul_(0.5).add_(counts)
            elif self.count == "last":
                self.tokens_per_expert.copy_(counts)
            else:
                self.tokens_per_expert.add_(counts * 2 if self.count == "double" else counts)
        order = torch.argsort(ids.flatten(), stable=True)
        tokens, w = order // self.k, top.flatten()[order, None]
        routed = x[tokens] * w.to(x.dtype) if self.before else x[tokens]
        y = self.experts(routed, counts)
        y = y if self.before else (y.float() * w).to(x.dtype)
        out = self.shared(x).scatter_add(0, tokens[:, None].expand(-1, x.shape[1]), y)
        return out.reshape(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grouped,before", [(False, False), (True, False), (False, True)])
def test_a_block_that_counts_its_tokens_per_expert(grouped, before, dtype):
    """torchtitan's MoE adds each expert's token count to a buffer in forward: compiled (it was refused as a change
    of state), and the compiled block adds the same counts; compile itself leaves the buffer as it was."""
    if grouped and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch without _grouped_mm")
    block = TokenCounting(grouped, before).to(dtype).eval()
    block.tokens_per_expert.fill_(3.0)
    ref = copy.deepcopy(block)
    moec.compile(block)
    report = moec.inspect(block)
    assert [b.path for b in report.blocks] == [""] and "tokens counted into tokens_per_expert" in report.blocks[0].experts
    assert torch.equal(block.tokens_per_expert, ref.tokens_per_expert)
    for shape in [(1, 1, 32), (2, 7, 32), (1, 300, 32)]:
        x = torch.randn(shape).to(dtype)
        with torch.no_grad():
            want = ref(x)
            before_runs = RUNS["count"]
            got = block(x)
            assert RUNS["count"] == before_runs  # compiled, not the original's code
        assert rel_err(got, want) < TOL[dtype], shape
        assert torch.equal(block.tokens_per_expert, ref.tokens_per_expert), shape


@pytest.mark.parametrize("count", ["double", "decay", "last"])
def test_a_block_that_counts_something_else_is_refused(count):
    block = TokenCounting(count=count).eval()
    moec.compile(block)
    report = moec.inspect(block)
    assert not report.blocks and "by other than the number of tokens routed to each expert" in report.rejected[0].reason
    assert not block.tokens_per_expert.any()  # compile left it as it was


def test_a_counting_block_counts_under_torch_compile_and_export():
    block = TokenCounting().eval()
    ref = copy.deepcopy(block)
    moec.compile(block)
    fast = torch.compile(block, backend="aot_eager", fullgraph=True)
    for shape in [(1, 1, 32), (2, 7, 32)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert rel_err(fast(x), ref(x)) < TOL[torch.float32]
        assert torch.equal(block.tokens_per_expert, ref.tokens_per_expert), shape
    exported = torch.export.export(block, (torch.randn(2, 7, 32),)).module()  # tracing counts nothing
    assert torch.equal(block.tokens_per_expert, ref.tokens_per_expert)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        assert rel_err(exported(x), ref(x)) < TOL[torch.float32]
    assert torch.equal(exported.tokens_per_expert, ref.tokens_per_expert)


def test_onnxruntime_and_inspect_leave_the_counters_as_they_were():
    """backend='onnxruntime' checks its session against the eager model, and moec.inspect runs the model for the
    expert load: neither counts into the model's buffers (a refused block's own forward counted, and so did the
    session's checks); the session itself counts nothing, said. Putting the counters back moves their versions, which
    is not a change of the model's weights: the next call keeps the session (it exported again at every call)."""
    pytest.importorskip("onnxruntime")
    block = TokenCounting().eval()
    moec.compile(block, backend="onnxruntime")
    with pytest.warns(UserWarning, match="holds no state"), torch.no_grad():
        block(torch.randn(2, 7, 32))
    assert not block.tokens_per_expert.any()
    opened = list(block.forward.sessions.values())
    with torch.no_grad():
        block(torch.randn(2, 7, 32))
    assert list(block.forward.sessions.values()) == opened and block.forward._stale() is None
    refused = TokenCounting(count="double").eval()
    with pytest.warns(UserWarning, match="no MoE block rewritten"):
        moec.compile(refused)
    moec.inspect(refused, torch.randn(2, 7, 32))
    assert not refused.tokens_per_expert.any()


def test_export_says_the_file_counts_nothing(tmp_path):
    onnx = pytest.importorskip("onnxruntime")
    block = TokenCounting().eval()
    with pytest.warns(UserWarning, match="an ONNX file holds no state"):
        moec.export_onnx(block, (torch.randn(2, 5, 32),), tmp_path / "counting.onnx")
    assert onnx and not block.tokens_per_expert.any()


# ---------------------------------------------------------------- look-alikes that must stay untouched


class SoftMoE(nn.Module):
    """Soft MoE: every token contributes to every slot (a softmax over tokens), every expert runs on its slots."""

    def __init__(self, H=32, E=4, slots=2, I=40):
        super().__init__()
        self.phi = nn.Parameter(torch.randn(H, E * slots) / H**0.5)
        self.E, self.slots = E, slots
        self.experts = nn.ModuleList(_mlp(H, I) for _ in range(E))

    def forward(self, x):  # [T, H]
        logits = x @ self.phi  # [T, E*S]
        dispatch = logits.softmax(dim=0)  # over tokens
        combine = logits.softmax(dim=1)  # over slots
        slots = (dispatch.T @ x).view(self.E, self.slots, -1)  # [E, S, H]
        ys = torch.cat([self.experts[e](slots[e]) for e in range(self.E)])  # [E*S, H]
        return combine @ ys


class HyperConnections(nn.Module):
    """Multi-stream residual: n streams mixed by learned weights around one dense MLP (no routing)."""

    def __init__(self, H=32, n=4, I=40):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(n, n) / 2)
        self.read = nn.Parameter(torch.randn(n) / 2)
        self.write = nn.Parameter(torch.randn(n) / 2)
        self.streams = nn.ModuleList(_mlp(H, I) for _ in range(n))

    def forward(self, h):  # [n, T, H]
        x = torch.einsum("n,nth->th", self.read.softmax(0), h)
        y = sum(m(x) for m in self.streams) / len(self.streams)
        return torch.einsum("nm,mth->nth", self.mix, h) + self.write[:, None, None] * y


@pytest.mark.parametrize("cls,shape", [(SoftMoE, (9, 32)), (HyperConnections, (4, 9, 32))])
def test_negative_controls_stay_untouched(cls, shape):
    m = cls()
    ref = copy.deepcopy(m)
    with pytest.warns(UserWarning, match="no MoE block rewritten"):
        moec.compile(m)
    assert not m._load_state_dict_pre_hooks  # unchanged: no hook (only moec.inspect's report of why)
    assert not moec.inspect(m).blocks
    x = torch.randn(shape)
    assert torch.equal(m(x), ref(x))


def test_capacity_is_kept():
    """A fixed capacity per expert (tokens past it dropped): exact, also where it drops most pairs."""
    b = _check(GShardTop2(capacity=3), [(2, 32), (9, 32), (40, 32)])
    assert "capacity" in b.router


# ---------------------------------------------------------------- what is kept, what is refused with its reason


class WithMask(RouterForms):
    """Takes a padding mask: padded tokens get no expert output."""

    def forward(self, x, mask=None):
        out = super().forward(x)
        return out if mask is None else out * mask[:, None]


def test_extra_inputs_keep_their_semantics():
    block = WithMask("@W.T").eval()
    ref = copy.deepcopy(block)
    moec.compile(block)
    assert moec.inspect(block).blocks
    x, mask = torch.randn(12, 32), (torch.rand(12) > 0.3).float()
    with torch.no_grad():
        assert rel_err(block(x, mask), ref(x, mask)) < TOL[torch.float32]  # the original runs: same semantics
        assert rel_err(block(x), ref(x)) < TOL[torch.float32]


class WithDropout(RouterForms):
    def __init__(self):
        super().__init__("@W.T")
        self.experts.ffn = nn.ModuleList(nn.Sequential(nn.Linear(32, 40), nn.GELU(), nn.Dropout(0.1), nn.Linear(40, 32))
                                         for _ in range(self.E))


def test_experts_with_dropout_and_activation_modules():
    b = _check(WithDropout(), SEQ)
    assert "GELU" in b.experts


class AuxOutputs(RouterForms):
    """Returns (out, aux_loss, tokens per expert), Switch-style."""

    def forward(self, x):
        out = super().forward(x)
        p = self.logits(x).softmax(-1)
        ids = p.topk(self.k).indices
        counts = F.one_hot(ids, self.E).sum((0, 1))
        aux = self.E * (counts.float() / ids.numel() * p.mean(0)).sum()
        return out, aux, counts


class SamplingRouter(RouterForms):
    """Samples the second expert from the remaining probabilities, also in eval mode."""

    def forward(self, x):
        p = self.logits(x).softmax(-1)
        i1 = p.argmax(-1)
        i2 = torch.multinomial(p.scatter(1, i1[:, None], 0.0), 1)[:, 0]
        ids = torch.stack([i1, i2], 1)
        return _dispatch(self.experts.run, x, ids, p.gather(1, ids), self.E)


class LoadStatistics(RouterForms):
    def forward(self, x):
        out = super().forward(x)
        self.last_load = self.logits(x).topk(self.k).indices.flatten().bincount(minlength=self.E)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: analysed on an fp32 copy (its state
@pytest.mark.parametrize("cls,reason", [(AuxOutputs, "extra output"), (SamplingRouter, "random numbers"),  # changes
                                        (LoadStatistics, "changes the block's own state")])  # were not seen)
def test_refused_with_the_true_reason(cls, reason, dtype):
    m = cls("@W.T").to(dtype).eval()
    before = {k: v for k, v in m.__dict__.items() if not k.startswith("_")}
    moec.compile(m)
    report = moec.inspect(m)
    assert not report.blocks and reason in report.rejected[0].reason, report
    assert {k: v for k, v in m.__dict__.items() if not k.startswith("_")} == before  # no values from moec's runs


class TensorCapacityTop1(nn.Module):
    """Top-1 with the capacity computed as a tensor, ceil(T / E * factor) with a minimum (DeepSpeed-style);
    dropped tokens output zero, or pass through (their input)."""

    def __init__(self, H=32, E=8, I=40, factor=1.0, min_capacity=2, passthrough=False):
        super().__init__()
        self.E, self.factor, self.min_capacity, self.passthrough = E, factor, min_capacity, passthrough
        self.wg = nn.Linear(H, E, bias=False)
        nn.init.normal_(self.wg.weight, std=2 / H**0.5)
        self.experts = _Experts(E, H, I, stacked=True)

    def forward(self, x):
        RUNS["count"] += 1
        T = x.shape[0]
        gates = F.softmax(self.wg(x), dim=1)
        capacity = torch.ceil(torch.tensor(T / self.E * self.factor)).to(torch.int64)
        if capacity < self.min_capacity:
            capacity = torch.tensor(self.min_capacity)
        idx = torch.argmax(gates, dim=1)
        mask = F.one_hot(idx, self.E)
        locations = torch.cumsum(mask, dim=0) - 1
        mask = mask * torch.lt(locations, capacity)
        g = (gates * mask).sum(1)
        out = x.clone() if self.passthrough else torch.zeros_like(x)
        for e in range(self.E):
            t = torch.where(mask[:, e] > 0)[0]
            out[t] = self.experts.run(e, x[t]) * g[t, None]
        return out


@pytest.mark.parametrize("factor", [1.0, 1.25])
@pytest.mark.parametrize("passthrough", [False, True])
def test_capacity_computed_as_a_tensor(factor, passthrough):
    b = _check(TensorCapacityTop1(factor=factor, passthrough=passthrough), [(1, 32), (9, 32), (40, 32), (300, 32)])
    assert "capacity max(2" in b.router and ("pass through" in b.router) == passthrough


class PriorityCapacity(nn.Module):
    """Top-k per token, then each expert keeps its top-C tokens by routing score (a top-k over the token axis,
    batch-priority style), per batch row of [B, S, H] or over all tokens; weights renormalised before the drop,
    after it, or not; a token that lost every expert outputs zero or passes through. Scores in the block's dtype,
    or in fp32 (a bf16 block then ranks without bf16's ties)."""

    def __init__(self, H=32, E=8, I=40, k=2, C=3, renorm="none", passthrough=False, rows=False, fp32_scores=False):
        super().__init__()
        self.E, self.k, self.C, self.renorm, self.passthrough, self.rows = E, k, C, renorm, passthrough, rows
        self.fp32_scores = fp32_scores
        self.wg = nn.Linear(H, E, bias=False)
        nn.init.normal_(self.wg.weight, std=2 / H**0.5)
        self.experts = _Experts(E, H, I, stacked=True)

    def forward(self, x):  # [T, H], or [B, S, H] with rows
        RUNS["count"] += 1
        logits = self.wg(x)
        p = (logits.float() if self.fp32_scores else logits).softmax(-1)  # [.., S, E]
        w, ids = p.topk(self.k)
        chosen = torch.zeros_like(p).scatter(-1, ids, 1.0)
        C = min(self.C, x.shape[-2])
        best = (p * chosen).topk(C, dim=-2).indices  # [.., C, E]: each expert's best tokens
        kept = (torch.zeros_like(p).scatter(-2, best, 1.0) * chosen).gather(-1, ids)  # [.., S, k]
        if self.renorm == "before":
            w = w / w.sum(-1, keepdim=True)
        w = w * kept
        if self.renorm == "after":
            w = w / w.sum(-1, keepdim=True).clamp(min=1e-9)
        H = x.shape[-1]
        out = _dispatch(self.experts.run, x.reshape(-1, H), ids.reshape(-1, self.k), w.reshape(-1, self.k).to(x.dtype),
                        self.E)
        if self.passthrough:
            out = torch.where(kept.reshape(-1, self.k).sum(-1, keepdim=True) > 0, out, x.reshape(-1, H))
        return out.reshape(x.shape)


@pytest.mark.parametrize("k,C,E", [(1, 2, 8), (2, 3, 8), (2, 5, 16), (3, 2, 4)])
@pytest.mark.parametrize("renorm", ["none", "before", "after"])
@pytest.mark.parametrize("passthrough", [False, True])
def test_capacity_by_score_over_the_tokens(k, C, E, renorm, passthrough):
    """A top-k over the token axis is the capacity rule (each expert's best C tokens), not expert-choice routing."""
    b = _check(PriorityCapacity(E=E, k=k, C=C, renorm=renorm, passthrough=passthrough), SEQ)
    assert f"top-{k}" in b.router and f"capacity {C}" in b.router and "by score" in b.router
    assert ("pass through" in b.router) == passthrough


def test_capacity_by_score_per_batch_row():
    b = _check(PriorityCapacity(rows=True, passthrough=True), [(1, 1, 32), (2, 9, 32), (3, 40, 32)])
    assert "/row" in b.router


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_capacity_rules_in_half_precision(dtype):
    for block in (PriorityCapacity(passthrough=True), PriorityCapacity(fp32_scores=True),
                  TensorCapacityTop1(passthrough=True)):
        _check(block.to(dtype), [(1, 32), (9, 32), (64, 32)], dtype)


# ---------------------------------------------------------------- an experts module inside a block moec leaves alone


class ExpertsModule(nn.Module):
    """E experts called with the routing: forward(hidden, top_k_index, top_k_weights) -> [T, H]."""

    def __init__(self, E=8, H=32, I=40, stacked=True):
        super().__init__()
        self.E = E
        self.inner = _Experts(E, H, I, stacked)

    def forward(self, hidden, top_k_index, top_k_weights):
        RUNS["count"] += 1
        return _dispatch(self.inner.run, hidden, top_k_index, top_k_weights, self.E)


class LayerWithMoE(nn.Module):
    """A layer that runs attention, a norm, a router and an experts module as siblings, and returns an aux loss:
    not an MoE block moec can rewrite whole; its experts module is."""

    def __init__(self, H=32, E=8, stacked=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(H, 4, batch_first=True)
        self.norm = nn.LayerNorm(H)
        self.router = nn.Linear(H, E, bias=False)
        self.experts = ExpertsModule(E, H, stacked=stacked)

    def forward(self, x):  # [B, S, H]
        h = x + self.attn(x, x, x, need_weights=False)[0]
        r = self.norm(h).reshape(-1, h.shape[-1])
        p = self.router(r).softmax(-1)
        w, ids = p.topk(2)
        y = self.experts(r, ids, w / w.sum(-1, keepdim=True))
        aux = (p.mean(0) ** 2).sum()
        return h + y.reshape(h.shape), aux


@pytest.mark.parametrize("stacked", [True, False])
def test_an_experts_module_is_rewritten_when_its_block_cannot_be(stacked):
    layer = LayerWithMoE(stacked=stacked).eval()
    ref = copy.deepcopy(layer)
    moec.compile(layer)
    report = moec.inspect(layer)
    assert [b.path for b in report.blocks] == ["experts"] and "caller" in report.blocks[0].router, report
    assert report.rejected[0].path == ""  # the layer itself, with its reason
    for shape in [(1, 1, 32), (2, 9, 32), (1, 300, 32)]:
        x = torch.randn(shape)
        with torch.no_grad():
            want = ref(x)
            before = RUNS["count"]
            got = layer(x)
            assert RUNS["count"] == before  # the experts module's original code did not run
        assert rel_err(got[0], want[0]) < TOL[torch.float32] and torch.allclose(got[1], want[1])


class LayerDispatching(LayerWithMoE):
    """The layer routes and loops over a ModuleList of experts itself, after attention and a norm: no module of
    its own computes the MoE part, so nothing can stand for it; refused with that reason, left as it was."""

    def __init__(self, H=32, E=8):
        super().__init__(H, E)
        self.experts = nn.ModuleList(_mlp(H, 40) for _ in range(E))

    def forward(self, x):
        h = x + self.attn(x, x, x, need_weights=False)[0]
        r = self.norm(h).reshape(-1, h.shape[-1])
        w, ids = self.router(r).softmax(-1).topk(2)
        return h + _dispatch(lambda e, t: self.experts[e](t), r, ids, w, len(self.experts)).reshape(h.shape)


def test_a_layer_that_routes_an_intermediate_value_is_refused_with_the_reason():
    layer = LayerDispatching().eval()
    ref = copy.deepcopy(layer)
    with pytest.warns(UserWarning, match="no MoE block rewritten"):
        moec.compile(layer)
    reason = moec.inspect(layer).rejected[0].reason
    assert "router reads a value the block computes (layer_norm in norm)" in reason, reason
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert torch.equal(layer(x), ref(x))


# ---------------------------------------------------------------- random blocks of these patterns (hypothesis)


@st.composite
def _pattern_blocks(draw):
    E = draw(st.sampled_from([4, 8, 16]))
    kind = draw(st.sampled_from(["gshard", "router_form", "tensor_capacity", "priority", "groups"]))
    if kind == "gshard":
        cap = draw(st.sampled_from([None, 2, 5]))
        return GShardTop2(E=E, normalize=draw(st.booleans()), mask=draw(st.sampled_from(["inf", "mul"])),
                          capacity=cap, stacked=draw(st.booleans()))
    if kind == "router_form":
        form = draw(st.sampled_from(["@W.T", "@W.t()", "@W", "matmul", "einsum", "einsum_he", "flat"]))
        return RouterForms(form, E=E, k=draw(st.integers(1, 3)), I=draw(st.sampled_from([13, 24, 40])))
    if kind == "tensor_capacity":
        return TensorCapacityTop1(E=E, factor=draw(st.sampled_from([0.5, 1.0, 1.25, 2.0])),
                                  min_capacity=draw(st.integers(1, 4)), passthrough=draw(st.booleans()))
    if kind == "priority":
        return PriorityCapacity(E=E, k=draw(st.integers(1, 3)), C=draw(st.integers(1, 6)),
                                renorm=draw(st.sampled_from(["none", "before", "after"])),
                                passthrough=draw(st.booleans()))
    G = draw(st.sampled_from([g for g in (2, 4) if E // g >= 2]))
    return GroupsWithBatchDims(E=E, G=G, topk_group=draw(st.integers(1, G)), k=2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(block=_pattern_blocks(), T=st.sampled_from([1, 7, 64]), scale=st.sampled_from([1.0, 100.0]),
       seed=st.integers(0, 3))
def test_random_pattern_blocks_same_outputs_or_rejected(block, T, scale, seed):
    """Random instances of the patterns above, at short and long inputs, plain and x100: the compiled block
    gives the original's outputs, or it is left alone with a reason."""
    block.eval()
    ref = copy.deepcopy(block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moec.compile(block)
    report = moec.inspect(block)
    assert report.blocks or report.rejected[0].reason
    H = 32
    shape = (1, T, H) if isinstance(block, GroupsWithBatchDims) else (T, H)
    x = scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        got, want = block(x), ref(x)
    assert rel_err(got, want) < TOL[torch.float32]
