"""The Triton backend: every kernel under TRITON_INTERPRET=1 (CI has no GPU) against the torch
backend and the naive references, compile-only for sm_80/sm_90, and end to end on HF models."""

import copy
import os
import subprocess
import sys

import pytest
import torch

import moec
from moec import models
from moec.backends import triton_route
from moec.backends.torch_backend import route_math
from moec.backends.triton_experts import align_block_size
from moec.ops import experts_args, route_args

from conftest import TOL, rel_err
from test_ops import EXPERTS, ROUTERS, check_route, naive_experts

TRITON_ROUTERS = [r for r in ROUTERS if triton_route.supports(8, r.n_group, r.scoring) is None]


@pytest.mark.parametrize("r", TRITON_ROUTERS, ids=lambda r: r.describe())
@pytest.mark.parametrize("T,E", [(1, 8), (5, 8), (33, 8), (4, 64), (3, 6)])
def test_route_kernel(r, T, E):
    if r.n_group > 1 and triton_route.supports(E, r.n_group, r.scoring):
        pytest.skip("groups need power-of-two experts in the kernel")
    (x, W, sb), got = check_route(torch.ops.moec.triton_route, r, T, E)
    torch.testing.assert_close(got, route_math(x, W, None, sb, *route_args(r), num_experts=E))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_route_kernel_low_precision(dtype):
    """Low-precision logits can tie: compare the chosen scores, not the indices."""
    r = ROUTERS[0]
    x, W = torch.randn(9, 16).to(dtype), torch.randn(8, 16).to(dtype)
    logits, ids, w = torch.ops.moec.triton_route(x, W, None, None, *route_args(r))
    ref_logits, ref_ids, ref_w = route_math(x, W, None, None, *route_args(r), num_experts=8)
    torch.testing.assert_close(logits, ref_logits)
    scores = ref_logits.float().softmax(-1)
    torch.testing.assert_close(scores.gather(1, ids).sort(-1).values, scores.gather(1, ref_ids).sort(-1).values)
    torch.testing.assert_close(w.sort(-1).values, ref_w.sort(-1).values)


@pytest.mark.parametrize("n,E,block_m", [(1, 8, 16), (6, 8, 4), (40, 16, 16), (96, 4, 8), (7, 64, 16)])
def test_align_block_size(n, E, block_m):
    ids = torch.randint(0, E, (n,), dtype=torch.int32)
    sorted_ids, block_expert, n_padded = align_block_size(ids, E, block_m)
    counts = torch.bincount(ids.long(), minlength=E)
    padded = (counts + block_m - 1) // block_m * block_m
    assert n_padded.item() == padded.sum().item()
    live = sorted_ids[:n_padded.item()]
    real = live[live < n]
    assert sorted(real.tolist()) == list(range(n))  # every pair exactly once
    assert (sorted_ids[n_padded.item():] == n).all() and (live[live >= n] == n).all()  # the rest is the sentinel
    for b in range(n_padded.item() // block_m):  # each block holds one expert's pairs
        rows = live[b * block_m:(b + 1) * block_m]
        rows = rows[rows < n].long()
        assert rows.numel() > 0 and (ids[rows] == block_expert[b]).all()


@pytest.mark.parametrize("e", EXPERTS, ids=lambda e: e.describe())
@pytest.mark.parametrize("T,k", [(1, 1), (1, 2), (6, 2), (40, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_experts_kernel(e, T, k, dtype):
    E, H, I = e.num_experts, e.hidden, e.inter
    N1 = 2 * I if e.gated else I
    x = torch.randn(T, H).to(dtype)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])  # at small T some experts stay empty
    w = torch.rand(T, k)
    w13, w2 = (torch.randn(E, N1, H) / H**0.5).to(dtype), (torch.randn(E, H, I) / I**0.5).to(dtype)
    b13 = torch.randn(E, N1).to(dtype) if e.bias else None
    b2 = torch.randn(E, H).to(dtype) if e.bias else None
    args = (x, ids, w, w13, b13, w2, b2, *experts_args(e))
    got = torch.ops.moec.triton_experts(*args)
    assert got.dtype == dtype and got.shape == x.shape
    assert rel_err(got, naive_experts(x, ids, w, w13, b13, w2, b2, e)) < TOL[dtype]
    assert rel_err(got, torch.ops.moec.experts(*args)) < TOL[dtype]


def test_experts_kernel_reads_strided_weights():
    """Weights stored transposed (as GPT-OSS keeps them) are read in place, not copied."""
    e = EXPERTS[0]
    x, ids, w = torch.randn(5, 16), torch.randint(0, 8, (5, 2)), torch.rand(5, 2)
    w13 = torch.randn(8, 16, 48).transpose(1, 2)  # [E, N1, H] view, H contiguous-major
    w2 = torch.randn(8, 24, 16).transpose(1, 2)
    args = (x, ids, w, w13, None, w2, None, *experts_args(e))
    assert rel_err(torch.ops.moec.triton_experts(*args), torch.ops.moec.experts(*args)) < TOL[torch.float32]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_hf_end_to_end(family):
    model = models.tiny_model(family)
    ref = copy.deepcopy(model)
    moec.compile(model, backend="triton")
    report = moec.inspect(model)
    assert "lower_triton" in report.pipeline and report.blocks and not report.rejected
    stats = report.blocks[0].passes[-1]
    assert stats.name == "lower_triton" and stats.modified
    for T in (1, 7):
        inputs = {"input_ids": torch.randint(0, model.config.vocab_size, (2, T))}
        with torch.no_grad():
            assert rel_err(model(**inputs).logits, ref(**inputs).logits) < 1e-4


def test_backend_choice(monkeypatch):
    model = models.tiny_model("mixtral")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        moec.compile(copy.deepcopy(model), backend="triton")
    moec.compile(model)  # auto on CPU: torch
    assert moec.inspect(model).backend == "torch"


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu(arch):
    """Every kernel variant compiles to PTX/cubin for the GPU target (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "moec.backends.triton_aot", "--arch", str(arch)], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count(f"compiled sm_{arch}") >= 25
