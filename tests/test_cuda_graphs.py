"""compile(cuda_graphs=True): generate()'s one-token steps replayed as CUDA graphs (moec/cuda_graphs.py).

On a CPU: the option's errors, and the bookkeeping (keys, buffers, checks, refusals, copies) with an emulated graph
(the `emulated` fixture). On a GPU (benchmarks/gpu_session.sh), real graphs: each test compares greedy tokens and
logits with the same weights run eagerly by transformers (static cache, no graphs) or by the same compiled model."""

import copy

import pytest
import torch

import moec
from moec import models

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_errors_say_what_to_do():
    model = models.tiny_model("mixtral")
    with pytest.raises(TypeError, match="cuda_graphs must be True or False"):
        moec.compile(model, cuda_graphs=1)
    with pytest.raises(ValueError, match=r"needs the whole model on one CUDA device.*model.to\('cuda'\)"):
        moec.compile(model, cuda_graphs=True)
    with pytest.raises(NotImplementedError, match="onnxruntime"):
        moec.compile(model, cuda_graphs=True, backend="onnxruntime")
    with pytest.raises(NotImplementedError, match="offload="):
        moec.compile(model, cuda_graphs=True, offload=moec.Offload(budget=4))
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        moec.compile(models.tiny_model("switch_transformers"), cuda_graphs=True)
    with pytest.raises(TypeError, match="generate"):  # refused before any block is rewritten
        moec.compile(hw_block := models.tiny_model("mixtral").model.layers[0].mlp, cuda_graphs=True)
    assert "_moec_graph" not in hw_block.__dict__
    assert not hasattr(model, "_moec_graphs") and "generate" not in model.__dict__


def test_generate_asks_moec_for_its_decode_steps(monkeypatch):
    """transformers' hook for its compiled decode step (get_compiled_call) reaches moec's GraphedStep; off CUDA it
    runs the forward as usual (same tokens), and compiling again without cuda_graphs takes the hook away."""
    from transformers import CompileConfig

    from moec import cuda_graphs

    ref = models.tiny_model("mixtral")
    ours = moec.compile(copy.deepcopy(ref))
    cuda_graphs.install(ours, True)  # compile() refuses a CPU model; the hook itself is device-independent
    calls, step, orig = [], ours._moec_graphs, cuda_graphs.GraphedStep.__call__

    def counted(self, **kw):
        calls.append(tuple(kw["input_ids"].shape))
        return orig(self, **kw)

    monkeypatch.setattr(cuda_graphs.GraphedStep, "__call__", counted)
    ids = torch.randint(4, ref.config.vocab_size, (2, 5))
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        want = ref.generate(ids, cache_implementation="static", disable_compile=True, **gen)
        every_device = CompileConfig()
        every_device._compile_all_devices = True  # transformers' switch for compiled decode steps off CUDA
        got = ours.generate(ids, compile_config=every_device, **gen)
    assert torch.equal(got, want) and calls and all(c == (2, 1) for c in calls)
    assert step.stats.captured == 0 and step.stats.replayed == 0
    moec.compile(ours)
    assert not {"get_compiled_call", "generate", "_moec_graphs"} & set(ours.__dict__)


class _EmulatedGraph:
    """A CUDA graph's data flow without a GPU: replay runs the step again, reading the graph's input buffers and
    writing its output tensors in place (a graph captures nothing on the host: neither does this)."""

    def __init__(self, step, out):
        self.step, self.out = step, out

    def replay(self):
        new = self.step()
        for k, v in self.out.items():
            if isinstance(v, torch.Tensor):
                v.copy_(new[k])


@pytest.fixture
def emulated(monkeypatch):
    """moec.cuda_graphs on the CPU, graphs emulated: the bookkeeping (keys, buffers, checks, refusals) under test."""
    from transformers import CompileConfig

    from moec import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "DEVICE", "cpu")
    monkeypatch.setattr(cuda_graphs, "_record", lambda step: (lambda out: (_EmulatedGraph(step, out), out))(step()))
    every_device = CompileConfig()
    every_device._compile_all_devices = True
    return lambda model: (cuda_graphs.install(model, True), every_device)[1]


def _emulated_pair(emulated, family: str, batch: int, prompt: int, new: int):
    """(HF model, moec-compiled copy with emulated graphs, compile_config for generate, prompt ids, greedy kwargs)."""
    ref = models.tiny_model(family)
    ours = moec.compile(copy.deepcopy(ref))
    cfg = emulated(ours)
    ids = torch.randint(4, ref.config.vocab_size, (batch, prompt))
    return ref, ours, cfg, ids, dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_emulated_graphs_give_the_eager_tokens(emulated, family):
    ref, ours, cfg, ids, gen = _emulated_pair(emulated, family, 3, 5, 9)
    with torch.no_grad():
        want = ref.generate(ids, cache_implementation="static", disable_compile=True, **gen)
        got = ours.generate(ids, compile_config=cfg, **gen)
        assert torch.equal(got, want)
        assert torch.equal(ours.generate(ids, compile_config=cfg, **gen), want)
    stats = ours._moec_graphs.stats  # (installed without compile: not in moec.inspect's report)
    assert (stats.captured, stats.replayed, stats.eager) == (2, 2 * 7, 2), stats


def test_emulated_graphs_follow_the_weights(emulated):
    """One cache, steps called directly: a weight written in place (version bump), assigned or cast after capture
    captures again; the outputs equal the eager model's each time."""
    from transformers import StaticCache

    ref = models.tiny_model("mixtral")
    ours = moec.compile(copy.deepcopy(ref))
    emulated(ours)
    step = ours._moec_graphs
    ids = torch.randint(4, ref.config.vocab_size, (1, 4))
    caches = [StaticCache(config=ref.config, max_cache_len=16) for _ in range(2)]
    with torch.no_grad():
        for m, c in zip((ref, ours), caches):
            m(ids, past_key_values=c, use_cache=True)

        def both(pos):
            kw = dict(input_ids=ids[:, pos % 4:pos % 4 + 1], position_ids=torch.tensor([[pos]]), use_cache=True)
            a = ref(**kw, past_key_values=caches[0]).logits
            b = step(**kw, past_key_values=caches[1], return_dict=True).logits
            assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5, pos

        both(4)
        both(5)
        assert step.stats.captured == 1 and step.stats.replayed == 1
        for m in (ref, ours):
            m.model.layers[1].mlp.experts.gate_up_proj[2].mul_(3)
        both(6)
        assert step.stats.captured == 2
        new = models.tiny_model("mixtral", seed=3).state_dict()
        ref.load_state_dict(new)
        ours.load_state_dict(new, assign=True)
        both(7)
        both(8)
        assert step.stats.captured == 3 and step.stats.replayed == 2


@pytest.mark.parametrize("family,why", [("gpt_oss", "the step changes Python state .*cumulative_length_int"),
                                        ("qwen3_next", "keeps tensors in a dict"),
                                        ("jamba", "keeps tensors in a dict")])
def test_emulated_refusals_run_eagerly_and_are_remembered(emulated, family, why):
    """Caches a graph cannot replay: GPT-OSS's sliding-window layers keep their position as a Python int, linear-
    attention layers their states in dicts. Refused before any replay (none advances them), remembered across
    generate() calls, with HF's tokens."""
    ref, ours, cfg, ids, gen = _emulated_pair(emulated, family, 2, 6, 5)
    with torch.no_grad(), pytest.warns(UserWarning, match=why):
        got = ours.generate(ids, compile_config=cfg, **gen)
        assert torch.equal(ours.generate(ids, compile_config=cfg, **gen), got)
    with torch.no_grad():
        assert torch.equal(got, ref.generate(ids, cache_implementation="static", disable_compile=True, **gen))
    stats = ours._moec_graphs.stats
    assert (stats.captured, stats.replayed, stats.eager) == (0, 0, 8) and len(ours._moec_graphs.refused) == 1


def test_emulated_a_step_that_writes_a_buffer_runs_eagerly(emulated):
    """A step that writes one of the model's buffers (a block's token counter; here a step counter written by a
    hook) cannot be a graph: the capture's check would write it again (counting a step twice), and each step's new
    version would need a graph of its own. Refused with the reason; the buffer counts as HF's does."""
    ref, ours, cfg, ids, gen = _emulated_pair(emulated, "mixtral", 2, 6, 5)
    for m in (ref, ours):
        m.register_buffer("steps", torch.zeros(()))
        m.register_forward_pre_hook(lambda mod, args, kwargs: mod.steps.add_(1) and None, with_kwargs=True)
    with torch.no_grad(), pytest.warns(UserWarning, match="writes the model's buffer steps"):
        got = ours.generate(ids, compile_config=cfg, **gen)
    with torch.no_grad():
        assert torch.equal(got, ref.generate(ids, cache_implementation="static", disable_compile=True, **gen))
    assert ours.steps == ref.steps == 5 and ours._moec_graphs.stats.captured == 0


def test_emulated_copies_user_caches_and_odd_arguments(emulated):
    """A deepcopy decodes with its own graphs (and pickles); a cache the caller passes is used as given; an argument
    that is neither a tensor nor a plain value runs eagerly, with the reason; generation_config is left alone."""
    import io

    from transformers import DynamicCache

    ref, ours, cfg, ids, gen = _emulated_pair(emulated, "mixtral", 1, 5, 5)
    with torch.no_grad():
        want = ref.generate(ids, cache_implementation="static", disable_compile=True, **gen)
        assert torch.equal(ours.generate(ids, compile_config=cfg, **gen), want)
        twin = copy.deepcopy(ours)
        assert twin.get_compiled_call() is twin._moec_graphs is not ours._moec_graphs
        assert twin.generate.owner.model is twin and not twin._moec_graphs.graphs
        assert torch.equal(twin.generate(ids, compile_config=cfg, **gen), want)
        assert twin._moec_graphs.stats.captured == 2 and ours._moec_graphs.stats.captured == 1
        torch.save(ours, io.BytesIO())
        dynamic = ours.generate(ids, past_key_values=DynamicCache(config=ours.config), **gen)  # no static cache forced
        assert torch.equal(dynamic, want) and ours.generation_config.cache_implementation is None
        step = ours._moec_graphs
        with pytest.warns(UserWarning, match="an argument is a slice"):
            for _ in range(2):
                step(input_ids=ids[:, :1], past_key_values=_static(ours, ids), logits_to_keep=slice(-1, None),
                     use_cache=True)
    assert step.stats.eager == 1 + 2


def test_emulated_generate_options_the_caller_chose(emulated):
    """Assisted decoding (moec's model as the assistant, prompt lookup in a config) and a cache implementation or no
    cache chosen by the caller (keyword, config passed by keyword or position) get no static cache; a deleted model
    is freed without the garbage collector, and no graph keeps generate()'s cache alive."""
    import gc
    import weakref

    from transformers import GenerationConfig

    ref, ours, cfg, ids, gen = _emulated_pair(emulated, "mixtral", 1, 6, 5)
    step = ours._moec_graphs
    with torch.no_grad():
        want = ref.generate(ids, **gen)
        assert torch.equal(ref.generate(ids, assistant_model=ours, **gen), want)
        lookup = GenerationConfig(prompt_lookup_num_tokens=2, **gen)
        assert torch.equal(ours.generate(ids, generation_config=lookup, compile_config=cfg), want)
        for call in (dict(cache_implementation="dynamic", **gen), dict(use_cache=False, **gen),
                     dict(generation_config=GenerationConfig(cache_implementation="dynamic", **gen))):
            assert torch.equal(ours.generate(ids, compile_config=cfg, **call), want)
        assert torch.equal(ours.generate(ids, GenerationConfig(cache_implementation="dynamic", **gen),
                                         compile_config=cfg), want)
        assert step.stats.captured == 0
        assert torch.equal(ours.generate(ids, GenerationConfig(**gen), compile_config=cfg), want)  # graphed
        assert step.stats.captured == 1
    # a real graph keeps no Python objects (the emulated one keeps the step, and so the cache, until the next call)
    assert all("past_key_values" not in g.output for g in step.graphs.values()) and step.cache() is not None
    step.new_call()
    gc.collect()
    assert step.cache() is None
    model = weakref.ref(ours)
    del ours
    assert model() is None


def _static(model, ids):
    """A static cache after the prompt ids[:, :-1]."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=16)
    model(ids[:, :-1], past_key_values=cache, use_cache=True)
    return cache


def _pair(family: str, dtype=torch.float32, **overrides):
    """(reference HF model, moec-compiled copy with cuda_graphs=True), same weights, on the GPU."""
    ref = models.tiny_model(family, dtype=dtype, **overrides).cuda()
    ours = moec.compile(copy.deepcopy(ref), backend="triton", cuda_graphs=True)
    return ref, ours


def _generate(model, ids, new=12, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              cache_implementation="static", disable_compile=True, **kw) \
            if model.__dict__.get("_moec_graphs") is None else \
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)


def _teacher_forced_err(ref, ours, seq) -> float:
    with torch.no_grad():
        a, b = ref(seq).logits.float(), ours(seq).logits.float()
    return ((a - b).abs().max() / b.abs().max()).item()


@cuda
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("batch", [1, 3])
def test_graphed_generate_gives_the_eager_tokens(family, batch):
    ref, ours = _pair(family)
    ids = torch.randint(4, ref.config.vocab_size, (batch, 7), device="cuda")
    want, got = _generate(ref, ids), _generate(ours, ids)
    stats = moec.inspect(ours).cuda_graphs
    assert stats.captured == 1 and stats.replayed == 12 - 2, stats  # step 1: prefill; step 2: eager + capture
    assert torch.equal(got, want)
    assert _teacher_forced_err(ref, ours, want) < 1e-4
    assert torch.equal(_generate(ours, ids), want)  # a second call: a new cache, captured again
    assert moec.inspect(ours).cuda_graphs.captured == 2


@cuda
def test_weights_changed_after_compile_and_after_capture():
    ref, ours = _pair("mixtral")
    ids = torch.randint(4, ref.config.vocab_size, (1, 5), device="cuda")
    _generate(ours, ids)
    new = models.tiny_model("mixtral", seed=7).cuda().state_dict()
    ref.load_state_dict(new)
    ours.load_state_dict(new)  # in place: same pointers, new versions
    want = _generate(ref, ids)
    assert torch.equal(_generate(ours, ids), want)
    with torch.no_grad():  # an edit by hand, in place, to one expert
        for m in (ref, ours):
            m.model.layers[0].mlp.experts.down_proj[3].mul_(-4)
    assert torch.equal(_generate(ours, ids), _generate(ref, ids))


@cuda
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_bf16_and_large_inputs_replay_the_eager_steps(family):
    """In bf16 moec's numbers are not HF's (fp32 accumulation), so the graphs are compared with the same compiled
    model run eagerly: the same kernels in the same order, the same tokens and logits."""
    ref, ours = _pair(family, dtype=torch.bfloat16)
    eager = moec.compile(copy.deepcopy(ref), backend="triton")
    with torch.no_grad():
        for m in (eager, ours):
            m.model.embed_tokens.weight.mul_(100)
    ids = torch.randint(4, ref.config.vocab_size, (2, 9), device="cuda")
    seq = _generate(ours, ids, new=8)
    assert moec.inspect(ours).cuda_graphs.replayed == 6
    assert torch.equal(seq, _generate(eager, ids, new=8))
    with torch.no_grad():
        assert torch.equal(ours(seq).logits, eager(seq).logits)


@cuda
def test_a_step_with_python_state_runs_eagerly():
    """GPT-OSS's sliding-window layers keep their position as a Python int in the static cache: no graph."""
    ref, ours = _pair("gpt_oss")
    ids = torch.randint(4, ref.config.vocab_size, (1, 6), device="cuda")
    with pytest.warns(UserWarning, match="run eagerly: the step changes Python state"):
        got = _generate(ours, ids)
    assert torch.equal(got, _generate(ref, ids))
    assert moec.inspect(ours).cuda_graphs.replayed == 0


@cuda
def test_train_mode_grad_and_compiling_again_without_graphs():
    ref, ours = _pair("mixtral")
    ids = torch.randint(4, ref.config.vocab_size, (1, 4), device="cuda")
    step = ours._moec_graphs
    ours.train()
    out = step(input_ids=ids[:, :1], use_cache=False)  # training mode: the forward as usual, with gradients
    assert out.logits.requires_grad and step.stats.captured == 0
    ours.eval()
    moec.compile(ours, backend="triton")
    assert not {"get_compiled_call", "generate", "_moec_graphs"} & set(ours.__dict__)
    assert torch.equal(_generate(ours, ids), _generate(ref, ids))


def test_save_and_load_keep_the_option_where_cuda_is(tmp_path):
    """moec.save records cuda_graphs=True; moec.load compiles with it again on CUDA, and on a CPU says it does not."""
    from moec import cuda_graphs

    ref = models.tiny_model("mixtral")
    ours = moec.compile(copy.deepcopy(ref))
    moec.inspect(ours).cuda_graphs = cuda_graphs.install(ours, True)  # compile() refuses a CPU model
    moec.save(ours, tmp_path / "m.safetensors")
    with pytest.warns(UserWarning, match="saved with cuda_graphs=True; the model is not on CUDA"):
        back = moec.load(models.tiny_model("mixtral", seed=5), tmp_path / "m.safetensors")
    assert "_moec_graphs" not in back.__dict__
    ids = torch.randint(4, ref.config.vocab_size, (1, 6))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ours(ids).logits)
