"""Hand-written MoE blocks in many styles (tests/handwritten.py): detection and parity; look-alikes untouched."""

import copy
import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import handwritten as hw
import moec

from conftest import TOL, rel_err


def _check_parity(block, ref, hidden, dtype=torch.float32):
    for shape in [(1, 1, hidden), (2, 5, hidden), (1, 23, hidden)]:
        x = torch.randn(shape).to(dtype)
        with torch.no_grad():
            got, want = block(x), ref(x)
        if isinstance(want, tuple):
            assert isinstance(got, tuple) and len(got) == len(want)
            for g, w in zip(got[1:], want[1:]):
                torch.testing.assert_close(g, w)
            got, want = got[0], want[0]
        assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("name", list(hw.PRESETS))
def test_preset(name):
    spec = hw.PRESETS[name]
    block = hw.make_block(spec)
    ref = copy.deepcopy(block)
    moec.compile(block)
    report = moec.inspect(block)
    assert [b.path for b in report.blocks] == [""] and not report.rejected, report
    b = report.blocks[0]
    assert (b.num_experts, b.top_k) == (spec.num_experts, spec.top_k)
    assert (b.shared != "-") == (spec.shared != "none")
    _check_parity(block, ref, spec.hidden)


@pytest.mark.parametrize("name", list(hw.LOOKALIKES))
def test_lookalike_left_alone(name):
    m = hw.LOOKALIKES[name](32)
    ref = copy.deepcopy(m)
    with pytest.warns(UserWarning, match="no MoE block rewritten"):
        moec.compile(m)
    assert not moec.inspect(m).blocks
    x = torch.randn(2, 5, 32)
    assert torch.equal(m(x), ref(x))


def test_blocks_inside_a_model():
    spec = hw.PRESETS["deepseek_v3_groups"]
    lm = hw.TinyLM(vocab=64, hidden=spec.hidden, n_layers=2, block_fn=lambda: hw.make_block(spec))
    ref = copy.deepcopy(lm)
    moec.compile(lm)
    assert len(moec.inspect(lm).blocks) == 2
    ids = torch.randint(0, 64, (2, 7))
    assert rel_err(lm(ids), ref(ids)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["mixtral_loop", "deepseek_v3_groups", "sorted_interleaved", "biased_gelu_experts"])
def test_low_precision(name, dtype):
    block = hw.make_block(hw.PRESETS[name]).to(dtype)
    ref = copy.deepcopy(block)
    moec.compile(block)
    assert moec.inspect(block).blocks
    _check_parity(block, ref, hw.PRESETS[name].hidden, dtype)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=hw.specs(), tokens=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_random_blocks(spec, tokens, seed):
    """Any valid random MoE block is detected with its E and k, and matches the original."""
    block = hw.make_block(spec, seed=seed)
    ref = copy.deepcopy(block)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "no MoE block rewritten" would fail the example
        moec.compile(block)
    report = moec.inspect(block)
    assert len(report.blocks) == 1, report
    assert (report.blocks[0].num_experts, report.blocks[0].top_k) == (spec.num_experts, spec.top_k)
    x = torch.randn(1, tokens, spec.hidden)
    with torch.no_grad():
        got, want = block(x), ref(x)
    got, want = (got[0], want[0]) if isinstance(want, tuple) else (got, want)
    assert rel_err(got, want) < TOL[torch.float32]
