"""The Triton backend: every kernel under TRITON_INTERPRET=1 (CI has no GPU) against the torch
backend and the naive references, compile-only for sm_80/sm_90, and end to end on HF models.
On a GPU machine, MOEC_TEST_DEVICE=cuda runs them on the GPU (benchmarks/gpu_session.sh)."""

import copy
import os
import subprocess
import sys

import pytest
import torch

import moec
from moec import models
from moec.canonical import resolve
from moec.backends.triton_experts import align_block_size
from moec.ir import ExpertsSpec
from moec.ops import experts_args
from moec.quant import Int4Experts, Int8Experts, dequantize, quantize

from conftest import TOL, rel_err
from test_ops import EXPERTS, naive_experts
from test_quant import _quantized_experts

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


QCONFIGS = [Int8Experts(), Int4Experts(32), Int4Experts(32, symmetric=False), Int4Experts(128),
            Int4Experts(128, symmetric=False), Int4Experts(32, signed_scale=True)]
QSPECS = [ExpertsSpec(4, 128, 128, "silu"), ExpertsSpec(4, 128, 128, "swiglu_oai", bias=True, alpha=1.702, limit=7.0),
          ExpertsSpec(4, 128, 128, "gelu", gated=False, bias=True)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# every format with every expert style and every dtype, and every style with every dtype (a Latin square:
# the full product would cost minutes in the interpreter)
QCASES = [(c, QSPECS[j], DTYPES[(i + j) % 3]) for i, c in enumerate(QCONFIGS) for j in range(3)]


def _triton_quantized(cfg, x, ids, w, t13, b13, t2, b2, e):
    if cfg.bits == 8:
        return torch.ops.moec.triton_experts_int8(x, ids, w, t13["q"], t13["scale"], b13, t2["q"], t2["scale"], b2,
                                                  *experts_args(e))
    return torch.ops.moec.triton_experts_int4(x, ids, w, t13["q"], t13["scale"], t13.get("zero"), b13, t2["q"],
                                              t2["scale"], t2.get("zero"), b2, cfg.group_size, *experts_args(e))


@pytest.mark.parametrize("cfg,e,dtype", QCASES, ids=[f"{c.describe()}-{e.describe()}-{d}" for c, e, d in QCASES])
def test_quantized_experts_kernel(cfg, e, dtype):
    """The int8/int4 kernels against the naive loop on dequantized weights and the torch backend's kernels."""
    E, H, I = e.num_experts, e.hidden, e.inter
    N1 = 2 * I if e.gated else I
    t13, t2 = quantize(cfg, torch.randn(E, N1, H) / H**0.5), quantize(cfg, torch.randn(E, H, I) / I**0.5)
    b13 = torch.randn(E, N1).to(dtype) if e.bias else None
    b2 = torch.randn(E, H).to(dtype) if e.bias else None
    for T, k in [(1, 2), (12, 3)]:  # one token leaves experts empty
        x = torch.randn(T, H).to(dtype)
        ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
        w = torch.rand(T, k)
        got = _triton_quantized(cfg, x, ids, w, t13, b13, t2, b2, e)
        assert got.dtype == dtype and got.shape == x.shape
        ref = naive_experts(x, ids, w, dequantize(cfg, t13, dtype), b13, dequantize(cfg, t2, dtype), b2, e)
        assert rel_err(got, ref) < TOL[dtype]
        if x.device.type == "cpu":  # the torch backend's quantized kernels are CPU kernels
            assert rel_err(got, _quantized_experts(cfg, x, ids, w, t13, b13, t2, b2, e)) < TOL[dtype]


def test_quantized_kernel_refuses_other_layouts():
    e, cfg = QSPECS[0], Int4Experts(32)
    t13, t2 = quantize(cfg, torch.randn(4, 256, 128)), quantize(cfg, torch.randn(4, 128, 128))
    x, ids, w = torch.randn(2, 128), torch.randint(0, 4, (2, 2)), torch.rand(2, 2)
    with pytest.raises(ValueError, match="w13 is not in moec's int4 format for group size 64"):
        torch.ops.moec.triton_experts_int4(x, ids, w, t13["q"], t13["scale"], None, None, t2["q"], t2["scale"], None,
                                           None, 64, *experts_args(e))


@pytest.mark.parametrize("cfg", [Int4Experts(32), Int8Experts()], ids=lambda c: c.describe())
def test_hf_quantized_end_to_end(cfg):
    """compile(backend="triton", quantize=...) equals the torch backend's quantized model."""
    model = models.tiny_model("mixtral", hidden_size=64, intermediate_size=64)
    ours = moec.compile(copy.deepcopy(model), backend="triton", quantize=cfg)
    with torch.device("cpu"):  # the torch backend's quantized kernels: CPU (also under MOEC_TEST_DEVICE=cuda)
        ref = moec.compile(copy.deepcopy(model).cpu(), backend="torch", quantize=cfg)
    stats = moec.inspect(ours).blocks[0].passes[-1]
    assert stats.name == "lower_triton" and stats.modified
    kernel = f"triton_experts_int{cfg.bits}"
    assert all(kernel in resolve(ours, b.path).__dict__["_moec_graph"].code for b in moec.inspect(ours).blocks)
    inputs = models.example_inputs(model, batch=2, seq=5)
    with torch.no_grad():
        got = ours(**{k: v.to(model.device) for k, v in inputs.items()}).logits.cpu()
        with torch.device("cpu"):
            want = ref(**inputs).logits
        assert rel_err(got, want) < 1e-4


def test_int4_in_the_torch_backend_off_the_cpu_is_refused():
    model = models.tiny_model("mixtral").to("meta")  # any device but the CPU
    with pytest.raises(NotImplementedError, match="CPU only .*use backend='triton'"):
        moec.compile(model, backend="torch", quantize=Int4Experts(32))


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


@pytest.mark.parametrize("quantize", [None, Int8Experts()])
def test_zero_compute_experts(quantize):
    """A block with zero-compute experts (LongCat-Flash): the kernels run the weight-0 pairs that stand in for them."""
    from test_generality import ZeroComputeExperts

    torch.manual_seed(0)
    block = ZeroComputeExperts("stacked").eval()
    ref = copy.deepcopy(block) if quantize is None else moec.compile(copy.deepcopy(block), quantize=quantize)
    moec.compile(block, backend="triton", quantize=quantize)
    assert moec.inspect(block).blocks[0].passes[-1].name == "lower_triton"
    with torch.no_grad():
        for T in (1, 7):
            x = torch.randn(T, 32)
            assert rel_err(block(x), ref(x)) < 1e-4


def test_backend_choice(monkeypatch):
    model = models.tiny_model("mixtral")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        moec.compile(copy.deepcopy(model), backend="triton")
    moec.compile(model)  # auto on CPU: torch
    assert moec.inspect(model).backend == "torch"


@pytest.mark.parametrize("arch", [pytest.param(80, marks=pytest.mark.slow), 90])  # H100/H200 are sm_90
def test_kernels_compile_for_gpu(arch):
    """Every kernel variant compiles to PTX/cubin for the GPU target (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "moec.backends.triton_aot", "--arch", str(arch)], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count(f"compiled sm_{arch}") >= 32
    for quantized in ("gemm1[bf16,w8,", "gemm2[bf16,w4g128,", "gemm1[bf16,w4g32,zero,", "gemm2[fp16,w4g128,"):
        assert f"compiled sm_{arch} {quantized}" in run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter smoke modes are for CPU machines (on a GPU "
                                                       "benchmarks/gpu_session.sh runs the scripts themselves)")
def test_gpu_scripts_run(tmp_path):
    """The GPU scripts (run only when a GPU is lent) stay runnable: their smoke modes under the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(__file__))
    for cmd in (["benchmarks/tune_triton.py", "--shapes", "tiny", "--tokens", "1", "--all", "--space", "fast",
                 "--out", str(tmp_path)],
                ["benchmarks/bench_triton.py", "--shapes", "tiny", "--tokens", "1", "--quantized", "--no-torch-compile"]):
        run = subprocess.run([sys.executable, *cmd], cwd=root, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]


def test_tuned_tiles_serve_nearby_token_counts_only(tmp_path, monkeypatch):
    """A tuned file's entry serves token counts within 4x of its own; further away, and for shapes it lacks, the
    heuristic (a file tuned at 1 token made 4096-token calls run 1-token tiles: 2.7x slower on an H200)."""
    import json

    from moec.backends import triton_config as tc

    dev = torch.device("cpu")
    tuned = tc.Config(16, 32, 32, 2, 2)
    key = tc.shape_key(8, 128, 64, 2, torch.bfloat16)
    (tmp_path / tc.file_name(tc.device_name(dev))).write_text(json.dumps({key: {"1": vars(tuned)}}))
    monkeypatch.setenv("MOEC_TRITON_CONFIGS", str(tmp_path))
    tc._tuned.cache_clear()
    try:
        for T in (1, 3, 4):
            assert tc.config_for(T, 8, 128, 64, 2, torch.bfloat16, dev) == tuned
        for T in (5, 4096):
            assert tc.config_for(T, 8, 128, 64, 2, torch.bfloat16, dev) == tc.heuristic(T, 8, 2, torch.bfloat16, dev)
        assert tc.config_for(1, 8, 128, 64, 2, torch.float16, dev) == tc.heuristic(1, 8, 2, torch.float16, dev)
    finally:
        tc._tuned.cache_clear()
