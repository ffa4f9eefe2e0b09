"""Models bigger than memory: build on the meta device, fill from a checkpoint, offload the experts block by block.

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = moec.load_offloaded(model, "checkpoint_dir", moec.Offload(budget="25%"))

Everything but the routed experts is read from the safetensors files, whose names must be the model's state_dict
keys (`safetensors.torch.save_model(model, path)` writes such a file; transformers 5 renames some families'
tensors when it saves, e.g. Mixtral's per-expert w1/w2/w3: such checkpoints need their names mapped first).
Then each MoE block in turn: its experts are read, the block is compiled with offloaded experts (proved like
any block; the experts go to the store), and its expert tensors are emptied. Peak memory: the non-expert
weights, the pool (budget), and while one block compiles a few copies of that block's experts (read; an fp32
copy for the analysis of a bf16/fp16 block; stacked for the graph; serialised to the store): measured by
benchmarks/bench_offload_memory.py. A block moec cannot prove keeps its experts in memory (listed
in moec.inspect(model).rejected, with a warning).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from moec.offload.config import Offload
from moec.passes.quantize_experts import give_back_memory
from moec.quant import Int4Experts, Int8Experts


def _files(checkpoint) -> list[Path]:
    paths = [Path(p) for p in (checkpoint if isinstance(checkpoint, (list, tuple)) else [checkpoint])]
    files = [f for p in paths for f in (sorted(p.glob("*.safetensors")) if p.is_dir() else [p])]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise FileNotFoundError(f"moec: no safetensors checkpoint at {missing or checkpoint}: give a "
                                f"folder of *.safetensors files or their paths")
    return files


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


class _Checkpoint:
    """Tensors by name across the files, read one at a time."""

    def __init__(self, files: list[Path]):
        self.where = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118  (a safe_open handle is not a dict)
                    if k in self.where:  # e.g. a stale shard of an earlier save beside the new ones
                        raise ValueError(f"moec: tensor {k!r} is in two checkpoint files, {self.where[k]} and {f}: "
                                         f"remove the stale one, or give the files to read as a list")
                    self.where[k] = f

    def header(self) -> list:
        """Every tensor's name, shape and dtype, as the files' headers give them (nothing is read)."""
        out = []
        for f in sorted(set(self.where.values())):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118  (a safe_open handle is not a dict)
                    part = h.get_slice(k)
                    out.append((k, part.get_shape(), part.get_dtype()))
        return sorted(out)

    def read(self, name: str, like: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `name` (shaped as `like`), or only its rows lo:hi along dim 0 (a sliced read)."""
        if name not in self.where:
            raise KeyError(f"moec: the checkpoint has no tensor {name!r} (its names must be the "
                           f"model's state_dict keys)")
        with safe_open(str(self.where[name]), framework="pt") as h:
            part = h.get_slice(name)
            shape = tuple(part.get_shape())
            if shape != tuple(like.shape):
                raise ValueError(f"moec: {name!r} is {shape} in the checkpoint, {tuple(like.shape)} in the model")
            t = h.get_tensor(name) if rows is None else part[rows[0]:rows[1]]
        # a copy: safetensors' tensor can be a view of the file's pages (mapped), which a later change to the file
        # would change under the model (or a truncation crash it), at an address the kernels' loads do not expect
        return t.to(like.dtype, copy=True)


def _fill(model: nn.Module, names: set[str], ckpt: _Checkpoint, read=None) -> None:
    """Give the parameters and persistent buffers in `names` their checkpoint values (`read(name, like)`: another
    way to get them); tied ones (one tensor under several names, e.g. an LM head tied to the embedding) are read
    once, under whichever name the checkpoint has."""
    groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        groups.setdefault(id(t), (t, []))[1].append(name)
    new = {}  # id of the meta tensor -> its filled replacement
    for key, (t, aliases) in groups.items():
        if not set(aliases) & names:
            continue
        value = (read or ckpt.read)(next((a for a in aliases if a in ckpt.where), aliases[0]), t)
        new[key] = nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value
    for m in model.modules():
        for store in (m._parameters, m._buffers):
            for attr, t in store.items():
                if t is not None and id(t) in new:
                    store[attr] = new[id(t)]


def _non_persistent_buffers(model: nn.Module, init) -> None:
    """Buffers a checkpoint does not hold (rotary frequencies): computed by the model's own initialiser (HF's
    `_init_weights`) on the modules holding them, which must hold no parameter of their own."""
    for path, m in model.named_modules():
        meta = [b for b, t in m._buffers.items() if t is not None and t.is_meta and b in m._non_persistent_buffers_set]
        if not meta:
            continue
        if init is None or any(p is not None for p in m._parameters.values()):
            raise ValueError(f"moec.load_offloaded: buffer(s) {meta} of {path or 'the model'} are not in a checkpoint "
                             f"and moec cannot compute them: build them on a real device before calling it")
        for b in meta:
            m._buffers[b] = torch.empty_like(m._buffers[b], device="cpu")
        init(m)


def fill_and_compile(model: nn.Module, checkpoint, pipeline: str, options: dict, *, verify: bool, who: str,
                     before_install=None, expert_reader=None, filled=None):
    """Fill `model` (on the meta device) from `checkpoint`: everything but the routed experts, then each MoE block's
    experts in turn, that block compiled by `pipeline` (which releases them: offloaded, sharded) before the next
    is read. expert_reader(candidate, checkpoint): how a block's expert tensors are read (`_fill`'s `read`; None:
    whole); filled(model, checkpoint): called once everything but the routed experts is filled. Returns the
    Report."""
    from moec.api import Instruments, _run
    from moec.report import Report
    from moec.bindings import resolve
    from moec.passes.detect.candidates import find_candidates, member_names

    ckpt = _Checkpoint(_files(checkpoint))
    cands = find_candidates(model)
    experts = {}  # block path -> names of its expert tensors
    for c in cands:
        pre = f"{c.path}." if c.path else ""
        if c.container:
            group = resolve(c.module, c.container)
            names = [f"{pre}{c.container}.{n}.{p}" for n in member_names(group)
                     for p, _ in getattr(group, n).named_parameters()]
        else:
            names = [f"{pre}{n}" for n in c.experts]
        experts[c.path] = set(names)
    held = set().union(*experts.values())
    _fill(model, set(model.state_dict()) - held, ckpt)  # parameters and persistent buffers
    _non_persistent_buffers(model, getattr(model, "_init_weights", None))
    if filled is not None:
        filled(model, ckpt)
    report = Report(pipeline=pipeline, backend="torch")
    for c in cands:
        _fill(model, experts[c.path], ckpt, None if expert_reader is None else expert_reader(c, ckpt))
        r = _run(model, pipeline, Instruments(verify=verify), install_blocks=True, backend="torch",
                 options=options, strict=verify, only=c.path, before_install=before_install)
        report.blocks += r.blocks
        report.rejected += r.rejected
        if r.rejected and expert_reader is not None:  # the block runs as it is: on its real experts, read whole
            _fill(model, experts[c.path], ckpt)
        give_back_memory()
    kept = [r.path for r in report.rejected]
    if kept:
        warnings.warn(f"{who}: {len(kept)} block(s) could not be compiled and keep their experts in memory: "
                      f"{', '.join(kept)} (see moec.inspect(model).rejected)", stacklevel=3)
    return report


def load_offloaded(model: nn.Module, checkpoint, offload: Offload, *, quantize=None, passes=None,
                   verify: bool = False, decode_linears: bool = True) -> nn.Module:
    """Fill `model` (built on the meta device) from `checkpoint` (a folder of *.safetensors, a file, or a list),
    compiling its MoE blocks with offloaded experts one at a time so that no block's experts stay in memory
    (see the module docstring; quantize= as in moec.compile: the store holds the quantized experts). Returns the
    model, on the CPU, in eval mode (its experts left it: it cannot train). decode_linears: as in moec.compile."""
    from moec.api import _start_offload, _warn_if_empty, install_decode_linears, refuse_save_pretrained, settle
    from moec.backends import pipeline_for
    from moec.offload.pool import Pool

    if not isinstance(offload, Offload):
        raise TypeError(f"moec.load_offloaded: offload must be moec.Offload(...), not {offload!r}")
    if quantize is not None and not isinstance(quantize, (Int8Experts, Int4Experts)):
        raise TypeError(f"moec.load_offloaded: quantize must be moec.Int8Experts() or moec.Int4Experts(...), "
                        f"not {quantize!r}")
    pool = Pool(offload, torch.device("cpu"))
    pipeline = pipeline_for("torch", passes, quantize=quantize is not None, offload=True)
    report = fill_and_compile(model, checkpoint, pipeline, {"quantize": quantize, "offload": pool}, verify=verify,
                              who="moec.load_offloaded")
    _warn_if_empty(model, report)
    report.quantize = quantize
    install_decode_linears(model, report, decode_linears)
    settle(model, report)
    model.__dict__["_moec_report"] = report
    _start_offload(model, report, pool)
    if report.blocks:
        refuse_save_pretrained(model)
    return model.eval()
