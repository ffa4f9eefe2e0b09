"""nn.Linear layers at decode on moec's CPU kernels (backends/cpu_linear.py, compile(decode_linears=True)):
the kernel against float64, the calls it must leave to torch, and a compiled model's linears through its life
(weights changed, dtype changed, pickled, copied, trained, saved and loaded)."""

import copy
import pickle
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import moec
from moec import models
from moec.backends import cpu_linear, cpu_quant
from conftest import TOL, rel_err


@pytest.fixture(autouse=True)
def _two_threads(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the kernels need 2 threads (fork safety)
    monkeypatch.setattr(cpu_linear, "MIN_BYTES", 0)  # the tiny models' layers too (see test_small_layers_...)
    monkeypatch.setattr(cpu_linear, "MIN_OUT", 0)
    monkeypatch.setattr(cpu_linear, "PASSIVE_MIN_BYTES", 0)
    yield
    torch.set_num_threads(threads)


def _spy():
    return mock.patch.object(cpu_quant, "linear_rows", side_effect=cpu_quant.linear_rows)


@pytest.mark.parametrize("N,K", [(1, 37), (33, 64), (100, 512)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_linear_matches_float64(N, K, bias, scale):
    """1 to MAX_ROWS rows (also as a 3-D batch and a strided view) on the kernel, one row more on torch's GEMM; each
    within fp32 rounding of float64."""
    w = torch.randn(N, K) * scale
    b = torch.randn(N) * scale if bias else None
    most = cpu_linear.MAX_ROWS
    for rows, shape in [(r, (r, K)) for r in range(1, most + 1)] + [(most, (1, most, K)), (most + 1, (most + 1, K))]:
        x = torch.randn(*shape[:-1], 2 * K)[..., ::2] * scale  # a strided view
        with _spy() as kernel, torch.no_grad():
            got = cpu_linear.linear(x, w, b)
        assert kernel.called == (rows <= most)
        ref = x.double() @ w.double().T + (0 if b is None else b.double())
        bound = 1e-5 * (x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs()))
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert ((got.double() - ref).abs() <= bound).all()


def test_linear_steps_aside():
    """Autograd recording (gradients are torch's), forward-mode AD and torch.func transforms (tangents, batches),
    autocast (its dtype), negative views, one thread, fake tensors, dispatch modes, other dtypes or devices and
    mismatched shapes all run F.linear; the kernel is never called."""
    w, b = torch.randn(8, 16), torch.randn(8)
    x = torch.randn(1, 16)

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with _spy() as kernel:
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        cpu_linear.linear(xg, wg, b).square().sum().backward()
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        F.linear(xr, wr, b).square().sum().backward()
        assert torch.equal(xg.grad, xr.grad) and torch.equal(wg.grad, wr.grad)
        with Seen():
            cpu_linear.linear(x, w, b)
        import torch.autograd.forward_ad as fwAD

        t = torch.randn_like(x)
        with torch.no_grad(), fwAD.dual_level():
            tangent = fwAD.unpack_dual(cpu_linear.linear(fwAD.make_dual(x, t), w, b)).tangent
        assert torch.equal(tangent, F.linear(t, w))
        with torch.no_grad():
            assert torch.equal(torch.func.jvp(lambda v: cpu_linear.linear(v, w, b), (x,), (t,))[1], F.linear(t, w))
            xs = torch.randn(3, 1, 16)
            assert torch.equal(torch.func.vmap(lambda v: cpu_linear.linear(v, w, b))(xs), F.linear(xs, w, b))
            with torch.autocast("cpu", torch.bfloat16):
                assert cpu_linear.linear(x, w, b).dtype == torch.bfloat16
            assert torch.equal(cpu_linear.linear(torch._neg_view(x), w, b), F.linear(-x, w, b))
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as fake:
            assert cpu_linear.linear(fake.from_tensor(x), fake.from_tensor(w)).shape == (1, 8)
        cpu_linear.linear(x.half(), w.half())
        cpu_linear.linear(x.bfloat16(), w.bfloat16())
        cpu_linear.linear(x.double(), w.double())
        cpu_linear.linear(x, w.T.contiguous().T)  # not contiguous
        cpu_linear.linear(x.to("meta"), w.to("meta"))
        with pytest.raises(RuntimeError):
            cpu_linear.linear(torch.randn(1, 15), w)  # torch's own error
        torch.set_num_threads(1)
        cpu_linear.linear(x, w, b)
        assert not kernel.called


def _qwen2_moe():
    return models.tiny_model("qwen2_moe")  # shared expert (and its gate), q/k/v with biases


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_compiled_model_runs_its_linears_on_the_kernel():
    """compile installs the kernel on every plain nn.Linear (attention, shared expert, lm_head) and the logits, at one
    token and over a prompt, and the greedy tokens stay the original's; decode_linears=False installs none."""
    ref = _qwen2_moe()
    model = moec.compile(copy.deepcopy(ref))
    n = moec.inspect(model).decode_linears
    assert n == sum(cpu_linear.installed(m) for m in model.modules()) > 0
    assert cpu_linear.installed(model.lm_head) and cpu_linear.installed(model.model.layers[0].self_attn.q_proj)
    assert "nn.Linear layers on moec's CPU kernel" in str(moec.inspect(model))
    ids = models.example_inputs(ref, seq=6)["input_ids"]
    with _spy() as kernel:
        assert rel_err(_logits(model, ids[:, :1]), _logits(ref, ids[:, :1])) < TOL[torch.float32]
        assert kernel.call_count >= n  # every installed layer ran on it
    assert rel_err(_logits(model, ids), _logits(ref, ids)) < TOL[torch.float32]
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                           ref.generate(ids, max_new_tokens=8, do_sample=False))
    assert torch.equal(model.lm_head(input=torch.ones(1, ref.config.hidden_size)),
                       ref.lm_head(input=torch.ones(1, ref.config.hidden_size)))  # nn.Linear's keyword
    off = moec.compile(copy.deepcopy(ref), decode_linears=False)
    assert moec.inspect(off).decode_linears is None and not any(cpu_linear.installed(m) for m in off.modules())
    assert moec.inspect(moec.compile(model)).decode_linears == n  # compiled again: the same layers, counted
    moec.compile(model, decode_linears=False)  # compiled again without them: removed
    assert moec.inspect(model).decode_linears is None and not any(cpu_linear.installed(m) for m in model.modules())


def test_small_layers_and_unused_expert_layers_keep_torch(monkeypatch):
    """Layers under MIN_BYTES or MIN_OUT (routers, gates: torch's fixed cost is lower), and the expert layers of a
    compiled block (its graph runs stacked copies; they run only in the original forward, e.g. training) are left
    alone."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    model = _qwen2_moe()
    biggest = max(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))  # lm_head's
    monkeypatch.setattr(cpu_linear, "MIN_BYTES", biggest)
    moec.compile(model)
    assert [n for n, m in model.named_modules() if cpu_linear.installed(m)] == ["lm_head"]
    monkeypatch.setattr(cpu_linear, "PASSIVE_MIN_BYTES", biggest + 1)  # threads that sleep between calls: more
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert not any(cpu_linear.installed(m) for m in moec.compile(_qwen2_moe()).modules())
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(cpu_linear, "MIN_BYTES", 0)
    model = moec.compile(models.tiny_model("switch_transformers"))
    assert moec.inspect(model).blocks
    names = [n for n, m in model.named_modules() if cpu_linear.installed(m)]
    assert names and not any(".mlp.experts." in n or ".mlp.router." in n for n in names)
    assert any(".mlp.experts." in n and isinstance(m, torch.nn.Linear) for n, m in model.named_modules())


def test_compiled_linears_follow_the_model():
    """New weights loaded after compile, the model in bf16, a pickled and a deep copy, and train() with gradients:
    the compiled model gives what the original gives in each."""
    ref = _qwen2_moe()
    model = moec.compile(copy.deepcopy(ref))
    ids = models.example_inputs(ref, seq=1)["input_ids"]
    new = {k: torch.randn_like(v) * 0.05 for k, v in ref.state_dict().items()}
    ref.load_state_dict(new)
    model.load_state_dict(new)
    assert rel_err(_logits(model, ids), _logits(ref, ids)) < TOL[torch.float32]
    for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert copied.lm_head.forward.args[0] is copied.lm_head  # the copy's own layer, not the original's
        assert torch.equal(_logits(copied, ids), _logits(model, ids))
    model.train()
    ref.train()
    model(ids).logits.square().mean().backward()
    ref(ids).logits.square().mean().backward()
    assert rel_err(model.lm_head.weight.grad, ref.lm_head.weight.grad) < TOL[torch.float32]
    model.eval().to(torch.bfloat16)
    ref.eval().to(torch.bfloat16)
    with _spy() as kernel:  # bf16 layers run torch's GEMM
        assert rel_err(_logits(model, ids), _logits(ref, ids)) < TOL[torch.bfloat16]
        assert not kernel.called


def test_save_and_load_keep_the_choice(tmp_path):
    for on in (True, False):
        model = moec.compile(_qwen2_moe(), decode_linears=on)
        moec.save(model, str(tmp_path / "m.safetensors"))
        loaded = moec.load(_qwen2_moe(), str(tmp_path / "m.safetensors"))
        assert cpu_linear.installed(loaded.lm_head) == on


def test_a_layer_the_kernel_does_not_match_keeps_torch():
    """The install check runs the kernel on each layer's weights: a kernel that computes something else (here: one
    output off by 1e-3 of its scale) is not installed, with a warning naming the layers."""
    real = cpu_quant.linear_rows

    def off(x, w):
        y = real(x, w)
        y[:, 0] += 1e-3 * x.float().norm(dim=1) * w[0].float().norm()
        return y

    with mock.patch.object(cpu_quant, "linear_rows", side_effect=off), pytest.warns(UserWarning, match="keep torch"):
        model = moec.compile(_qwen2_moe())
    assert moec.inspect(model).decode_linears == 0 and not cpu_linear.installed(model.lm_head)


def test_no_moe_no_linears():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="no MoE block"):
        moec.compile(model)
    assert not cpu_linear.installed(model[0])


def test_decode_linears_must_be_a_bool():
    with pytest.raises(TypeError, match="decode_linears must be True or False"):
        moec.compile(_qwen2_moe(), decode_linears="yes")
