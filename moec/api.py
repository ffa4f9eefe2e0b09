"""Public API: moec.compile and moec.inspect, and the report they produce."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from rich.console import Console
from rich.progress import track
from rich.table import Table
from torch import nn

import moec.passes  # noqa: F401  (registers the passes)
from moec.backends import pipeline_for, resolve_backend
from moec.canonical import install, resolve
from moec.quant import Int4Experts, Int8Experts, QuantConfig
from moec.pass_manager import Instruments, PassManager, PassRecord, Rejected
from moec.passes.detect_moe import Candidate, find_candidates
from moec.passes.quantize_experts import release_originals

# max relative error allowed by verify=True, per compute dtype
VERIFY_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class BlockReport:
    path: str
    num_experts: int
    top_k: int
    router: str
    experts: str
    shared: str
    passes: list[PassRecord] = field(default_factory=list)
    expert_load: list[int] | None = None  # tokens routed to each expert on the example inputs


@dataclass
class Rejection:
    path: str
    reason: str


@dataclass
class Report:
    blocks: list[BlockReport] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    pipeline: str = ""
    backend: str = ""
    quantize: QuantConfig | None = None
    export: object = None  # backend="onnxruntime": the moec.export_onnx report of the last session opened

    def __rich__(self) -> Table:
        q = f", quantize {self.quantize}" if self.quantize else ""
        t = Table(title=f"moec: {len(self.blocks)} MoE block(s) found, {len(self.rejected)} rejected "
                        f"(pipeline {self.pipeline}, backend {self.backend}{q})", title_justify="left")
        for col in ("block", "E", "k", "router", "experts", "shared", "load (min/max tokens)"):
            t.add_column(col)
        for b in self.blocks:
            load = f"{min(b.expert_load)}/{max(b.expert_load)}" if b.expert_load else "-"
            t.add_row(b.path, str(b.num_experts), str(b.top_k), b.router, b.experts, b.shared, load)
        for r in self.rejected:
            t.add_row(r.path, "", "", f"[not rewritten] {r.reason}", "", "", "")
        if not self.blocks and not self.rejected:
            t.add_row("-", "", "", "no MoE block found: the model is returned unchanged", "", "", "")
        return t

    def __str__(self) -> str:
        console = Console(width=160, file=io.StringIO())
        console.print(self)
        return console.file.getvalue()


def _block_graph(block: nn.Module, cand: Candidate, options: dict) -> fx.GraphModule:
    """The graph a pipeline starts from: one opaque call of the candidate block."""
    root = nn.Module()
    root.block = block
    g = fx.Graph()
    x = g.placeholder("hidden_states")
    g.output(g.call_module("block", (x,)))
    gm = fx.GraphModule(root, g, class_name="Candidate")
    gm.meta.update(block=block, candidate=cand, options=options)
    return gm


def _run(model: nn.Module, passes, instruments: Instruments, install_blocks: bool, backend: str,
         options: dict | None = None) -> Report:
    pm = PassManager(passes, instruments)
    report = Report(pipeline=pm.pipeline, backend=backend)
    cands = find_candidates(model)
    for cand in track(cands, description="moec: compiling MoE blocks", disable=len(cands) < 4, transient=True):
        block = resolve(model, cand.path)
        try:
            gm, records = pm.run(_block_graph(block, cand, options or {}), cand.path, block)
        except Rejected as e:
            report.rejected.append(Rejection(cand.path, str(e)))
            continue
        spec = gm.meta["moe_spec"]
        d = spec.describe()
        report.blocks.append(BlockReport(cand.path, spec.experts.num_experts, spec.router.top_k, d["router"],
                                         d["experts"], d["shared"], records))
        if install_blocks:
            install(block, gm)
            if spec.quant is not None:  # proved and installed: the fp experts are no longer read
                release_originals(block, cand, gm)
        else:  # inspection leaves the model exactly as it was
            for name in [n for n, _ in block.named_buffers(recurse=False) if n.startswith("_moec_")]:
                delattr(block, name)
    return report


def compile(model: nn.Module, *, backend: str = "auto", passes: str | None = None, verify: bool = False,
            quantize: QuantConfig | None = None, providers: list[str] | None = None, session_options=None,
            **options) -> nn.Module:
    """Find, prove and rewrite every MoE block of `model` (in place); return the model.

    backend: "auto" (Triton on CUDA, else torch), "torch", "triton" (appends the lower_triton pass) or
        "onnxruntime" (the whole model runs in an ONNX Runtime session, see moec.backends.ort_session;
        `providers` in precedence order, default CUDA when usable else CPU; `session_options` an
        onnxruntime.SessionOptions or a dict of its attributes).
    passes: a pipeline such as "detect_moe,fuse_gate,batch_experts" (the default).
    verify: check each rewritten block against the original after every pass, raise if off
        (quantized blocks: up to the pass before quantize_experts; quantization error is measured, not checked).
    quantize: Int8Experts() or Int4Experts(group_size, symmetric[, shared, router]): weight-only quantized
        routed experts (appends the quantize_experts pass). Backend torch: numba kernels, CPU only;
        triton: w8a16/w4a16 GEMMs; onnxruntime: QMoE nodes. shared=True is torch backend only.
    A model without MoE comes back unchanged, with a warning; blocks moec cannot prove are
    left as they were and listed in `moec.inspect(model).rejected` with the reason.
    """
    if options:
        raise TypeError(f"unknown option(s) {sorted(options)}")
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    backend = resolve_backend(backend, device)
    if quantize is not None and not isinstance(quantize, (Int8Experts, Int4Experts)):
        raise TypeError(f"quantize must be moec.Int8Experts() or moec.Int4Experts(...), not {quantize!r}")
    if getattr(quantize, "shared", False) and backend != "torch":
        raise NotImplementedError(f"moec: quantized shared experts (shared=True) run in the torch backend on CPU "
                                  f"only, not backend {backend!r}")
    if backend == "onnxruntime":
        return _compile_onnxruntime(model, passes, quantize, providers, session_options)
    if providers is not None or session_options is not None:
        raise TypeError("providers= and session_options= are options of backend='onnxruntime'")
    if quantize is not None and backend == "torch" and device.type != "cpu":
        raise NotImplementedError(f"moec: quantized experts in the torch backend run on CPU only (the model is on "
                                  f"{device.type}): use backend='triton'")
    instruments = Instruments.from_env()
    instruments.verify = instruments.verify or verify
    report = _run(model, pipeline_for(backend, passes, quantize is not None), instruments, install_blocks=True,
                  backend=backend, options={"quantize": quantize})
    if verify:
        for b in report.blocks:
            err = [r for r in b.passes if r.name != "quantize_experts"][-1].max_rel_err
            dtype = next(resolve(model, b.path).parameters()).dtype
            if err > VERIFY_TOL.get(dtype, 1e-4):
                raise RuntimeError(f"moec: block {b.path!r} differs from the original after "
                                   f"{b.passes[-1].name}: max relative error {err:.2e}")
    _warn_if_empty(model, report)
    report.quantize = quantize
    model.__dict__["_moec_report"] = report
    if quantize is not None and report.blocks and hasattr(model, "save_pretrained"):
        model.save_pretrained = _refuse_save_pretrained  # it would write the released (empty) expert weights
    return model


def _warn_if_empty(model: nn.Module, report: Report) -> bool:
    if report.blocks:
        return False
    why = f" ({len(report.rejected)} candidate(s) rejected: see moec.inspect)" if report.rejected else ""
    warnings.warn(f"moec: no MoE block rewritten in {type(model).__name__}{why}; returned unchanged", stacklevel=3)
    return True


def _compile_onnxruntime(model: nn.Module, passes, quantize, providers, session_options) -> nn.Module:
    """Prove the blocks now (the report); export and open a session at the first call of each input signature."""
    from moec.backends import ort_session
    from moec.export import check_exportable

    if passes is not None:
        raise ValueError("backend='onnxruntime' runs moec.export_onnx's pipeline; it takes no passes=")
    check_exportable(model, quantize, "cuda" if (providers or ort_session.default_providers())[0]
                     == "CUDAExecutionProvider" else "cpu")
    report = _run(model, "detect_moe", Instruments(), install_blocks=False, backend="onnxruntime")
    if _warn_if_empty(model, report):
        return model
    report.quantize = quantize
    model.__dict__["_moec_report"] = report
    ort_session.install(model, report, providers, session_options, quantize)
    return model


def _refuse_save_pretrained(*args, **kwargs):
    raise NotImplementedError("moec: a model with quantized experts has released its fp expert weights, so "
                              "save_pretrained cannot write it: use moec.save(model, path) and "
                              "moec.load(fresh_model, path)")


def inspect(model: nn.Module, *args, **kwargs) -> Report:
    """What moec finds in `model`: detected blocks (path, E, k, router, experts, shared) and
    rejected candidates with the reason. Works on compiled and original models alike; with
    example inputs, also counts the tokens each block routes to each expert."""
    report = model.__dict__.get("_moec_report")
    if report is None:
        report = _run(model, "detect_moe", Instruments(), install_blocks=False, backend="-")
    if args or kwargs:
        _expert_load(model, report, args, kwargs)
    return report


def _expert_load(model: nn.Module, report: Report, args, kwargs) -> None:
    from moec.backends.torch_backend import route_math
    from moec.ops import route_args

    specs = {b.path: _spec_of(model, b.path) for b in report.blocks}
    loads: dict[str, torch.Tensor] = {}

    def hook(path):
        def fn(mod, a):
            spec, x = specs[path], a[0]
            p = lambda role: resolve(mod, spec.params[role]) if role in spec.params else None  # noqa: E731
            _, ids, _ = route_math(x.reshape(-1, spec.experts.hidden), p("router_weight"), p("router_bias"),
                                   p("select_bias"), *route_args(spec.router), num_experts=spec.experts.num_experts)
            counts = torch.bincount(ids.reshape(-1).cpu(), minlength=spec.experts.num_experts)
            loads[path] = loads.get(path, 0) + counts
        return fn

    handles = [resolve(model, p).register_forward_pre_hook(hook(p)) for p, s in specs.items() if s is not None]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    for b in report.blocks:
        if b.path in loads:
            b.expert_load = loads[b.path].tolist()


def _spec_of(model: nn.Module, path: str):
    gm = resolve(model, path).__dict__.get("_moec_graph")
    if gm is not None:
        return gm.meta["moe_spec"]
    block = resolve(model, path)
    cand = next(c for c in find_candidates(block) if c.path == "")
    from moec.passes.detect_moe import analyze

    spec = analyze(block, cand)
    for name in [n for n, _ in block.named_buffers(recurse=False) if n.startswith("_moec_")]:
        delattr(block, name)
    return spec
