"""Quality cost of quantized experts, measured on moec's trained tiny MoE LM (moec.examples).

    python benchmarks/quality.py [--batches 8] [--batch-size 8] [--seq 128]

Rows: fp32 (moec-compiled, unquantized), int8 per-channel, int4 with groups 32/64/128,
symmetric (amax/7, and the 16-level signed-scale grid "sym16") and asymmetric, and int8 / int4 g128 with the
router weight quantized too (router=True), and int8 / int4 g32 with int8 activations on the torch backend (one scale
per row / per group of 32, as ONNX Runtime's); int4 g32 (weight-only and a8) and int8 a8 with the dense layers in the
same format (dense=: attention, lm_head; expert bytes count the routed experts only);
then int8 and int4 g32 in ONNX Runtime (backend="onnxruntime"), weight-only and with int8 activations ("a8": int4
one scale per group of 32 inputs; int8 one scale per row on moec's kernels where the CPU has AVX512-VNNI, else per
group of 32 in QMoE; each such row's label names the op its blocks ran); then the model in bf16, run by HF eagerly and
by moec on ONNX Runtime (its label says whether the experts' and dense layers' input rows were rounded to bf16 as the
eager bf16 model's are: AVX512-BF16 CPUs). Columns: held-out perplexity (next byte) and its change vs fp32,
max and mean |logit error| vs fp32 over the held-out tokens, and the bytes of the routed
experts (quantized: packed weights + scales + zero points) and their ratio to fp32.
"""

import argparse
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import moec  # noqa: E402
from moec import examples  # noqa: E402
from moec.canonical import resolve  # noqa: E402
from moec.passes.quantize_experts import quantized_tensors  # noqa: E402

CONFIGS = {"fp32": None, "int8": moec.Int8Experts(),
           **{c.describe(): c for g in (32, 64, 128) for c in (moec.Int4Experts(g), moec.Int4Experts(g, signed_scale=True),
                                                                moec.Int4Experts(g, symmetric=False))},
           "int8 +router": moec.Int8Experts(router=True), "int4 g128 sym +router": moec.Int4Experts(128, router=True),
           "int8 per-channel a8 (torch: a scale per row)": moec.Int8Experts(activations="int8"),
           "int4 g32 sym a8 (torch: a scale per group of 32)": moec.Int4Experts(32, activations="int8")}
# dense=: the attention, shared-expert and lm_head layers quantized too (torch backend), as llama.cpp's files
DENSE = {"int4 g32 sym, dense= too": moec.Int4Experts(32), "int4 g32 sym a8, dense= too": moec.Int4Experts(32, activations="int8"),
         "int8 per-channel a8, dense= too": moec.Int8Experts(activations="int8")}
# backend="onnxruntime": weight-only, and with int8 activations, to separate the two costs
ORT = {f"{c.describe()}, onnxruntime": c for c in (moec.Int8Experts(), moec.Int8Experts(activations="int8"),
                                                   moec.Int4Experts(32), moec.Int4Experts(32, activations="int8"))}

# the model in bf16: HF's eager bf16 arithmetic (False), moec's ONNX Runtime session of it (True)
BF16 = {"bf16 model, eager (HF)": False, "bf16 model, onnxruntime": True}


def expert_bytes(model) -> int:
    total = 0
    for b in moec.inspect(model).blocks:
        block = resolve(model, b.path)
        bindings = block.__dict__["_moec_graph"].meta["bindings"]
        for role in ("w13", "w2"):
            tensors = list(quantized_tensors(block, role).values()) or [bindings[role].get(block)]
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    base = examples.tiny_moe_lm()
    batches = examples.heldout_batches(seq_len=args.seq, n_batches=args.batches, batch_size=args.batch_size)
    t = Table(title=f"moec tiny MoE LM, held-out stdlib bytes ({args.batches * args.batch_size} x {args.seq} tokens)")
    for col in ("experts", "perplexity", "vs fp32", "max |dlogit|", "mean |dlogit|", "expert bytes", "x fp32"):
        t.add_column(col, justify="right")
    ref_logits = ref_ppl = ref_bytes = None
    for name, cfg in [*CONFIGS.items(), *DENSE.items(), *ORT.items(), *BF16.items()]:
        ort = name in ORT or name in BF16 and cfg
        if name in BF16:
            model = copy.deepcopy(base).to(torch.bfloat16)
            model = moec.compile(model, backend="onnxruntime") if cfg else model
        else:
            model = moec.compile(copy.deepcopy(base), quantize=cfg, backend="onnxruntime" if ort else "auto",
                                 dense=cfg if name in DENSE else None)
        with torch.no_grad():
            logits = torch.cat([model(input_ids=b).logits.float() for b in batches])
        ppl = examples.perplexity(model, batches)
        nbytes = ref_bytes // 2 if name in BF16 else None if ort else expert_bytes(model)  # ORT: as the torch row's
        if ort:
            blocks = moec.inspect(model).export.blocks
            name += f" ({', '.join(sorted({b.op for b in blocks}))}"
            name += f"{', bf16 rows' if any('input rows to bf16' in b.why for b in blocks) else ''})"
        if cfg is None:
            ref_logits, ref_ppl, ref_bytes = logits, ppl, nbytes
        err = (logits - ref_logits).abs()
        t.add_row(name, f"{ppl:.4f}", f"{100 * (ppl / ref_ppl - 1):+.3f}%", f"{err.max().item():.4f}",
                  f"{err.mean().item():.5f}", "-" if nbytes is None else f"{nbytes / 1e6:.3f} MB",
                  "-" if nbytes is None else f"{nbytes / ref_bytes:.3f}")
    Console(width=140).print(t)


if __name__ == "__main__":
    main()
