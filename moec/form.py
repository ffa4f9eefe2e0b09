"""What a compiled block's graph assumes of the block beyond its tensors, checked at each call.

The graph was proved for the block as it was at compile: its submodules (names, classes, the forwards their
classes run), its parameter and buffer names, and the plain attributes its code may read (`gate.top_k`,
`norm_topk_prob`, an activation function, the training flags of its dropout modules: eval mode). `Form` records
them; `changed()` names the first that differs. The compiled block then runs its original forward
(moec.canonical.CompiledForward) until the model is compiled again, which proves the block anew.

Tensors are not part of the form: the graph reads them at each call (moec.bindings).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn.modules import module as _module

from moec.bindings import resolve

_TORCH_KEYS = frozenset(nn.Module().__dict__) - {"training"}  # torch's bookkeeping: slots, hooks
_SKIPPED = frozenset({"_is_hf_initialized", "_compiled_call_impl"})  # set by loaders and Module.compile()
_STATELESS = (nn.Linear, nn.Identity, nn.ModuleList, nn.ModuleDict, nn.Sequential)  # no training-mode behaviour


def _plain(v) -> bool:
    """A value the block's code may branch on or call: a number, string, flag, None or a function (not a module
    or tensor: those are registered, and the structure or the bindings follow them)."""
    return v is None or type(v) in (int, float, bool, str) or (
        callable(v) and not isinstance(v, (nn.Module, torch.Tensor, type)))


def train_sensitive(m: nn.Module) -> bool:
    """Whether a module may act on its training flag (not a Linear, a container or an activation)."""
    return not isinstance(m, _STATELESS) and type(m).__module__ != "torch.nn.modules.activation"


def _structure(block: nn.Module) -> tuple:
    return (tuple((n, type(m)) for n, m in block.named_modules()), tuple(n for n, _ in block.named_parameters()),
            tuple(n for n, _ in block.named_buffers()))


_WATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a compiled block's module -> its Forms


def _registered(module, *args):
    """A parameter, buffer or submodule was (re)registered on `module`: the forms watching it look again."""
    for form in _WATCHED.get(module, ()):
        form.dicts = None


_module.register_module_parameter_registration_hook(_registered)
_module.register_module_buffer_registration_hook(_registered)
_module.register_module_module_registration_hook(_registered)


class Form:
    """The block's form at compile. Training flags are those of modules that may act on them (not a Linear or an
    activation); the other attributes of the experts in a container (`container`: a ModuleList of expert MLPs,
    often hundreds of modules) are left out."""

    def __init__(self, block: nn.Module, container: str | None):
        self.structure = _structure(block)
        entries = []  # (path, key, value at compile)
        for path, m in block.named_modules():
            member = container is not None and path.startswith(container + ".")
            for k, v in m.__dict__.items():
                if k in _TORCH_KEYS or k in _SKIPPED or k.startswith("_moec") or (
                        not path and k in ("forward", "extra_repr")):  # moec's own, on the block
                    continue
                if k == "training":
                    if train_sensitive(m):  # (a Linear or an activation computes the same in training mode)
                        entries.append((path, k, False))  # analysed and proved in eval mode
                elif not member and _plain(v):
                    entries.append((path, k, v))
        self.paths, self.keys, values = zip(*entries) if entries else ((), (), ())
        self.values = tuple(values)
        self.classes = tuple({type(m): type(m).forward for _, m in block.named_modules()}.items())
        self.dicts = None  # the modules' __dict__s, in `paths` order: bound at the first call, and again after a
        # registration on one of the block's modules (not pickled)

    def __getstate__(self):
        return {**self.__dict__, "dicts": None}

    def changed(self, block: nn.Module) -> str | None:
        """What differs from the form at compile, or None."""
        if self.dicts is None:
            if _structure(block) != self.structure:
                return "its submodules, parameters or buffers are not those it was compiled with"
            for _, m in block.named_modules():
                forms = _WATCHED.setdefault(m, [])
                if self not in forms:
                    forms.append(self)
            self.dicts = [resolve(block, p).__dict__ for p in self.paths]
        if tuple(map(dict.get, self.dicts, self.keys)) != self.values:
            path, key, then, now = next((p, k, v, d.get(k)) for p, k, v, d in
                                        zip(self.paths, self.keys, self.values, self.dicts) if d.get(k) != v)
            return f"{path + '.' if path else ''}{key} is {now!r}, was {then!r}"
        if bad := next((cls for cls, f in self.classes if cls.forward is not f), None):
            return f"{bad.__name__}.forward was replaced"
        return None
