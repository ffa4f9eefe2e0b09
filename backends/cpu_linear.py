"""A compiled model's fp32 nn.Linear layers at few rows (decode) on CPU through moec's numba kernels
(`moec.compile(..., decode_linears=True)`, the default of the torch backend).

    y [..., N] = x [..., K] @ W [N, K]^T (+ b [N])          rows R = x.numel() / K <= MAX_ROWS

At 1-4 rows torch's fp32 GEMM streams W at 7-10 GB/s on the CPU machine, where the kernel of `cpu_quant` (the
experts' decode kernel on one expert; threads split the output channels) streams a large layer at up to 25: the
attention, shared-expert and lm_head layers of a decode step, outside the experts op. Measured one layer at a
time, weights from DRAM, 2 threads (docs/benchmarks.md): 1.3-2.7x torch from 512 x 512 (1 MB) up; below about
1 MB, or with fewer than 256 outputs, torch's ~10-17 us fixed cost beats the kernel's ~16-25, so such layers
are left alone (MIN_BYTES, MIN_OUT; 4 MB under OMP_WAIT_POLICY=PASSIVE, where each call wakes numba's
threads). bf16 is left to torch: its oneDNN GEMV (8-14 GB/s of bf16) matched or beat the kernel, whose widening
of each bf16 weight costs as much as reading it.
Each layer is checked once at install (the kernel against torch's F.linear on its weights; a layer that fails
keeps torch's GEMM) and then takes the kernel only where it computes what F.linear does:

    CPU; x and W fp32; plain tensors; nothing recorded by autograd, no forward-mode AD or torch.func transform,
    no autocast; no tracing (torch.compile, torch.export, fake tensors, torch function or dispatch modes);
    torch threads >= 2 (as the experts op: a fork-safe process on one thread).

Every other call is F.linear. The layer keeps its class, parameters, state_dict and hooks (its `forward` is an
instance attribute, as for the compiled blocks); weights are read at each call, so they may change, move or
change dtype after compile.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from moec.bindings import tracing

MAX_ROWS = 4  # fp32 rows up to which the kernel beat torch's GEMM (2-5x at 2-4 rows, 1-1.9x at 8)
MIN_BYTES, MIN_OUT = 1 << 20, 256  # smaller layers: torch's lower fixed cost wins (routers, gates, narrow k/v)
# OMP_WAIT_POLICY=PASSIVE: numba's threads sleep between calls and each call wakes them (~100 us): the kernel won
# only from a few MB (1.16x at 2.5-5 MB, 1.36x at 64 MB; 0.6-0.9x at 1-2 MB)
PASSIVE_MIN_BYTES = 4 << 20
_PLAIN = (torch.Tensor, nn.Parameter)


def _plain(t: torch.Tensor) -> bool:
    """A plain CPU tensor whose data the kernel may read: no subclass, functorch wrapper (vmap, jvp, grad),
    negative view."""
    return (type(t) in _PLAIN and t.device.type == "cpu" and not t.is_neg()
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def _large(w: torch.Tensor) -> bool:
    least = PASSIVE_MIN_BYTES if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" else MIN_BYTES
    return w.dim() == 2 and w.shape[0] >= MIN_OUT and w.numel() * w.element_size() >= least


def _rows(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> int:
    """The rows the kernel takes for F.linear(x, w, b), or 0: this call runs F.linear."""
    if tracing() or torch.jit.is_tracing():  # first: torch.compile traces F.linear and nothing below
        return 0
    if (not _plain(x) or not _plain(w) or (b is not None and not _plain(b)) or x.dtype != torch.float32
            or w.dtype != torch.float32 or not _large(w) or x.dim() == 0 or x.shape[-1] != w.shape[1]
            or x.numel() == 0 or not w.is_contiguous()):
        return 0
    if b is not None and (b.dtype != w.dtype or b.shape != (w.shape[0],)):
        return 0
    rows = x.numel() // w.shape[1]
    if rows > MAX_ROWS or torch.get_num_threads() < 2:
        return 0
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return 0
    return rows if values_only() else 0


def values_only() -> bool:
    """Whether a kernel that computes values only (C, numba) may stand for torch's ops: no forward-mode AD (tangents
    are torch's), no autocast (it picks the ops' dtypes: a dispatch key, not a mode), no torch function or dispatch
    mode (they see torch's ops)."""
    return not (torch.autograd.forward_ad._current_level >= 0 or torch.is_autocast_enabled("cpu")
                or torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack())


def _kernel(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x2 [R, K] @ w [N, K]^T (+ b) on the kernels -> [R, N] fp32."""
    from moec.backends import cpu_quant  # numba: imported at the first call, not by `import moec`

    cpu_quant.set_threads()
    y = cpu_quant.linear_rows(x2, w)
    if b is not None:
        y += b
    return y


def linear(input: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(input, w, b), on moec's kernels where `_rows` allows."""
    rows = _rows(input, w, b)
    if not rows:
        return F.linear(input, w, b)
    return _kernel(input.reshape(rows, w.shape[1]), w, b).to(input.dtype).reshape(*input.shape[:-1], w.shape[0])


def _forward(module: nn.Linear, input: torch.Tensor) -> torch.Tensor:  # nn.Linear.forward's signature
    return linear(input, module.weight, module.bias)


def installed(module: nn.Module) -> bool:
    fwd = module.__dict__.get("forward")
    return isinstance(fwd, functools.partial) and fwd.func is _forward


@torch.no_grad()
def _agrees(module: nn.Linear) -> bool:
    """The kernel on this layer's weights, at 1 and MAX_ROWS rows of a random input, against torch's F.linear: each
    output within 1e-5 of |x| |W[n]| (+ |b[n]|) (the two fp32 sums' orders). Layers the kernel will not see while
    they stay so (other dtypes, non-contiguous weights) pass."""
    w, b = module.weight, module.bias
    if w.dtype != torch.float32 or not _large(w) or not w.is_contiguous():
        return True
    g = torch.Generator().manual_seed(0)
    norms = torch.linalg.vector_norm(w, dim=1)  # [N]
    for rows in (1, MAX_ROWS):
        x = torch.randn(rows, w.shape[1], generator=g, device="cpu")  # not a default device's
        got, ref = _kernel(x, w, b), F.linear(x, w, b)
        bound = 1e-5 * (torch.linalg.vector_norm(x, dim=1, keepdim=True) * norms + (0 if b is None else b.abs()))
        if not bool(((got - ref).abs() <= bound).all()):
            return False
    return True


def unused(model: nn.Module) -> set[int]:
    """Submodules of compiled blocks that their graphs do not call (stacked experts, routers): they run only where
    the block runs its original forward (training, extra inputs)."""
    from moec.canonical import compiled_graph

    skip = set()
    for block in model.modules():
        gm = compiled_graph(block)
        if gm is None:
            continue
        shared = gm.meta["moe_spec"].shared
        called = [p for p in (shared.module, shared.gate) if p] if shared else []
        skip |= {id(m) for n, m in block.named_modules()
                 if n and not any(n == c or n.startswith(c + ".") for c in called)}
    return skip


def install(model: nn.Module) -> tuple[int, list[str]]:
    """Give the nn.Linear layers of `model` that run at decode (exactly nn.Linear's forward, fp32 on the CPU, large
    enough, not inside a compiled block unless its graph calls them) the kernel. Returns (how many
    layers have them, installed before included; the names of those whose check failed: they keep torch's GEMM).
    Nothing on one torch thread (the check would start numba's thread pool: see `_rows`)."""
    n, failed = 0, []
    if torch.get_num_threads() < 2:
        return n, failed
    skip = unused(model)
    for name, m in model.named_modules():
        if installed(m):
            n += 1
            continue
        if (not isinstance(m, nn.Linear) or type(m).forward is not nn.Linear.forward or "forward" in m.__dict__
                or id(m) in skip or m.weight.device.type != "cpu" or m.weight.dtype != torch.float32
                or not _large(m.weight)):
            continue
        if not _agrees(m):
            failed.append(name)
            continue
        m.forward = functools.partial(_forward, m)  # a partial of a module-level function: pickle stores it
        n += 1
    return n, failed


def uninstall(model: nn.Module) -> None:
    for m in model.modules():
        if installed(m):
            del m.__dict__["forward"]
