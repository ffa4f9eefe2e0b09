"""Offloaded experts (moec.Offload, passes/offload_experts.py, moec/offload.py): the same outputs as the original
at every budget and policy, with and without prefetch; the cache never holds more than its budget; the
experts leave the model; a damaged store fails with what to do; concurrent calls."""

import copy
import os
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from safetensors.torch import save_model
from conftest import TOL, rel_err
from test_generality import RouterForms, ZeroComputeExperts

import moec
from moec import models
from moec.bindings import resolve
from moec.canonical import compiled_graph
from moec.offload import History, Pool, optimal, simulate, slots_for, victim

FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3"]


def _lm(family, seed=0):
    return models.tiny_model(family, seed=seed).eval()


def _compile(model, **kw):
    moec.compile(model, offload=moec.Offload(**kw))
    report = moec.inspect(model)
    assert report.blocks and all("[offloaded]" in b.experts for b in report.blocks), report
    return report


@pytest.mark.parametrize("family,budget", [
    (f, b) if f == "mixtral" or isinstance(b, int) else pytest.param(f, b, marks=pytest.mark.slow)  # others: slow
    for f in FAMILIES for b in (1, "25%", 1.0)])
@pytest.mark.parametrize("policy", ["lru", "lfu", "routing", "auto"])
def test_same_outputs_at_every_budget_and_policy(family, budget, policy):
    """The resident compiled model's numbers, bit for bit (its per-expert, grouped-GEMM and numba routes run on
    the slots), whatever the budget splits a call into."""
    model = _lm(family)
    ref = copy.deepcopy(model)
    resident = moec.compile(copy.deepcopy(model))
    report = _compile(model, budget=budget, policy=policy, store="disk")
    inputs = models.example_inputs(model, batch=2, seq=9)
    with torch.no_grad():
        assert rel_err(model(**inputs).logits, ref(**inputs).logits) < TOL[torch.float32]
        for seq, batch in ((1, 1), (9, 2), (40, 1)):  # one token, and a prompt that needs every expert
            x = models.example_inputs(model, batch=batch, seq=seq, seed=seq)
            assert torch.equal(model(**x).logits, resident(**x).logits), (seq, batch)
    s = report.offload.total()
    assert s.calls and s.misses and s.hits + s.misses >= s.calls


def test_generation_is_the_same_and_the_cache_stays_within_its_budget():
    model = _lm("mixtral")
    ref = copy.deepcopy(model)
    report = _compile(model, budget="25%", store="host")
    E, L = model.config.num_local_experts, model.config.num_hidden_layers
    pool = compiled_graph(resolve(model, report.blocks[0].path)).offloaded.pool
    ids = models.example_inputs(model, seq=6)["input_ids"]
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=12, do_sample=False)
        want = ref.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)
    (slots,) = pool._slots.values()
    assert slots.n == slots_for("25%", E * L, 1) == (E * L) // 4
    assert all(t.shape[0] == slots.n for t in slots.t.values())
    assert len(slots.where) <= slots.n and not slots.pins.any()
    assert report.offload.total().calls == L * 12  # the proof's calls are not counted
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    assert experts and all(p.numel() == 0 for p in experts)  # the experts left the model


@pytest.mark.parametrize("family", FAMILIES)
def test_prefetch_never_changes_a_number(family):
    outs = []
    for prefetch, width in (("router", 1), ("router", 3), (None, 2)):
        model = _lm(family)
        # a norm holding a buffer is not called again by the late predictor: its block keeps the early guess
        model.model.layers[0].post_attention_layernorm.register_buffer("calls", torch.zeros(()))
        report = _compile(model, budget="50%", prefetch=prefetch, prefetch_width=width)
        pool = compiled_graph(resolve(model, report.blocks[0].path)).offloaded.pool
        with torch.no_grad():
            outs.append([model(**models.example_inputs(model, seq=s, seed=s)).logits for s in (1, 1, 3, 1, 1)])
        rates = report.offload.rates(report.offload.total())
        assert (rates["prefetch_recall"] > 0) == (prefetch is not None)
        if prefetch:  # the late predictor found each block's norm on the first call, but layer 0's
            assert [late.norm is not None for late in pool.late] == [i > 0 for i in range(len(report.blocks))]
            assert pool.blocks[report.blocks[0].path]["router"] is not None
            assert all(pool.blocks[b.path]["router"] is None for b in report.blocks[1:])
    assert all(torch.equal(a, b) for ref in outs[1:] for a, b in zip(outs[0], ref))


class _Chained(torch.nn.Module):
    """Two MoE blocks, chained in an nn.Sequential or looped over in an nn.ModuleList."""

    def __init__(self, container):
        super().__init__()
        self.body = container(RouterForms("@W.T", E=8), RouterForms("@W.T", E=8))

    def forward(self, x):
        if isinstance(self.body, torch.nn.Sequential):
            return self.body(x)
        for b in self.body:
            x = b(x)
        return x


@pytest.mark.parametrize("container", [torch.nn.Sequential, lambda *m: torch.nn.ModuleList(m)], ids=["seq", "list"])
def test_chained_blocks_keep_the_early_guess(container):
    """The module before block 1 is block 0 (not a norm to call again), or the parent is a list nobody calls: no
    late predictor; each block keeps the early guess, and the numbers stay the original's."""
    model = _Chained(container).eval()
    ref = copy.deepcopy(model)
    moec.compile(model, offload=moec.Offload(budget=4, prefetch="router"))
    pool = compiled_graph(model.body[0]).offloaded.pool
    x = torch.randn(5, 32)
    with torch.no_grad():
        for _ in range(3):
            assert rel_err(model(x), ref(x)) < TOL[torch.float32]
    assert [late.norm for late in pool.late] == [None, None]
    assert pool.blocks["body.1"]["router"] is not None and pool.stats.blocks["body.0"].calls == 3
    needed = sum(len(need) for block, need in pool.stats.trace if block == "body.1")
    assert pool.stats.blocks["body.1"].needed_after_prediction == needed  # the early guess ran before every call


@pytest.mark.parametrize("form", ["modules", "stacked"])
def test_zero_compute_experts_are_never_fetched(form):
    """Blocks with zero-compute experts (router ids past E): the prediction for block 1 ranks them too, and they are
    not prefetched (they were, as experts 6-8 of 6); the numbers stay the original's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(ZeroComputeExperts(form), ZeroComputeExperts(form)).eval()
    ref = copy.deepcopy(model)
    moec.compile(model, offload=moec.Offload(budget=4, prefetch="router", prefetch_width=3))
    pool = compiled_graph(model[0]).offloaded.pool
    x = torch.randn(9, 32)
    with torch.no_grad():
        for _ in range(3):
            assert rel_err(model(x), ref(x)) < TOL[torch.float32]
    assert [b.path for b in moec.inspect(model).blocks] == ["0", "1"]
    assert all(max(need) < 6 for _, need in pool.stats.trace if need)
    rates = moec.inspect(model).offload.rates(moec.inspect(model).offload.total())
    assert rates["prefetch_recall"] == rates["prefetch_precision"] == 1.0  # (every call needs all 6 experts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp_experts_offloaded_give_the_resident_numbers_at_decode(dtype):
    """At decode the resident fp32/bf16 experts op may run cpu_quant's numba kernels (torch_backend._numba_route);
    the offloaded one takes the same route on its slots: the same numbers, token for token."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the route needs two threads
    try:
        model, resident = _lm("mixtral").to(dtype), _lm("mixtral").to(dtype)
        moec.compile(resident)
        _compile(model, budget="50%", store="host")
        with torch.no_grad():
            for seq in (1, 2, 5):
                x = models.example_inputs(model, seq=seq, seed=seq)
                assert torch.equal(model(**x).logits, resident(**x).logits)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("quant", [moec.Int8Experts(), moec.Int8Experts(activations="int8"), moec.Int4Experts(group_size=32),
                                   moec.Int4Experts(group_size=32, symmetric=True),
                                   moec.Int4Experts(group_size=32, activations="int8")],
                         ids=["int8", "int8a8", "int4", "int4sym", "int4a8"])
@pytest.mark.parametrize("budget", [1, "25%", 1.0])
def test_quantized_experts_offloaded_give_the_resident_quantized_numbers(quant, budget):
    """offload= with quantize=: the store holds the quantized experts, and the outputs are the resident quantized
    model's, number for number (one token: the kernels; 40 tokens: experts with many rows are dequantized)."""
    model, resident = _lm("qwen2_moe"), _lm("qwen2_moe")
    moec.compile(resident, quantize=quant)
    moec.compile(model, quantize=quant, offload=moec.Offload(budget=budget, policy="lru"))
    report = moec.inspect(model)
    assert report.blocks and all("[offloaded]" in b.experts for b in report.blocks), report
    with torch.no_grad():
        for seq in (1, 40, 1, 3):
            x = models.example_inputs(model, seq=seq, seed=seq)
            assert torch.equal(model(**x).logits, resident(**x).logits)
    quantized = [t for n, t in model.named_buffers() if "_moec_w" in n]
    assert quantized and all(t.numel() == 0 for t in quantized)  # the quantized experts left the model too
    fp_bytes = sum(p[0].numel() * 4 for n, p in _lm("qwen2_moe").named_parameters() if ".experts." in n)  # one fp32 expert
    s = report.offload.total()
    assert s.misses and s.bytes_read / s.misses < fp_bytes / 3  # a miss moves a quantized expert


@pytest.mark.parametrize("family,quant,budget", [
    ("qwen2_moe", None, 1), ("qwen2_moe", None, "25%"), ("qwen2_moe", moec.Int8Experts(), 1),
    ("qwen2_moe", moec.Int4Experts(group_size=32), 1), ("gpt_oss", None, 1)],  # GPT-OSS: transposed slots, biases
    ids=["fp-1", "fp-25%", "int8-1", "int4-1", "gpt_oss-fp-1"])
def test_the_triton_kernels_run_on_the_slots(family, quant, budget):
    """backend="triton" with offload=: the kernels run on the pool's slots (TRITON_INTERPRET=1 on a CPU), each pair
    with the resident kernel's tiles, so the outputs are the resident Triton model's bit for bit; a call needing more
    experts than the pool holds (budget 1) runs its pairs group by group."""
    model, resident = _lm(family), _lm(family)
    moec.compile(resident, backend="triton", quantize=quant)
    moec.compile(model, backend="triton", quantize=quant, offload=moec.Offload(budget=budget, policy="lru", store="host"))
    report = moec.inspect(model)
    assert report.blocks and not report.rejected and all("[offloaded]" in b.experts for b in report.blocks), report
    assert all(b.passes[-1].name == "lower_triton" and b.passes[-1].modified for b in report.blocks)
    with torch.no_grad():
        for seq in (1, 40, 3):
            x = models.example_inputs(model, seq=seq, seed=seq)
            assert torch.equal(model(**x).logits, resident(**x).logits), seq
    assert report.offload.total().misses


@pytest.mark.parametrize("form", ["@W.T", "flat"])
@pytest.mark.parametrize("quant", [None, moec.Int8Experts()], ids=["fp", "int8"])
def test_a_hand_written_block(form, quant):
    """Experts in an nn.ModuleList (stacked by moec): the resident compiled block's numbers, also after a cast
    to bf16 (the slots follow the dtype of the released per-expert weights)."""
    block = RouterForms(form, E=8).eval()
    ref, resident = copy.deepcopy(block), moec.compile(copy.deepcopy(block), quantize=quant)
    moec.compile(block, quantize=quant, offload=moec.Offload(budget=2))
    assert "[offloaded]" in moec.inspect(block).blocks[0].experts
    for dtype in (torch.float32, torch.bfloat16):
        block.to(dtype), resident.to(dtype), ref.to(dtype)
        for T in (1, 7, 300):
            x = torch.randn(T, 32, dtype=dtype)
            with torch.no_grad():
                assert torch.equal(block(x), resident(x)), (dtype, T)
                if quant is None:
                    assert rel_err(block(x), ref(x)) < TOL[dtype]


def test_a_damaged_store_fails_with_what_to_do(tmp_path):
    model = _lm("mixtral")
    _compile(model, budget=1, store="disk", path=str(tmp_path))
    files = sorted(tmp_path.iterdir())
    assert len(files) == model.config.num_hidden_layers
    x = models.example_inputs(model, seq=3)
    with torch.no_grad():
        model(**x)
    with open(files[0], "r+b") as f:  # values changed in place, header, size and token kept: NaN came out
        f.seek(os.path.getsize(files[0]) - 64)
        f.write(b"\xff" * 64)
    with pytest.raises(RuntimeError, match="changed after compile.*compile the model again"), torch.no_grad():
        model(**x)
    files[0].write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="compile the model again"), torch.no_grad():
        model(**x)
    os.remove(files[1])
    with pytest.raises(RuntimeError, match="compile the model again"), torch.no_grad():
        model(**x)


def test_a_store_another_compile_rewrote_is_refused(tmp_path):
    """Two models compiled into one Offload(path=...): the first must not run on the second's experts."""
    model, other = _lm("mixtral"), models.tiny_model("mixtral", seed=1).eval()
    _compile(model, budget=1, store="disk", path=str(tmp_path))
    x = models.example_inputs(model, seq=3)
    with torch.no_grad():
        model(**x)  # its headers read
        _compile(other, budget=1, store="disk", path=str(tmp_path))
        other(**x)
        with pytest.raises(RuntimeError, match="another compile rewrote"):
            model(**x)


def test_store_reads_take_as_many_reads_as_the_os_needs(tmp_path, monkeypatch):
    """A read may return fewer bytes than asked (over 2 GiB on Linux, network filesystems): the store reads on."""
    import io

    from moec.offload import store

    model = _lm("qwen2_moe")
    ref = copy.deepcopy(model)
    _compile(model, budget=2, store="disk", path=str(tmp_path))

    class Short(io.FileIO):
        def readinto(self, b):
            return super().readinto(memoryview(b)[:1000])

    monkeypatch.setattr(store, "open", lambda path, mode, buffering=-1: Short(path, mode), raising=False)
    x = models.example_inputs(model, seq=4)
    with torch.no_grad():
        assert rel_err(model(**x).logits, ref(**x).logits) < TOL[torch.float32]
    assert moec.inspect(model).offload.total().bytes_read > 0


def test_concurrent_calls_give_each_its_own_outputs():
    model = _lm("mixtral")
    ref = copy.deepcopy(model)
    _compile(model, budget=2)
    inputs = [models.example_inputs(model, seq=s, seed=s) for s in (1, 5, 2, 9)]
    with torch.no_grad():
        want = [ref(**x).logits for x in inputs]
    got, errors = [None] * len(inputs), []

    def run(i):
        try:
            with torch.no_grad():
                for _ in range(3):
                    got[i] = model(**inputs[i]).logits
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and all(rel_err(g, w) < TOL[torch.float32] for g, w in zip(got, want))


def test_clear_errors():
    with pytest.raises(ValueError, match="write '25%'"):
        moec.Offload(budget="a quarter")
    with pytest.raises(ValueError, match="policy"):
        moec.Offload(policy="fifo")
    with pytest.raises(ValueError, match="prefetch_width"):
        moec.Offload(prefetch_width=0)
    for budget in (0, -3, "0%", "150%", "1.5.3GB", "0GB"):
        with pytest.raises(ValueError, match="write '25%'"):
            moec.Offload(budget=budget)
    model = _lm("mixtral")
    with pytest.warns(UserWarning, match="no MoE block rewritten"):
        moec.compile(model, offload=moec.Offload(budget="1KB"))
    assert "smaller than one expert" in moec.inspect(model).rejected[0].reason
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        moec.compile(_lm("mixtral"), offload=moec.Offload(), backend="onnxruntime")
    model = _lm("mixtral")
    _compile(model)
    with pytest.raises(NotImplementedError, match="offload"):
        moec.save(model, "/tmp/never-written.safetensors")
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="load_state_dict cannot give it new expert weights"):  # not ignored
        model.load_state_dict(_lm("mixtral").state_dict())
    inputs = models.example_inputs(model, seq=2)
    fresh = dict(_lm("mixtral").named_parameters())
    for replace in (lambda mod, name, t: setattr(getattr(mod, name), "data", t),  # .data = new weights
                    lambda mod, name, t: setattr(mod, name, nn.Parameter(t))):  # a new Parameter
        emptied = next(n for n, p in model.named_parameters() if p.numel() == 0)
        owner, name = emptied.rsplit(".", 1)
        replace(model.get_submodule(owner), name, fresh[emptied].detach().clone())
        with torch.no_grad(), pytest.raises(RuntimeError, match="given new values after compile"):
            model(**inputs)  # the store holds the compiled experts: refused, not silently run
        setattr(model.get_submodule(owner), name, nn.Parameter(torch.empty(0)))
    with pytest.raises(NotImplementedError, match="save_pretrained"):  # it would write the emptied experts
        model.save_pretrained("/tmp/never-written")
    with pytest.raises(ValueError, match="already compiled with offloaded experts"):  # its blocks are no longer found
        moec.compile(model)
    with pytest.raises(NotImplementedError, match="load_offloaded"):
        moec.load(_lm("mixtral"), "/tmp/any.safetensors", offload=moec.Offload())
    model.train()
    with pytest.raises(NotImplementedError, match="offloaded experts"):
        model(**models.example_inputs(model, seq=2))


def test_a_relative_store_path_survives_a_change_of_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, ref = _lm("mixtral"), _lm("mixtral")
    _compile(model, budget=1, path="store")
    monkeypatch.chdir("/")
    x = models.example_inputs(model, seq=3)
    with torch.no_grad():
        assert rel_err(model(**x).logits, ref(**x).logits) < TOL[torch.float32]


def test_one_budget_for_blocks_of_different_shapes():
    """Blocks whose experts differ in shape get pools of their own; the budget (experts or bytes) is split between
    them, so that all of them together hold no more than it."""
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = RouterForms("@W.T", E=8, I=40), RouterForms("@W.T", E=8, I=24)

        def forward(self, x):
            return self.b(self.a(x))

    expert = {40: 2 * 40 * 32 * 4, 24: 2 * 24 * 32 * 4}  # bytes of one fp32 expert of each block
    for budget, most in ((4, 4 * expert[40]), ("40KB", 40 * 1024)):
        model = Two().eval()
        ref = copy.deepcopy(model)
        moec.compile(model, offload=moec.Offload(budget=budget, store="host"))
        x = torch.randn(50, 32)
        with torch.no_grad():
            assert rel_err(model(x), ref(x)) < TOL[torch.float32]
        pool = compiled_graph(model.a).offloaded.pool
        assert len(pool._slots) == 2
        held = sum(t.numel() * t.element_size() for s in pool._slots.values() for t in s.t.values())
        assert held <= most, (budget, pool.stats.slots, held)


class _TwoArgMixer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(32, 32)

    def forward(self, x, scale):
        return torch.tanh(self.q(x)) * scale


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mix, self.moe = _TwoArgMixer(), RouterForms("@W.T", E=8)

    def forward(self, x, scale):
        return x + self.moe(self.mix(x, scale))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Layer(), _Layer()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x, 0.5)
        return x


@pytest.mark.parametrize("make", [_Net, lambda: torch.nn.Sequential(
    RouterForms("@W.T", H=32, E=8), torch.nn.Linear(32, 48), RouterForms("@W.T", H=48, E=8))], ids=["two-arg", "widths"])
def test_a_prediction_that_cannot_run_is_dropped(make):
    """The prefetch guesses with modules around the blocks (the child feeding a block, the next block's router); where
    one cannot run on what it is given (a child taking more arguments, blocks of another width), the guess is dropped,
    never the forward."""
    model = make().eval()
    ref = copy.deepcopy(model)
    moec.compile(model, offload=moec.Offload(budget=4, prefetch="router"))
    assert moec.inspect(model).blocks
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the two-arg child's guess says it falls back
        for _ in range(3):
            x = torch.randn(5, 32)
            assert rel_err(model(x), ref(x)) < TOL[torch.float32]


def test_a_failed_prefetch_into_a_slot_the_call_holds_does_not_hang_it():
    """A call pins the slot a prefetch is writing; the prefetch fails and empties it: the call loads the expert there
    itself (before, it waited forever for a free slot only it could release)."""
    pool = Pool(moec.Offload(budget=1, store="host", policy="lru", prefetch="router"), "cpu")
    pool.register("a", {"w13": torch.arange(8.0).view(8, 1, 1).expand(8, 2, 2).contiguous()})
    load, started = pool._load, threading.Event()

    def failing(slots, slot, block, e, side=False):
        if side:
            started.wait(5)
            raise OSError("a transient read error")
        return load(slots, slot, block, e, side)

    pool._load = failing
    pool.prefetch("a", [3], reserve=0)
    pool.note_call("a", frozenset([3]))
    held = pool.pin("a", [3])  # the slot being written
    started.set()
    done = []
    t = threading.Thread(target=lambda: done.append(pool.acquire("a", 3, held)), daemon=True)
    t.start()
    t.join(10)
    assert done, "the call still waits"
    slots, slot = done[0]
    assert slots.t["w13"][slot][0, 0] == 3
    pool.release("a", held)
    assert not slots.pins.any()


def test_torch_compile_of_an_offloaded_model():
    """The pool's Python runs eagerly inside torch.compile (locks, reads): the same logits."""
    model = moec.compile(_lm("qwen2_moe"), offload=moec.Offload(budget=2))
    ids = models.example_inputs(model, seq=3)["input_ids"]
    with torch.no_grad():
        assert torch.equal(torch.compile(model, backend="aot_eager", dynamic=False)(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "llama4", "dbrx"])
def test_experts_stored_transposed_give_the_resident_numbers(family):
    """GPT-OSS and Llama 4 hold their experts as [E, H, N] (DBRX its w2), read transposed: the store and the slots
    keep that layout, so the GEMMs read the same strides as the resident model's (a contiguous copy computed
    other sums: 2e-7 off)."""
    model, resident = _lm(family), moec.compile(_lm(family))
    _compile(model, budget=1, store="disk")
    with torch.no_grad():
        for seq, batch in ((1, 1), (3, 2), (40, 1)):
            x = models.example_inputs(model, batch=batch, seq=seq, seed=seq)
            assert torch.equal(model(**x).logits, resident(**x).logits), (seq, batch)


@pytest.mark.parametrize("quant,dtype", [(None, torch.bfloat16), (moec.Int4Experts(group_size=32), torch.bfloat16),
                                         (moec.Int8Experts(), torch.float16)], ids=["fp-bf16", "int4-bf16", "int8-fp16"])
def test_the_cache_follows_the_model_to_another_dtype(quant, dtype):
    """model.to(dtype) after compile casts the block's (released) expert tensors, a quantized block's scales too:
    the slots take their dtypes, and the outputs stay the resident model's after the same cast."""
    model, resident = _lm("gpt_oss"), moec.compile(_lm("gpt_oss"), quantize=quant)
    ref = copy.deepcopy(model).to(dtype)
    moec.compile(model, quantize=quant, offload=moec.Offload(budget="50%"))
    model.to(dtype)
    resident.to(dtype)
    with torch.no_grad():
        if quant is None:
            x = models.example_inputs(model, seq=7)
            assert rel_err(model(**x).logits, ref(**x).logits) < TOL[dtype]
        for seq, batch in ((1, 1), (3, 2), (40, 1)):  # the resident model's routes, on slots of the new dtypes
            x = models.example_inputs(model, batch=batch, seq=seq, seed=seq)
            assert torch.equal(model(**x).logits, resident(**x).logits), (seq, batch)


class _TwoBlocks(torch.nn.Module):
    """Two hand-written blocks of one expert shape, each run in its own dtype."""

    def __init__(self):
        super().__init__()
        from handwritten import Spec, make_block

        self.a, self.b = make_block(Spec(), seed=0), make_block(Spec(), seed=1)

    def forward(self, x):
        y = self.a(x.to(next(self.a.parameters()).dtype)).float()
        return self.b(y.to(next(self.b.parameters()).dtype)).float()


def test_blocks_of_one_shape_in_two_dtypes_and_casts_back():
    """One block cast to bf16, the other not: each gets slots of its dtype (they emptied each other's at every
    call); a cast back to fp32 rounds the stored experts as the resident tensors were rounded; the default "auto"
    policy replays its trace after a cast emptied the slots (it raised)."""
    model = _TwoBlocks().eval()
    resident = moec.compile(copy.deepcopy(model))
    moec.compile(model, offload=moec.Offload(budget=1.0, store="host"))
    x = torch.randn(5, 32)
    with torch.no_grad():
        for m in (model, resident):
            m.b.to(torch.bfloat16)
        for _ in range(2):  # the first call of each block after the cast sizes the slots anew
            assert torch.equal(model(x), resident(x))
        misses = moec.inspect(model).offload.total().misses
        for _ in range(3):  # then every expert stays in its slot (the same tokens: the same experts)
            assert torch.equal(model(x), resident(x))
        assert moec.inspect(model).offload.total().misses == misses
        for m in (model, resident):
            m.b.to(torch.float32)
        for _ in range(moec.offload.Pool.AUTO_AFTER):  # fp32 again, with the bf16 rounding in the weights
            assert torch.equal(model(x), resident(x))
    assert moec.inspect(model).offload.policy.startswith("auto: ")


def test_policies_on_a_cyclic_trace():
    """Blocks visited in turn, each with a hot expert and a rare one: the routing policy keeps the hot experts
    (LRU evicts them for the rare ones); the simulator counts hits as the pool does."""
    trace = []
    for t in range(200):
        for b in ("a", "b", "c"):
            trace.append((b, frozenset({0, 1 + t % 5})))
    lru, routing = simulate(trace, 4, "lru"), simulate(trace, 4, "routing")
    assert routing > lru + 0.2
    # Belady's bound: at least every policy; a slot per expert misses only first uses; 4 slots keep the 3 hot
    # experts and miss every rare use (each comes back after 15 others)
    assert optimal(trace, 4) >= max(simulate(trace, 4, p) for p in ("lru", "lfu", "routing"))
    assert optimal(trace, 18) == 1 - 18 / 1200
    assert optimal(trace, 4) == pytest.approx(0.5 - 3 / 1200)
    h = History(["a", "b", "c"])
    h.call("a")
    assert list(h.distance()) == [3, 1, 2]  # "a" runs now: "b" is next, "a" last
    h.calls[:2] = 10
    h.uses.update({("a", 0): 10, ("b", 3): 1})
    assert victim("routing", [("a", 0), ("b", 3)], h) == ("b", 3)
    assert victim("lfu", [("a", 0), ("b", 3)], h) == ("b", 3)


def _reference_victim(policy, candidates, h):
    """The policies written key by key (what victim_index computes over arrays)."""
    def key(k):
        last = h.last_use.get(k, -1)
        if policy == "lru":
            return (last,)
        uses = h.uses.get(k, 0)
        if policy == "lfu":
            return uses, last
        b = h.index[k[0]]
        dist = 1 if h.now is None else (b - h.index[h.now] - 1) % len(h.order) + 1
        return (uses + 1) * (1 / ((int(h.calls[b]) + 2) * dist)), last
    return min(candidates, key=key)


def _zipf_trace(blocks, E, k, calls, seed=0):
    rng = np.random.default_rng(seed)
    return [(blocks[c % len(blocks)], frozenset(int(e) for e in rng.zipf(1.2, k) % E)) for c in range(calls)]


@pytest.mark.parametrize("policy", ["lru", "lfu", "routing"])
def test_the_pool_evicts_as_the_policy_says(policy):
    """The pool keeps each slot's history in arrays and searches them at every miss: it must choose the victim
    the policy's definition chooses (a reference written key by key), so its hits equal the replay's."""
    blocks = ["a", "b", "c", "d"]
    trace = _zipf_trace(blocks, E=16, k=4, calls=400)
    h = History(blocks)
    for block, need in trace[:100]:
        h.call(block)
        for e in sorted(need):
            h.use(block, e)
    h.uses[("a", 15)] = h.uses[("b", 15)] = 3  # equal counts: the tie goes to the least recent
    cands = [(b, e) for b in blocks for e in range(16)]
    for now in blocks:
        h.now = now
        assert victim(policy, cands, h) == _reference_victim(policy, cands, h)
    for slots in (4, 13, 40):  # at least the experts of one call (this loop holds them all, as one group)
        pool = Pool(moec.Offload(budget=slots, store="host", policy=policy, prefetch=None), "cpu")
        for b in blocks:
            pool.register(b, {"w13": torch.arange(16.0).view(16, 1, 1).expand(16, 2, 2).contiguous()})
        for block, need in trace:
            pool.note_call(block, need)
            held = pool.pin(block, list(need))
            for e in sorted(need):
                got = pool.acquire(block, e, held)
                assert got[0].t["w13"][got[1]][0, 0] == e  # the slot holds the expert asked for
            pool.release(block, held)
        total = pool.stats.total()
        assert total.hits / (total.hits + total.misses) == simulate(trace, slots, policy)
        assert len(pool._slots) == 1 and len(next(iter(pool._slots.values())).where) <= slots


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_a_model_built_on_meta_is_filled_from_its_checkpoint(family, tmp_path):
    """moec.load_offloaded: everything but the experts read from the checkpoint, the experts block by block into
    the store; the model never holds all its experts (each block's are emptied once it is compiled)."""
    ref = _lm(family)
    (tmp_path / "ckpt").mkdir()
    save_model(ref, str(tmp_path / "ckpt" / "model.safetensors"))  # names: the state_dict's (ties written once)
    with torch.device("meta"):
        model = type(ref)(ref.config)  # in training mode, as built: the loader returns it ready to run
    assert moec.load_offloaded(model, tmp_path / "ckpt", moec.Offload(budget="25%", path=str(tmp_path / "store"))) \
        is model and not model.training
    report = moec.inspect(model)
    assert len(report.blocks) == ref.config.num_hidden_layers and not report.rejected
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert all(p.numel() == 0 for n, p in model.named_parameters() if ".experts." in n and "shared" not in n)
    ids = models.example_inputs(ref, seq=5)["input_ids"]
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, ref(input_ids=ids).logits) < TOL[torch.float32]
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False),
                           ref.generate(ids, max_new_tokens=6, do_sample=False))
        before = model(input_ids=ids).logits
    # the weights read are the model's own: another checkpoint's bytes written over the file, in place (as cp
    # does), change nothing (they were views of the file's mapped pages)
    save_model(_lm(family, seed=1), str(tmp_path / "other.safetensors"))
    other = (tmp_path / "other.safetensors").read_bytes()
    assert len(other) == (tmp_path / "ckpt" / "model.safetensors").stat().st_size
    with open(tmp_path / "ckpt" / "model.safetensors", "r+b") as f:
        f.write(other)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_load_offloaded_quantized(tmp_path):
    """load_offloaded(quantize=): the blocks quantized then offloaded as they are read; the outputs are those of the
    whole model compiled with quantize= in memory."""
    ref = _lm("qwen2_moe")
    save_model(ref, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        model = type(ref)(ref.config).eval()
    moec.load_offloaded(model, tmp_path / "model.safetensors", moec.Offload(budget="25%"), quantize=moec.Int8Experts())
    assert all("[offloaded]" in b.experts and "int8" in b.experts for b in moec.inspect(model).blocks)
    moec.compile(ref, quantize=moec.Int8Experts())
    with torch.no_grad():
        for seq in (5, 1):
            x = models.example_inputs(ref, seq=seq, seed=seq)
            assert torch.equal(model(**x).logits, ref(**x).logits)
    with pytest.raises(TypeError, match="quantize must be"):
        moec.load_offloaded(model, tmp_path, moec.Offload(), quantize="int8")


def test_load_offloaded_errors(tmp_path):
    ref = _lm("mixtral")
    with torch.device("meta"):
        model = type(ref)(ref.config).eval()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        moec.load_offloaded(model, tmp_path / "nothing", moec.Offload())
    (tmp_path / "other").mkdir()
    save_model(_lm("qwen2_moe"), str(tmp_path / "other" / "model.safetensors"))
    with torch.device("meta"):
        model = type(ref)(ref.config).eval()
    with pytest.raises((KeyError, ValueError), match="checkpoint"):
        moec.load_offloaded(model, tmp_path / "other", moec.Offload())
    (tmp_path / "stale").mkdir()  # a tensor in two files (a stale shard beside a new save): refused, not picked
    save_model(ref, str(tmp_path / "stale" / "model.safetensors"))
    save_model(_lm("mixtral"), str(tmp_path / "stale" / "old.safetensors"))
    with torch.device("meta"):
        model = type(ref)(ref.config).eval()
    with pytest.raises(ValueError, match="in two checkpoint files"):
        moec.load_offloaded(model, tmp_path / "stale", moec.Offload())


def test_a_fitted_prefetch_predicts_more_and_changes_nothing():
    """fit_prefetch on training text: the held-out generation is the resident model's, token for token, and the
    prediction names more of the experts each block then needs than the router on the residual stream alone."""
    from moec import examples

    train = examples.evenly_spaced_batches(examples.corpus("train"), 128, 2, 8)
    prompt = examples.corpus("heldout")[:24][None].long()
    resident = moec.compile(examples.fine_moe_lm().eval())
    with torch.no_grad():
        want = resident.generate(prompt, max_new_tokens=24, do_sample=False)
    recall = {}
    for fit in (False, True):
        model = examples.fine_moe_lm().eval()
        moec.compile(model, offload=moec.Offload(budget="25%", policy="routing", prefetch="router"))
        if fit:  # input_ids tensors and mappings of inputs (a tokenizer's output) alike
            rows = moec.offload.fit_prefetch(model, [train[0], {"input_ids": train[1]}])
            assert sorted(rows) == [b.path for b in moec.inspect(model).blocks] and set(rows.values()) == {2048}
        with torch.no_grad():
            assert torch.equal(model.generate(prompt, max_new_tokens=24, do_sample=False), want)
        st = moec.inspect(model).offload
        recall[fit] = st.rates(st.total())["prefetch_recall"]
    assert recall[True] > recall[False] + 0.02, recall
    plain = examples.fine_moe_lm().eval()
    moec.compile(plain, offload=moec.Offload(budget="25%", prefetch=None))
    with pytest.raises(ValueError, match="no late prefetch to fit"):
        moec.offload.fit_prefetch(plain, train)
    with pytest.raises(ValueError, match="no batches"):
        moec.offload.fit_prefetch(model, [])
