"""Live tensors: what a compiled block's graph reads, taken from the module as it is at call time.

A compiled block's graph takes every tensor it reads (router weight, W13, W2, biases, quantized
experts, ...) as an input. A `Binding` says how to get that tensor from the block *now*:

    Param(path)                     the block's own tensor                           (HF stacked experts)
    Derived(parts, ...)             built from the block's tensors: a view (transpose, unflatten) when one
                                    part suffices, else a copy (ModuleList experts stacked, separate
                                    gate/up concatenated). moec keeps ONE copy: the block's tensors are
                                    re-pointed into it (p.data = a view of moec's storage), so
                                    load_state_dict and in-place edits write through.
    Const(tensor)                   a tensor moec made (export-only layouts)

Nothing is captured at compile time. Each call checks cheaply that what a binding cached still
holds: a global generation counter that torch's module/parameter/buffer registration hooks bump
(load_state_dict(assign=True), a replaced parameter or submodule), the data pointers, dtypes and
devices of the sources (.to(), .half(), .data = ...) and, for a copy whose sources could not be
re-pointed into it, their version counters (in-place edits). Anything changed: re-derived.
While tracing (torch.export, torch.compile) tensors are derived functionally from the parameters,
so an exported program follows its parameters too.
"""

from __future__ import annotations

import functools
import operator
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules import module as _module


def resolve(module: nn.Module, path: str):
    return functools.reduce(getattr, path.split("."), module) if path else module


class _Generation:
    """Bumped whenever any module, parameter or buffer is (re)registered anywhere, outside torch.compile's
    tracing: there, tensors are derived from the parameters functionally, and a bump traced (HF's forward slices
    `self.layers[:n]`, registering each layer in a new ModuleList) would make Dynamo guard on the counter and
    recompile the model at every call."""

    value = 0

    @classmethod
    def bump(cls, *args):
        if not torch.compiler.is_compiling():
            cls.value += 1


_module.register_module_parameter_registration_hook(_Generation.bump)
_module.register_module_buffer_registration_hook(_Generation.bump)
_module.register_module_module_registration_hook(_Generation.bump)


def generation() -> int:
    return _Generation.value


def tracing() -> bool:
    return torch.compiler.is_compiling() or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def transformed() -> str | None:
    """Forward-mode AD or a torch.func transform (vmap, grad, jvp, jacfwd, ...) is on, which moec's ops (values only,
    no derivative or batching rules) would not follow (their tangents came out 0): what it is, or None. (Eager calls
    only: inside torch.compile, Dynamo's answer for functorch's stack is not that of the eager call.)"""
    if torch.autograd.forward_ad._current_level >= 0:
        return "forward-mode AD is on"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a torch.func transform (vmap, grad, jvp, ...) is on"
    return None


@dataclass(frozen=True)
class Part:
    """One expert tensor set, as [E, n, D] (or [E, n] for biases): `name` inside each member of
    `container` (stacked: a copy), else a tensor of the block, [E, ...] as is or 2-D [E*n, D]
    (`unflatten` = E); `transposed`: stored with its last two dims swapped (a view); `rows`: the first `rows`
    experts of a tensor holding more (LongCat-Flash's gate_up_proj has rows for its zero-compute experts too)."""

    name: str
    transposed: bool = False
    container: str | None = None
    members: tuple[str, ...] = ()
    unflatten: int = 0
    rows: int = 0

    def tensors(self, block) -> list[torch.Tensor]:
        if self.container is None:
            return [resolve(block, self.name)]
        group = resolve(block, self.container)
        return [resolve(resolve(group, m), self.name) for m in self.members]

    def locations(self, block) -> list[tuple[nn.Module, str]]:
        """(module, attribute) of each tensor of `tensors`."""
        owner, _, attr = self.name.rpartition(".")
        if self.container is None:
            return [(resolve(block, owner), attr)]
        group = resolve(block, self.container)
        return [(resolve(resolve(group, m), owner), attr) for m in self.members]

    def value(self, block, experts=None) -> torch.Tensor:
        """[E, ...] (or the rows `experts` only) in canonical orientation."""
        if self.container is not None:
            ts = self.tensors(block)
            t = torch.stack(ts if experts is None else [ts[i] for i in experts])
        else:
            t = resolve(block, self.name)
            t = t.unflatten(0, (self.unflatten, -1)) if self.unflatten else t[:self.rows] if self.rows else t
            t = t if experts is None else t[experts]
        return t.transpose(-1, -2) if self.transposed else t


class Binding:
    """How to get one tensor the graph reads from the block. `get(block)` is the tensor to use now."""

    def sources(self, block: nn.Module) -> list[torch.Tensor]:
        return []

    def live_sources(self, block: nn.Module) -> list[torch.Tensor]:
        """`sources`, as the next `get` reads them (a binding that caches them looks them up again only where
        something changed)."""
        return self.sources(block)

    def get(self, block: nn.Module) -> torch.Tensor | None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def first_source(binding: Binding) -> str | None:
    """The path in the block of the first tensor `binding` reads (None: it reads none)."""
    if isinstance(binding, Param):
        return binding.path
    part = next((p for p in getattr(binding, "parts", ()) if isinstance(p, Part)), None)
    if part is None:
        return None
    return f"{part.container}.{part.members[0]}.{part.name}" if part.container is not None else part.name


class Param(Binding):
    def __init__(self, path: str):
        self.path = path

    def sources(self, block):
        return [resolve(block, self.path)]

    def get(self, block):
        return resolve(block, self.path)

    def describe(self):
        return self.path


class Const(Binding):
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.detach()

    def get(self, block):
        return self.tensor

    def describe(self):
        return f"constant {tuple(self.tensor.shape)}"


def _nobody():
    return None


class Derived(Binding):
    """parts [E, n_i, D] (after stacking / unflattening / transposing) -> one [E, sum n_i, D] tensor,
    parts concatenated along dim 1; an int part n is zeros [E, n] (a bias beside a projection without)."""

    def __init__(self, parts: tuple[Part | int, ...]):
        self.parts = parts  # a Part, or an int n: zeros [E, n] (a missing bias)
        self._key = None
        self._value = None
        self._srcs: list[torch.Tensor] = []
        self._where: tuple[list[dict], list[str]] = ([], [])  # each source's module's _parameters or _buffers, name
        self._gen = -1
        self._aliased = False  # every source is a view into moec's storage (edits write through)
        self._adopted = False
        self._owner = _nobody  # the module the cached sources belong to (weakly: the block holds this binding)

    def __getstate__(self):  # pickle / deepcopy: the cache is rebuilt (and re-aliased) at the next call
        return {**self.__dict__, "_key": None, "_value": None, "_srcs": [], "_where": ([], []), "_gen": -1,
                "_owner": _nobody, "_aliased": False}

    # -- pure derivation (traceable, differentiable) --
    def derive(self, block, experts=None) -> torch.Tensor:
        """The tensor, from the block's tensors as they are (`experts`: those rows only)."""
        tensors = [p.value(block, experts) if isinstance(p, Part) else p for p in self.parts]
        like = next(t for t in tensors if isinstance(t, torch.Tensor))
        tensors = [like.new_zeros(like.shape[0], t) if isinstance(t, int) else t for t in tensors]
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)

    @property
    def copies(self) -> bool:
        return len(self.parts) > 1 or any(isinstance(p, Part) and p.container is not None for p in self.parts)

    def sources(self, block):
        return [t for p in self.parts if isinstance(p, Part) for t in p.tensors(block)]

    # -- eager: cached; once installed, aliased --
    def live_sources(self, block):
        if self._gen != generation() or self._owner() is not block or not self._registered():
            self._find(block)
        return self._srcs

    def get(self, block):
        if tracing():
            return self.derive(block)
        self.live_sources(block)
        if self._fingerprint() != self._key:
            # read before the copy: an edit by another thread while it is made is seen at the next call
            ptrs, versions = [s.data_ptr() for s in self._srcs], [s._version for s in self._srcs]
            # (not an inference tensor: the block's parameters are re-pointed into it, and may train later; no_grad
            # last: inference_mode(False) turns gradients on)
            with torch.inference_mode(False), torch.no_grad():
                self._value = self.derive(block)
                if self.copies and self._srcs and all(s.is_shared() for s in self._srcs):
                    self._value.share_memory_()  # model.share_memory(): the copy they are re-pointed into is too
            # re-pointed: the block's own parameters only, never tensors a caller swapped in (functional_call's
            # plain tensors, e.g. views of the caller's flat buffer)
            moved: set[int] = set()
            self._aliased = (self.copies and self._adopted and all(isinstance(t, nn.Parameter) for t in self._srcs)
                             and self._alias(block, self._value, dict(zip(map(id, self._srcs), versions)), moved))
            # the key: the data pointers after the copy of the sources re-pointed into it (their version counters
            # stay), before it of the others; the versions from before it
            ptrs = tuple(s.data_ptr() if id(s) in moved else p for s, p in zip(self._srcs, ptrs))
            self._key = ptrs if self._aliased or not self.copies else (ptrs, tuple(versions))
        return self._value

    def _find(self, block) -> None:
        where = [w for p in self.parts if isinstance(p, Part) for w in p.locations(block)]
        self._srcs, self._gen, self._owner = [getattr(m, a) for m, a in where], generation(), weakref.ref(block)
        self._where = ([m._parameters if a in m._parameters else m._buffers if a in m._buffers else {}
                        for m, a in where], [a for _, a in where])

    def _registered(self) -> bool:
        """Each cached source is still the tensor its module holds. Registration hooks (the generation) miss a
        swap straight into `module._parameters` (torch.func.functional_call, accelerate), and a parametrized
        weight is computed anew at each access (never registered: looked up every call)."""
        return all(map(operator.is_, map(dict.get, *self._where), self._srcs))  # C loops: ~0.1 us a source

    def adopt(self, block) -> None:
        """From now on (the block is installed), keep one copy: re-point the block's tensors into moec's
        storage. (Before, while compiling, the block's tensors are not touched.)"""
        self._adopted = True
        if self.copies:
            self.get(block)
            self._aliased = self._alias(block, self._value)
            self._key = self._fingerprint()

    def _fingerprint(self) -> tuple:
        """Data pointers change with .to()/.half()/.data=; versions with in-place edits, which only
        matter while some source is not a view into moec's storage (a view's edits write through)."""
        ptrs = tuple(s.data_ptr() for s in self._srcs)
        return ptrs if self._aliased or not self.copies else (ptrs, tuple(s._version for s in self._srcs))

    def _alias(self, block, value: torch.Tensor, versions: dict[int, int] | None = None,
               moved: set[int] | None = None) -> bool:
        """Re-point each source tensor into `value` where its slot is a view of it (same values: the
        source's own memory is released). True if every source now is such a view. `versions`: each source's version
        when `value` was made (one written since keeps its memory: re-pointed, it would lose the write); `moved`
        gets the ids of the sources re-pointed."""
        off, every, seen = 0, True, set()
        for p in self.parts:
            if isinstance(p, int):
                off += p
                continue
            srcs = p.tensors(block)
            n = p.value(block, [0]).shape[1]
            part = value[:, off:off + n]  # [E, n(, D)]
            slots = [part[e] for e in range(len(srcs))] if p.container is not None else [part]
            for src, slot in zip(srcs, slots):
                slot = slot.transpose(-1, -2) if p.transposed else slot
                if slot.shape != src.shape:  # an unflattened 2-D source: a view only if contiguous
                    slot = slot.reshape(src.shape) if slot.is_contiguous() else None
                # one tensor in two slots (tied experts) can be a view of one only; one written since `value` was
                # made keeps its memory (re-pointed, it would lose the write)
                if id(src) in seen or versions is not None and src._version != versions.get(id(src)):
                    slot = None
                seen.add(id(src))
                if slot is not None and _repoint(src, slot):
                    if moved is not None:
                        moved.add(id(src))
                else:
                    every = False
            off += n
        return every

    def describe(self):
        names = [(p.name + (f"[:{p.rows}]" if p.rows else "") + (".T" if p.transposed else "")) if isinstance(p, Part)
                 else f"zeros[{p}]"
                 for p in self.parts]
        how = "stack+" if any(isinstance(p, Part) and p.container for p in self.parts) else ""
        return (f"{how}cat({', '.join(names)})" if len(names) > 1 else f"{how}{names[0]}") + \
            (" (one copy, parameters re-pointed into it)" if self.copies else " (a view)")


def _repoint(src: torch.Tensor, slot: torch.Tensor) -> bool:
    if src.shape != slot.shape or src.dtype != slot.dtype or src.device != slot.device:
        return False
    src.data = slot
    return True


def resolve_all(block: nn.Module, bindings: dict[str, Binding]) -> dict[str, torch.Tensor | None]:
    return {role: b.get(block) for role, b in bindings.items()}


class NoBackward(torch.autograd.Function):
    """Marks an output computed for inference (moec's kernels record no gradients): its backward raises `why`.
    `NoBackward.apply(why, [out], *inputs)`: `out` comes in a list, so that the Function returns it as an output of
    its own, not a view of an input, which the caller may then write into in place (logits[..., banned] = -inf);
    a view of another tensor is copied first (autograd forbids in-place writes into a view a Function returns)."""

    @staticmethod
    def forward(ctx, why: str, held: list, *inputs):
        ctx.why, ctx.inputs = why, len(inputs)
        if tracing():  # (the traced backward's op gives the first input's gradient: its shape)
            ctx.save_for_backward(inputs[0])
        out = held[0]
        return out if out._base is None else out.clone()

    @staticmethod
    def backward(ctx, *grads):
        if tracing() and ctx.saved_tensors:  # torch.compile traces the backward ahead: an op that raises when it
            like, = ctx.saved_tensors  # runs, as the first input's gradient (an unused one would be dropped)
            return None, None, torch.ops.moec.no_backward(grads[0], like, ctx.why), *(None,) * (ctx.inputs - 1)
        raise RuntimeError(ctx.why)
