"""moec against llama.cpp on the same weights, CPU: decode and prefill tokens/s in one interleaved run.

    pip install llama-cpp-python gguf      # llama-cpp-python builds llama.cpp (several minutes on 2 cores)
    python benchmarks/bench_llamacpp.py [--models mix qmoe] [--prompt 16] [--new-tokens 64] [--prefill 64 512]
                                        [--rounds 3] [--threads 2] [--precisions fp32 bf16 int8 int4] [--onnx]
                                        [--linears-off] [--qmoe] [--long-prompt 1024] [--flash-attn] [--sample]

Models (random weights, fp32): "mix" = moec.models.demo_model() (Mixtral-style: hidden 512, 8 experts of 1792,
top-2, 4 layers); "qmoe" = a Qwen2-MoE of hidden 512, 4 layers, 64 experts of 320, top-6, a shared expert of
1280. Each is written as GGUF by `to_gguf` below (moec's own writer, the `gguf` package's GGUFWriter):
llama.cpp's "llama" architecture for Mixtral (q/k rows permuted for its rope layout, as llama.cpp's converter
does) and "qwen2moe" for Qwen2-MoE, a byte-level SPM vocabulary of the model's size. Before timing, the script
checks that llama.cpp's f32 logits of the prompt match HF's (the conversion is right).
Pairs (moec torch backend, KV cache, `model.generate` / one forward for prefill; llama.cpp through
llama-cpp-python, `eval` + greedy argmax): fp32 <-> f32, bf16 (the model in bf16) <-> bf16, int8 experts <->
q8_0, int4 g32 experts <-> q4_0 (llama.cpp quantizes every matrix but the router, and its activations to 8 bits;
moec quantizes the routed experts only, weight-only; plus moec's experts with int8 activations on the torch
backend: int8 ones with one scale per row, int4 ones per group of 32, with moec's C kernel at decode; then also
every matrix but the router and embedding, `dense=`, as llama.cpp's file). --onnx adds moec backend="onnxruntime" (the whole step in
an ONNX Runtime session with the KV cache, greedy generate in moec's loop around it; fp32, int8, int4, and
int8/int4 with int8 activations (activations="int8": int8 dot products, as q8_0/q4_0 do), experts only and
then every matrix but the router and embedding (dense=, as llama.cpp's file); bf16: the model in bf16).
Experts and MatMuls of every precision (int8 with int8 activations where the CPU has AVX512-VNNI), and attention,
on backend="onnxruntime" run moec's kernels in the session (backends/ort_kernels.py, ort_attention.py); --qmoe adds the int4 all-matmuls row on ORT's own ops instead (QMoE,
MatMulNBits, GroupQueryAttention: MOEC_ORT_KERNELS=0), the A/B. --linears-off adds moec torch rows compiled with decode_linears=False (the A/B of moec's kernels for the model's
nn.Linear layers at decode). Tokens/s medians over --rounds interleaved rounds; each round's wall time printed.
Prefill of n tokens: one forward, the median of max(1, 256 // n) calls a round (one call before 2026-12-05's
nineteenth session; a 64-token call takes ~10-15 ms, and one interruption moved a pair by 5%).
Decode: --new-tokens / (the time from the first new token to the last of one call generating 1 + that many after
the --prompt; each token's time noted by a streamer, `Clock`), so that neither the prompt's prefill nor the call's
set-up is in it (sections of docs/benchmarks.md before 2026-12-05's eighteenth session timed the whole call, the
16-token prompt included; from then until 2026-12-06's twenty-third session, the difference of two calls, 1 + new
tokens and 1: a slow prefill in either moved the rate, and decode after 1024 tokens could read faster than after
16). --long-prompt N adds a column:
decode after an N-token prompt, timed the same way. --flash-attn adds llama.cpp rows with flash attention on
(llama-cpp-python's flash_attn=True; off by default in 0.3.x); the ratio columns compare with the faster llama.cpp
row of each precision. --sample adds a column: decode sampling top-k 50 at temperature 1 instead of greedy, timed
the same way (moec: `generate(do_sample=True, top_k=50)`, HF's processors and draw; on backend="onnxruntime" in
moec's loop; llama.cpp: llama-cpp-python's `generate` with its sampler chain set to top_k=50, top_p=1, min_p=0,
temp=1).
moec's ONNX Runtime sessions run with ORT's default thread options as a user gets them, --threads intra-op
threads (`ort_options`; before 2026-12-05's twentieth session they stopped spinning at the end of each run, which
made quantized decode read 1.6-2.6x slower after PAUSE).
Skips cleanly (exit 0, a message) where llama-cpp-python or gguf is not installed. Never in CI.
Do not run it with OMP_WAIT_POLICY=PASSIVE: llama.cpp's OpenMP threads then sleep at each of the hundreds of
barriers in a token, and its decode fell 2-7x (q4_0 on mix: 200 tokens/s instead of 1468).
"""

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# seconds between two timed calls: llama.cpp's and torch's OpenMP threads spin on after a call, and the 16-token
# prompt of the system timed next took 16 ms instead of 10 (moec onnxruntime after llama.cpp, mix bf16)
PAUSE = 0.2

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import moec
from moec import models

QUANT = {"fp32": (None, "F32"), "bf16": (None, "BF16"), "int8": (moec.Int8Experts(), "Q8_0"),
         "int4": (moec.Int4Experts(32), "Q4_0")}
LLAMA_NAME = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}


def build(name: str):
    if name == "mix":
        return models.demo_model().eval()
    import transformers

    cfg = transformers.Qwen2MoeConfig(vocab_size=1024, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                      num_key_value_heads=2, moe_intermediate_size=320, num_experts=64,
                                      num_experts_per_tok=6, shared_expert_intermediate_size=1280,
                                      intermediate_size=1280, max_position_embeddings=2048)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's q/k rows (rotate-half rope) -> llama.cpp's "llama" layout (rope on adjacent pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf(model, path: str, qtype: str = "F32") -> None:
    """Write an HF Mixtral or Qwen2-MoE model as GGUF: every matrix but the router in `qtype` (F32, BF16, Q8_0,
    Q4_0)."""
    import gguf

    cfg, sd = model.config, {k: v.float().numpy() for k, v in model.state_dict().items()}
    arch = {"mixtral": "llama", "qwen2_moe": "qwen2moe"}[cfg.model_type]
    w = gguf.GGUFWriter(path, arch)
    heads, kv, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    E = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(H)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(H // heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(E)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_feed_forward_length(cfg.intermediate_size)
    if arch == "qwen2moe":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    # a byte-level SPM vocabulary of the model's size (the benchmark feeds token ids)
    V = cfg.vocab_size
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]]
    tokens += [f"t{i}" for i in range(V - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * V)
    w.add_token_types([2, 3, 3, *[6] * 256, *[1] * (V - 259)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    qt = getattr(gguf.GGMLQuantizationType, qtype)

    def put(name: str, t: np.ndarray, quantize: bool = True) -> None:
        t = np.ascontiguousarray(t, dtype=np.float32)
        if quantize and qtype != "F32" and t.ndim >= 2:
            w.add_tensor(name, gguf.quants.quantize(t, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, t)

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    put("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = _permute(q, heads), _permute(k, kv)
        put(b + "attn_q.weight", q)
        put(b + "attn_k.weight", k)
        put(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        for name in ("q", "k", "v"):
            if p + f"self_attn.{name}_proj.bias" in sd:
                put(b + f"attn_{name}.bias", sd[p + f"self_attn.{name}_proj.bias"])
        put(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(b + "ffn_gate_inp.weight", sd[p + "mlp.gate.weight"], quantize=False)
        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]  # [E, 2I, H], [E, H, I]
        inter = gate_up.shape[1] // 2
        put(b + "ffn_gate_exps.weight", gate_up[:, :inter])
        put(b + "ffn_up_exps.weight", gate_up[:, inter:])
        put(b + "ffn_down_exps.weight", down)
        if p + "mlp.shared_expert.gate_proj.weight" in sd:
            for part in ("gate", "up", "down"):
                put(b + f"ffn_{part}_shexp.weight", sd[p + f"mlp.shared_expert.{part}_proj.weight"])
            put(b + "ffn_gate_inp_shexp.weight", sd[p + "mlp.shared_expert_gate.weight"][0], quantize=False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class LlamaCpp:
    """A GGUF file behind generate(ids, max_new_tokens) (greedy) and prefill(ids), like the torch models."""

    def __init__(self, path: str, threads: int, n_ctx: int, flash_attn: bool = False):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx,
                         n_ubatch=n_ctx, logits_all=True, verbose=False, flash_attn=flash_attn)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        return torch.from_numpy(np.array(self.llm.scores[:ids.shape[1]]))

    def generate(self, ids: torch.Tensor, max_new_tokens: int, sample: bool = False, clock=None) -> torch.Tensor:
        """`clock.put` is called once a new token is known, as a streamer is"""
        self.llm.reset()
        out = ids[0].tolist()
        if sample:  # llama.cpp's own sampler chain, top-k 50 at temperature 1 (as HF's sampling defaults)
            tokens = self.llm.generate(out, top_k=50, top_p=1.0, min_p=0.0, temp=1.0)
        else:
            self.llm.eval(out)
        for _ in range(max_new_tokens):
            out.append(next(tokens) if sample else int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            if clock is not None:
                clock.put(None)
            if not sample:
                self.llm.eval([out[-1]])
        return torch.tensor(out)[None]

    def prefill(self, ids: torch.Tensor) -> None:
        self.llm.reset()
        self.llm.eval(ids[0].tolist())


class Torch:
    def __init__(self, model):
        self.model = model

    def generate(self, ids, max_new_tokens, sample=False, clock=None):
        with torch.no_grad():
            return self.model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                       do_sample=sample, streamer=clock, **({"top_k": 50} if sample else {}))

    def prefill(self, ids):
        with torch.no_grad():
            self.model(input_ids=ids, use_cache=False)


class Clock:
    """A streamer that notes when each token comes (HF's generate calls put with the prompt first, then each new
    token; LlamaCpp.generate each new token)"""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def decode_rate(system, ids: torch.Tensor, new: int, sample: bool = False) -> float:
    """tokens/s of `new` greedy (or sampled: top-k 50) tokens after the prompt `ids`: in one call of 1 + new tokens,
    from the first new token to the last, so that neither the prompt's prefill nor the call's set-up is in it
    (llama-cpp-python's set-up and 16-token prompt took ~50 ms of a 64-token call on mix f32, a third of it)"""
    time.sleep(PAUSE)  # the previous call's threads spin a while after it: not on this one's clock
    clock = Clock()
    system.generate(ids, 1 + new, sample, clock)
    assert len(clock.times) >= 1 + new, "every new token was noted"
    times = clock.times[-(1 + new):]  # moec's first put is the prompt
    return new / (times[-1] - times[0])


def ort_options(threads: int):
    """ORT session options as a user gets them, `threads` intra-op threads: the workers spin between a run's ops and
    on for ~30 ms of CPU after it (measured: 31-35 ms during a 0.05-0.2 s sleep after a call), well inside PAUSE, so
    they are off the cores when the next system of the round starts. Until 2026-12-05's twentieth session the
    sessions stopped spinning at the end of each run (`session.force_spinning_stop`): then every decode step woke the
    sleeping worker, and after an idle pause such as PAUSE the VM made those wakes slow; mix int4's decode read 1701
    tokens/s that way against 2589 with ORT's default (medians of 5 interleaved rounds)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return so


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mix", "qmoe"], choices=("mix", "qmoe"))
    ap.add_argument("--precisions", nargs="+", default=list(QUANT), choices=tuple(QUANT))
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--onnx", action="store_true", help="add moec backend='onnxruntime' rows (every precision)")
    ap.add_argument("--qmoe", action="store_true", help="with --onnx: also int4 all matmuls on ORT's own ops "
                    "(QMoE, MatMulNBits, GroupQueryAttention: MOEC_ORT_KERNELS=0) beside moec's kernels in the session")
    ap.add_argument("--long-prompt", type=int, default=0,
                    help="add a column: decode tokens/s after a prompt of this many tokens, its prefill excluded")
    ap.add_argument("--flash-attn", action="store_true", help="add llama.cpp rows with flash attention on")
    ap.add_argument("--sample", action="store_true",
                    help="add a column: decode tokens/s sampling (top-k 50, temperature 1) instead of greedy")
    ap.add_argument("--linears-off", action="store_true",
                    help="add moec torch rows compiled with decode_linears=False (torch's GEMMs for nn.Linear layers)")
    args = ap.parse_args()
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as e:
        print(f"bench_llamacpp: skipped, {e.name} is not installed (pip install llama-cpp-python gguf)")
        return
    torch.set_num_threads(args.threads)
    console, work = Console(width=160), tempfile.mkdtemp(prefix="moec-bench-llamacpp-")
    n_ctx = max(args.prefill + [args.prompt + args.new_tokens, args.long_prompt + args.new_tokens + 1]) + 8
    for name in args.models:
        ref = build(name)
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, ref.config.vocab_size, (1, args.prompt), generator=gen)
        long = {n: torch.randint(3, ref.config.vocab_size, (1, n), generator=gen) for n in args.prefill}
        context = torch.randint(3, ref.config.vocab_size, (1, args.long_prompt), generator=gen)
        systems = {}
        for prec in args.precisions:
            quantize, qtype = QUANT[prec]
            path = os.path.join(work, f"{name}-{qtype}.gguf")
            to_gguf(ref, path, qtype)
            systems[f"llama.cpp {LLAMA_NAME[prec]}"] = LlamaCpp(path, args.threads, n_ctx)
            if args.flash_attn:
                systems[f"llama.cpp {LLAMA_NAME[prec]}, flash attention"] = LlamaCpp(path, args.threads, n_ctx, True)
            model = build(name).to(torch.bfloat16 if prec == "bf16" else torch.float32)
            moec.compile(model, quantize=quantize)
            systems[f"moec {prec}" + (" experts" if quantize else "")] = Torch(model)
            if quantize is not None:  # the torch backend's int8 activations (as llama.cpp's q8_0/q4_0 round them)
                a8 = dataclasses.replace(quantize, activations="int8")
                systems[f"moec {prec} experts, int8 activations"] = Torch(moec.compile(build(name), quantize=a8))
                # and every matrix but the router and embedding, as llama.cpp's file (dense=)
                model = moec.compile(build(name), quantize=a8, dense=a8)
                systems[f"moec {prec} all matmuls, int8 activations"] = Torch(model)
            if args.linears_off:
                model = build(name).to(torch.bfloat16 if prec == "bf16" else torch.float32)
                moec.compile(model, quantize=quantize, decode_linears=False)
                systems[f"moec {prec}" + (" experts" if quantize else "") + ", decode_linears=False"] = Torch(model)
            if args.onnx:  # bf16: the fp32 upcast with its weights in bf16 on moec's kernels (ort_session.runs_bf16)
                model = moec.compile(build(name).to(torch.bfloat16 if prec == "bf16" else torch.float32),
                                     backend="onnxruntime", quantize=quantize,
                                     session_options=ort_options(args.threads))
                systems[f"moec onnxruntime {prec}" + (" experts" if quantize else "")] = Torch(model)
                if prec == "int8":  # every matrix but the router and embedding, weight-only (moec's int8 kernels)
                    model = moec.compile(build(name), backend="onnxruntime", quantize=quantize, dense=quantize,
                                         session_options=ort_options(args.threads))
                    systems[f"moec onnxruntime {prec} all matmuls"] = Torch(model)
                if quantize is not None:  # llama.cpp's q8_0/q4_0 round activations to 8 bits too
                    a8 = dataclasses.replace(quantize, activations="int8")
                    model = moec.compile(build(name), backend="onnxruntime", session_options=ort_options(args.threads),
                                         quantize=a8)
                    systems[f"moec onnxruntime {prec} experts, int8 activations"] = Torch(model)
                    # and every matrix but the router and embedding, as llama.cpp's file
                    model = moec.compile(build(name), backend="onnxruntime", session_options=ort_options(args.threads),
                                         quantize=a8, dense=a8)
                    systems[f"moec onnxruntime {prec} all matmuls, int8 activations"] = Torch(model)
                    if args.qmoe and prec == "int4":  # the same with ORT's own ops instead of moec's kernels
                        os.environ["MOEC_ORT_KERNELS"] = "0"
                        try:
                            model = moec.compile(build(name), backend="onnxruntime", quantize=a8, dense=a8,
                                                 session_options=ort_options(args.threads))
                        finally:
                            del os.environ["MOEC_ORT_KERNELS"]
                        systems[f"moec onnxruntime {prec} all matmuls, int8 activations, ORT's ops"] = Torch(model)
        with torch.no_grad():
            want = ref(input_ids=prompt).logits[0]
        got = systems["llama.cpp f32"].logits(prompt) if "fp32" in args.precisions else None
        if got is not None:
            err = ((got - want).norm() / want.norm()).item()
            console.print(f"{name}: llama.cpp f32 logits vs HF, relative error {err:.2e}")
            if err > 1e-3:
                sys.exit(f"bench_llamacpp: {name}'s GGUF conversion is wrong (logits differ from HF by {err:.2e})")
        columns = ("decode", *args.prefill, *(["long"] if args.long_prompt else []), *(["sampled"] if args.sample else []))
        speed = {s: {k: [] for k in columns} for s in systems}
        for rnd in range(args.rounds + 1):  # round 0 warms up
            t0 = time.perf_counter()
            for label, system in systems.items():
                decode = decode_rate(system, prompt, args.new_tokens)
                pre = {}
                for n, ids in long.items():  # a short prompt's call takes ~10 ms: the median of several
                    took = []
                    for _ in range(max(1, 256 // n)):
                        time.sleep(PAUSE)
                        t = time.perf_counter()
                        system.prefill(ids)
                        took.append(time.perf_counter() - t)
                    pre[n] = n / statistics.median(took)
                if args.long_prompt:
                    pre["long"] = decode_rate(system, context, args.new_tokens)
                if args.sample:
                    pre["sampled"] = decode_rate(system, prompt, args.new_tokens, sample=True)
                if rnd:
                    speed[label]["decode"].append(decode)
                    for n, v in pre.items():
                        speed[label][n].append(v)
            console.print(f"{name} round {rnd}{' (warm-up)' if not rnd else ''}: {time.perf_counter() - t0:.1f} s wall")
        t = Table(title=f"{name}: tokens/s, {args.threads} threads, median of {args.rounds} interleaved rounds "
                        f"(decode: {args.new_tokens} tokens after {args.prompt}, KV cache)")
        extra = {**({"long": f"decode after {args.long_prompt}"} if args.long_prompt else {}),
                 **({"sampled": "sampled decode"} if args.sample else {})}  # column key: title
        for col in ("system", "decode", *[f"prefill {n}" for n in args.prefill], *extra.values(), "decode vs llama.cpp",
                    *[f"{c} vs llama.cpp" for c in extra.values()]):
            t.add_column(col)
        for prec in args.precisions:
            llamas = [s for s in systems if s.startswith(f"llama.cpp {LLAMA_NAME[prec]}")]
            ours = [s for s in systems if s.startswith((f"moec {prec}", f"moec onnxruntime {prec}"))]
            med = {label: {k: statistics.median(v) for k, v in speed[label].items()} for label in (*ours, *llamas)}
            best = {k: max(med[label][k] for label in llamas) for k in columns}  # the faster llama.cpp row
            for label in (*ours, *llamas):
                ratios = [f"{med[label][k] / best[k]:.2f}x" for k in ("decode", *extra)]
                t.add_row(label, f"{med[label]['decode']:.0f}", *[f"{med[label][n]:.0f}" for n in args.prefill],
                          *[f"{med[label][k]:.0f}" for k in extra], *ratios)
        console.print(t)


if __name__ == "__main__":
    main()
