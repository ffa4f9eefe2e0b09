"""Backends: kernels for moec's canonical ops.

- `torch`: plain torch (`torch_backend`), every device; the fast path on CPU, where the numba kernels
  (`cpu_quant`) run quantized experts, fp32/bf16 experts at decode and, once a block is rewritten, the model's
  nn.Linear layers at decode (`cpu_linear`).
- `triton`: grouped-GEMM Triton kernels (`triton_experts`; routing stays torch's ops), CUDA;
  also runs on CPU tensors under TRITON_INTERPRET=1 (slow; for tests).
- `onnxruntime`: the whole model exported (moec.export_onnx) and run in an InferenceSession (`ort_session`);
  plain greedy and sampling `generate` in one loop around it (`ort_generate`).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

BACKENDS = ("torch", "triton", "onnxruntime")
CSRC = Path(__file__).parent / "csrc"  # the C kernels: cpu_native's library, and ort_kernels' custom-op library


def c_source(*names: str) -> str:
    """csrc's files `names` as one translation unit, in that order (each after what it uses); #line keeps the
    compiler's messages on each file's own lines."""
    return "".join(f'#line 1 "csrc/{name}"\n' + (CSRC / name).read_text() for name in names)


_SCHEMAS = threading.Lock()


def register_once(schema) -> None:
    """`schema` (an onnx OpSchema) registered with onnx unless one of its name and domain is: under a lock, so
    that two threads exporting at once do not both register it (onnx raises on the second)."""
    import onnx

    with _SCHEMAS:
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)


def triton_unavailable(device) -> str | None:
    """None if the Triton backend can run on `device`, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"the Triton backend needs a CUDA device (the model is on {device.type}; TRITON_INTERPRET=1 runs " \
           "its kernels in Triton's CPU interpreter, slowly)"


def resolve_backend(name: str, device) -> str:
    """'auto' picks the best backend available for the device: Triton on CUDA, else torch."""
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_unavailable(device) is None else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)} (or 'auto')")
    if name == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        raise RuntimeError("moec: backend='onnxruntime' needs onnxruntime (pip install onnxruntime-gpu or onnxruntime)")
    if name == "triton" and (why := triton_unavailable(device)):
        raise RuntimeError(f"moec: backend='triton' cannot run here: {why}")
    return name


def pipeline_for(backend: str, passes: str | list[str] | None, quantize: bool = False, offload: bool = False,
                 topk: bool = False, experts: bool = False, sharded: bool = False) -> str:
    """The pass pipeline: the user's (or the default), reduce_topk and reduce_experts after fuse_gate if asked,
    then quantize_experts / offload_experts if asked, then the backend's lowering."""
    from moec.pass_manager import parse_pipeline

    names = parse_pipeline(passes)
    for asked, name in ((topk, "reduce_topk"), (experts, "reduce_experts")):
        if asked and name not in names:
            after = [i for i, n in enumerate(names) if n in ("fuse_gate", "reduce_topk")]
            names.insert(after[-1] + 1 if after else len(names), name)
    if quantize and "quantize_experts" not in names:
        names.append("quantize_experts")
    if offload and "offload_experts" not in names:
        names.append("offload_experts")
    if sharded and "shard_experts" not in names:
        names.append("shard_experts")
    if backend == "triton" and "lower_triton" not in names:
        names.append("lower_triton")
    return ",".join(names)
