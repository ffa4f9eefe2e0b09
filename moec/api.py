"""Public API: moec.compile and moec.inspect (their report: moec.report).

compile is transactional: every candidate block is analysed, rewritten by the pipeline and its
final graph proved (detect.proof's probes, against the original block) before any block is
installed; a block that fails is left as it was, with the reason in the report; with verify=True
a failure raises and no block is installed at all.
"""

from __future__ import annotations

import gc
import itertools
import warnings
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from torch import fx, nn

import moec.passes  # noqa: F401  (registers the passes)
from moec.backends import cpu_dense, cpu_linear, pipeline_for, resolve_backend
from moec.backends.ort_session import uninstall as ort_uninstall
from moec.approx import ExpertPlan, TopP
from moec.bindings import Const, Derived
from moec.distributed import ExpertParallel, Group, ShardedExperts, compiled_blocks, fingerprint
from moec.cuda_graphs import check as cuda_graphs_check, install as cuda_graphs_install
from moec.canonical import (
    buffers_kept,
    build_graph,
    compiled_forward,
    compiled_graph,
    install,
    resolve,
    runner,
    uninstall,
)
from moec.log import _status, status
from moec.offload import OffloadedExperts, Offload, Pool
from moec.pass_manager import DEFAULT_PIPELINE, PASSES, Instruments, PassManager, PassRecord, Rejected, parse_pipeline
from moec.report import BlockReport, Rejection, Report
from moec.passes.detect import experts_only
from moec.passes.detect_moe import Candidate, analyze, find_candidates
from moec.passes.quantize_experts import (give_back_memory, quantized_tensors, refuse_new_experts_first,
                                          release_originals)
from moec.passes.reduce_topk import new_topk
from moec.quant import Int4Experts, Int8Experts, QuantConfig, dequantize, weight_only


@dataclass
class _Done:
    """A block whose final graph is proved, not installed yet."""

    cand: Candidate
    block: nn.Module
    gm: fx.GraphModule
    report: BlockReport


RAISED = "moec failed on it"  # how a rejection's reason starts where a pass (or moec) raised on the block


class _FinalProofFailed(Rejected):
    """The graph the pipeline produced differs from the original: a defect of a pass, never a user error.
    records: the passes that ran (with their errors under verify), for the CLI to name the first that changed them."""

    def __init__(self, message: str, records: list[PassRecord] | None = None):
        super().__init__(message)
        self.records = records or []


def _check_module(model, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"moec.{what} takes a torch.nn.Module, not {type(model).__name__}")


def _block_graph(block: nn.Module, cand: Candidate, options: dict) -> fx.GraphModule:
    """The graph a pipeline starts from: one opaque call of the candidate block."""
    root = nn.Module()
    root.block = block
    g = fx.Graph()
    x = g.placeholder("hidden_states")
    g.output(g.call_module("block", (x,)))
    gm = fx.GraphModule(root, g, class_name="Candidate")
    gm.meta.update(block=block, candidate=cand, options=options, undo=[])
    return gm


def _undo(gm_meta: dict) -> None:
    for fn in reversed(gm_meta.get("undo", [])):
        fn()
    gm_meta["undo"] = []


def _final_proof(gm: fx.GraphModule, block: nn.Module, pm: PassManager) -> str:
    """Prove the graph that will run (every pass, the backend's lowering included) on the probes, plus
    the token counts where its kernels change path. Quantized experts are compared with the canonical
    graph on their dequantized weights (the invariant of quantize_experts), routing included."""
    spec, proof = gm.meta["moe_spec"], gm.meta["proof"]
    in_dim = proof.probes[0].x.dim()
    proof.add_tokens([t for n in pm.names if PASSES[n].proof_tokens for t in PASSES[n].proof_tokens(spec)], in_dim)
    dtype = max((p for p in block.parameters() if p.is_floating_point()), key=torch.Tensor.numel).dtype
    what = f"the compiled graph (after {pm.names[-1]})"
    status(f"proving the graph after {pm.names[-1]}")
    run = runner(gm, block)
    approximate = gm.meta.get("approximate")
    if spec.quant is None and not approximate:
        proof.check(run, dtype, what, error=_FinalProofFailed)
    else:  # against the canonical graph of what the passes promise: dequantized weights, the new k
        roles = dict(gm.meta["canonical_bindings"]) | gm.meta.get("reference_roles", {})  # reduce_experts'
        quantized = () if spec.quant is None else ("w13", "w2") + (("router",) if spec.quant.router else ())
        expert_map = gm.meta.get("expert_map")  # reduce_experts: the kept experts, one per original expert
        for role in quantized:
            deq = dequantize(spec.quant, quantized_tensors(block, role), dtype)
            deq = deq if role == "router" or expert_map is None else deq[expert_map]
            roles["router_weight" if role == "router" else role] = Const(deq[0] if role == "router" else deq)
        ref = build_graph(block, spec.with_(quant=None), roles)
        with weight_only():  # int8 activations: measured below, the rest proved exactly
            proof.check(run, dtype, what, error=_FinalProofFailed, reference=runner(ref, block))
    proved = f"{proof.describe()}; experts reached {len(proof.reached)}/{spec.router_width}"
    if spec.quant is not None and spec.quant.activations == "int8":
        proved += (f"; with int8 activations: max relative error {proof.error(run, dtype):.2e} against the original "
                   f"block (weights and activations quantized)")
    if approximate:  # measured, not a failure: the pass was asked for by name
        gm.meta["approximation"] = (f"{', '.join(approximate)}: max relative error {proof.error(run, dtype):.2e} "
                                    f"against the original block on the probes, at compile")
        proved += f"; approximate ({gm.meta['approximation']})"
    return proved


def _blame(pm: PassManager) -> str:
    """Whose defect a failure in the pipeline is: moec's, or one of the user's own passes (not in moec's package)."""
    own = [n for n in pm.names if not PASSES[n].__module__.startswith("moec.")]
    return f"a defect of one of the passes {own}, or of moec's" if own else "a moec defect: please report it"


def _compile_block(pm: PassManager, block: nn.Module, cand: Candidate, options: dict) -> _Done | Rejection:
    start = _block_graph(block, cand, options)
    records = []
    try:
        gm, records = pm.run(start, cand.path, block)
        proved = _final_proof(gm, block, pm)
    except _FinalProofFailed as e:
        _undo(start.meta)
        raise _FinalProofFailed(f"{e} ({_blame(pm)})", records) from e
    except Rejected as e:
        _undo(start.meta)
        return Rejection(cand.path, str(e))
    except Exception as e:
        _undo(start.meta)
        first = (str(e).strip().splitlines() or [""])[0]  # an fx error prints the whole graph after its first line
        raise _FinalProofFailed(f"{RAISED}: {type(e).__name__}: {first} ({' '.join(getattr(e, '__notes__', []))};"
                                f" {_blame(pm)})") from e
    spec = gm.meta["moe_spec"]
    d = spec.describe()
    return _Done(cand, block, gm, BlockReport(cand.path, spec.experts.num_experts, spec.router.top_k, d["router"],
                                              d["experts"], d["shared"], records, proof=proved,
                                              approximate=gm.meta.get("approximation", ""),
                                              router_width=spec.router_width))


def _progress(n: int):
    console = Console(stderr=True)
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                    transient=True, disable=n == 0 or not console.is_terminal)


def _run(model: nn.Module, passes, instruments: Instruments, install_blocks: bool, backend: str,
         options: dict | None = None, strict: bool = False, only: str | None = None, before_install=None) -> Report:
    """Compile every candidate block of `model` (or the one at path `only`); before_install(report) may refuse
    (raise) once every block is proved, before any is installed."""
    pm = PassManager(passes, instruments)
    report = Report(pipeline=pm.pipeline, backend=backend)
    cands = [c for c in find_candidates(model) if only is None or c.path == only]
    for name, named in (("topk", (options or {}).get("topk")), ("experts", getattr((options or {}).get("experts"),
                                                                                        "keep", None))):
        if isinstance(named, dict) and (unknown := sorted(set(named) - {c.path for c in cands})):
            raise ValueError(f"moec.compile: {name} names no block at {unknown}; the blocks are "
                             f"{[c.path for c in cands]}")
    done: list[_Done] = []
    restore = []  # (block, its old graph, path): blocks uninstalled to be compiled again
    kept = model.__dict__.get("_moec_report")
    try:
        with _progress(len(cands)) as progress:
            task = progress.add_task("moec", total=len(cands))
            where = [""]  # the block being compiled, for the status line
            _status.append(lambda text: progress.update(task, description=f"{where[0]}: {text}"))
            for i, cand in enumerate(cands):
                where[0] = f"moec: block {i + 1}/{len(cands)} {cand.path or '(model)'}"
                status("analysing")
                block = resolve(model, cand.path)
                old = compiled_graph(block)
                # changed since compile (moec.form; not its training flags: a model in train() compiled again):
                # proved anew, or left to its own forward
                stale = old is not None and not block.training and compiled_forward(block).changed()
                if old is not None:
                    kept_block = _recompile(block, cand, pm, kept, options or {}, stale)
                    if kept_block is not None:
                        report.blocks.append(kept_block)
                        progress.advance(task)
                        continue
                    if not stale:
                        restore.append((block, old, cand.path))
                try:
                    res = _compile_block(pm, block, cand, options or {})
                except _FinalProofFailed as e:
                    if strict:
                        raise RuntimeError(f"moec: block {cand.path!r}: {e}; no block was rewritten") from e
                    res = Rejection(cand.path, str(e), e.records)
                if isinstance(res, Rejection):
                    if old is not None and not stale:  # compiled before, not with these options: it keeps its
                        install(block, old, cand.path)  # compiled graph
                    report.rejected.append(res)
                    sub = _experts_module(model, block, cand, pm, options or {}, strict)
                    if sub is not None:  # the block stays as it is, its experts module is rewritten
                        done.append(sub)
                        report.blocks.append(sub.report)
                else:
                    done.append(res)
                    report.blocks.append(res.report)
                progress.advance(task)
        if before_install is not None:
            before_install(report)
        if install_blocks and done:
            _install_all(done)
            refuse_new_experts_first(model)
    finally:
        if len(_status) > 1:
            _status.pop()
        if not install_blocks or any(compiled_graph(d.block) is not d.gm for d in done):
            for d in done:
                _undo(d.gm.meta)
            for block, old, path in restore:  # not compiled anew (an error, or inspect): the old graph runs again
                if compiled_graph(block) is None:
                    install(block, old, path)
    return report


def _experts_module(model, block, cand, pm: PassManager, options: dict, strict: bool) -> _Done | None:
    """A rejected block's experts module, compiled on its own (detect.experts_only), or None."""
    if cand.call:
        return None
    H = cand.hidden
    x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(0), device="cpu").to(next(block.parameters()))
    sub = experts_only.experts_candidate(block, cand, x) or experts_only.experts_candidate(block, cand, x.reshape(-1, H))
    if sub is None:
        return None
    status("rewriting its experts module alone")
    module = resolve(model, sub.path)
    if compiled_graph(module) is not None:
        return None
    try:
        res = _compile_block(pm, module, sub, options)
    except _FinalProofFailed as e:
        if strict:
            raise RuntimeError(f"moec: experts module {sub.path!r}: {e}; no block was rewritten") from e
        return None
    if isinstance(res, Rejection):
        return None
    return res


def _recompile(block, cand, pm: PassManager, kept: Report | None, options: dict, changed: str | None):
    """An already compiled block: keep it if compiled the same way and not `changed` since, else compile it anew (a
    quantized one has released its fp expert weights: refused). Returns its report when kept."""
    gm = compiled_graph(block)
    old = gm.meta["moe_spec"].quant
    new = options.get("quantize")
    same = (not changed and kept is not None and kept.pipeline == pm.pipeline and old == new
            and new_topk(kept.topk, cand.path) == new_topk(options.get("topk"), cand.path)
            and kept.experts == options.get("experts"))
    if pm.pipeline == "detect_moe" or (same and not gm.meta["moe_spec"].offloaded):  # inspect: what is installed
        return next((b for b in kept.blocks if b.path == cand.path), None) if kept else None
    if gm.meta["moe_spec"].offloaded:
        raise ValueError(f"moec.compile: block {cand.path!r} is already compiled with offloaded experts (its expert "
                         f"weights live in the offload store, not the model): build a fresh model to compile it again")
    if gm.meta["moe_spec"].kept:
        raise ValueError(f"moec.compile: block {cand.path!r} is already compiled with fewer experts (experts=) and "
                         f"the others were released: build a fresh model to compile it another way")
    if old is not None:
        raise ValueError(f"moec.compile: block {cand.path!r} is already compiled with {old.describe()} experts and "
                         f"its fp expert weights were released: build a fresh model to compile it with "
                         f"{new.describe() if new else 'fp experts'} or another pipeline"
                         + (f" ({changed})" if changed else ""))
    uninstall(block)
    return None


def _install_all(done: list[_Done]) -> None:
    """Install every proved block, or none (an error while installing uninstalls the ones before it)."""
    installed, released = [], False
    try:
        for d in done:
            install(d.block, d.gm, d.cand.path)
            installed.append(d)
            for b in d.gm.meta["bindings"].values():
                if isinstance(b, Derived):
                    b.adopt(d.block)  # one copy: the block's tensors become views of moec's storage
            spec = d.gm.meta["moe_spec"]
            if spec.quant is not None or spec.offloaded or spec.kept or spec.sharded:  # the originals are not read
                released = release_originals(d.block, d.cand) > 0 or released
            for m in d.gm.children():  # the sharded experts drop the full weights they replayed the proof on
                if isinstance(m, ShardedExperts):
                    m.installed()
                elif isinstance(m, OffloadedExperts):  # the offloaded experts' slots follow the block's dtypes
                    m.installed(d.block)
            d.gm.meta.pop("proof", None)
            d.gm.meta.pop("reference_roles", None)
            d.gm.meta["undo"] = []
            d.gm.meta["canonical_bindings"] = {  # routing only (inspect's expert load): no expert copies kept
                r: b for r, b in d.gm.meta["canonical_bindings"].items() if r.startswith(("router", "select"))}
    except BaseException:
        for d in installed:
            uninstall(d.block)
        raise
    if released:
        give_back_memory()


def compile(model: nn.Module, *, backend: str = "auto", passes: str | list[str] | None = None, verify: bool = False,
            quantize: QuantConfig | None = None, offload: Offload | None = None, topk: int | TopP | dict | None = None,
            experts: ExpertPlan | None = None, approximate: bool = False,
            expert_parallel: ExpertParallel | None = None, providers: list[str] | None = None, session_options=None,
            dense: QuantConfig | None = None, decode_linears: bool = True, cuda_graphs: bool = False,
            **options) -> nn.Module:
    """Find, prove and rewrite every MoE block of `model` (in place); return the model.

    backend: "auto" (Triton on CUDA, else torch), "torch", "triton" (appends the lower_triton pass) or
        "onnxruntime" (the whole model runs in an ONNX Runtime session, see moec.backends.ort_session;
        `providers` in precedence order, default CUDA when usable else CPU; `session_options` an
        onnxruntime.SessionOptions or a dict of its attributes; bf16 models on the CPU provider with moec's kernels
        (built at first use) run as their fp32 upcast on their bf16 weights, the experts' and dense layers' input rows
        rounded to bf16 as the model's where the CPU has AVX512-BF16; elsewhere they are refused).
    passes: a pipeline such as "detect_moe,fuse_gate,batch_experts" (the default) or a list of pass names.
    verify: raise (and rewrite nothing) if any block's final graph fails its proof, instead of leaving that
        block alone; also checks each block after every pass (MOEC_LOGS=verify prints the errors).
    quantize: Int8Experts() or Int4Experts(group_size, symmetric[, shared, router]): weight-only quantized
        routed experts (appends the quantize_experts pass). Backend torch: numba kernels, CPU only;
        triton: w8a16/w4a16 GEMMs; onnxruntime: QMoE nodes. shared=True is torch backend only.
        activations="int8": int8 activations and int8 dot products in the routed experts: backend onnxruntime
        (Int8Experts: a scale per row on moec's kernels where the CPU has AVX512-VNNI, else per group of 32 inputs
        in QMoE; Int4Experts: per group of the group size) or torch (Int8Experts: a scale per row; Int4Experts: per
        group, as ONNX Runtime, in moec's C kernel: backends/cpu_native).
    offload: moec.Offload(budget, store, path, policy, prefetch, prefetch_width): the routed experts leave the
        model for a store (disk or host memory) and run from a cache of `budget` experts (appends offload_experts; torch
        or triton backend; with quantize=, the quantized experts are stored and cached; see moec.offload). Statistics:
        moec.inspect(model).offload.
    topk: an approximation (needs approximate=True, or reduce_topk named in `passes`): every block routes to
        its `topk` best experts instead of its k (an int), or per block ({block path: k}; blocks not named, and
        blocks whose own k is at or below the one asked, keep theirs; a path that names no block is refused);
        the combine weights follow each router's own rule at the new k (passes/reduce_topk.py). The block is
        proved against its canonical form at the new k, and its error against the original is
        measured and shown by moec.inspect (docs/model_passes.md). moec.TopP(p, min_k, max_k) instead of k:
        top-p routing, each token keeps its fewest heaviest experts holding p of its k experts' weight.
    experts: an approximation (approximate=True, or reduce_experts in `passes`): moec.expert_plan(calibration,
        keep=n, mode="prune" | "merge") keeps n experts per block, dropping or merging the others
        (passes/reduce_experts.py); the dropped experts' memory is released. Not with offload= or onnxruntime.
    expert_parallel: moec.ExpertParallel(group, timeout, replicas, calibration): the routed experts sharded over a
        torch.distributed group, E/N per rank (+ `replicas` copies of the busiest experts of a calibration run),
        tokens exchanged with all_to_all (appends shard_experts; torch or triton backend; see moec.distributed).
        Every rank calls compile on the same model with the same options (checked).
    dense: an approximation asked for by name: Int4Experts(g, symmetric, signed_scale, activations) or
        Int8Experts(activations), the model's dense layers (attention, shared experts, dense MLPs, lm_head; never
        routers, 1-column gates or the layers of blocks moec left alone) in that format, as llama.cpp's quantized files have them. Backend torch (CPU):
        each nn.Linear becomes a moec.quant.QuantLinear on moec's kernels, checked once on its weights, its fp32
        weight released (see moec.backends.cpu_dense; left-alone layers in moec.inspect). onnxruntime: the
        MatMuls as MatMulNBits, as moec.export_onnx(dense=) writes them; with moec's kernels (CPU provider)
        int4 ones on moec::Int4MatMul and weight-only Int8Experts() as moec::LinearInt8, a scale per
        channel (the torch backend's numbers). Quality: docs/quality.md.
    decode_linears: backend torch: once a block is rewritten, the model's large fp32 nn.Linear layers
        (attention, shared experts, lm_head) run on moec's CPU kernel where a call has up to 4 rows (decode;
        1.3-2.7x torch's GEMM per layer there), each checked once at install against torch's (see
        moec.backends.cpu_linear; on one torch thread at compile: none). False leaves them to torch (and removes
        them if installed).
    cuda_graphs: a decoder-only transformers model on one CUDA device: generate() runs with a static KV cache (unless
        the call or a generation config names another cache or assisted decoding) and replays each one-token decode
        step as a CUDA graph of the whole forward, each graph checked against the eager step it was captured from
        (moec.cuda_graphs; statistics in moec.inspect(model).cuda_graphs). Not with offload=, expert_parallel= or
        backend "onnxruntime". False takes them away again.
    Every rewritten block is proved: its final graph is checked against the original block before it is
    installed (docs/guarantees.md). A model without MoE comes back unchanged, with a warning; blocks moec
    cannot prove are left as they were and listed in `moec.inspect(model).rejected` with the reason.
    """
    _check_module(model, "compile")
    _refuse_released(model)
    onnx = options.pop("_onnx", None)  # moec.export_onnx's settings for the lower_onnx pass, not a user option
    if options:
        raise TypeError(f"moec.compile got unknown option(s) {sorted(options)}")
    if not isinstance(verify, bool):
        raise TypeError(f"moec.compile: verify must be True or False, not {verify!r}")
    if not isinstance(decode_linears, bool):
        raise TypeError(f"moec.compile: decode_linears must be True or False, not {decode_linears!r}")
    named = set() if passes is None else set(parse_pipeline(passes))
    _check_cuda_graphs(model, cuda_graphs, backend, offload, expert_parallel)
    if topk is not None:
        _check_topk(topk)
        if not (approximate or "reduce_topk" in named):
            raise ValueError("moec.compile: topk= changes the model's outputs (an approximating pass): pass "
                             "approximate=True to ask for it")
    if experts is not None:
        if not isinstance(experts, ExpertPlan):
            raise TypeError(f"moec.compile: experts must be a moec.ExpertPlan (moec.expert_plan(calibration, keep=n)),"
                            f" not {experts!r}")
        if not (approximate or "reduce_experts" in named):
            raise ValueError("moec.compile: experts= changes the model's outputs (an approximating pass): pass "
                             "approximate=True to ask for it")
        if offload is not None:
            raise NotImplementedError("moec.compile: experts= with offload= (the prefetch predicts the original "
                                      "experts): compile with one of them")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    backend = resolve_backend(backend, device)
    group = None if expert_parallel is None else _expert_parallel_group(model, expert_parallel, backend, offload,
                                                                         [passes, quantize, topk, experts])
    if quantize is not None and not isinstance(quantize, (Int8Experts, Int4Experts)):
        raise TypeError(f"quantize must be moec.Int8Experts() or moec.Int4Experts(...), not {quantize!r}")
    if getattr(quantize, "shared", False) and backend != "torch":
        raise NotImplementedError(f"moec: quantized shared experts (shared=True) run in the torch backend on CPU "
                                  f"only, not backend {backend!r}")
    if quantize is not None and quantize.activations != "fp32" and backend != "onnxruntime" \
            and "lower_onnx" not in named:  # lower_onnx: ORT's ops by their torch reference
        if backend != "torch":
            raise NotImplementedError(f"moec: int8 activations ({type(quantize).__name__}(activations='int8')) run in "
                                      f"ONNX Runtime's QMoE kernel (backend='onnxruntime', or moec.export_onnx) and "
                                      f"in the torch backend on CPU, not in backend {backend!r}")
    if offload is not None:
        if not isinstance(offload, Offload):
            raise TypeError(f"offload must be moec.Offload(...), not {offload!r}")
        if backend not in ("torch", "triton"):
            raise NotImplementedError(f"moec: offloaded experts run in the torch or triton backend, not {backend!r}: "
                                      f"use backend='torch' or 'triton'")
    if dense is not None:
        _check_dense(dense, backend, device)
    cpu_dense.check_recompile(model, dense, backend)
    ort_uninstall(model)  # compiled again after backend="onnxruntime": the new backend replaces its sessions
    cuda_graphs_install(model, False)  # compiled again: installed again below if asked for
    if backend == "onnxruntime":
        if topk is not None or experts is not None:
            raise NotImplementedError("moec: topk= and experts= run in the torch backend (tested), not 'onnxruntime'")
        return _compile_onnxruntime(model, passes, quantize, providers, session_options, dense)
    if providers is not None or session_options is not None:
        raise TypeError("providers= and session_options= are options of backend='onnxruntime'")
    if quantize is not None and backend == "torch" and device.type != "cpu":
        raise NotImplementedError(f"moec: quantized experts in the torch backend run on CPU only (the model is on "
                                  f"{device.type}): use backend='triton'")
    instruments = Instruments.from_env()
    instruments.verify = instruments.verify or verify
    pool = Pool(offload, device) if offload is not None else None
    agree = None if group is None else lambda r: group.agree("the blocks compiled", compiled_blocks(r))
    report = _run(model, pipeline_for(backend, passes, quantize is not None, pool is not None, topk is not None,
                                      experts is not None, group is not None),
                  instruments, install_blocks=True, backend=backend,
                  options={"quantize": quantize, "offload": pool, "topk": topk, "experts": experts,
                           "expert_parallel": group, "onnx": onnx or {}}, strict=verify, before_install=agree)
    _warn_if_empty(model, report)
    report.quantize, report.topk, report.experts = quantize, topk, experts
    install_dense(model, report, dense)
    install_decode_linears(model, report, decode_linears and backend == "torch")
    report.cuda_graphs = cuda_graphs_install(model, cuda_graphs)
    report.expert_parallel = None if group is None else group.stats
    if pool is not None:
        _start_offload(model, report, pool)
    settle(model, report)
    model.__dict__["_moec_report"] = report  # (also where no block was rewritten: inspect says why)
    if (quantize is not None or pool is not None) and report.blocks:
        refuse_save_pretrained(model)
    if torch.__future__.get_swap_module_params_on_conversion() or _nbytes(model) >= COLLECT_FROM:
        gc.collect()  # analysis's graphs, in reference cycles, still hold the model's tensors: `del model` would not
        # free them, and .to() with swapped parameters fails while they are held
    return model


COLLECT_FROM = 64 << 20  # a model's bytes from which compile ends with a full garbage collection (~0.2 s)


def _nbytes(model: nn.Module) -> int:
    return sum(t.nbytes for t in itertools.chain(model.parameters(), model.buffers()))


def _check_cuda_graphs(model: nn.Module, on: bool, backend: str, offload, expert_parallel) -> None:
    if not isinstance(on, bool):
        raise TypeError(f"moec.compile: cuda_graphs must be True or False, not {on!r}")
    if not on:
        return
    if backend == "onnxruntime" or offload is not None or expert_parallel is not None:
        what = "offload=" if offload is not None else "expert_parallel=" if expert_parallel is not None else \
            "backend 'onnxruntime'"
        raise NotImplementedError(f"moec.compile: cuda_graphs=True does not run with {what} (the graph would replay "
                                  f"host work: expert loads, exchanges, sessions): compile without one of them")
    cuda_graphs_check(model)


def _refuse_released(model: nn.Module) -> None:
    """A model whose blocks run offloaded or sharded experts holds none (or a shard) of them, so its blocks are no
    longer even found as MoE blocks (their parent would be): refuse to compile it again."""
    for name, m in model.named_modules():
        spec = m.__dict__.get("_moec_graph") and m.__dict__["_moec_graph"].meta["moe_spec"]
        if spec and (spec.offloaded or spec.sharded):
            how = "offloaded experts (they live in the offload store" if spec.offloaded else \
                "sharded experts (this rank holds its shard only"
            raise ValueError(f"moec.compile: block {name!r} is already compiled with {how}, not the model): build "
                             f"a fresh model to compile it again")


def _expert_parallel_group(model, cfg, backend: str, offload, options: list) -> Group:
    """The group the sharded experts exchange in, once every rank agreed on the model and the options."""
    if not isinstance(cfg, ExpertParallel):
        raise TypeError(f"moec.compile: expert_parallel must be moec.ExpertParallel(...), not {cfg!r}")
    if backend not in ("torch", "triton"):
        raise NotImplementedError(f"moec: expert_parallel= runs the torch or triton backend's experts ops (fp, int8, "
                                  f"int4), not backend {backend!r}: use backend='torch' or 'triton'")
    if offload is not None:
        raise NotImplementedError("moec: expert_parallel= with offload=: compile with one of them")
    group = Group(cfg)
    shapes = [(c.path, c.num_experts, c.hidden) for c in find_candidates(model)]
    uncalibrated = [path for path, E, _ in shapes if cfg.replicas and cfg.loads(path, E) is None]
    if uncalibrated:
        warnings.warn(f"moec.ExpertParallel: the calibration has no routing for block(s) {uncalibrated} (other paths "
                      f"or expert counts: a calibration of another model?): they get no copies", stacklevel=3)
    config = getattr(model, "config", None)  # an HF model's config (k, sizes, ...)
    group.agree("the model and the compile options", [shapes, [repr(o) for o in options],
                                                      [group.placement(path, E) for path, E, _ in shapes],
                                                      {n: fingerprint(p) for n, p in model.named_parameters()},
                                                      config.to_dict() if hasattr(config, "to_dict") else None])
    return group


def _check_topk(topk) -> None:
    """A TypeError for another kind of value, a ValueError for an int below 1 (an int k of 0 keeps no expert)."""
    ks = list(topk.values()) if isinstance(topk, dict) and all(isinstance(p, str) for p in topk) else [topk]
    if not all(isinstance(k, TopP) or isinstance(k, int) and not isinstance(k, bool) for k in ks):
        raise TypeError(f"moec.compile: topk must be an int >= 1, a moec.TopP, or a dict {{block path: either}}, "
                        f"not {topk!r}")
    if any(isinstance(k, int) and k < 1 for k in ks):
        raise ValueError(f"moec.compile: topk must be at least 1 (each token keeps k experts), not {topk!r}")


def _start_offload(model: nn.Module, report: Report, pool: Pool) -> None:
    """Give the pool each offloaded block's predictors (moec.offload.prefetch), in the order the blocks run in
    the model (module order), empty it and its statistics (the proof's calls)."""
    from moec.offload.prefetch import LatePrefetch, router_predictor

    for b in report.blocks:
        block = resolve(model, b.path)
        spec, roles = _spec_of(model, b.path)
        if b.path not in pool.blocks or "router_weight" not in roles or pool._worker is None:
            continue
        predict = router_predictor(roles, block, spec, pool.cfg.prefetch_width)
        pool.blocks[b.path]["router"] = predict
        if "." in b.path:
            pool.late.append(LatePrefetch(pool, b.path, resolve(model, b.path.rpartition(".")[0]), block, predict,
                                          spec.experts.hidden))
    pool.reset()
    report.offload = pool.stats


def _check_dense(dense, backend: str, device: torch.device) -> None:
    if not isinstance(dense, (Int8Experts, Int4Experts)) or dense.shared or dense.router:
        raise TypeError(f"moec.compile: dense must be moec.Int4Experts(group_size, symmetric, signed_scale, "
                        f"activations) or moec.Int8Experts(activations), without shared=/router=, not {dense!r}")
    if backend not in ("torch", "onnxruntime"):
        raise NotImplementedError(f"moec.compile: dense= runs on backend 'torch' (CPU, moec's kernels) or "
                                  f"'onnxruntime' (MatMulNBits), not {backend!r}")
    if backend == "torch" and device.type != "cpu":
        raise NotImplementedError(f"moec.compile: dense= on backend 'torch' runs on CPU only (the model is on "
                                  f"{device.type})")


def settle(model: nn.Module, report: Report) -> None:
    """The compiled blocks' forms (moec.form) as compile, load_offloaded and load_sharded leave them: dense= and
    decode_linears= replace or wrap Linears inside blocks after the blocks are installed."""
    for b in report.blocks:
        compiled_forward(resolve(model, b.path)).settle()


def install_dense(model: nn.Module, report: Report, dense) -> None:
    """compile(dense=...) on the torch backend: the model's dense layers quantized (moec.backends.cpu_dense), once
    a block is rewritten (a model without MoE comes back unchanged)."""
    if dense is None or not report.blocks:
        return
    report.dense = dense
    report.dense_layers, report.dense_left = cpu_dense.install(model, dense, [r.path for r in report.rejected])
    refuse_save_pretrained(model)  # the quantized layers' fp32 weights are gone


def install_decode_linears(model: nn.Module, report: Report, on: bool) -> None:
    """decode_linears=True (torch backend): once a block is rewritten, the model's nn.Linear layers run on moec's
    CPU kernels at decode (moec.backends.cpu_linear); layers whose check fails keep torch's GEMM, with a warning."""
    if not isinstance(on, bool):
        raise TypeError(f"moec: decode_linears must be True or False, not {on!r}")
    if not (on and report.blocks):
        cpu_linear.uninstall(model)  # a model compiled before with them
        return
    report.decode_linears, failed = cpu_linear.install(model)
    if failed:
        warnings.warn(f"moec: {len(failed)} nn.Linear layer(s) keep torch's GEMM at decode: moec's kernel did not "
                      f"match it on their weights ({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''})",
                      stacklevel=3)


def _warn_if_empty(model: nn.Module, report: Report, kept: bool = True) -> bool:
    """Warn where no block was rewritten, with the first rejection's reason (kept: the model keeps the report, so
    moec.inspect lists every rejection)."""
    if report.blocks:
        return False
    why = " (moec looks for a router choosing among 2 or more experts: moec.inspect(model) shows what it finds)"
    if report.rejected:
        first, more = report.rejected[0], len(report.rejected) - 1
        why = (f" ({first.path or '(model)'}: {first.reason}"
               + (f"; and {more} more candidate(s) rejected" if more else "")
               + ("; moec.inspect(model) lists them" if kept and more else "") + ")")
    warnings.warn(f"moec: no MoE block rewritten in {type(model).__name__}{why}; returned unchanged", stacklevel=3)
    return True


def _compile_onnxruntime(model: nn.Module, passes, quantize, providers, session_options, dense) -> nn.Module:
    """Prove the blocks now (the report); export and open a session at the first call of each input signature."""
    from moec.backends import ort_session
    from moec.export import check_exportable, export_pipeline

    if passes is not None:
        raise ValueError("backend='onnxruntime' runs moec.export_onnx's pipeline; it takes no passes=")
    providers = providers or ort_session.default_providers()
    check_exportable(model, quantize, "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu", dense,
                     bf16=ort_session.runs_bf16(providers))
    # with quantize=, the quantizing pass too: a block it refuses (a group size that does not divide) is rejected
    # now, with the reason, as on the torch backend, not at the first call's export
    pipeline = "detect_moe" if quantize is None else DEFAULT_PIPELINE + ",quantize_experts"
    report = _run(model, pipeline, Instruments(), install_blocks=False, backend="onnxruntime",
                  options={"quantize": quantize})
    if _warn_if_empty(model, report, kept=False):
        return model
    # what will run: the export's passes, at the first call of each input signature
    report.quantize, report.dense, report.pipeline = quantize, dense, export_pipeline(quantize)
    model.__dict__["_moec_report"] = report
    ort_session.install(model, report, providers, session_options, quantize, dense)
    return model


def refuse_save_pretrained(model: nn.Module) -> None:
    """An HF model whose experts left it (quantized, offloaded): its save_pretrained would write empty experts."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = _refuse_save_pretrained


def _refuse_save_pretrained(*args, **kwargs):
    raise NotImplementedError("moec: a model with quantized or offloaded experts, or dense layers quantized by "
                              "dense=, has released those fp weights, so save_pretrained cannot write it: use "
                              "moec.save(model, path) and moec.load(fresh_model, path) for quantized ones; keep the "
                              "original checkpoint of an offloaded one")


def inspect(model: nn.Module, *args, **kwargs) -> Report:
    """What moec finds in `model`: detected blocks (path, E, k, router, experts, shared) and
    rejected candidates with the reason. Works on compiled and original models alike and leaves
    the model as it was; with example inputs, also counts the tokens each block routes to each expert."""
    _check_module(model, "inspect")
    report = model.__dict__.get("_moec_report")
    if report is None:
        report = _run(model, "detect_moe", Instruments(), install_blocks=False, backend="-")
    if args or kwargs:
        _expert_load(model, report, args, kwargs)
    report.calibration = model.__dict__.get("_moec_calibration")
    return report


def _expert_load(model: nn.Module, report: Report, args, kwargs) -> None:
    specs = {b.path: _spec_of(model, b.path) for b in report.blocks}
    loads: dict[str, torch.Tensor] = {}

    def hook(path):
        def fn(mod, a, kw):
            spec, roles = specs[path]
            _, ids, w = block_route(mod, spec, roles, a[0] if a else next(iter(kw.values())))
            counts = torch.bincount(ids[w != 0].cpu(), minlength=spec.router_width)  # top-p's 0s do not run
            loads[path] = loads.get(path, 0) + counts
        return fn

    handles = [resolve(model, p).register_forward_pre_hook(hook(p), with_kwargs=True) for p in specs]
    try:
        with torch.no_grad(), buffers_kept(model):  # (token counters: inspect leaves them as they were)
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    for b in report.blocks:
        if b.path in loads:
            b.expert_load = loads[b.path].tolist()


def block_route(block: nn.Module, spec, roles: dict, x: torch.Tensor, router=None, weight=None):
    """The block's routing of x [.., H] by its router as moec read it (RouterSpec `router` instead of the block's:
    e.g. a wider top-k), on its live weights (`weight` [E, H] instead of the router's: a fitted predictor):
    (logits [T, E], ids [T, k], weights [T, k])."""
    from moec.backends.torch_backend import route_math
    from moec.ops import route_args

    p = lambda role: roles[role].get(block) if role in roles else None  # noqa: E731
    w, bias, select_bias = p("router_weight") if weight is None else weight, p("router_bias"), p("select_bias")
    if spec.kept and hasattr(block, "_moec_router_mask"):  # pruned by reduce_experts: -inf at the dropped experts
        mask = block._moec_router_mask
        bias = mask if bias is None else bias + mask
        select_bias = None if select_bias is None else select_bias + mask
    return route_math(x.reshape(-1, spec.experts.hidden).to(w.dtype), w, bias, select_bias,
                      *route_args(router or spec.router), num_experts=spec.router_width)


def _spec_of(model: nn.Module, path: str):
    """(spec, bindings) of a block: its installed graph's, else a fresh analysis."""
    block = resolve(model, path)
    gm = compiled_graph(block)
    if gm is not None:
        return gm.meta["moe_spec"], gm.meta.get("canonical_bindings", gm.meta["bindings"])
    cand = next(c for c in find_candidates(block) if c.path == "")
    specs, roles, _ = analyze(block, cand)
    return specs[0], roles
