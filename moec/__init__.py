"""moec: a compiler for Mixture-of-Experts inference.

    model = moec.compile(model)     # find, prove and rewrite every MoE block
    model = moec.compile(model, quantize=moec.Int4Experts(group_size=128))   # + weight-only int4 experts
    print(moec.inspect(model))      # what was found, rewritten, and why not
    moec.export_onnx(model, inputs, "model.onnx")   # ONNX, each MoE block one com.microsoft::MoE/QMoE node

Pipeline (see the file tree): moec/capture.py (record a block's run as an fx graph) ->
passes/ (detect_moe, fuse_gate, reduce_topk, reduce_experts, batch_experts, quantize_experts, offload_experts,
lower_triton, lower_onnx) -> backends/ (kernels for moec's canonical
ops, defined in moec/ops.py and described by moec/ir.py) -> moec/api.py.
"""

from moec.api import compile, inspect
from moec.report import Report
from moec.approx import ExpertPlan, TopP
from moec.distributed import ExpertParallel, load_sharded
from moec.calibrate import Calibration, calibrate, expert_plan, topk_schedule, topk_search
from moec.ir import ExpertsSpec, MoESpec, RouterSpec, SharedSpec
from moec.offload import Offload, load_offloaded
from moec.pass_manager import DEFAULT_PIPELINE, PASSES
from moec.quant import Int4Experts, Int8Experts
from moec.serialize import load, save

# the ONNX side (onnx, onnxscript: ~0.6 s of `import moec`) is imported when first used
_LAZY = {"export_onnx": "moec.export", "ExportReport": "moec.export", "export_genai": "moec.genai"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = ["compile", "inspect", "Report", "calibrate", "topk_schedule", "topk_search", "expert_plan", "ExpertPlan", "TopP", "ExpertParallel", "load_sharded", "Calibration", "Offload", "load_offloaded", "export_onnx", "export_genai", "ExportReport", "Int8Experts", "Int4Experts", "save", "load", "MoESpec", "RouterSpec", "ExpertsSpec", "SharedSpec", "PASSES",
           "DEFAULT_PIPELINE"]
