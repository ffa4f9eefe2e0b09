"""Expert parallelism (moec.ExpertParallel, gloo on CPU): ranks launched by torchrun (tests/ep_worker.py) equal the
one-process model; a dead or silent rank makes the others raise within the timeout; two "hosts" in network
namespaces joined by a veth pair; the in-process errors."""

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import TOL, rel_err

import moec
from moec import models
from moec.distributed import shards

WORKER = Path(__file__).with_name("ep_worker.py")
CASES = ["hand", "mixtral", "deepseek_v3", "qwen2_moe", "uneven", "int8", "triton", "idle", "load", "load_int4", "replicas",
         "generate", "mismatch", "empty"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(WORKER.parent.parent)}


def _check(out: subprocess.CompletedProcess, ranks, cases):
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    for rank in ranks:
        for case in cases:
            assert f"rank {rank}: {case} ok" in out.stdout, out.stdout[-4000:]


def _torchrun(n: int, *cases: str, tmp: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), str(WORKER), *cases]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**ENV, "MOEC_EP_TMP": str(tmp)})


@pytest.mark.parametrize("n", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4 ranks on 2 cores: 2 minutes
def test_ranks_equal_one_process(n, tmp_path):
    """Mixtral-, DeepSeek-V3- and Qwen2-MoE-style models and a hand-written block, E % N != 0, int8 experts, ranks
    whose experts get no pair, the Triton backend (int4, interpreted), each rank loading its shard from a checkpoint (fp and int4), copies of a hot expert
    (compiled and loaded), greedy generation with
    ranks finishing apart, mismatched models and checkpoints refused, a rank calling a block with no tokens."""
    _check(_torchrun(n, *CASES, tmp=tmp_path), range(n), CASES)


@pytest.mark.parametrize("case", ["kill", "stall"])
def test_a_dead_or_silent_rank_fails_the_others_in_bounded_time(case):
    out = _torchrun(2, case)
    _check(out, [0], [case])


def _netns_available() -> str | None:
    if shutil.which("ip") is None:
        return "no `ip` command"
    name = f"moec{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode:
        return f"cannot create network namespaces here ({r.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def test_two_hosts_joined_by_a_veth_pair():
    """Rank 0 and rank 1 in two network namespaces (own loopback, own address), talking over a veth pair."""
    if (why := _netns_available()) is not None:
        pytest.skip(why)
    tag = uuid.uuid4().hex[:5]
    a, b = f"moeca{tag}", f"moecb{tag}"
    sh = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        for ns, dev, addr in ((a, f"va{tag}", "10.77.0.1/24"), (b, f"vb{tag}", "10.77.0.2/24")):
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", addr, "dev", dev)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        procs = []
        for rank, (ns, dev) in enumerate(((a, f"va{tag}"), (b, f"vb{tag}"))):
            env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "10.77.0.1",
                   "MASTER_PORT": "29611", "GLOO_SOCKET_IFNAME": dev}
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(WORKER), "mixtral", "int8"],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=600) for p in procs]
        for rank, (p, (stdout, stderr)) in enumerate(zip(procs, outs)):
            _check(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), [rank], ["mixtral", "int8"])
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_shards_split_uneven_counts():
    assert shards(8, 2) == [(0, 4), (4, 8)]
    assert shards(7, 4) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert shards(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]  # ranks without an expert


def test_one_rank_group_runs_the_exchange_in_process(tmp_path):
    """A world of one: every expert is local, the all_to_all moves the rows to itself; equal to plain moec."""
    model = models.tiny_model("olmoe").eval()
    ref = moec.compile(models.tiny_model("olmoe").eval())
    with pytest.raises(RuntimeError, match="init_process_group"):
        moec.compile(models.tiny_model("olmoe").eval(), expert_parallel=moec.ExpertParallel())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        moec.compile(model, expert_parallel=moec.ExpertParallel())
        assert all("on rank 0/1" in b.experts for b in moec.inspect(model).blocks)
        inputs = models.example_inputs(model, batch=2, seq=6)
        with torch.no_grad():
            assert rel_err(model(**inputs).logits, ref(**inputs).logits) < TOL[torch.float32]
        stats = moec.inspect(model).expert_parallel
        assert stats.rows_received == stats.rows_sent == 2 * 6 * 2 * len(moec.inspect(model).blocks)
        assert stats.bytes_sent == 0  # nothing left the rank
        with pytest.raises(NotImplementedError, match="moec.load_sharded"):
            moec.save(model, tmp_path / "m.safetensors")
        model.train()  # the original forward would run the released experts (and skip the exchange): refused
        with pytest.raises(NotImplementedError, match="sharded"):
            model(**inputs)
        model.eval()
        llama4 = models.tiny_model("llama4").eval()  # experts that take the combine weight on their input
        llama4_ref = moec.compile(models.tiny_model("llama4").eval())
        moec.compile(llama4, expert_parallel=moec.ExpertParallel())
        assert moec.inspect(llama4).blocks and not moec.inspect(llama4).rejected
        with torch.no_grad():
            inputs = models.example_inputs(llama4, batch=2, seq=5)
            assert rel_err(llama4(**inputs).logits, llama4_ref(**inputs).logits) < TOL[torch.float32]
        a8 = moec.Int8Experts(activations="int8")  # int8 activations: each row rounded on its own, wherever it runs
        sharded, resident = (moec.compile(models.tiny_model("olmoe").eval(), quantize=a8, **kw)
                             for kw in ({"expert_parallel": moec.ExpertParallel()}, {}))
        with torch.no_grad():
            inputs = models.example_inputs(sharded, batch=2, seq=6)
            assert rel_err(sharded(**inputs).logits, resident(**inputs).logits) < TOL[torch.float32]
        with pytest.raises(TypeError, match="moec.ExpertParallel"):
            moec.compile(models.tiny_model("olmoe").eval(), expert_parallel=2)
        with pytest.raises(NotImplementedError, match="offload"):
            moec.compile(models.tiny_model("olmoe").eval(), expert_parallel=moec.ExpertParallel(),
                         offload=moec.Offload())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family,world,rank", [("qwen2_moe", 2, 1), ("qwen2_moe", 3, 0), ("switch_transformers", 4, 2),
                                               ("mixtral", 16, 9), ("dbrx", 2, 1)])
def test_a_rank_reads_only_its_experts(family, world, rank, tmp_path):
    """load_sharded's reads (shard_reader): a rank's experts come from the checkpoint as they are there, read as
    slices of the stacked tensors or as their own tensors (ModuleList experts), and nothing else of the experts is
    read; the other ranks' experts are stand-ins at the same scale, not the checkpoint's values. A rank that holds
    none of a block's experts (8 experts over 16 ranks) reads them whole, and so are experts in another layout than
    [E, ...] (DBRX's [E*n, D] matrices)."""
    from safetensors.torch import save_model

    from moec.distributed import shard_reader
    from moec.offload.load import _Checkpoint, _fill
    from moec.passes.detect.candidates import find_candidates

    ref = models.tiny_model(family).eval()
    save_model(ref, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        model = type(ref)(ref.config).eval()
    reads = []

    class Recorded(_Checkpoint):
        def read(self, name, like, rows=None):
            reads.append((name, rows))
            return super().read(name, like, rows)

    ckpt, real = Recorded([tmp_path / "model.safetensors"]), ref.state_dict()
    cands = find_candidates(model)
    assert cands
    for c in cands:
        lo, hi = shards(c.num_experts, world)[rank]
        pre = f"{c.path}." if c.path else ""
        if c.container:
            group = model.get_submodule(f"{pre}{c.container}")
            names = {f"{pre}{c.container}.{n}.{p}": int(n.rpartition("_")[2])
                     for n, m in group.named_children() for p, _ in m.named_parameters()}
        else:
            names = {f"{pre}{n}": None for n in c.experts}
        reads.clear()
        _fill(model, set(names), ckpt, shard_reader(lambda path, E: range(*shards(E, world)[rank]))(c, ckpt))
        state = model.state_dict()
        for name, expert in names.items():
            got, want = state[name], real[name]
            if lo == hi or expert is None and (got.dim() < 3 or got.shape[0] != c.num_experts):  # read whole
                assert torch.equal(got, want) and (name, None) in reads
            elif expert is None:  # stacked [E, ...]: rows lo:hi read, the rest stand-ins
                assert torch.equal(got[lo:hi], want[lo:hi]) and not torch.equal(got, want)
                assert reads.count((name, (lo, hi))) == 1 and (name, None) not in reads
                rms = lambda t: t.float().square().mean().sqrt()
                assert 0.7 < rms(got) / rms(want[lo:hi]) < 1.3
            elif lo <= expert < hi:
                assert torch.equal(got, want) and (name, None) in reads
            else:
                assert not torch.equal(got, want) and (name, None) not in reads
        assert all(n in names for n, _ in reads), reads


def test_placement_copies_busy_experts_to_even_the_ranks():
    """placement (ExpertParallel(replicas=...)): each rank keeps its shard and gets at most `replicas` copies, never
    of an expert it holds; the busiest rank's expected load goes down on skewed routing; uniform routing, one rank or
    no calibration get no copies."""
    from moec.distributed import placement

    def busiest(held, load):
        copies = [sum(e in h for h in held) for e in range(len(load))]
        return max(sum(load[e] / copies[e] for e in h) for h in held)

    skewed = [400, 10, 10, 10, 300, 10, 10, 10, 5, 5, 5, 5, 5, 5, 200, 5]
    for world, replicas in [(2, 1), (4, 1), (4, 2), (3, 3)]:
        held = placement(16, world, skewed, replicas)
        for r, ((lo, hi), h) in enumerate(zip(shards(16, world), held)):
            assert h[:hi - lo] == list(range(lo, hi)) and len(h) - (hi - lo) <= replicas and len(set(h)) == len(h)
        assert busiest(held, skewed) < busiest(placement(16, world), skewed), (world, replicas, held)
    assert placement(16, 4, [7] * 16, 2) == placement(16, 4)
    assert placement(3, 4, [100, 84, 100], 2) == placement(3, 4)  # a copy would only split a tie at the top
    assert placement(16, 1, skewed, 2) == [list(range(16))]
    assert placement(16, 4, None, 2) == placement(16, 4)
    with pytest.raises(ValueError, match="calibration"):
        moec.ExpertParallel(replicas=1)
    with pytest.raises(ValueError, match="replicas"):
        moec.ExpertParallel(replicas=-1)


@pytest.mark.parametrize("quantize", [None, moec.Int8Experts(), moec.Int4Experts(32)], ids=["fp", "int8", "int4"])
def test_triton_backend_under_expert_parallel(quantize, tmp_path):
    """backend="triton" with expert_parallel=: each rank's experts run the Triton kernels (TRITON_INTERPRET=1 here,
    a world of one: the rows go through all_to_all to this rank) and the logits equal the one-process Triton
    model's."""
    from moec.bindings import resolve

    model = models.tiny_model("mixtral", hidden_size=64, intermediate_size=64).eval()
    ref = moec.compile(models.tiny_model("mixtral", hidden_size=64, intermediate_size=64).eval(), backend="triton",
                       quantize=quantize)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        moec.compile(model, backend="triton", quantize=quantize, expert_parallel=moec.ExpertParallel())
        report = moec.inspect(model)
        assert report.blocks and not report.rejected and "lower_triton" in report.pipeline
        kernel = getattr(torch.ops.moec, "triton_experts" if quantize is None else f"triton_experts_int{quantize.bits}")
        for b in report.blocks:
            assert b.passes[-1].name == "lower_triton" and b.passes[-1].modified
            assert resolve(model, b.path).__dict__["_moec_graph"].sharded.op is kernel
        inputs = models.example_inputs(model, batch=2, seq=5)
        with torch.no_grad():
            assert rel_err(model(**inputs).logits, ref(**inputs).logits) < TOL[torch.float32]
        assert moec.inspect(model).expert_parallel.rows_received > 0
    finally:
        dist.destroy_process_group()


def test_a_block_left_alone_gets_its_real_experts(tmp_path):
    """load_sharded's stand-ins never run: a block the pipeline rejects (here: shard_experts without a group) has its
    experts read again, whole, before the next block."""
    from safetensors.torch import save_model

    from moec.distributed import shard_reader
    from moec.offload.load import fill_and_compile

    ref = models.tiny_model("qwen2_moe").eval()
    save_model(ref, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        model = type(ref)(ref.config).eval()
    report = fill_and_compile(model, tmp_path, "detect_moe,batch_experts,shard_experts", {}, verify=False, who="test",
                              expert_reader=shard_reader(lambda path, E: [0]))  # this "rank" holds expert 0 only
    assert not report.blocks and len(report.rejected) == ref.config.num_hidden_layers
    real = ref.state_dict()
    assert all(torch.equal(t, real[n]) for n, t in model.state_dict().items())
    inputs = models.example_inputs(ref, seq=5)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref(**inputs).logits)
