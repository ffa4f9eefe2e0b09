"""What moec.compile and moec.inspect report: the blocks found and rewritten, those rejected and why, and which
numerics run (printed as a rich table)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from moec.pass_manager import PassRecord
from moec.quant import Int4Experts, Int8Experts, QuantConfig, activation_group


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
    proof: str = ""  # what the final graph was checked on
    approximate: str = ""  # what an approximating pass (reduce_topk) changed, and its measured error
    router_width: int = 0  # the router's outputs: num_experts, and zero-compute experts (MoESpec.router_width)


@dataclass
class Rejection:
    path: str
    reason: str
    passes: list[PassRecord] = field(default_factory=list)  # a final proof that failed: the passes run before it


def _numerics(backend: str, cfg: QuantConfig, pipeline: str = "") -> str:
    """Which arithmetic the quantized experts run in, per backend (a torch pipeline with lower_onnx: ORT's ops)."""
    if cfg.activations == "int8" and backend == "torch" and "lower_onnx" not in pipeline:
        if isinstance(cfg, Int8Experts):
            from moec.backends.torch_backend import int_mm_has_vnni

            many = "torch._int_mm (oneDNN)" if int_mm_has_vnni() else "exact fp32 GEMMs of the integers (no VNNI)"
            return ("(routed experts: int8 activations, one scale per row of each GEMM's input, int8 x int8 products: "
                    f"{many} for experts with many rows, moec's kernels for few; the rest weight-only)")
        from moec.backends import cpu_native

        how = ("int8 dot products in moec's native kernel" if cpu_native.library() else
               "the rounded rows on dequantized weights (fp32 GEMMs: the native kernel is not built)")
        return (f"(routed experts: int8 activations per group of {cfg.group_size} inputs, as ONNX Runtime's; {how}; "
                f"the rest weight-only)")
    kernel = "ONNX Runtime's QMoE kernel"
    if backend.startswith("onnxruntime") and "(CPU" in backend:  # moec's kernels where this CPU's build has them
        from moec.backends import cpu_native, ort_kernels

        int8, a8 = isinstance(cfg, Int8Experts), cfg.activations == "int8"
        ours = f"moec's {'int8' if int8 else 'int4'} kernels as an ONNX Runtime custom op where a block fits them " \
               "(gated SiLU, no biases; else QMoE: .export.blocks says which)"
        if ort_kernels.library() and int8 and a8 and cpu_native.has_vnni512():
            return ("(routed experts: int8 activations, one scale per row of each GEMM's input as on the torch "
                    f"backend, int8 dot products: {ours})")
        if ort_kernels.library() and not (int8 and a8):  # (int8 rows on int8 weights: AVX512-VNNI, above)
            kernel = ours
    if cfg.activations == "int8":
        return f"(int8 activations per group of {activation_group(cfg)}, int8 dot products: {kernel})"
    if backend.startswith("onnxruntime"):
        return f"(weight-only, {kernel})"
    if backend == "triton":
        return "(weight-only: activations in the model's dtype, fp32 accumulation)"
    if isinstance(cfg, Int4Experts) and backend == "torch" and "lower_onnx" not in pipeline:
        from moec.backends import cpu_native

        how = "moec's native kernel" if cpu_native.library() is not None else "moec's numba kernels"
        return f"(weight-only: fp32 activations and accumulation; {how})"
    return "(weight-only: fp32 activations and accumulation)"


@dataclass
class Report:
    blocks: list[BlockReport] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    pipeline: str = ""
    backend: str = ""
    quantize: QuantConfig | None = None
    dense: QuantConfig | None = None  # compile(dense=...): the dense layers' format (MatMulNBits on onnxruntime)
    dense_layers: int | None = None  # backend torch, compile(dense=...): nn.Linear layers quantized (cpu_dense)
    dense_left: list[str] = field(default_factory=list)  # "name: reason" for each nn.Linear (onnxruntime: MatMul) dense= left alone
    topk: int | dict | None = None  # compile(topk=...): the approximation asked for (moec.save keeps it)
    experts: object = None  # compile(experts=moec.ExpertPlan): the experts kept (moec.save keeps it)
    export: object = None  # backend="onnxruntime": the moec.export_onnx report of the last session opened
    offload: object = None  # compile(offload=...): the expert cache's statistics (moec.offload.OffloadStats), live
    calibration: object = None  # moec.calibrate's routing statistics (moec.calibrate.Calibration), if it ran
    expert_parallel: object = None  # compile(expert_parallel=...): this rank's exchange statistics, live
    decode_linears: int | None = None  # torch backend, compile(decode_linears=True): nn.Linear layers on moec's
    # CPU kernels at decode (backends/cpu_linear.py); None: off
    cuda_graphs: object = None  # compile(cuda_graphs=True): the graphed decode steps' statistics, live

    def __rich__(self) -> Table:
        q = f", quantize {self.quantize.describe()} {_numerics(self.backend, self.quantize, self.pipeline)}" if self.quantize else ""
        if self.dense and self.dense_layers is not None:
            how = "int8 activations" if self.dense.activations == "int8" else "weight-only"
            q += f", {self.dense_layers} dense nn.Linear layers {self.dense.describe()} ({how}, moec's CPU kernels)"
        elif self.dense:
            q += f", dense MatMuls {self.dense.describe()} (in the ONNX Runtime session)"
        q += (f", {self.decode_linears} nn.Linear layers on moec's CPU kernel at decode (fp32, up to 4 rows)"
              if self.decode_linears else "")
        q += f", {self.cuda_graphs.describe()}" if self.cuda_graphs is not None else ""
        t = Table(title=f"moec: {len(self.blocks)} MoE block(s) found, {len(self.rejected)} rejected "
                        f"(pipeline {self.pipeline}, backend {self.backend}{q})", title_justify="left")
        for col in ("block", "E", "k", "router", "experts", "shared", "load (min/max tokens)"):
            t.add_column(col)
        for b in self.blocks:
            load = f"{min(b.expert_load)}/{max(b.expert_load)}" if b.expert_load else "-"
            t.add_row(b.path, str(b.num_experts), f"{b.top_k}*" if b.approximate else str(b.top_k), b.router,
                      b.experts, b.shared, load)
        for r in self.rejected:
            t.add_row(r.path, "", "", f"[not rewritten] {r.reason}", "", "", "")
        if not self.blocks and not self.rejected:
            t.add_row("-", "", "", "no MoE block found: the model is returned unchanged", "", "", "")
        notes = [f"* {b.path}: approximate, {b.approximate}" for b in self.blocks if b.approximate]
        notes += [f"dense= left fp32: {why}" for why in self.dense_left]
        if notes:
            t.caption, t.caption_justify = "\n".join(notes), "left"
        return t

    def __str__(self) -> str:
        console = Console(width=160, file=io.StringIO())
        console.print(self)
        return console.file.getvalue()
