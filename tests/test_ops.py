"""The torch backend's canonical ops against a naive per-token reference."""

import math

import pytest
import torch
import torch.nn.functional as F

import moec  # noqa: F401
from moec.backends.torch_backend import activate
from moec.ir import ExpertsSpec, RouterSpec
from moec.ops import experts_args, route_args

from conftest import TOL, rel_err


def naive_route(x, W, sb, r: RouterSpec):
    """One token at a time, written from RouterSpec's docstring."""
    E = W.shape[0]
    ids, ws = [], []
    for t in range(x.shape[0]):
        logits = (W.float() @ x[t].float())
        scores = {"softmax": logits.softmax(-1), "sigmoid": logits.sigmoid(), "none": logits}[r.scoring]
        choice = scores + (sb if sb is not None else 0)
        if r.n_group > 1:
            g = choice.view(r.n_group, -1)
            gs = g.max(-1).values if r.group_score == "max" else g.topk(2, -1).values.sum(-1)
            keep = set(gs.topk(r.topk_group).indices.tolist())
            choice = torch.tensor([c if e // (E // r.n_group) in keep else -float("inf") for e, c in enumerate(choice.tolist())])
        i = choice.topk(r.top_k).indices
        w = scores[i] if r.weighting == "scores" else torch.ones(r.top_k)
        if r.renorm:
            w = w / (w.sum() if r.renorm == 1 else w.norm(p=r.renorm))
        ids.append(i)
        ws.append(w * r.scale)
    return torch.stack(ids), torch.stack(ws)


def naive_experts(x, ids, w, w13, b13, w2, b2, e: ExpertsSpec):
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            i = ids[t, j]
            xin = (x[t].float() * w[t, j]) if e.weight_on_input else x[t].float()
            h = F.linear(xin, w13[i].float(), None if b13 is None else b13[i].float())
            y = F.linear(activate(h, e.activation, e.gated, e.alpha, e.limit), w2[i].float(),
                         None if b2 is None else b2[i].float())
            out[t] += y if e.weight_on_input else w[t, j] * y
    return out


ROUTERS = [
    RouterSpec(top_k=2, scoring="softmax", renorm=1.0),
    RouterSpec(top_k=2, scoring="softmax"),
    RouterSpec(top_k=1, scoring="softmax"),
    RouterSpec(top_k=3, scoring="sigmoid", select_bias=True, n_group=4, topk_group=2, group_score="top2_sum",
               renorm=1.0, scale=2.5),
    RouterSpec(top_k=2, scoring="softmax", n_group=2, topk_group=1, group_score="max", scale=16.0),
    RouterSpec(top_k=2, scoring="none", weighting="ones"),
    RouterSpec(top_k=2, scoring="softmax", renorm=2.0),
]


@pytest.mark.parametrize("r", ROUTERS, ids=lambda r: r.describe())
@pytest.mark.parametrize("T", [1, 5, 33])
def test_route(r, T):
    check_route(torch.ops.moec.route, r, T, 8)


def check_route(op, r: RouterSpec, T: int, E: int):
    """op (a moec::route implementation) against the naive per-token router; returns its inputs and outputs."""
    x, W = torch.randn(T, 16), torch.randn(E, 16)
    sb = torch.randn(E) * 0.1 if r.select_bias else None
    logits, ids, w = op(x, W, None, sb, *route_args(r))
    ref_ids, ref_w = naive_route(x, W, sb, r)
    torch.testing.assert_close(logits, x @ W.T)
    assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
    torch.testing.assert_close(w.gather(1, ids.argsort(-1)), ref_w.gather(1, ref_ids.argsort(-1)))
    return (x, W, sb), (logits, ids, w)


def naive_sparsemixer(logits, jitter_eps):
    """HF's eval-mode `sparsemixer` (PhiMoE), one token at a time in Python floats: two picks, each
    the best logit not picked yet, weighted by a softmax over the logits not picked yet that lie
    within the relative threshold (m - l) / max(|l|, m) <= 2 * jitter_eps of it."""
    ids, ws = [], []
    for row in logits.tolist():
        picked, weights = [], []
        for _ in range(2):
            left = [e for e in range(len(row)) if e not in picked]
            i = max(left, key=lambda e: row[e])
            m = row[i]
            kept = [e for e in left if (m - row[e]) / max(abs(row[e]), m) <= 2 * jitter_eps]
            weights.append(1.0 / sum(math.exp(row[e] - m) for e in kept))
            picked.append(i)
        ids.append(picked)
        ws.append(weights)
    return torch.tensor(ids), torch.tensor(ws)


@pytest.mark.parametrize("jitter_eps", [0.01, 0.5])
@pytest.mark.parametrize("shift", [0.0, -20.0])  # -20: every logit negative, so the max bounds the denominator
@pytest.mark.parametrize("T", [1, 5, 33])
def test_route_sparsemixer(jitter_eps, shift, T):
    E, H = 8, 16
    x, W, b = torch.randn(T, H), torch.randn(E, H), torch.full((E,), shift)
    r = RouterSpec(top_k=2, scoring="sparsemixer", jitter_eps=jitter_eps)
    logits, ids, w = torch.ops.moec.route(x, W, b, None, *route_args(r))
    ref_ids, ref_w = naive_sparsemixer(x @ W.T + b, jitter_eps)
    torch.testing.assert_close(logits, x @ W.T + b)
    assert torch.equal(ids, ref_ids)  # in pick order
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, ref_w)
    if jitter_eps == 0.5 and T > 1:
        assert (w < 0.99).any()  # the masked softmax is not trivially 1 here


EXPERTS = [
    ExpertsSpec(8, 16, 24, "silu"),
    ExpertsSpec(8, 16, 24, "gelu", bias=True),
    ExpertsSpec(4, 16, 24, "gelu_tanh"),
    ExpertsSpec(4, 16, 24, "relu", gated=False, bias=True),
    ExpertsSpec(4, 16, 24, "gelu", gated=False),
    ExpertsSpec(8, 16, 24, "swiglu_oai", bias=True, alpha=1.702, limit=0.5),
    ExpertsSpec(8, 16, 24, "silu", weight_on_input=True),
]


@pytest.mark.parametrize("e", EXPERTS, ids=lambda e: e.describe())
@pytest.mark.parametrize("T,k", [(1, 1), (1, 2), (6, 2), (40, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["experts", "experts_loop"])
def test_experts(e, T, k, dtype, op):
    E, H, I = e.num_experts, e.hidden, e.inter
    N1 = 2 * I if e.gated else I
    x = torch.randn(T, H).to(dtype)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])  # [T, k]; at small T some experts stay empty
    w = torch.rand(T, k)
    w13, w2 = (torch.randn(E, N1, H) / H**0.5).to(dtype), (torch.randn(E, H, I) / I**0.5).to(dtype)
    b13 = torch.randn(E, N1).to(dtype) if e.bias else None
    b2 = torch.randn(E, H).to(dtype) if e.bias else None
    got = getattr(torch.ops.moec, op)(x, ids, w, w13, b13, w2, b2, *experts_args(e))
    ref = naive_experts(x, ids, w, w13, b13, w2, b2, e)
    assert got.dtype == dtype and got.shape == x.shape
    assert rel_err(got, ref) < TOL[dtype]


@pytest.mark.parametrize("e", [EXPERTS[0], ExpertsSpec(8, 16, 24, "gelu", bias=True),
                               ExpertsSpec(8, 16, 24, "silu", weight_on_input=True)], ids=lambda e: e.describe())
@pytest.mark.parametrize("scale", [1.0, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_numba_route(e, scale, dtype):
    """fp32/bf16 on CPU with few rows per expert take the numba route (one call per GEMM over the experts). In
    fp32 an expert that still gets DEQUANT_MIN_ROWS rows or more runs MKL: one call holding hot, rare and unused
    experts checks both against the reference, also with large activations. Where autograd records the call, or
    on one thread (fork safety), the route steps aside: the gradients are torch's."""
    from moec.backends import torch_backend as tb

    E, H, I, k = e.num_experts, e.hidden, e.inter, 2
    T = 28 if dtype == torch.float32 else 5  # bf16: fewer rows in all than DEQUANT_MIN_ROWS
    N1 = 2 * I if e.gated else I
    ids = torch.stack([torch.tensor([0, 1]) if t % 2 else torch.randperm(E)[:k] for t in range(T)])
    if dtype == torch.float32:
        counts = torch.bincount(ids.reshape(-1), minlength=E)
        assert counts.max() >= tb.DEQUANT_MIN_ROWS and (counts[2:] < tb.DEQUANT_MIN_ROWS).all()
    x = (torch.randn(T, H) * scale).to(dtype)
    w = torch.rand(T, k)
    w13, w2 = (torch.randn(E, N1, H) / H**0.5).to(dtype), (torch.randn(E, H, I) / I**0.5).to(dtype)
    b13 = torch.randn(E, N1).to(dtype) if e.bias else None
    b2 = torch.randn(E, H).to(dtype) if e.bias else None
    args = (ids, w, w13, b13, w2, b2, *experts_args(e))
    ref = naive_experts(x, ids, w, w13, b13, w2, b2, e)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert tb._numba_route(x, ids, E, dtype, w, w13, b13, w2, b2)
        got = torch.ops.moec.experts(x, *args)
        assert got.dtype == dtype and rel_err(got, ref) < TOL[dtype]
        xg = x.clone().requires_grad_()
        assert not tb._numba_route(xg, ids, E, dtype, w, w13, b13, w2, b2)
        if dtype == torch.float32:
            torch.ops.moec.experts(xg, *args).square().sum().backward()
            xr = x.clone().requires_grad_()
            naive_experts(xr, ids, w, w13, b13, w2, b2, e).square().sum().backward()
            assert rel_err(xg.grad, xr.grad) < TOL[dtype]
        torch.set_num_threads(1)
        assert not tb._numba_route(x, ids, E, dtype, w, w13, b13, w2, b2)
    finally:
        torch.set_num_threads(threads)


def test_fake_impls_trace_under_export():
    """The canonical ops keep a graph traceable with symbolic token counts."""
    r, e = ROUTERS[0], EXPERTS[0]
    W, w13, w2 = torch.randn(8, 16), torch.randn(8, 48, 16), torch.randn(8, 16, 24)

    class M(torch.nn.Module):
        def forward(self, x):
            _, ids, w = torch.ops.moec.route(x, W, None, None, *route_args(r))
            return torch.ops.moec.experts(x, ids, w, w13, None, w2, None, *experts_args(e))

    x = torch.randn(5, 16)
    ep = torch.export.export(M(), (x,), dynamic_shapes=({0: torch.export.Dim("T", min=1)},))
    torch.testing.assert_close(ep.module()(torch.randn(3, 16)).shape, torch.Size([3, 16]))


def _capacity(ids, w, rows, E, r: RouterSpec):
    kept = torch.ops.moec.capacity_kept(ids, w, rows, E, torch.float32, r.to_json())
    return torch.ops.moec.capacity(w, kept, r.to_json())


def naive_capacity(ids, w, rows, capacity):
    """Token by token within each row: all first choices, then all second choices, ...; an
    expert's pairs past `capacity` get weight 0."""
    T, k = ids.shape
    S, out = T // rows, w.clone()
    for r in range(rows):
        taken = {}
        for j in range(k):
            for t in range(r * S, (r + 1) * S):
                e = int(ids[t, j])
                taken[e] = taken.get(e, 0) + 1
                if taken[e] > capacity:
                    out[t, j] = 0
    return out


@pytest.mark.parametrize("T,rows,k,capacity", [(1, 1, 1, 1), (12, 2, 1, 2), (12, 1, 2, 2), (30, 3, 2, 3),
                                                (9, 1, 2, 64)])
def test_capacity(T, rows, k, capacity):
    E, H = 4, 16
    x, W = torch.randn(T, H), torch.randn(E, H)
    _, ids, w = torch.ops.moec.route(x, W, None, None, *route_args(RouterSpec(top_k=k)))
    got = _capacity(ids, w, rows, E, RouterSpec(top_k=k, capacity=capacity))
    ref = naive_capacity(ids, w, rows, capacity)
    torch.testing.assert_close(got, ref)
    assert (got == 0).any() or T // rows * k <= E * capacity  # a row with more pairs than E * capacity drops some
    e = ExpertsSpec(E, H, 24, "relu", gated=False)
    w13, w2 = torch.randn(E, 24, H) / H**0.5, torch.randn(E, H, 24) / 24**0.5
    y = torch.ops.moec.experts(x, ids, got, w13, None, w2, None, *experts_args(e))
    assert rel_err(y, naive_experts(x, ids, ref, w13, None, w2, None, e)) < TOL[torch.float32]


def test_capacity_traces_under_export():
    """Rows (the batch size) stay symbolic."""
    W = torch.randn(8, 16)

    class M(torch.nn.Module):
        def forward(self, x):
            _, ids, w = torch.ops.moec.route(x.reshape(-1, 16), W, None, None, *route_args(RouterSpec(top_k=1)))
            return _capacity(ids, w, x.shape[0], 8, RouterSpec(top_k=1, capacity=2))

    dims = {0: torch.export.Dim("B", min=1), 1: torch.export.Dim("S", min=1)}
    ep = torch.export.export(M(), (torch.randn(2, 5, 16),), dynamic_shapes=(dims,))
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(ep.module()(x), M()(x))


@pytest.mark.parametrize("form,f,m,n,E,want", [
    ("ceil", 1.25, 4, 100, 8, 16), ("ceil", 1.25, 4, 10, 8, 4), ("ceil_per_expert", 1.5, 1, 100, 8, 19),
    ("floor", 2.0, 1, 9, 4, 4), ("ceil", 2.0, 1, 9, 4, 5)])
def test_capacity_formula(form, f, m, n, E, want):
    """max(min, ceil(f n / E)) / floor(f ceil(n / E)) / floor(f n / E), as libraries compute expert capacity."""
    r = RouterSpec(top_k=2, capacity=m, capacity_factor=f, capacity_form=form)
    assert r.capacity_for(n, E) == want


def test_capacity_renormalises_after_the_drop():
    """GShard renormalises the kept gates after dropping the pairs past capacity (a kept pair's partner dropped:
    its weight becomes 1)."""
    E, H, T = 4, 16, 12
    x, W = torch.randn(T, H), torch.randn(E, H)
    eps = torch.finfo(torch.float32).eps
    r = RouterSpec(top_k=2, capacity=2, capacity_renorm=True, renorm=1.0, renorm_floor=eps)
    _, ids, w = torch.ops.moec.route(x, W, None, None, *route_args(r))  # renormalised later
    assert not torch.allclose(w.sum(-1), torch.ones(T))
    got = _capacity(ids, w, 1, E, r)
    kept = naive_capacity(ids, w, 1, 2)
    assert (kept == 0).all(-1).any() and ((kept == 0).sum(-1) == 1).any()  # tokens that lost both, and one pair
    torch.testing.assert_close(got, kept / kept.sum(-1, keepdim=True).clamp(min=eps))


def test_numba_kernels_refuse_mismatched_shapes():
    """cpu_quant's kernels do not check bounds: grouped_qmm and combine check the shapes first (a hidden size
    other than the experts', or slot weights other than the rows, crashed the process or read past the end)."""
    from moec.backends import cpu_quant

    w = torch.randn(4, 8, 16)
    rows = cpu_quant.expert_rows([2, 1, 0, 0])
    assert cpu_quant.grouped_qmm(torch.randn(3, 16), rows, w).shape == (3, 8)
    with pytest.raises(ValueError, match="shapes do not match"):
        cpu_quant.grouped_qmm(torch.randn(3, 15), rows, w)
    with pytest.raises(ValueError, match="shapes do not match"):
        cpu_quant.grouped_qmm(torch.randn(2, 16), rows, w)  # fewer rows than the experts' rows
    _, inv, _, _ = cpu_quant.plan(torch.tensor([[0, 1], [2, 0]]), 4)
    with pytest.raises(ValueError, match="do not match"):
        cpu_quant.combine(torch.randn(4, 8), inv, torch.rand(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_expert_of_unquantized_weights(dtype):
    """The big-expert branch of the numba route reads fp32 experts in place and widens bf16 ones into `out`."""
    from moec.backends import cpu_quant

    w = torch.randn(3, 8, 16).to(dtype)
    got = cpu_quant.dequantize_expert(1, w, out=torch.empty(8, 16))
    assert got.dtype == torch.float32 and torch.equal(got, w[1].float())
    assert dtype != torch.float32 or got.data_ptr() == w[1].data_ptr()
