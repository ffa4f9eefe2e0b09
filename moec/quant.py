"""Weight-only quantization of expert weights: the configs and moec's storage format.

Expert matrices are [E, N, K] (canonical W13 [E, N1, H] and W2 [E, H, I]; K is the input dim).

    Int8Experts():  q int8 [E, N, K], scale fp32 [E, N]          w ~ q * scale   (per output channel, symmetric)
    Int4Experts(g): q uint8 [E, N, K/2] (two nibbles a byte: k even in the low nibble),
                    scale fp32 [E, N, K/g] (fp16 numbers: _fp16),
                    zero uint8 [E, N, K/g] (asymmetric only)
                    w ~ (q - 8) * scale (symmetric)  or  (q - zero) * scale (asymmetric)

FORMAT_VERSION names this layout in saved files.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

FORMAT_VERSION = 1


def _extras(cfg) -> str:
    return (" +shared" if cfg.shared else "") + (" +router" if cfg.router else "")


def _check_fields(cfg, *names) -> None:
    """The boolean fields `names` are bools, and activations is "fp32" or "int8"."""
    for name in names:
        if not isinstance(getattr(cfg, name), bool):
            raise TypeError(f"{type(cfg).__name__}.{name} must be True or False, not {getattr(cfg, name)!r}")
    if cfg.activations not in ("fp32", "int8"):
        raise ValueError(f"{type(cfg).__name__}.activations must be 'fp32' or 'int8', not {cfg.activations!r}")


def _a8(cfg) -> str:
    return " a8" if cfg.activations == "int8" else ""


@dataclass(frozen=True)
class Int8Experts:
    """int8 weight-only experts, one scale per output channel. shared=True quantizes the shared
    experts' linear layers the same way (torch backend, CPU); router=True the router weight.
    activations="int8": each expert GEMM's input rows rounded to int8 (scale amax/127, round to nearest) and
    multiplied with the int8 weights. The torch backend (CPU): a scale per row, so that an expert with many rows
    (prefill) runs one int8 GEMM with int32 sums (torch._int_mm: oneDNN, where the CPU has VNNI; else fp32 GEMMs of
    1024 inputs at a time, exact: the same sums); few rows run
    moec's kernels on the rounded rows (fp32 sums of the integer products: exact below 2^24). backend="onnxruntime"
    on a CPU with AVX512-VNNI: the same, in moec's kernels inside the session (backends/ort_kernels.py; the dense
    layers of dense= too). ONNX files (export_onnx/export_genai), and the session elsewhere: a scale per group of 32
    inputs (ORT's block-wise 8-bit QMoE, each channel's scale repeated per block: the same weights), numbers apart
    from the per-row ones by the rounding."""

    shared: bool = False
    router: bool = False
    activations: str = "fp32"
    bits = 8

    def __post_init__(self):
        _check_fields(self, "shared", "router")

    def describe(self) -> str:
        return "int8 per-channel" + _a8(self) + _extras(self)


@dataclass(frozen=True)
class Int4Experts:
    """int4 weight-only experts, one scale (and zero point if asymmetric) per group of inputs.

    Symmetric groups dequantize as (q - 8) * scale, q in 0..15. signed_scale=True (ORT's and llama.cpp's Q4_0
    grid) makes the group's largest-magnitude weight -8 steps (scale = that weight / -8, of its sign), so all 16
    levels are used at a step of amax/8; False spends 15 levels at a step of amax/7. Either step is then made an
    fp16 number (`_fp16`), as llama.cpp's and ORT's scales are stored.

    activations="int8" (backend="onnxruntime", moec.export_onnx/export_genai, or the torch backend, on CPU): each
    expert GEMM quantizes its input rows to int8 per group of `group_size` inputs (scale amax/127, round to
    nearest) and runs int8 dot products (ORT's QMoE accuracy_level=4; on the torch backend moec's C kernel,
    backends/cpu_native; both AVX512-VNNI where the CPU has it). The two backends round alike.
    An approximation on top of the weights' (docs/quality.md); the default "fp32" is weight-only."""

    group_size: int = 128
    symmetric: bool = True
    shared: bool = False  # also the shared experts' linear layers (torch backend, CPU)
    router: bool = False  # also the router weight [E, H] (dequantized in the graph; any backend)
    signed_scale: bool = False  # symmetric only: the 16-level grid above
    activations: str = "fp32"  # or "int8": see above
    bits = 4

    def __post_init__(self):
        if type(self.group_size) is not int or self.group_size not in (32, 64, 128):
            raise ValueError(f"Int4Experts.group_size must be 32, 64 or 128 (an int), not {self.group_size!r}")
        _check_fields(self, "symmetric", "shared", "router", "signed_scale")
        if self.signed_scale and not self.symmetric:
            raise ValueError("Int4Experts(signed_scale=True) is a symmetric grid: drop symmetric=False")

    def describe(self) -> str:
        grid = "sym16" if self.signed_scale else "sym" if self.symmetric else "asym"
        return f"int4 g{self.group_size} {grid}" + _a8(self) + _extras(self)


QuantConfig = Int8Experts | Int4Experts


def activation_group(cfg: QuantConfig) -> int:
    """The inputs that share one int8 scale under activations="int8" (ORT's block size)."""
    return getattr(cfg, "group_size", 32)


def check_shape(cfg: QuantConfig, w: torch.Tensor, what: str) -> None:
    """Raise ValueError naming `what` when w [E, N, K] cannot take this format."""
    if isinstance(cfg, Int4Experts) and w.shape[-1] % cfg.group_size:
        raise ValueError(f"{what}: input dim {w.shape[-1]} is not a multiple of the int4 group size "
                         f"{cfg.group_size} (use a group size that divides it, or Int8Experts)")
    if cfg.activations == "int8" and w.shape[-1] % activation_group(cfg):
        raise ValueError(f"{what}: input dim {w.shape[-1]} is not a multiple of {activation_group(cfg)}, the group "
                         f"of inputs int8 activations share a scale in (use activations='fp32')")


def _fp16(scale: torch.Tensor) -> torch.Tensor:
    """int4 steps made the next fp16 number away from zero (|s| up to 65504; others as they are): the CPU kernels can
    then store the groups' scales in fp16 (ort_layouts.half_if_exact): a group of 32 weights in 18 bytes, as
    llama.cpp's q4_0, not 20 (19 with a zero point, not 21). The change is below 2^-10 of a normal fp16 step (2^-14
    or more); a smaller one (a group's weights all below ~4e-4) grows to the next multiple of 2^-24, less than 6e-8.
    Away from zero, not to nearest as llama.cpp's and ORT's converters: the step only grows, so an asymmetric
    group's range stays within its 16 levels. The floor of 1e-12 (a group of zeros, or of weights that any such step
    rounds to 0) becomes 2^-14."""
    scale = torch.where(scale.abs() <= 1e-12, torch.full_like(scale, 2.0 ** -14).copysign(scale), scale)
    half = scale.half()
    # fp16's bits hold sign and magnitude apart: one more in the magnitude's bits is the next number away from zero
    # (from +-0, the smallest subnormal of that sign)
    half = torch.where(half.float().abs() < scale.abs(), (half.view(torch.int16) + 1).view(torch.float16), half)
    return torch.where(scale.abs() <= 65504, half.float(), scale)


def quantize(cfg: QuantConfig, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """w [E, N, K] (any float dtype) -> {"q", "scale"[, "zero"]} in moec's format."""
    w = w.detach().float()
    if isinstance(cfg, Int8Experts):
        scale = (w.abs().amax(-1) / 127).clamp_min(1e-12)  # [E, N]
        return {"q": torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8), "scale": scale}
    E, N, K = w.shape
    g = w.reshape(E, N, K // cfg.group_size, cfg.group_size)
    if cfg.signed_scale:
        extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)  # [E, N, K/g] of its sign
        scale = _fp16(torch.where(extreme < 0, extreme.clamp(max=-8e-12), extreme.clamp(min=8e-12)) / -8)
        q = torch.round(g / scale[..., None]).clamp(-8, 7) + 8
        zero = None
    elif cfg.symmetric:
        scale = _fp16((g.abs().amax(-1) / 7).clamp_min(1e-12))  # [E, N, K/g]
        q = torch.round(g / scale[..., None]).clamp(-8, 7) + 8
        zero = None
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)  # the range holds 0 exactly
        scale = _fp16(((hi - lo) / 15).clamp_min(1e-12))
        zero = torch.round(-lo / scale).clamp(0, 15)
        q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, 15)
    q = q.to(torch.uint8).reshape(E, N, K)
    out = {"q": q[..., 0::2] | (q[..., 1::2] << 4), "scale": scale}
    if zero is not None:
        out["zero"] = zero.to(torch.uint8)
    return out


def unpack_int4(q: torch.Tensor) -> torch.Tensor:
    """[..., K/2] uint8 -> [..., K] uint8 nibbles."""
    return torch.stack([q & 15, q >> 4], dim=-1).flatten(-2)


def dequantize(cfg: QuantConfig, t: dict[str, torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    """The weights the quantized experts stand for: [E, N, K] (the reference the kernels are tested against)."""
    if isinstance(cfg, Int8Experts):
        return (t["q"].float() * t["scale"][..., None]).to(dtype)
    q = unpack_int4(t["q"]).float()
    E, N, K = q.shape
    q = q.reshape(E, N, K // cfg.group_size, cfg.group_size)
    zero = t["zero"].float()[..., None] if "zero" in t else 8.0
    return ((q - zero) * t["scale"][..., None]).reshape(E, N, K).to(dtype)


def dequantized(q, scale, zero, bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize` with plain arguments, as graph ops (fx and torch.export take no config objects)."""
    cfg = Int8Experts() if bits == 8 else Int4Experts(group_size, symmetric=zero is None)
    q = q if bits == 8 else q.to(torch.int32)  # exported uint8 nibble shifts came back typed int8 (ORT refused)
    return dequantize(cfg, {"q": q, "scale": scale, **({"zero": zero} if zero is not None else {})}, dtype)


def int8_quantized_rows(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, K] -> (q, scale): each row's groups of `group_size` inputs rounded to int8 at a step of their
    amax/127: x times the step's fp32 reciprocal, rounded to nearest (as ORT's kernels do). q [n, K] fp32 holding
    the integers -127..127, scale [n, K/g] fp32. A group whose step is 0 or subnormal (amax < 1.5e-36, where the
    reciprocal overflows) rounds to 0 with a step of 0."""
    n, K = x.shape
    g = x.float().reshape(n, K // group_size, group_size)
    scale = g.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale < torch.finfo(torch.float32).tiny, 0.0, scale)  # NaN and inf stay
    inverse = torch.where(scale > 0, 1 / scale, 0.0)
    return torch.round(g * inverse).clamp(-127, 127).reshape(n, K), scale.squeeze(-1)


def int8_rows(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [n, K] as int8-activation kernels see it (`int8_quantized_rows`), returned dequantized (fp32)."""
    q, scale = int8_quantized_rows(x, group_size)
    n, K = x.shape
    return (q.reshape(n, K // group_size, group_size) * scale[..., None]).reshape(n, K)


# set by weight_only(): the int8-activation kernels and references then keep their activations in fp32
_WEIGHT_ONLY = contextvars.ContextVar("moec_weight_only", default=False)


@contextlib.contextmanager
def weight_only():
    """Quantized experts without int8 activations, so that a graph asking for them can still be proved equal to
    the dequantized weights' (every layout and the routing); their own error is then measured apart."""
    token = _WEIGHT_ONLY.set(True)
    try:
        yield
    finally:
        _WEIGHT_ONLY.reset(token)


def weight_only_active() -> bool:
    return _WEIGHT_ONLY.get()


def nbytes(t: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in t.values())


class QuantLinear(torch.nn.Module):
    """A quantized nn.Linear: y = x W^T + b with W [N, K] held in moec's format as [1, N, K] buffers q, scale[, zero]:
    a shared expert's layer under `shared=True` (weight-only), or a dense layer under compile(dense=...)
    (backends/cpu_dense.py), whose int8_activations follow the config's activations (int8 rows per group for
    int4, per row for int8; fp32 under `weight_only()`). CPU only; values only (no gradients)."""

    def __init__(self, cfg: QuantConfig, linear: torch.nn.Linear, int8_activations: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.cfg = linear.in_features, linear.out_features, cfg
        self.int8_activations = int8_activations
        for k, v in quantize(cfg, linear.weight[None]).items():
            self.register_buffer(k, v)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer computes with, dequantized [N, K] (for code that reads a layer's weight instead of
        calling it, e.g. Jamba's dt_proj); read-only."""
        b = self._buffers
        return dequantize(self.cfg, {k: b[k] for k in ("q", "scale", "zero") if k in b})[0].to(b["scale"].dtype)

    @weight.setter
    def weight(self, value) -> None:
        raise AttributeError(f"moec: this layer's weight is quantized ({self.cfg.describe()}) and read-only: to "
                             f"change the weights, build a fresh model and compile it again")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from moec.backends import torch_backend

        if x.device.type != "cpu":
            raise NotImplementedError(f"moec: quantized linear layers run on CPU only, not {x.device.type}")
        if not x.is_floating_point() or x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"moec: a quantized linear layer of {self.in_features} inputs takes floating-point "
                             f"[..., {self.in_features}], not {x.dtype} {list(x.shape)}")
        b = self._buffers  # not hasattr(self, "zero"): a missing attribute costs an exception at every call
        a8 = self.int8_activations and not weight_only_active()
        y = torch_backend.quantized_linear(x.reshape(-1, self.in_features), (b["q"], b["scale"], b.get("zero")), a8)
        if self.bias is not None:
            y += self.bias.detach()
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        inputs = [x] + ([self.bias] if self.bias is not None else [])
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):  # a backward through it raises, clearly
            from moec.bindings import NoBackward

            y = NoBackward.apply(f"moec: quantized linear layers ({self.cfg.describe()}) compute values only, no "
                                 f"gradients: run them under torch.no_grad(), or train the model before compiling "
                                 f"it with quantize=/dense=", [y], *inputs)
        return y

    def extra_repr(self) -> str:
        how = "int8 activations" if self.int8_activations else "weight-only"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.cfg.describe()}, {how}"
