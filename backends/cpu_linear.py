"""A compiled model's nn.Linear layers at few rows (decode) on CPU through moec's numba kernels
(`moec.compile(..., decode_linears=True)`, the default of the torch backend).

    y [..., N] = x [..., K] @ W [N, K]^T (+ b [N])          rows R = x.numel() / K

At 1-4 rows torch's GEMM streams W at 7-8 GB/s on the CPU machine (one thread works), where the kernels of
`cpu_quant` (the experts' decode kernels, one expert; threads split the output channels) stream it at
15-23: the attention, shared-expert and lm_head layers of a decode step, which are outside the experts op.
Each layer is checked once at install (the kernel against float64 on a random input; a layer that fails
keeps torch's GEMM) and then takes the kernel only where it computes what F.linear does:

    CPU; x and W of one dtype, fp32 at R <= 4 rows or bf16 at R = 1 (torch's bf16 GEMM wins above: oneDNN);
    plain tensors; nothing recorded by autograd; no tracing (torch.compile, torch.export, fake tensors, torch
    function or dispatch modes); torch threads >= 2 (as the experts op: a fork-safe process on one thread).

Every other call is F.linear. The layer keeps its class, parameters, state_dict and hooks (its `forward` is an
instance attribute, as for the compiled blocks); weights are read at each call, so they may change, move or
change dtype after compile.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from moec.bindings import tracing

MAX_ROWS = {torch.float32: 4, torch.bfloat16: 1}  # measured crossovers against torch's GEMM (docs/benchmarks.md)
_PLAIN = (torch.Tensor, nn.Parameter)


def _rows(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> int:
    """The rows the kernel takes for F.linear(x, w, b), or 0: this call runs F.linear."""
    if tracing() or torch.jit.is_tracing():  # first: torch.compile traces F.linear and nothing below
        return 0
    if (type(x) is not torch.Tensor or type(w) not in _PLAIN or (b is not None and type(b) not in _PLAIN)
            or x.device.type != "cpu" or w.device.type != "cpu" or x.dtype != w.dtype or w.dtype not in MAX_ROWS
            or w.dim() != 2 or x.dim() == 0 or x.shape[-1] != w.shape[1] or w.shape[1] == 0 or x.numel() == 0
            or not w.is_contiguous()):
        return 0
    if b is not None and (b.device.type != "cpu" or b.dtype != w.dtype or b.shape != (w.shape[0],)):
        return 0
    rows = x.numel() // w.shape[1]
    if rows > MAX_ROWS[w.dtype] or torch.get_num_threads() < 2:
        return 0
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return 0
    if torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():  # a mode sees F.linear
        return 0
    return rows


def _kernel(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x2 [R, K] @ w [N, K]^T (+ b) on the kernels -> [R, N] fp32."""
    from moec.backends import cpu_quant  # numba: imported at the first call, not by `import moec`

    cpu_quant.set_threads()
    y = cpu_quant.linear_rows(x2, w)
    if b is not None:
        y += b
    return y


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b), on moec's kernels where `_rows` allows."""
    rows = _rows(x, w, b)
    if not rows:
        return F.linear(x, w, b)
    return _kernel(x.reshape(rows, w.shape[1]), w, b).to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, module.weight, module.bias)


def installed(module: nn.Module) -> bool:
    fwd = module.__dict__.get("forward")
    return isinstance(fwd, functools.partial) and fwd.func is _forward


@torch.no_grad()
def _agrees(module: nn.Linear) -> bool:
    """The kernel on this layer's weights, at 1 and the most rows of a random input, against torch's F.linear: each
    output within 1e-5 of |x| |W[n]| (+ |b[n]|) (the two fp32 sums' orders), plus bf16's own rounding of each
    result. Layers the kernel will not see while they stay so (other devices or dtypes) pass."""
    w, b = module.weight, module.bias
    if w.device.type != "cpu" or w.dtype not in MAX_ROWS or w.dim() != 2 or w.shape[1] == 0 or not w.is_contiguous():
        return True
    g = torch.Generator().manual_seed(0)
    norms = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32)  # [N]
    for rows in {1, MAX_ROWS[w.dtype]}:
        x = torch.randn(rows, w.shape[1], generator=g, device="cpu").to(w.dtype)  # not a default device's
        got, ref = _kernel(x, w, b).to(w.dtype).float(), F.linear(x, w, b).float()
        bound = 1e-5 * (torch.linalg.vector_norm(x.float(), dim=1, keepdim=True) * norms
                        + (0 if b is None else b.float().abs()))
        if w.dtype != torch.float32:
            bound = bound + torch.finfo(w.dtype).eps * ref.abs()  # each side rounded once (half a step) to bf16
        if not bool(((got - ref).abs() <= bound).all()):
            return False
    return True


def install(model: nn.Module) -> tuple[int, list[str]]:
    """Give every nn.Linear of `model` (exactly nn.Linear's forward, no forward of its own yet) the kernels at
    decode. Returns (how many layers, the names of those whose check failed: they keep torch's GEMM). Nothing on
    one torch thread (the check would start numba's thread pool: see `_rows`)."""
    n, failed = 0, []
    if torch.get_num_threads() < 2:
        return n, failed
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or type(m).forward is not nn.Linear.forward or "forward" in m.__dict__:
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
