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
MIN_BYTES = 256 << 10  # smaller weights: F.linear's ~5 us beat the kernel's fixed cost (routers, gates)
_PLAIN = (torch.Tensor, nn.Parameter)


def _plain(t: torch.Tensor) -> bool:
    """A plain CPU tensor whose data the kernel may read: no subclass, functorch wrapper (vmap, jvp, grad),
    negative view."""
    return (type(t) in _PLAIN and t.device.type == "cpu" and not t.is_neg()
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def _rows(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> int:
    """The rows the kernel takes for F.linear(x, w, b), or 0: this call runs F.linear."""
    if tracing() or torch.jit.is_tracing():  # first: torch.compile traces F.linear and nothing below
        return 0
    if (not _plain(x) or not _plain(w) or (b is not None and not _plain(b)) or x.dtype != w.dtype
            or w.dtype not in MAX_ROWS or w.dim() != 2 or x.dim() == 0 or x.shape[-1] != w.shape[1]
            or x.numel() == 0 or not w.is_contiguous() or w.numel() * w.element_size() < MIN_BYTES):
        return 0
    if b is not None and (b.dtype != w.dtype or b.shape != (w.shape[0],)):
        return 0
    rows = x.numel() // w.shape[1]
    if rows > MAX_ROWS[w.dtype] or torch.get_num_threads() < 2:
        return 0
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return 0
    if (torch.autograd.forward_ad._current_level >= 0  # forward-mode AD: tangents are torch's
            or torch.is_autocast_enabled("cpu")  # autocast picks F.linear's dtype (a dispatch key, not a mode)
            or torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack()):  # modes see F.linear
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
    """The kernel on this layer's weights, at 1 and the most rows of a random input, against torch's F.linear: each
    output within 1e-5 of |x| |W[n]| (+ |b[n]|) (the two fp32 sums' orders), plus bf16's own rounding of each
    result. Layers the kernel will not see while they stay so (other devices or dtypes) pass."""
    w, b = module.weight, module.bias
    if w.dtype not in MAX_ROWS or w.dim() != 2 or w.shape[1] == 0 or not w.is_contiguous():
        return True
    g = torch.Generator().manual_seed(0)
    norms = torch.cat([torch.linalg.vector_norm(w[i:i + 4096].float(), dim=1)  # [N], 4096 rows at a time in fp32
                       for i in range(0, w.shape[0], 4096)])
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


def _unused(model: nn.Module) -> set[int]:
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
    """Give the nn.Linear layers of `model` that run at decode (exactly nn.Linear's forward, on the CPU, not inside
    a compiled block unless its graph calls them, at least MIN_BYTES of weights) the kernels. Returns (how many
    layers have them, installed before included; the names of those whose check failed: they keep torch's GEMM).
    Nothing on one torch thread (the check would start numba's thread pool: see `_rows`)."""
    n, failed = 0, []
    if torch.get_num_threads() < 2:
        return n, failed
    unused = _unused(model)
    for name, m in model.named_modules():
        if installed(m):
            n += 1
            continue
        if (not isinstance(m, nn.Linear) or type(m).forward is not nn.Linear.forward or "forward" in m.__dict__
                or id(m) in unused or m.weight.device.type != "cpu"
                or m.weight.numel() * m.weight.element_size() < MIN_BYTES):
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
