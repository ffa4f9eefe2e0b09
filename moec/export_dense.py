"""export_onnx(..., dense=Int4Experts(g) | Int8Experts()): the exported file's dense MatMuls as MatMulNBits.

    y[.., N] = MatMul(x[.., K], W[K, N] initializer)   ->   y = com.microsoft::MatMulNBits(x, Q, scales)

for the attention projections, the lm_head and the dense / shared MLPs: every MatMul whose second input is a
constant [K, N] with K a multiple of the block size, except the routers (N = a block's expert count: quantized
router weights would change which experts run) and one-column gates (N = 1, the shared experts' sigmoid gate).
ONNX Runtime's own quantizer (onnxruntime.quantization.matmul_nbits_quantizer) writes the nodes: int4 in blocks of
the config's group size (symmetric or with zero points), int8 per block of 32 (Int8Experts). With
activations="int8" (either config) the nodes take accuracy_level=4 (int8 activations, int8 dot products).
"""

from __future__ import annotations

import logging

import onnx
from onnx import numpy_helper

from moec.quant import Int4Experts, Int8Experts


def dense_matmuls(proto: onnx.ModelProto, block: int, router_widths: set[int]) -> list[str]:
    """Names of the MatMul nodes to quantize (see the module docstring)."""
    consts = {t.name: t.dims for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node
            if n.op_type == "MatMul" and len(consts.get(n.input[1], ())) == 2
            and consts[n.input[1]][0] % block == 0 and consts[n.input[1]][1] not in router_widths | {1}]


def quantize_dense(path: str, cfg: Int4Experts | Int8Experts, router_widths: set[int], external_data: bool) -> int:
    """Rewrite the file at `path` in place; return how many MatMuls became MatMulNBits."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    block = cfg.group_size if isinstance(cfg, Int4Experts) else 32
    proto = onnx.load(path)
    names = dense_matmuls(proto, block, router_widths)
    if not names:
        return 0
    int8 = cfg.activations == "int8"  # int8 dot products, as for the experts
    quantizer = MatMulNBitsQuantizer(proto, bits=cfg.bits, block_size=block, accuracy_level=4 if int8 else None,
                                     is_symmetric=getattr(cfg, "symmetric", True), nodes_to_include=names)
    ort_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level, ort_log.level = ort_log.level, logging.WARNING  # it logs a line per node at INFO
    try:
        quantizer.process()
    finally:
        ort_log.setLevel(level)
    quantizer.model.save_model_to_file(path, use_external_data_format=external_data)
    return sum(n.op_type == "MatMulNBits" for n in onnx.load(path, load_external_data=False).graph.node)
