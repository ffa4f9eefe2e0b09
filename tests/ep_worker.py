"""Run by torchrun from tests/test_distributed.py: every rank compiles the same models with expert_parallel= and
checks its own slice of a batch against the single-process model (each rank computes that reference itself).

    torchrun --nproc-per-node N tests/ep_worker.py CASE [CASE ...]      (gloo, CPU)

Cases: families (mixtral, deepseek_v3, qwen2_moe), "hand" (a hand-written block), "uneven" (E % N != 0),
"int8", "triton" (the Triton backend's int4 kernels; needs TRITON_INTERPRET=1 on a CPU), "idle" (one token: most
ranks receive no pair), "load" / "load_int4" (moec.load_sharded from a checkpoint in $MOEC_EP_TMP), "replicas"
(copies of a hot expert, compiled and loaded), "generate" (greedy tokens, synced_gpus=True), "mismatch" (rank 1
builds another model, or loads another checkpoint: every rank must refuse), "kill" (rank 1 exits mid-run) and "stall" (rank 1 stops
answering): the others must raise, within the timeout. Prints "rank R: CASE ok" per case; any failure raises
(non-zero exit).
"""

import copy
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import moec  # noqa: E402
from moec import models  # noqa: E402

TOL = 2e-5


def rel_err(got, ref):
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def check_lm(model, rank, world, seq=7, **compile_kw):
    """The batch of `world` rows: row `rank` is this rank's request; logits equal the one-process model's."""
    ref = moec.compile(copy.deepcopy(model), **{k: v for k, v in compile_kw.items() if k != "expert_parallel"})
    inputs = models.example_inputs(model, batch=world, seq=seq, seed=11)
    mine = {k: v[rank:rank + 1] for k, v in inputs.items()}
    ep = compile_kw.pop("expert_parallel", moec.ExpertParallel(timeout=30))
    moec.compile(model, expert_parallel=ep, **compile_kw)
    report = moec.inspect(model)
    assert report.blocks and not report.rejected, report
    assert all(f"on rank {rank}/{world}" in b.experts for b in report.blocks), [b.experts for b in report.blocks]
    with torch.no_grad():
        want = ref(**inputs).logits[rank:rank + 1]
        got = model(**mine).logits
    err = rel_err(got, want)
    assert err < TOL, f"rel err {err}"
    return model


def saved_and_meta(ref, name: str, rank: int):
    """`ref` written once (by rank 0) as a safetensors folder in $MOEC_EP_TMP, and its architecture built on the meta
    device: (folder, meta model)."""
    from safetensors.torch import save_model

    folder = os.path.join(os.environ["MOEC_EP_TMP"], name)
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        save_model(ref, os.path.join(folder, "model.safetensors"))
    dist.barrier()
    with torch.device("meta"):
        return folder, type(ref)(ref.config).eval()


def check_row(model, ref, rank, world):
    """Row `rank` of a batch of `world` through `model` gives the one-process `ref`'s logits."""
    inputs = models.example_inputs(ref, batch=world, seq=6, seed=5)
    with torch.no_grad():
        want = ref(**inputs).logits[rank:rank + 1]
        got = model(**{k: v[rank:rank + 1] for k, v in inputs.items()}).logits
    assert rel_err(got, want) < TOL, rel_err(got, want)


def case(name, rank, world):
    if name in ("mixtral", "deepseek_v3", "qwen2_moe"):
        check_lm(models.tiny_model(name, num_experts_per_tok=2).eval(), rank, world)
    elif name == "uneven":  # 7 experts over 2 or 4 ranks
        check_lm(models.tiny_model("mixtral", num_local_experts=7).eval(), rank, world)
    elif name == "triton":  # backend="triton" (TRITON_INTERPRET=1 on CPU), int4 experts: each rank's on its kernels
        check_lm(models.tiny_model("mixtral", hidden_size=64, intermediate_size=64).eval(), rank, world,
                 backend="triton", quantize=moec.Int4Experts(32))
    elif name == "int8":
        check_lm(models.tiny_model("qwen2_moe").eval(), rank, world, quantize=moec.Int8Experts())
    elif name == "idle":  # one token per rank, top-1 of 8: most ranks' experts run nothing in a block
        model = check_lm(models.tiny_model("mixtral", num_experts_per_tok=1).eval(), rank, world, seq=1)
        stats = moec.inspect(model).expert_parallel
        received = torch.tensor([stats.rows_received])
        dist.all_reduce(received)
        assert received.item() == world * 2, received  # 2 blocks, one pair per rank each, wherever they ran
    elif name == "empty":  # a rank with no tokens still takes part in the exchange (the others would wait)
        block = models.tiny_model("mixtral").eval().model.layers[0].mlp
        ref = copy.deepcopy(block)
        moec.compile(block, expert_parallel=moec.ExpertParallel(timeout=30))
        x = torch.randn(1, 0 if rank == 1 else 4, block.gate.weight.shape[1], generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            got, want = block(x), ref(x)
        got, want = (t[0] if isinstance(t, tuple) else t for t in (got, want))
        assert got.shape == want.shape and rel_err(got, want) < TOL if x.numel() else got.numel() == 0
        try:
            copy.deepcopy(block)
        except TypeError as e:
            assert "cannot be copied or pickled" in str(e), e
        else:
            raise AssertionError("a block with sharded experts was copied")
    elif name == "hand":
        from test_generality import RouterForms

        torch.manual_seed(0)
        block = RouterForms("@W.T", E=8, k=3).eval()
        ref = copy.deepcopy(block)
        x = torch.randn(world * 5, 32, generator=torch.Generator().manual_seed(2))
        moec.compile(block, expert_parallel=moec.ExpertParallel(timeout=30))
        with torch.no_grad():
            assert rel_err(block(x[rank * 5:(rank + 1) * 5]), ref(x)[rank * 5:(rank + 1) * 5]) < TOL
    elif name == "generate":
        model = models.tiny_model("qwen2_moe").eval()
        ref = moec.compile(copy.deepcopy(model))
        prompt = models.example_inputs(model, batch=world, seq=5, seed=3)["input_ids"][rank:rank + 1]
        new = 4 + 3 * rank  # ranks finish at different steps: synced_gpus keeps them stepping together
        moec.compile(model, expert_parallel=moec.ExpertParallel(timeout=30))
        with torch.no_grad():
            want = ref.generate(prompt, max_new_tokens=new, do_sample=False)
            got = model.generate(prompt, max_new_tokens=new, do_sample=False, synced_gpus=True)
        assert torch.equal(got, want), (got, want)
    elif name in ("load", "load_int4"):  # meta build, every rank fills its shard from one checkpoint
        quantize = moec.Int4Experts(group_size=32) if name == "load_int4" else None
        ref = models.tiny_model("qwen2_moe", num_experts_per_tok=2).eval()
        folder, model = saved_and_meta(ref, name, rank)
        moec.load_sharded(model, folder, moec.ExpertParallel(timeout=30), quantize=quantize)
        assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
        held = sum(t.numel() for n, t in model.named_buffers() if "_moec_shard_" in n and ("w13" in n or "q13" in n))
        full = sum(b.experts.gate_up_proj.numel() for b in (m.mlp for m in ref.model.layers))
        per_byte = 2 if quantize else 1  # int4: two weights a byte
        assert held * per_byte == full // world, (held, full)  # E/N experts (8 over 2 or 4 ranks)
        check_row(model, moec.compile(ref, quantize=quantize), rank, world)
    elif name == "replicas":  # copies of a hot expert (calibrated loads made skewed), compiled and loaded
        ref = models.tiny_model("qwen2_moe", num_experts_per_tok=2).eval()
        cal = moec.calibrate(ref, [models.example_inputs(ref, batch=2, seq=8, seed=1)["input_ids"]])
        for b in cal.blocks:
            b.load = [1000 if e == 3 else 10 for e in range(len(b.load))]
        ep = moec.ExpertParallel(timeout=30, replicas=1, calibration=cal)
        model = check_lm(copy.deepcopy(ref), rank, world, expert_parallel=ep)
        copied = torch.tensor([sum("copies of [3]" in b.experts for b in moec.inspect(model).blocks)])
        dist.all_reduce(copied)
        assert copied.item() >= 2, copied  # expert 3 copied in both blocks, to other ranks than its own
        folder, meta = saved_and_meta(ref, name, rank)
        moec.load_sharded(meta, folder, ep)
        check_row(meta, moec.compile(ref), rank, world)
    elif name == "mismatch":  # another config, other weights (another seed), another dtype on rank 1
        for model in (models.tiny_model("mixtral", num_experts_per_tok=2 if rank != 1 else 1),
                      models.tiny_model("mixtral", seed=rank),
                      models.tiny_model("mixtral").to(torch.bfloat16 if rank == 1 else torch.float32)):
            try:
                moec.compile(model.eval(), expert_parallel=moec.ExpertParallel(timeout=30))
            except ValueError as e:
                assert "the ranks disagree on the model and the compile options" in str(e), e
            else:
                raise AssertionError("a mismatched model was accepted")
        from safetensors.torch import save_model  # rank 1 loads a stale copy: other weights, same shapes

        ref = models.tiny_model("qwen2_moe", seed=int(rank == 1)).eval()
        folder = os.path.join(os.environ["MOEC_EP_TMP"], f"mismatch_{rank}")
        os.makedirs(folder, exist_ok=True)
        save_model(ref, os.path.join(folder, "model.safetensors"))
        with torch.device("meta"):
            meta = type(ref)(ref.config).eval()
        try:
            moec.load_sharded(meta, folder, moec.ExpertParallel(timeout=30))
        except ValueError as e:
            assert "the ranks disagree on the checkpoint" in str(e), e
        else:
            raise AssertionError("a rank that read another checkpoint was accepted")
    elif name in ("kill", "stall"):
        model = models.tiny_model("mixtral").eval()
        moec.compile(model, expert_parallel=moec.ExpertParallel(timeout=5))
        inputs = models.example_inputs(model, seq=4)
        with torch.no_grad():
            model(**inputs)  # one step together
            if rank == 1:
                if name == "stall":  # alive but silent past the others' timeout
                    time.sleep(8)
                os._exit(0)  # dies without a word
            start = time.monotonic()
            try:
                model(**inputs)
            except RuntimeError as e:
                waited = time.monotonic() - start
                assert "moec expert parallel" in str(e) and waited < 20, (waited, e)
                print(f"rank {rank}: {name} ok ({waited:.1f} s: {e})", flush=True)
                os._exit(0)  # the group is broken: no orderly shutdown
            raise AssertionError("no error after a rank died")
    else:
        raise ValueError(f"unknown case {name!r}")
    print(f"rank {rank}: {name} ok", flush=True)


def main():
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in sys.argv[1:]:
        case(name, rank, world)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
