"""Complex tensors as pairs of real ones while a model is traced for ONNX, which has no complex type.

Rotary embeddings written with complex numbers (DeepSeek-V2, Llama 4) do

    freqs_cis = torch.polar(ones, angle)                      # complex [B, S, D/2]
    x_ = torch.view_as_complex(x.float().reshape(..., -1, 2))  # complex [B, S, H, D/2]
    out = torch.view_as_real(x_ * freqs_cis[:, :, None, :]).flatten(3)   # real [B, S, H, D]

Inside `as_real_pairs()`, torch.polar and torch.view_as_complex return a `Pair` (real part, imaginary part: two
real tensors of the complex shape); multiplication and shape ops on it act on both parts, and torch.view_as_real
stacks them back into the real [..., 2] tensor. The traced graph holds only real ops, computing the same
products (a complex multiply is (ac - bd) + (ad + bc)i either way). Any other use of a Pair raises
NotImplementedError naming the op, so an export never carries a silently wrong complex computation.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods that only move or reshape elements: applied to both parts alike.
_SHAPE_METHODS = {"unsqueeze", "squeeze", "to", "view", "reshape", "expand", "transpose", "permute", "contiguous",
                  "repeat", "flip", "narrow", "clone", "detach"}


class Pair:
    """A complex tensor as its real and imaginary parts (real tensors of the same shape)."""

    def __init__(self, real: torch.Tensor, imag: torch.Tensor):
        self.real, self.imag = real, imag

    @property
    def shape(self) -> torch.Size:
        return self.real.shape

    @property
    def device(self) -> torch.device:
        return self.real.device

    def __getattr__(self, name: str):
        if name in _SHAPE_METHODS:
            return lambda *args, **kwargs: Pair(getattr(self.real, name)(*args, **kwargs),
                                                getattr(self.imag, name)(*args, **kwargs))
        raise NotImplementedError(f"moec.export_onnx: complex tensor method {name!r} has no real form in moec's "
                                  f"export (ONNX has no complex type)")

    def __getitem__(self, index):
        return Pair(self.real[index], self.imag[index])

    def __mul__(self, other):
        if isinstance(other, Pair):
            return Pair(self.real * other.real - self.imag * other.imag,
                        self.real * other.imag + self.imag * other.real)
        if isinstance(other, torch.Tensor) and other.is_complex():
            raise NotImplementedError("moec.export_onnx: a complex tensor made outside torch.polar/view_as_complex")
        return Pair(self.real * other, self.imag * other)

    __rmul__ = __mul__

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"moec.export_onnx: {getattr(func, '__name__', func)} on a complex tensor has no "
                                  f"real form in moec's export (ONNX has no complex type)")


_MULTIPLY = (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__)


class _AsRealPairs(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.polar:
            magnitude, angle = args
            return Pair(magnitude * torch.cos(angle), magnitude * torch.sin(angle))
        if func is torch.view_as_complex:
            (x,) = args
            return Pair(x[..., 0], x[..., 1])
        if func is torch.view_as_real and isinstance(args[0], Pair):
            return torch.stack([args[0].real, args[0].imag], dim=-1)
        if func in _MULTIPLY and any(isinstance(a, Pair) for a in args):  # real tensor * complex
            return args[1] * args[0]
        return func(*args, **kwargs)


@contextlib.contextmanager
def as_real_pairs():
    """Complex numbers from torch.polar / torch.view_as_complex as real pairs until view_as_real (module doc)."""
    with _AsRealPairs():
        yield
