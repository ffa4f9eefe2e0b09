"""moec's passes; importing this package registers them (see moec.pass_manager.PASSES)."""

from moec.passes import (batch_experts, detect_moe, fuse_gate, lower_onnx, lower_triton,  # noqa: F401
                         offload_experts, quantize_experts, reduce_experts, reduce_topk,
                         shard_experts)
