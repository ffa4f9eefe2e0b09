"""What a compiled block's graph assumes of the block beyond its tensors, checked at each call.

The graph was proved for the block as it was at compile: its submodules (names, classes, the forwards their
classes run), its parameter and buffer names, and the plain attributes its code may read (`gate.top_k`,
`norm_topk_prob`, an activation function, the training flags of its dropout modules: eval mode). `Form` records
them; `changed()` names the first that differs. The compiled block then runs its original forward
(moec.canonical.CompiledForward) until the model is compiled again, which proves the block anew.

Tensors are not part of the form: the graph reads them at each call (moec.bindings).

`ModelRef`: how what moec installs on a model (its forward, generate) refers back to it without keeping it alive.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn
from torch.nn.modules import module as _module


_TORCH_KEYS = frozenset(nn.Module().__dict__) - {"training"}  # torch's bookkeeping: slots, hooks
_SKIPPED = frozenset({"_is_hf_initialized", "_compiled_call_impl", "_is_torch_compile", "__overloads__"})  # set by
# loaders, Module.compile(), torch.compile(module) and torch.jit.script
_INSTALLED = ("forward", "extra_repr", "generate")  # what moec installs on a block (or, onnxruntime, on the model)
_STATELESS = (nn.Linear, nn.Identity, nn.ModuleList, nn.ModuleDict, nn.Sequential, nn.Embedding, nn.LayerNorm,
              nn.RMSNorm, nn.GroupNorm)  # no training-mode behaviour


def _plain(v) -> bool:
    """A value the block's code may branch on or call: a number, string, flag, dtype, None, a tuple of those or a
    function (not a module or tensor: those are registered, and the structure or the bindings follow them)."""
    return v is None or type(v) in (int, float, bool, str, torch.dtype) or (
        type(v) is tuple and all(map(_plain, v))) or (
        callable(v) and not isinstance(v, (nn.Module, torch.Tensor, type)))


def train_sensitive(m: nn.Module) -> bool:
    """Whether a module may act on its training flag (not a Linear, an embedding, a layer norm, a container or an
    activation)."""
    return not isinstance(m, _STATELESS) and (type(m).__module__ != "torch.nn.modules.activation"
                                              or isinstance(m, (nn.MultiheadAttention, nn.RReLU)))


def _structure(block: nn.Module, called: tuple[str, ...]) -> tuple:
    return (tuple((n, type(m)) for n, m in block.named_modules() if not _under(n, called)),
            tuple(n for n, _ in block.named_parameters() if not _under(n, called)),
            tuple(n for n, _ in block.named_buffers() if not _under(n, called)))


def _under(path: str, called: tuple[str, ...]) -> bool:
    return any(path == c or path.startswith(c + ".") for c in called)


_WATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a compiled block's module -> its Forms (weakly)


def _registered(module, *args):
    """A parameter, buffer or submodule was (re)registered on `module`: the forms watching it look again. (Not while
    torch.compile traces: HF's forward registers its layers in a new ModuleList at every call, and Dynamo would
    guard on the registry.)"""
    if not torch.compiler.is_compiling():
        for form in _WATCHED.get(module, ()):
            form.bound = None


_module.register_module_parameter_registration_hook(_registered)
_module.register_module_buffer_registration_hook(_registered)
_module.register_module_module_registration_hook(_registered)


def _names(modules: list[nn.Module]) -> tuple:
    """The attribute names of each module (the block first), but moec's own (`_moec_*`, what it installs on the
    block) and the markers tools set (_SKIPPED)."""
    return tuple(frozenset(k for k in m.__dict__ if not k.startswith("_moec") and k not in _SKIPPED and (
        i or k not in _INSTALLED)) for i, m in enumerate(modules))


class Form:
    """The block's form at compile. Training flags are those of modules that may act on them (not a Linear or an
    activation). The experts in a container (`container`: a ModuleList of expert MLPs, often hundreds of modules)
    are watched for their training flags only; the block's other modules for their plain attributes, which
    attributes they have, their class and their children (a `_modules` entry swapped without registration). The
    modules the graph calls (`called`: shared experts and their gate, run as they are at each call) are not
    watched."""

    def __init__(self, block: nn.Module, container: str | None, called: tuple[str, ...] = (),
                 unread: tuple[str, ...] = ()):
        self.called = called
        # tensors the block's own forward reads and its graph does not: their values at compile were part of what the
        # proof compared (a LoRA adapter's lora_B is 0 at compile, which hides the adapter): (path, tensor, data
        # pointer, version, its values then)
        self.unread = [(p, t, t.data_ptr(), t._version, t.detach().clone()) for p in unread
                       for t in [_module_tensor(block, p)]]
        self.structure = _structure(block, called)
        entries, self.own = [], []  # (path, key, value at compile); the paths of the modules not experts of a container
        for path, m in block.named_modules():
            if _under(path, called):
                continue
            member = container is not None and path.startswith(container + ".")
            if not member:
                self.own.append(path)
            for k, v in m.__dict__.items():
                if k in _TORCH_KEYS or k in _SKIPPED or k.startswith("_moec") or (
                        not path and k in _INSTALLED):  # moec's own, on the block
                    continue
                if k == "training":
                    if train_sensitive(m):  # (a Linear or an activation computes the same in training mode)
                        entries.append((path, k, False))  # analysed and proved in eval mode
                elif not member and _plain(v):
                    entries.append((path, k, v))
        self.paths, self.keys, values = zip(*entries) if entries else ((), (), ())
        self.values = tuple(values)
        n = sum(not p for p in self.paths)  # the block's own entries come first (named_modules: the block first)
        self.split = (self.keys[:n], self.values[:n], self.keys[n:], self.values[n:])  # the block's; the others'
        own = [block.get_submodule(p) for p in self.own]  # the block first
        self.names = _names(own)
        # (the block's, the other own modules'): numbers of attributes, classes, children
        self.lens = (len(block.__dict__), tuple(len(m.__dict__) for m in own[1:]))
        self.types = (type(block), tuple(map(type, own[1:])))
        self.children = (tuple(block._modules.values()), tuple(c for m in own[1:] for c in m._modules.values()))
        self.classes = tuple({type(m): type(m).forward for p, m in block.named_modules()
                              if not _under(p, called)}.items())
        self.bound = None  # (the watched __dict__s, the own modules, their __dict__s and _modules), the block's left
        # out (it holds this form: a cycle would keep a deleted model until the garbage collector runs): bound at the
        # first call, and again after a registration on one of the block's modules (not pickled)

    def __getstate__(self):
        return {**self.__dict__, "bound": None}

    def changed(self, block: nn.Module) -> str | None:
        """What differs from the form at compile, or None."""
        bound = self.bound
        if bound is None:
            if _structure(block, self.called) != self.structure:
                return "its submodules, parameters or buffers are not those it was compiled with"
            for _, m in block.named_modules():
                _WATCHED.setdefault(m, weakref.WeakSet()).add(self)
            own = [block.get_submodule(p) for p in self.own[1:]]
            self.bound = bound = ([block.get_submodule(p).__dict__ for p in self.paths[len(self.split[0]):]], own,
                                  [m.__dict__ for m in own], [m._modules for m in own])
        dicts, own, own_dicts, kids = bound
        mine = block.__dict__
        keys, values, their_keys, their_values = self.split
        if tuple(map(mine.get, keys)) != values or tuple(map(dict.get, dicts, their_keys)) != their_values:
            path, key, then, now = next((p, k, v, d.get(k)) for p, k, v, d in zip(
                self.paths, self.keys, self.values, [mine] * len(keys) + dicts) if d.get(k) != v)
            return f"{path + '.' if path else ''}{key} is {now!r}, was {then!r}"
        if len(mine) != self.lens[0] or tuple(map(len, own_dicts)) != self.lens[1]:
            if (names := _names([block, *own])) != self.names:
                path = next(p for p, now, then in zip(self.own, names, self.names) if now != then)
                return f"{path or 'the block'} has other attributes"
            self.lens = (len(mine), tuple(map(len, own_dicts)))  # only moec's own attributes came or went
            # (moec.inspect's report on the model)
        if (type(block) is not self.types[0] or tuple(map(type, own)) != self.types[1]
                or tuple(block._modules.values()) != self.children[0]
                or tuple(itertools.chain.from_iterable(map(dict.values, kids))) != self.children[1]):
            return "its submodules are not those it was compiled with"
        if bad := next((cls for cls, f in self.classes if cls.forward is not f), None):
            return f"{bad.__name__}.forward was replaced"
        return self._unread_changed(block) if self.unread else None

    def traced_changed(self, block: nn.Module, unread: bool = True) -> str | None:
        """changed(), while torch.compile or torch.export traces the block: the classes of the block's own modules,
        their plain attributes and training flags read through getattr, on which Dynamo guards (a change compiles the
        model again); what changed() compares by identity (dicts, children, forwards) and the experts' training flags
        are not compared. A block whose graph leaves tensors of its forward unread runs its own forward under
        torch.compile and torch.export (a trace holds fake tensors: their values cannot be compared with those at
        compile, and the graph would ignore a change); `unread=False`: moec's own export of a copy it compiled a
        moment before, whose values are those compared."""
        if self.unread and unread:
            return (f"traced (torch.compile or torch.export), as the compiled graph does not read {self.unread[0][0]}, "
                    f"which its own forward reads, and a trace cannot compare its values with those at compile")
        if type(block) is not self.types[0] or tuple(
                type(block.get_submodule(p)) for p in self.own[1:]) != self.types[1]:  # (e.g. parametrized since: a
            return "its submodules are not those it was compiled with"  # class of its own)
        for path, key, then in zip(self.paths, self.keys, self.values):
            if key == "training" and path not in self.own:  # an expert's
                continue
            if (now := getattr(block.get_submodule(path), key, None)) != then:
                return f"{path + '.' if path else ''}{key} is {now!r}, was {then!r}"
        return None

    def _unread_changed(self, block: nn.Module) -> str | None:
        for i, (path, then, ptr, version, values) in enumerate(self.unread):
            now = _module_tensor(block, path)
            if now is then and now.data_ptr() == ptr and now._version == version:
                continue
            if now is None or now.shape != values.shape or not torch.equal(now.detach(),
                                                                           values.to(now.device, now.dtype)):
                return f"{path}, which its own forward reads and the compiled graph does not, changed"
            self.unread[i] = (path, now, now.data_ptr(), now._version, values)  # the same values (e.g. loaded again)
        return None


def _module_tensor(block: nn.Module, path: str) -> torch.Tensor | None:
    owner, _, name = path.rpartition(".")
    try:
        return getattr(block.get_submodule(owner), name)
    except AttributeError:
        return None


class ModelRef:
    """A weak reference to a model, for what moec installs in the model's own __dict__ (a strong one is a cycle that
    keeps a deleted model's weights until the garbage collector runs); copies of the model re-point it to the copy."""

    def __init__(self, model: nn.Module):
        self.ref = weakref.ref(model)

    @property
    def model(self) -> nn.Module:
        if (model := self.ref()) is None:
            raise ReferenceError("moec: the model this method belongs to was deleted: keep the model, not its method")
        return model

    def __deepcopy__(self, memo):
        return ModelRef(memo.get(id(self.model), self.model))

    def __getstate__(self):
        return {"model": self.model}

    def __setstate__(self, state):
        self.ref = weakref.ref(state["model"])
