"""Whole-model generation with a KV cache: moec's ONNX deployments against HF eager, moec's torch backend and
onnxruntime-genai's own builder.

    python benchmarks/bench_generate.py [--models mix gpt_oss deepseek qwen3_next jamba] [--prompt 16] [--new-tokens 64]
                                        [--rounds 3]
                                        [--threads 2] [--no-genai]

Models (random weights, fp32): "mix" = moec.models.demo_model() (Mixtral-style, hidden 512, 8 experts of 1792,
top-2, 4 layers); "gpt_oss" = a GPT-OSS of hidden 512, 4 layers, 8 experts (the size the deployment issue
measured onnxruntime-genai on); "deepseek" = moec.models.deepseek_style_model() (DeepSeek-V3: MLA, 64 experts of
320, top-6 of 8 groups, a shared expert, 2 layers); "qwen3_next" = a Qwen3-Next of hidden 512, 4 layers (3 gated
delta nets, then full attention, as its 3:1 pattern), 64 experts of 320, top-6, a shared expert of 1280 (its linear
attention's states are exported and fed back, moec.export_state); "jamba" = a Jamba of hidden 512, 4 layers (3 Mamba,
then attention), 8 experts of 1792, top-2 in every layer (its Mamba states exported the same way). Systems, all
greedy, the same tokens asserted against HF:
  HF eager (KV cache) | moec torch backend (KV cache), and with decode_linears=False (the model's nn.Linear layers
  on torch's GEMMs) | moec backend="onnxruntime" with the KV cache, fp32 and
  int4 experts (g32), and int4 everywhere with int8 activations (dense=, greedy generate in moec's loop around
  the session) | moec backend="onnxruntime" without the cache (generate recomputes the sequence: how it
  ran before the KV-cache export) | where onnxruntime-genai is installed: moec.export_genai's folders (fp32; int4
  g32 experts; int4 g32 experts with attention, lm_head and dense MLPs as int4 MatMulNBits, `dense=`; int4 g32
  experts with int8 activations, `Int4Experts(32, activations="int8")`, as llama.cpp's q4_0 runs; the same with
  every dense matrix int4 too) run by its
  generator, and for GPT-OSS the folder genai's own builder makes from the same weights saved as an HF checkpoint
  (`python -m onnxruntime_genai.models.builder -p fp32 -e cpu`; its int4 reads only GPT-OSS's original MXFP4
  tensors, which a checkpoint of these weights does not have).
Tokens/s of the whole generate call (prompt included), median of interleaved rounds; each round's wall time is
printed. "= HF": the greedy tokens equal HF's (asserted for moec's fp32 systems).
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import moec
from moec import examples, models

GPT_OSS = dict(hidden_size=512, intermediate_size=512, num_hidden_layers=4, num_local_experts=8,
               num_attention_heads=8, num_key_value_heads=2, head_dim=64,
               layer_types=["sliding_attention", "full_attention"] * 2)


QWEN3_NEXT = dict(hidden_size=512, num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"],
                  num_experts=64, num_experts_per_tok=6, moe_intermediate_size=320,
                  shared_expert_intermediate_size=1280, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                  linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64)


JAMBA = dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=4, num_experts=8, num_experts_per_tok=2,
             expert_layer_period=1, expert_layer_offset=0, attn_layer_period=4, attn_layer_offset=3,
             num_attention_heads=8, num_key_value_heads=2, mamba_d_state=16, mamba_expand=2, mamba_dt_rank=32)


BUILD = {"mix": models.demo_model, "gpt_oss": lambda: models.tiny_model("gpt_oss", **GPT_OSS),
         "deepseek": models.deepseek_style_model, "qwen3_next": lambda: models.tiny_model("qwen3_next", **QWEN3_NEXT),
         "jamba": lambda: models.tiny_model("jamba", **JAMBA)}


class Genai:
    """An onnxruntime-genai folder behind model.generate(ids, ...) -> [1, prompt + new] tokens (greedy)."""

    def __init__(self, folder: str, threads: int):
        import onnxruntime_genai as og

        path = Path(folder, "genai_config.json")
        cfg = json.loads(path.read_text())
        cfg["model"]["decoder"]["session_options"].update(intra_op_num_threads=threads, inter_op_num_threads=1)
        path.write_text(json.dumps(cfg, indent=2))
        self.og, self.model = og, og.Model(folder)

    def generate(self, ids, use_cache=True, max_new_tokens=16, **_):
        n = ids.shape[1] + max_new_tokens
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=n, min_length=n, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids.numpy().astype(np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        return torch.tensor(np.asarray(generator.get_sequence(0)), dtype=torch.long)[None]


def genai_systems(name: str, ref, threads: int, work: str) -> dict:
    """moec.export_genai's folders, and (GPT-OSS) genai's builder's from the same weights."""
    systems, tokenizer = {}, examples.byte_tokenizer()
    int4, a8 = moec.Int4Experts(32), moec.Int4Experts(32, activations="int8")
    for i, (label, q, dense) in enumerate((("fp32", None, None), ("int4 g32 experts", int4, None),
                                           ("int4 g32 experts + int4 g32 dense MatMulNBits", int4, int4),
                                           ("int4 g32 experts, int8 activations", a8, None),
                                           ("int4 g32 experts + dense, int8 activations", a8, a8))):
        folder = os.path.join(work, f"moec-{name}-{i}")
        moec.export_genai(ref, tokenizer, folder, quantize=q, dense=dense)
        systems[f"moec export_genai {label} (onnxruntime-genai)"] = (Genai(folder, threads), True)
    if name == "gpt_oss":
        hf = os.path.join(work, "hf")
        ref.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
        folder = os.path.join(work, "builder-fp32")  # its int4 needs GPT-OSS's original MXFP4 tensors: not these
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", folder, "-p", "fp32",
                        "-e", "cpu"], check=True, capture_output=True)
        systems["genai builder fp32 (onnxruntime-genai)"] = (Genai(folder, threads), True)
    return systems


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mix", "gpt_oss"], choices=tuple(BUILD))
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-genai", action="store_true", help="leave out the onnxruntime-genai systems")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="moec-bench-generate-")
    torch.set_num_threads(args.threads)
    so = {"intra_op_num_threads": args.threads, "inter_op_num_threads": 1}
    console = Console()
    for name in args.models:
        ref = BUILD[name]().eval()
        # one eos for every system (byte_tokenizer's, the genai folders' tokenizer): generate suppresses it
        ref.config.eos_token_id = ref.generation_config.eos_token_id = examples.byte_tokenizer().eos_token_id
        systems = {"HF eager (KV cache)": (ref, True)}
        systems["moec torch (KV cache)"] = (moec.compile(copy.deepcopy(ref), backend="torch"), True)
        systems["moec torch, decode_linears=False (KV cache)"] = (
            moec.compile(copy.deepcopy(ref), backend="torch", decode_linears=False), True)
        for label, q in (("fp32", None), ("int4 g32 experts", moec.Int4Experts(32))):
            systems[f"moec onnxruntime {label} (KV cache)"] = (
                moec.compile(copy.deepcopy(ref), backend="onnxruntime", quantize=q, session_options=so), True)
        a8 = moec.Int4Experts(32, activations="int8")  # every matrix, as the genai folder's last row
        systems["moec onnxruntime int4 all matmuls, int8 activations (KV cache)"] = (
            moec.compile(copy.deepcopy(ref), backend="onnxruntime", quantize=a8, dense=a8, session_options=so), True)
        systems["moec onnxruntime fp32 (no cache)"] = (systems["moec onnxruntime fp32 (KV cache)"][0], False)
        if not args.no_genai:
            systems.update(genai_systems(name, ref, args.threads, work))
        ids = torch.randint(0, ref.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        with torch.no_grad():
            want = ref.generate(ids, **kw)
        speeds, same = {k: [] for k in systems}, {}
        for rnd in range(args.rounds + 1):  # round 0 warms up (exports, session opening, numba)
            t0 = time.perf_counter()
            for label, (model, cache) in systems.items():
                with torch.no_grad():
                    t = time.perf_counter()
                    out = model.generate(ids, use_cache=cache, **kw)
                    tps = args.new_tokens / (time.perf_counter() - t)
                same[label] = torch.equal(out, want)
                if "int4" not in label and "builder" not in label:
                    assert same[label], f"{name}, {label}: other tokens than HF"
                if rnd:
                    speeds[label].append(tps)
            console.print(f"{name} round {rnd}{' (warm-up)' if not rnd else ''}: {time.perf_counter() - t0:.1f} s wall")
        t = Table(title=f"{name}: generate {args.new_tokens} tokens after {args.prompt}, batch 1, {args.threads} "
                        f"threads, median of {args.rounds} rounds")
        for col in ("system", "tokens/s", "vs HF eager", "= HF"):
            t.add_column(col)
        med = {k: statistics.median(v) for k, v in speeds.items()}
        for label, v in med.items():
            t.add_row(label, f"{v:.1f}", f"{v / med['HF eager (KV cache)']:.2f}x", "yes" if same[label] else "no")
        console.print(t)


if __name__ == "__main__":
    main()
