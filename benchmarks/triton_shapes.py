"""MoE layer shapes of the Triton benchmarks, random HF Mixtral-style blocks built on the device, the timer."""

import torch
import transformers

# name: (E, H, I, k); "tiny" runs anywhere (also under TRITON_INTERPRET=1) to smoke-test the scripts
SHAPES = {
    "mixtral-8x7b": (8, 4096, 14336, 2),
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "deepseek-v3": (256, 7168, 2048, 8),
    "tiny": (8, 64, 64, 2),
}


def hf_block(shape: str, impl: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A Mixtral sparse-MoE block with the shape's E/H/I/k and random weights (built on `device`: no host copy)."""
    E, H, I, k = SHAPES[shape]
    cfg = transformers.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k,
                                     experts_implementation=impl)
    with torch.device(device):
        block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(cfg).to(dtype)
    gen = torch.Generator(device).manual_seed(0)
    for p in block.parameters():
        p.data.normal_(0, 0.02, generator=gen)
    return block.eval()


def timer(device: str, warmup_ms: int = 25, rep_ms: int = 100, graph: bool = False):
    """fn -> seconds: triton's do_bench on a GPU (graph: do_bench_cudagraph, fn's kernels replayed in a CUDA graph,
    without the host's launch work), else the median of a few runs (interpreter smoke tests)."""
    if device == "cuda":
        import triton.testing
        if graph:  # one eager call first: a kernel's first launch loads its binary, which a graph capture forbids
            return lambda fn: (fn(), triton.testing.do_bench_cudagraph(fn, rep=rep_ms) / 1e3)[1]
        return lambda fn: triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms) / 1e3
    from moec.timing import median_time
    return lambda fn: median_time(fn, 3)
