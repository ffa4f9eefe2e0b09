"""backend="onnxruntime": plain greedy and sampling `generate` calls run moec's loop around the session
(backends/ort_generate.py), token for token HF's greedy search or seeded sampling on the original model; every other
call runs HF's generate."""

import copy
import itertools
import types
import warnings

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor
from transformers.generation.streamers import BaseStreamer

import moec
from moec import models
from moec.backends import ort_generate, ort_session

from conftest import rel_err


@pytest.fixture(scope="module", params=["mixtral", "gpt_oss"])
def pair(request):
    """(the compiled model, the original) with the same weights."""
    ref = models.tiny_model(request.param).eval()
    model = moec.compile(copy.deepcopy(ref), backend="onnxruntime", session_options={"intra_op_num_threads": 2})
    return model, ref


@pytest.fixture
def loops(monkeypatch):
    """How many generate calls ran moec's loop."""
    ran = []
    loop = ort_generate.loop
    monkeypatch.setattr(ort_generate, "loop", lambda *a: ran.append(1) or loop(*a))
    return ran


@pytest.fixture(params=["C", "numpy"])
def picks(request, monkeypatch):
    """The loop's work between two runs done by csrc/greedy.c (its calls counted: the test checks they ran), or by
    the loop's numpy lines (where the library is not built)."""
    calls = []
    if request.param == "numpy":
        monkeypatch.setattr(ort_generate, "_native", lambda: None)
    else:
        fns = ort_generate._native()
        if fns is None:
            pytest.skip("moec's C library is not built here")
        counted = {name: (lambda f: lambda *a: calls.append(1) or f(*a))(f) if callable(f) else f
                   for name, f in vars(fns).items()}
        monkeypatch.setattr(ort_generate, "_native", lambda: types.SimpleNamespace(**counted))
    yield calls
    assert bool(calls) == (request.param == "C")


def _prompt(model, batch: int, seq: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, : seq // 2] = 0  # rows after the first: left padding
    return ids, mask


def _same(model, ref, ids, **kw):
    with torch.no_grad():
        got, want = model.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(got, want), (got, want)
    return got


@pytest.mark.parametrize("batch,seq,new", [(1, 1, 1), (1, 9, 12), (3, 7, 10)])
def test_greedy_equals_hf(pair, loops, picks, batch, seq, new):
    model, ref = pair
    ids, mask = _prompt(model, batch, seq)
    _same(model, ref, ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None)
    assert loops == [1]


def test_rows_that_hit_eos_end_and_are_padded(pair, loops, picks):
    """eos: one of the tokens the rows generate, so rows end at different steps and are padded after; min_new_tokens
    keeps eos out until it is reached; several eos ids; an empty list of them."""
    model, ref = pair
    ids, mask = _prompt(model, 3, 6, seed=1)
    with torch.no_grad():
        free = ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    eos = int(free[0, 6 + 2])  # row 0's third new token
    got = _same(model, ref, ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                pad_token_id=1)
    assert (got[0, 6 + 3:] == 1).all() and got.shape[1] > 6 + 3  # row 0 ended, padded; others went on
    _same(model, ref, ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=5, do_sample=False,
          eos_token_id=eos, pad_token_id=1)
    _same(model, ref, ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
          eos_token_id=[int(free[1, 6 + 1]), eos], pad_token_id=1)
    every = sorted({int(t) for t in free[:, 6]})  # each row's first token: every row ends at once
    got = _same(model, ref, ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=every)
    assert got.shape[1] == 7
    _same(model, ref, ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=2, do_sample=False, eos_token_id=[],
          pad_token_id=1)  # no eos at all (an IndexError in the loop before)
    # ids outside the vocabulary match no token (numpy read -1 as the last one, and raised on vocab + 5)
    V = model.config.vocab_size
    _same(model, ref, ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=3, do_sample=False,
          eos_token_id=[int(free[0, 6 + 1]) - V, V + 5], pad_token_id=1)
    assert loops == [1] * 6
    with pytest.raises(IndexError):  # eos [] without a pad token: HF's error, not the loop's
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=[], pad_token_id=None)
    assert loops == [1] * 6


def test_weights_changed_after_compile(pair, loops):
    model, ref = pair
    ids, mask = _prompt(model, 2, 5, seed=2)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        before = model.generate(ids, **kw)
        state = {k: v.clone() for k, v in ref.state_dict().items()}
        for m in (model, ref):
            m.lm_head.weight.mul_(-1.0)  # in place: every greedy token changes
        try:
            after = _same(model, ref, ids, **kw)
        finally:
            for m in (model, ref):
                m.load_state_dict(state)
    assert not torch.equal(before, after) and loops == [1, 1]


@pytest.mark.parametrize("kw", [
    dict(do_sample=True),  # top_k 50, the default
    dict(do_sample=True, top_k=5, temperature=0.7),
    dict(do_sample=True, top_p=0.8, min_p=0.05),
    dict(do_sample=True, typical_p=0.9, temperature=1.3),
    dict(do_sample=True, top_k=0, epsilon_cutoff=3e-4),
    dict(do_sample=True, top_k=2**64 + 5),  # HF keeps min(k, V): every token (a C int64 would wrap it to 5)
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("batch", [1, 3])
def test_sampling_equals_hf(pair, loops, picks, kw, batch):
    """Plain sampling runs the loop: HF's processors for the call's config, then its draw (softmax, multinomial).
    With the same seed, the same tokens as HF's generate over the same session (the same logits: exactly) and as
    the original model; left-padded rows, min_new_tokens holding eos back, rows ending at eos and padded."""
    model, ref = pair
    ids, mask = _prompt(model, batch, 6, seed=11)
    torch.manual_seed(1)
    eos = int(torch.randint(3, model.config.vocab_size, ()))
    kw = dict(attention_mask=mask, max_new_tokens=24, min_new_tokens=3, eos_token_id=eos, pad_token_id=0, **kw)
    out = {}
    with torch.no_grad():
        for name, generate in (("loop", model.generate), ("hf", lambda i, **k: type(model).generate(model, i, **k)),
                               ("original", ref.generate)):
            torch.manual_seed(5)
            out[name] = generate(ids, **kw)
            if name == "loop":
                after = torch.rand(3)  # the loop drew from torch's generator as many times as HF's sampling does
            elif name == "hf":
                assert torch.equal(torch.rand(3), after)
    assert loops == [1]
    assert torch.equal(out["loop"], out["hf"]) and torch.equal(out["loop"], out["original"])
    assert out["loop"].shape[1] > ids.shape[1] + 3


def test_min_new_tokens_holds_back_a_likely_eos_when_sampling(pair, loops, picks):
    """min_new_tokens' processor comes first in a plain sampling call: the loop takes it out and sets the eos ids to
    -inf itself, before the other processors. The eos here is the token drawn first without it (top_k=1: the most
    likely): held back for 4 steps, the same tokens as the original model."""
    model, ref = pair
    ids, mask = _prompt(model, 2, 6, seed=13)
    with torch.no_grad():
        eos = int(ref(input_ids=ids, attention_mask=mask).logits[0, -1].argmax())
    kw = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=4, eos_token_id=eos, pad_token_id=0,
              do_sample=True, top_k=1)
    plan = ort_generate._plain(model, ids, None, dict(kw))
    assert plan[3] == 4 and not any("MinNewTokens" in type(p).__name__ for p in plan[6])
    out = {}
    with torch.no_grad():
        for name, generate in (("loop", model.generate), ("original", ref.generate)):
            torch.manual_seed(2)
            out[name] = generate(ids, **kw)
        torch.manual_seed(2)
        unheld = model.generate(ids, **dict(kw, min_new_tokens=0))
    assert loops == [1, 1] and torch.equal(out["loop"], out["original"])
    assert unheld[0, 6] == eos and not (out["loop"][:, 6:6 + 4] == eos).any()


class _Recorder(BaseStreamer):
    """What a streamer is given: ("put", tokens) and ("end",) in order."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        assert isinstance(value, torch.Tensor) and value.dtype == torch.int64
        self.calls.append(("put", value.clone()))

    def end(self):
        self.calls.append(("end",))


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(do_sample=True, top_k=5)], ids=["greedy", "sampled"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_streamer_gets_what_hfs_generate_gives_it(pair, loops, picks, kw, batch):
    """A streamer does not take the call off the loop: it is given the prompt, then each step's tokens (pads of
    ended rows included), then end(), as HF's generate gives them on the original model; rows ending at eos at
    different steps, left padding."""
    model, ref = pair
    ids, mask = _prompt(model, batch, 6, seed=17)
    with torch.no_grad():
        free = ref.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, eos_token_id=None)
    kw = dict(attention_mask=mask, max_new_tokens=9, eos_token_id=int(free[0, 6 + 1]), pad_token_id=1, **kw)
    got, out = {}, {}
    with torch.no_grad():
        for name, generate in (("loop", model.generate), ("original", ref.generate)):
            got[name] = _Recorder()
            torch.manual_seed(3)
            out[name] = generate(ids, streamer=got[name], **kw)
    assert loops == [1] and torch.equal(out["loop"], out["original"])
    loop, want = got["loop"].calls, got["original"].calls
    assert [c[0] for c in loop] == [c[0] for c in want] == ["put"] * (out["loop"].shape[1] - 6 + 1) + ["end"]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(loop[:-1], want[:-1]))
    assert torch.equal(torch.stack([c[1] for c in loop[1:-1]], 1), out["loop"][:, 6:])


class _Drawing(_Recorder):
    """A streamer that draws from torch's generator in each put, and raises at put number `fail` when given."""

    def __init__(self, fail: int | None = None):
        super().__init__()
        self.fail = fail

    def put(self, value):
        super().put(value)
        self.calls.append(("rand", torch.rand(2)))
        if self.fail and len(self.calls) == 2 * self.fail:
            raise KeyboardInterrupt  # a user stopping the stream


def test_a_streamers_tensors_are_its_own(pair, loops, picks):
    """Each step's tokens come to a streamer as a tensor of their own, as HF's: one it moves to shared memory (as
    torch.multiprocessing's queues do), keeps or pickles holds that step's tokens, pickles to the size of its B
    tokens, and the later steps' tensors are not touched by it; with more steps than the loop makes ahead (PUTS)."""
    import pickle

    model, ref = pair
    ids, mask = _prompt(model, 2, 5, seed=17)
    new = ort_generate.PUTS + 6

    class Mover(BaseStreamer):
        def __init__(self):
            self.kept, self.sizes = [], []

        def put(self, value):
            self.sizes.append(len(pickle.dumps(value)))
            self.kept.append(value.share_memory_())

        def end(self):
            pass

    streamer = Mover()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             streamer=streamer)
    assert loops == [1] and len(streamer.kept) == new + 1
    assert torch.equal(torch.stack(streamer.kept[1:], 1), out[:, ids.shape[1]:])
    assert max(streamer.sizes[1:]) < 2048  # its own 2 tokens, not the call's


@pytest.mark.parametrize("fail", [None, 3])
def test_a_streamer_that_draws_sees_the_generator_as_hfs_does(pair, loops, picks, fail):
    """A streamer that draws from torch's generator between two steps sees it as HF's generate leaves it there
    (each step's draw made), and its draws move the loop's next ones as they move HF's: the same tokens, the same
    numbers drawn in put, the generator after the call the same; also when the streamer raises after drawing."""
    model, ref = pair
    ids, mask = _prompt(model, 2, 6, seed=19)
    kw = dict(attention_mask=mask, max_new_tokens=7, do_sample=True, top_k=20, pad_token_id=1, eos_token_id=None)
    got, out, after = {}, {}, {}
    with torch.no_grad():
        for name, generate in (("loop", model.generate), ("original", ref.generate)):
            got[name] = _Drawing(fail)
            torch.manual_seed(6)
            try:
                out[name] = generate(ids, streamer=got[name], **kw)
            except KeyboardInterrupt:
                out[name] = None
            after[name] = torch.rand(2)
    assert loops == [1] and torch.equal(after["loop"], after["original"])
    assert (out["loop"] is out["original"] is None) if fail else torch.equal(out["loop"], out["original"])
    loop, want = got["loop"].calls, got["original"].calls
    assert [c[0] for c in loop] == [c[0] for c in want] and len(loop) == (2 * fail if fail else 2 * (7 + 1) + 1)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(loop, want) if a[0] != "end")


def test_loops_in_threads_lose_no_draw(pair, picks):
    """Sampled calls in four threads at once: each draw reads torch's generator and writes it back under one lock,
    so none is lost to another (a draw advances the generator by the same amount whatever it picks): the generator
    after them is where the four calls leave it one after the other."""
    import threading

    model, _ = pair
    ids, mask = _prompt(model, 2, 6, seed=23)
    kw = dict(attention_mask=mask, max_new_tokens=40, do_sample=True, pad_token_id=1, eos_token_id=None)
    with torch.no_grad():
        torch.manual_seed(8)
        for _ in range(4):
            model.generate(ids, **kw)
        want = torch.rand(3)
        torch.manual_seed(8)
        threads = [threading.Thread(target=model.generate, args=(ids,), kwargs=kw) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert torch.equal(torch.rand(3), want)


def test_first_calls_in_threads_share_one_export(monkeypatch):
    """A freshly compiled model's first generate calls, made from four threads at once: one export (the others wait
    for its session), and each thread's tokens are the original model's. Registering a schema with onnx is locked
    too: two threads that both found it missing (onnx's check slowed here to widen the window) register it once."""
    import threading
    import time

    import onnx
    from onnx.defs import OpSchema

    from moec.backends import register_once

    has = onnx.defs.has
    monkeypatch.setattr(onnx.defs, "has", lambda *a: time.sleep(0.3) or has(*a))
    schema = OpSchema("MoecThreadsProbe", "moec.test", 1, "a schema four threads register",
                      inputs=[OpSchema.FormalParameter("x", "tensor(float)")],
                      outputs=[OpSchema.FormalParameter("y", "tensor(float)")])
    errors = []

    def register():
        try:
            register_once(schema)
        except Exception as e:  # onnx's "already registered"
            errors.append(e)

    threads = [threading.Thread(target=register) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    monkeypatch.setattr(onnx.defs, "has", has)
    assert not errors and has("MoecThreadsProbe", "moec.test")
    onnx.defs.deregister_schema("MoecThreadsProbe", 1, "moec.test")

    ref = models.tiny_model("mixtral").eval()
    model = moec.compile(copy.deepcopy(ref), backend="onnxruntime", session_options={"intra_op_num_threads": 1})
    ids, mask = _prompt(model, 2, 5, seed=21)
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    opened, out = [], {}
    open_cached = ort_session.OrtForward._open_cached
    monkeypatch.setattr(ort_session.OrtForward, "_open_cached", lambda *a: opened.append(1) or open_cached(*a))
    start = threading.Barrier(4)

    def generate(i):
        start.wait()
        with torch.no_grad():
            out[i] = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert opened == [1] and len(out) == 4 and all(torch.equal(o, want) for o in out.values())


def test_a_call_during_an_export_waits_for_it(monkeypatch):
    """While one thread exports, the model keeps moec's forward and generate (the export runs on a shallow copy):
    a call another thread makes then waits for the session in moec's code, never runs HF's own code beside the
    export and its patches, and gets the original model's tokens."""
    import threading

    from moec import export

    ref = models.tiny_model("mixtral").eval()
    model = moec.compile(copy.deepcopy(ref), backend="onnxruntime", session_options={"intra_op_num_threads": 1})
    ids, mask = _prompt(model, 2, 5, seed=22)
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    out, seen = {}, []

    def second():
        with torch.no_grad():
            out["second"] = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)

    late = threading.Thread(target=second)
    export_onnx = export.export_onnx

    def exporting(*args, **kwargs):  # the first export: the second call starts now and must still wait after 2 s
        seen.append("export")
        if len(seen) == 1:
            seen.append((type(model.forward).__name__, type(model.generate).__name__))
            late.start()
            late.join(timeout=2)
            seen.append(late.is_alive())
        return export_onnx(*args, **kwargs)

    monkeypatch.setattr(export, "export_onnx", exporting)
    with torch.no_grad():
        out["first"] = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    late.join(timeout=600)
    assert seen == ["export", ("OrtForward", "OrtGenerate"), True]  # one export: the second call used its session
    assert torch.equal(out["first"], want) and torch.equal(out["second"], want)


@pytest.fixture(params=["C", "torch"])
def draws(request, monkeypatch):
    """The draw by csrc/greedy.c's moec_draw, or by torch.multinomial (where the library is not built)."""
    if request.param == "torch":
        monkeypatch.setattr(ort_generate, "_native", lambda: None)
    elif ort_generate._native() is None:
        pytest.skip("moec's C library is not built here")
    else:  # a torch whose generator or exponential_ moved: greedy.c's moec_draw wants updating
        assert ort_generate._native().draw is not None, "moec_draw does not draw this torch's numbers"


@pytest.mark.parametrize("batch,vocab", [(1, 1), (1, 7), (3, 1024), (2, 50003)])
def test_the_draw_is_multinomials(draws, batch, vocab):
    """The loop's draws take the same numbers from torch's generator as torch.multinomial(probs, 1) and pick the
    same tokens: probabilities with zeros (filtered tokens), exact ties, one-hot rows, 1e-30 next to 1, rows of
    subnormal probabilities (whose p / q underflow to 0 and tie with the zeros), rows across several twists of the
    generator's state; the generator after two draws."""
    gen = torch.Generator().manual_seed(batch * vocab)
    for trial in range(40 if vocab < 50000 else 6):
        logits = torch.randn(batch, vocab, generator=gen) * (1 + trial)
        logits[:, ::3] = -float("inf") if vocab > 1 else 0.0  # filtered out, as top-k/top-p leave them
        if vocab > 2:
            logits[:, 1] = logits[:, 2] = logits.max()  # ties
        if trial % 5 == 0 and vocab > 1:
            logits[0] = -float("inf")
            logits[0, vocab // 2] = 0.0  # one-hot
        probs = torch.softmax(logits, -1)
        if trial % 7 == 0 and vocab > 2:
            probs[-1, 1], probs[-1, 2] = 1e-30, 1.0
        if trial % 4 == 3 and vocab > 5:
            probs[0] = 0.0
            probs[0, 3:] = torch.rand(vocab - 3, generator=gen).lt(0.5) * 1.4e-45  # the smallest subnormal
        torch.manual_seed(trial)
        want = [torch.multinomial(probs, num_samples=1)[:, 0] for _ in range(2)]
        then = torch.rand(2)
        torch.manual_seed(trial)
        into = np.full(batch, -1, np.int64)
        draw = ort_generate._Draws(True, into)
        for tokens in want:
            assert draw(probs) is into and torch.equal(torch.from_numpy(into), tokens), trial
        assert torch.equal(torch.rand(2), then)


@pytest.mark.skipif(ort_generate._native() is None, reason="moec's C library is not built here")
def test_a_draw_unlike_torchs_is_not_used():
    """The check behind moec_draw: a draw whose numbers are not torch's exponential_'s (here one that draws
    nothing) is refused, and the check leaves torch's generator as it found it."""
    torch.manual_seed(4)
    want = torch.rand(3)
    torch.manual_seed(4)
    assert not ort_generate._draws_as_torch(lambda *args: 0)
    assert ort_generate._draws_as_torch(ort_generate._native().draw)
    assert torch.equal(torch.rand(3), want)


@pytest.mark.skipif(ort_generate._native() is None, reason="moec's C library is not built here")
def test_the_c_refuses_what_it_cannot_do():
    """moec_draw refuses a generator state that torch's set_rng_state takes but its engine never reaches (words to
    read past the state's end: torch reads out of bounds there), drawing nothing; moec_top_k refuses k < 1 (HF's
    warper refuses it when built; a warper whose k is changed after is HF's code), and leaves the scores of
    k >= V as they are."""
    native = ort_generate._native()
    probs = np.full((1, 8), 0.125, np.float32)
    for left, nxt in ((624, 624), (2, 624), (0, 0), (625, 0)):
        state = torch.get_rng_state()
        raw = state.numpy()
        raw[8:12] = np.frombuffer(np.int32(left).tobytes(), np.uint8)
        raw[16:24] = np.frombuffer(np.uint64(nxt).tobytes(), np.uint8)
        before, out = state.clone(), np.full(1, -1, np.int64)
        assert native.draw(probs.ctypes.data, 1, 8, state.data_ptr(), out.ctypes.data, None) == -1
        assert torch.equal(state, before) and out[0] == -1
    scores = np.arange(8, dtype=np.float32)[None].copy()
    for k in (0, -1):
        assert native.top_k(scores.ctypes.data, 1, 8, 8, k) == -1 and np.array_equal(scores[0], np.arange(8))
    for k in (8, 9, 2**62):
        assert native.top_k(scores.ctypes.data, 1, 8, 8, k) == 0 and np.array_equal(scores[0], np.arange(8))
    from transformers.generation.logits_process import TopKLogitsWarper

    warper = TopKLogitsWarper(3)
    warper.top_k = 0
    with pytest.raises(Exception) as hf:
        warper(None, torch.from_numpy(scores.copy()))
    with pytest.raises(type(hf.value)):
        ort_generate._process([warper], np.zeros((1, 1), np.int64), scores.copy())


def test_nan_probabilities_raise_multinomials_error(draws):
    """A NaN logit (a broken weight) makes NaN probabilities: torch.multinomial, so HF's sampling, refuses them
    before it draws, and so does the loop's draw: the same error, after a draw that went through, the generator as
    that draw left it; never a token."""
    fine = torch.softmax(torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 1.0]]), -1)
    broken = torch.softmax(torch.tensor([[0.0, 1.0, 2.0], [0.0, float("nan"), 1.0]]), -1)
    torch.manual_seed(0)
    first = torch.multinomial(fine, num_samples=1)[:, 0]
    with pytest.raises(RuntimeError) as error:
        torch.multinomial(broken, num_samples=1)
    after = torch.rand(2)
    torch.manual_seed(0)
    draw = ort_generate._Draws(True, np.full(2, -1, np.int64))
    assert torch.equal(torch.from_numpy(draw(fine)), first)
    with pytest.raises(RuntimeError) as mine:
        draw(broken)
    assert str(mine.value) == str(error.value) and torch.equal(torch.rand(2), after)


@pytest.mark.skipif(ort_generate._native() is None, reason="moec's C library is not built here")
@pytest.mark.parametrize("vocab", [1, 5, 16, 17, 47, 1024, 50003])
@pytest.mark.parametrize("bf16", [False, True])
def test_the_steps_in_c_are_torchs(vocab, bf16):
    """csrc/greedy.c against torch on the same scores. Greedy: argmax (ties: the first; NaN: the first NaN), of the
    scores rounded to bf16 (fp32 scores that differ but round to one bf16 value tie there), the held ids at -inf
    (the maximum among them; every score -inf). Sampling: the scores rounded and held in place, then given tokens.
    Either: rows that ended padded, rows ending on a stop id; the tokens written to the sequence, the next input
    ids (int64 and int32), the streamer's row of the step, and positions, counts advanced. Vocabularies below, at
    and across the 16 lanes, rows on a stride wider than the vocabulary."""
    gen = np.random.default_rng(vocab)
    B, S, new, step = 7, 3, 5, 2
    base = gen.integers(-3, 3, (B, vocab)).astype(np.float32) * 64  # many ties
    # fp32 neighbours above a tie value: distinct in fp32, one value in bf16 (its first index wins there)
    base += (gen.random((B, vocab)) < 0.3) * np.float32(0.125)
    base[0] = gen.standard_normal(vocab) * 1e30  # large magnitudes (some round to inf in bf16)
    # NaN: the first one is the token; payloads that a bf16 rounding's carry would turn into 0, then inf
    at = np.sort(gen.choice(vocab, min(vocab, 2), replace=False))
    base[1, at] = np.array([0xFFFFFFFF, 0x7F800001], np.uint32)[:len(at)].view(np.float32)
    base[2] = -np.inf
    base[3, : vocab // 2] = np.inf
    held = np.unique(np.concatenate([base[4].argmax(keepdims=True), gen.integers(0, vocab, 2)]))  # row 4's max
    drawn = gen.integers(0, vocab, B)
    cases = itertools.product((False, True), (False, True), (np.arange(B) == 6, np.arange(B) != 5), (False, True))
    for hold, ids32, ended, sampled in cases:
        want = torch.from_numpy(base.copy())
        want = want.bfloat16().float() if bf16 else want
        if hold:
            want[:, torch.from_numpy(held)] = -torch.inf
        token = drawn.copy() if sampled else want.argmax(-1).numpy()
        stop = np.array([token[5], vocab + 9], np.int64)  # row 5 ends: with the others ended, every row
        token[ended] = 1
        scores = np.full((B, vocab + 3), 7.0, np.float32)[:, :vocab]  # a row stride of vocab + 3
        scores[:] = base
        seq, count = np.zeros((B, S + new), np.int64), np.arange(10, 10 + B, dtype=np.int64)[:, None]
        nxt, npos = np.zeros((B, 1), np.int32 if ids32 else np.int64), np.zeros((B, 1), np.int64)
        now = ended.copy()
        steps = ort_generate._Steps(ort_generate._native(), scores, bf16, held, step + hold, stop, now, 1, seq, S,
                                    nxt, npos, count)
        steps.s.step = step
        rows = steps.rows(2)  # this step's and the next's
        rows[1].fill_(-1)
        steps.address(scores)
        if sampled:
            steps.prepare()
            nan = torch.from_numpy(scores).isnan()
            assert torch.equal(nan, want.isnan()) and torch.equal(torch.from_numpy(scores)[~nan], want[~nan])
            steps.given[:] = drawn
        going = steps.next(sampled)
        assert np.array_equal(seq[:, S + step], token) and np.array_equal(rows[0].numpy(), token)
        assert (rows[1] == -1).all()
        assert not seq[:, :S + step].any() and not seq[:, S + step + 1:].any()
        assert np.array_equal(nxt[:, 0], token) and np.array_equal(now, ended | np.isin(token, stop)) and now[5]
        assert np.array_equal(npos[:, 0], np.arange(10, 10 + B)) and np.array_equal(count[:, 0], np.arange(11, 11 + B))
        assert going == (not now.all()) and steps.s.step == step + 1


def _fused():
    """csrc/greedy.c's functions where moec_sample should run: the library built, torch's kernels on 16 lanes
    (AVX-512) and its exp exported"""
    native = ort_generate._native()
    if native is None or native.exp is None or torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("moec_sample is for torch's AVX-512 softmax with the C library built")
    assert native.sample is not None, "moec_softmax does not compute this torch's softmax (or moec_draw its draw)"
    return native


@pytest.mark.parametrize("vocab", [1, 2, 15, 16, 17, 47, 1024, 50003, 152064])
def test_softmax_in_c_is_torchs(vocab):
    """moec_softmax against torch.softmax, to the bit: vocabularies below, at and across 16 lanes (torch's order of
    the sums), rows on a stride wider than the vocabulary, -inf (filtered tokens), ties, magnitudes from 1e-3 to
    1e4 apart, a row of one finite score, subnormal and underflowing probabilities. Rows holding NaN or +inf, or
    only -inf, are refused (torch's multinomial raises on the NaN its softmax makes), the output left alone."""
    native = _fused()
    gen = torch.Generator().manual_seed(vocab)
    for scale in (1e-3, 1.0, 30.0, 90.0, 1e4):
        wide = torch.randn(3, vocab + 5, generator=gen) * scale
        x = wide[:, :vocab]
        if vocab > 2:
            x[0, ::3] = -float("inf")
            x[1, -1] = x[1, 0] = x[1].max()
            x[2] = -float("inf")
            x[2, vocab // 2] = 0.0
        p = np.empty((3, vocab), np.float32)
        assert native.softmax(x.data_ptr(), 3, vocab, vocab + 5, p.ctypes.data, native.exp) == 0
        want = torch.softmax(x, -1).numpy()
        assert np.array_equal(p.view(np.uint32), want.view(np.uint32)), scale
    for bad in (float("nan"), float("inf")):
        x = torch.zeros(2, vocab)
        x[1, vocab - 1] = bad
        p = np.full((2, vocab), 7.0, np.float32)
        assert native.softmax(x.data_ptr(), 2, vocab, vocab, p.ctypes.data, native.exp) == -1 and (p == 7).all()
    x = torch.full((1, vocab), -float("inf"))
    assert native.softmax(x.data_ptr(), 1, vocab, vocab, p.ctypes.data, native.exp) == -1


@pytest.mark.parametrize("batch,vocab,k", [(1, 1, 0), (1, 9, 3), (3, 1024, 50), (2, 50003, 50), (2, 300, 0)])
def test_a_sampled_step_in_one_c_call_is_hfs(batch, vocab, k):
    """moec_sample (top-k, softmax, draw, next in one call) against HF's top-k warper, torch.softmax and
    torch.multinomial on the same scores: the same tokens, written where the loop reads them, and the generator
    after. Scores with NaN (a broken weight) go to torch's softmax and multinomial: their error, nothing drawn."""
    from transformers.generation.logits_process import TopKLogitsWarper

    native = _fused()
    gen = torch.Generator().manual_seed(vocab)
    for trial in range(12):
        logits = torch.randn(batch, vocab, generator=gen) * (1 + 3 * trial)
        if vocab > 2:
            logits[:, 1] = logits[:, 2] = logits.max()  # ties
        torch.manual_seed(trial)
        scores = logits if not k else TopKLogitsWarper(k)(None, logits.clone())
        want = torch.multinomial(torch.softmax(scores, -1), num_samples=1)[:, 0]
        then = torch.rand(2)
        torch.manual_seed(trial)
        scores, seq = logits.numpy().copy(), np.zeros((batch, 4), np.int64)
        nxt, npos, count = (np.zeros((batch, 1), np.int64) for _ in range(3))
        steps = ort_generate._Steps(native, scores, False, np.zeros(0, np.int64), 0, np.zeros(0, np.int64),
                                    np.zeros(batch, bool), 0, seq, 2, nxt, npos, count, k)
        steps.address(scores)
        draw = ort_generate._Draws(True, steps.given)
        assert draw.sample(steps) and np.array_equal(seq[:, 2], want.numpy()) and np.array_equal(nxt[:, 0], want)
        assert torch.equal(torch.rand(2), then), trial
    scores[-1, 0] = float("nan")
    with pytest.raises(RuntimeError) as error:
        torch.multinomial(torch.softmax(torch.from_numpy(scores.copy()), -1), num_samples=1)
    steps.address(scores.copy())
    torch.manual_seed(0)
    with pytest.raises(RuntimeError) as mine:
        draw.sample(steps)
    assert str(mine.value) == str(error.value) and torch.equal(torch.rand(2), (torch.manual_seed(0), torch.rand(2))[1])


def test_bf16_rounding_is_torchs():
    """A bf16 model's scores, rounded as torch's cast rounds them: every bf16 value with the low halves that decide
    a rounding (0, 1, just below, at and above half, all ones), so ties to even, carries into the exponent, overflow
    to inf, denormals, signaling and quiet NaNs, both signs; quietly where numpy is told to raise."""
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    x = (high[:, None] | low).reshape(1, -1).view(np.float32)  # [1, 393216]
    with np.errstate(all="raise"):
        got = ort_generate._round_bf16(x)
    want = torch.from_numpy(x).bfloat16().float().numpy()
    assert got.dtype == np.float32 and np.isnan(want).sum() > 0
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(got[ok].view(np.uint32), want[ok].view(np.uint32))  # -0.0 too


@pytest.mark.skipif(ort_generate._native() is None, reason="moec's C library is not built here")
@pytest.mark.parametrize("batch,vocab", [(1, 1), (1, 9), (3, 1024), (2, 50003)])
def test_top_k_in_c_is_hfs(batch, vocab):
    """The loop's top-k warper (csrc/greedy.c) sets the same scores to -inf as HF's TopKLogitsWarper, alone and
    between HF's other processors: ties at the k-th score, k of 1, the vocabulary and above it, -inf and +inf scores, NaN rows
    (NaN counts above every score in both), huge magnitudes."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    gen = torch.Generator().manual_seed(batch * vocab)
    seq = np.zeros((batch, 3), np.int64)
    for trial in range(30):
        scores = torch.randn(batch, vocab, generator=gen) * 10.0 ** (trial % 7 * 6 - 6)
        scores = torch.round(scores * 4) / 4 if trial % 2 else scores  # many ties
        if vocab > 4:
            scores[:, 0], scores[:, 1] = -float("inf"), float("inf") if trial % 3 == 0 else 0.0
            if trial % 5 == 0:
                scores[-1, 2:4] = float("nan")
        for k in (1, 2, 5, vocab, vocab + 3):
            for chain in ([TopKLogitsWarper(k)],
                          [TemperatureLogitsWarper(0.7), TopKLogitsWarper(k), TopPLogitsWarper(0.9)],
                          [TopKLogitsWarper(k, min_tokens_to_keep=3), TopKLogitsWarper(max(k // 2, 1))]):
                want = scores.clone()
                for processor in chain:
                    want = processor(torch.from_numpy(seq), want)
                got = ort_generate._process(chain, seq, scores.numpy().copy())
                assert got.dtype == torch.float32
                assert np.array_equal(got.numpy(), want.numpy(), equal_nan=True), (trial, k, chain)


@pytest.mark.parametrize("kw", [
    dict(do_sample=True, num_return_sequences=2),
    dict(do_sample=True, repetition_penalty=1.5),
    dict(repetition_penalty=1.5),
    dict(num_beams=2),
    dict(logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)])),
    dict(return_dict_in_generate=True, output_scores=True),
    dict(max_length=12),  # no max_new_tokens
    dict(no_repeat_ngram_size=2),
], ids=lambda kw: ",".join(kw))
def test_other_calls_run_hf_generate(pair, loops, kw):
    """Anything but plain greedy search runs HF's generate (same tokens as the original, greedy or seeded)."""
    model, ref = pair
    ids, mask = _prompt(model, 2, 5, seed=3)
    kw = dict(dict(attention_mask=mask, max_new_tokens=6, eos_token_id=None), **kw)
    if "max_length" in kw:
        del kw["max_new_tokens"]
    with torch.no_grad():
        torch.manual_seed(0)
        got = model.generate(input_ids=ids, **kw)  # (input_ids by name: passed on to HF as given)
        torch.manual_seed(0)
        want = ref.generate(input_ids=ids, **kw)
    assert loops == []
    got, want = (o.sequences if hasattr(o, "sequences") else o for o in (got, want))
    assert torch.equal(got, want)


def test_hf_generate_over_a_cache_kept_in_place(pair, loops):
    """HF's generate steps a session that keeps its cache in place (ort_attention.in_place): each step's past is the
    array the last step wrote into, grown (copied into one of twice the rows) when full, rows reordered by beam
    search; 40 tokens, beams and a repetition penalty, the original's tokens."""
    model, ref = pair
    ids, mask = _prompt(model, 2, 5, seed=9)
    kw = dict(attention_mask=mask, max_new_tokens=40, min_new_tokens=40, eos_token_id=None)
    for extra in (dict(num_beams=2), dict(repetition_penalty=1.3)):
        with torch.no_grad():
            got, want = (m.generate(ids, **kw, **extra) for m in (model, ref))
        assert torch.equal(got, want)
    assert loops == [] and moec.inspect(model).export.outputs == ["logits"]


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(do_sample=True, top_k=8, min_new_tokens=3)],
                         ids=["greedy", "sampled"])
def test_the_loop_over_a_session_that_hands_its_cache_back(monkeypatch, loops, picks, kw):
    """A session whose attention does not keep the cache in place (ort_attention.in_place left it) hands each step's
    presents back: the loop feeds them to the next step as the pasts. Left-padded rows, eos ending rows early: the
    original's tokens, greedy and sampled."""
    from moec.backends import ort_attention

    monkeypatch.setattr(ort_attention, "in_place", lambda proto: 0)
    ref = models.tiny_model("mixtral").eval()
    model = moec.compile(copy.deepcopy(ref), backend="onnxruntime", session_options={"intra_op_num_threads": 2})
    ids, mask = _prompt(model, 3, 5, seed=2)
    with torch.no_grad():
        torch.manual_seed(3)
        first = ref.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, **kw)
    eos = int(first[0, -3])  # a token the first row draws (ends it early), the others may too
    for seed in range(3):
        out = []
        for m in (model, ref):
            torch.manual_seed(seed)
            with torch.no_grad():
                out.append(m.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=0,
                                      **kw))
        assert torch.equal(*out), out
    assert loops == [1, 1, 1] and len(moec.inspect(model).export.outputs) > 1  # logits and the presents


def test_a_pad_token_in_the_prompt_without_a_mask_runs_hf_generate(pair, loops):
    """HF infers the attention mask from pad tokens in the prompt: that call is left to it."""
    model, ref = pair
    ids, _ = _prompt(model, 2, 6, seed=4)
    ids[1, :2] = 0
    _same(model, ref, ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=2)
    assert loops == []


def test_a_cache_filled_or_cropped_outside_the_session():
    """A cache the eager model filled, or one cropped (assisted decoding), is fed as the past when it holds every
    past position; a sliding-window layer's cropped cache does not, and raises."""
    ref = models.tiny_model("mixtral").eval()
    model = moec.compile(copy.deepcopy(ref), backend="onnxruntime")
    ids, mask = _prompt(ref, 2, 7, seed=5)
    with torch.no_grad():
        for crop in (0, 2):
            caches = []
            for m in (ref, model):  # the prompt by the eager model, cropped, then a step of the compiled model
                cache = ref(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
                if crop:
                    cache.crop(-crop)
                caches.append(cache)
            step = dict(input_ids=ids[:, :1], attention_mask=torch.cat([mask[:, :7 - crop], mask[:, :1]], 1),
                        use_cache=True)
            want, got = (m(past_key_values=c, **step).logits for m, c in zip((ref, model), caches))
            assert (got - want).norm() / want.norm() < 1e-5

        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        cache.crop(-3)  # a mask one column short for the cropped cache: said as such, not as a changed cache
        with pytest.raises(ValueError, match="the attention_mask covers 3 past position.s. but the cache holds 4"):
            model(input_ids=ids[:, :1], attention_mask=mask[:, :4], past_key_values=cache, use_cache=True)

        slid = models.tiny_model("gpt_oss").eval()  # sliding window 4: its HF cache keeps 3 positions
        cache = slid(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        moec.compile(slid, backend="onnxruntime")
        with pytest.raises(NotImplementedError, match="no longer holds every past position"):
            slid(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), past_key_values=cache,
                 use_cache=True)


def test_calls_found_by_a_hostile_probe(pair, loops, picks):
    """eos as a tensor or numpy integer and int32 prompts run the loop (int64 result, as HF's); a GenerationConfig
    argument (HF fills it from the model's), right padding and use_cache=False run HF's generate; labels= is
    refused (the session returns no loss)."""
    import numpy as np
    from transformers import GenerationConfig

    model, ref = pair
    family = model.config.model_type
    ids, mask = _prompt(model, 3, 7, seed=6)
    eos = int(ref.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, eos_token_id=None)[0, 8])
    for e in (torch.tensor(eos), np.int64(eos)):
        _same(model, ref, ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=e)
    assert _same(model, ref, ids.int(), attention_mask=mask, max_new_tokens=4, do_sample=False).dtype == torch.int64
    assert len(loops) == 3
    _same(model, ref, ids, attention_mask=mask, generation_config=GenerationConfig(max_new_tokens=6, eos_token_id=eos))
    right = torch.ones_like(mask)
    right[1, 4:] = 0
    right[2, 2:] = 0
    if family == "gpt_oss":  # sliding windows: the session's counts tokens, HF's slots; refused
        with pytest.raises(NotImplementedError, match="right padding"):
            model.generate(ids, attention_mask=right, max_new_tokens=6, do_sample=False)
    else:
        _same(model, ref, ids, attention_mask=right, max_new_tokens=6, do_sample=False)
    _same(model, ref, ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=False)
    assert len(loops) == 3
    with pytest.raises(NotImplementedError, match="labels"):
        model(input_ids=ids, labels=ids)


def test_a_plain_call_returns_the_cache_to_continue_from():
    """Like HF's forward, a call without use_cache returns the cache (the config's use_cache), and a step fed that
    cache continues from it."""
    ref = models.tiny_model("mixtral").eval()
    model = moec.compile(copy.deepcopy(ref), backend="onnxruntime")
    ids, mask = _prompt(ref, 2, 7, seed=7)
    with torch.no_grad():
        a, b = ref(input_ids=ids[:, :5]), model(input_ids=ids[:, :5])
        assert b.past_key_values is not None and rel_err(b.logits, a.logits) < 1e-5
        a, b = (m(input_ids=ids[:, 5:6], past_key_values=o.past_key_values) for m, o in ((ref, a), (model, b)))
    assert rel_err(b.logits, a.logits) < 1e-5


def test_more_calls_found_by_a_hostile_probe(pair, loops):
    """inputs_embeds= with the cache is refused (it went the uncached way and the next step restarted from an empty
    cache: wrong tokens), as is a mask that does not cover past + new tokens; a copy (deepcopy, pickle) made after a
    call opens its own session; compiled again with backend="torch", the model runs torch, not the old session."""
    import io
    import pickle

    model, ref = pair
    ids, mask = _prompt(model, 2, 6, seed=8)
    with torch.no_grad():
        emb = ref.get_input_embeddings()(ids)
        with pytest.raises(NotImplementedError, match="inputs_embeds"):
            model.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=3, do_sample=False)
        with pytest.raises(ValueError, match="attention_mask"):
            model(input_ids=ids, attention_mask=mask[:, 1:], use_cache=True)
        _same(model, ref, ids, attention_mask=mask, max_new_tokens=3, do_sample=False)  # sessions open
        buffer = io.BytesIO()
        torch.save(model, buffer)
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert not twin.forward.sessions
            _same(twin, ref, ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        again = moec.compile(copy.deepcopy(model), backend="torch")
        assert "forward" not in again.__dict__ and moec.inspect(again).backend == "torch"
        assert rel_err(again(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits) < 1e-5


@pytest.mark.skipif(not ort_session.runs_bf16(["CPUExecutionProvider"]), reason="bf16 models need moec's AVX-512 kernels")
@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(do_sample=True, top_k=8)], ids=["greedy", "sampled"])
def test_a_bf16_models_logits_are_taken_in_bf16(picks, kw):
    """A bf16 model's session computes its logits in fp32; its forward hands them back in bf16, as the model gives
    them, and HF's search takes those. The loop rounds them the same way: an lm_head whose rows share a large
    component puts many logits within one bf16 step of each other, where fp32 and bf16 pick different tokens."""
    ref = models.tiny_model("mixtral", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        w = ref.lm_head.weight
        w.copy_(w[:1] * 30 + w * 0.05)  # logit j = 30 * (row 0 . h) + small: ties after rounding to bf16
    model = moec.compile(ref, backend="onnxruntime")
    ids, mask = _prompt(model, 2, 5, seed=12)
    kw = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=None, **kw)
    with torch.no_grad():
        torch.manual_seed(3)
        got = model.generate(ids, **kw)
        torch.manual_seed(3)
        want = type(model).generate(model, ids, **kw)
        logits = model(input_ids=want, attention_mask=torch.cat([mask, torch.ones_like(want[:, 5:])], 1)).logits
    assert torch.equal(got, want)
    top = logits.float().topk(2, -1).values
    assert bool((top[..., 0] == top[..., 1]).any())  # ties in bf16 did occur


@pytest.mark.skipif(ort_generate._native() is None, reason="moec's C library is not built here")
def test_the_sampling_benchmark_runs():
    """benchmarks/bench_sampling.py on a small vocabulary: it asserts the same tokens as HF's sampling step."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "bench_sampling.py"
    run = subprocess.run([sys.executable, str(script), "--vocab", "300", "--rounds", "1", "--steps", "3"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "one sampling step" in run.stdout, run.stderr[-2000:]


def test_hooks_wrappers_and_settings_after_compile(pair, loops):
    """Found by a hostile probe, each once a wrong answer: a forward hook (on a module or the model, registered after
    the session opened; and removed again), a wrapped model.forward, an attribute or config setting changed after
    compile. Hooks and wrappers run the model's own forward (HF's generate over it); a changed setting exports
    again; the tokens are the original's."""
    model, ref = pair
    ids, mask = _prompt(model, 2, 6, seed=9)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    _same(model, ref, ids, **kw)  # the session is open

    def ban(module, args, out):  # steering: tokens below 128 never come
        out = out.clone()
        out[..., :128] = -1e9
        return out

    for where in ("lm_head", ""):
        hooks = [m.get_submodule(where).register_forward_hook(
            ban if where else lambda m, a, out: out.__class__(logits=ban(m, a, out.logits), **{
                k: v for k, v in out.items() if k != "logits"})) for m in (model, ref)]
        before = len(loops)
        with warnings.catch_warnings(record=True) as caught:  # (said once)
            warnings.simplefilter("always")
            got = _same(model, ref, ids, **kw)
        assert bool(where) == any("forward hooks" in str(w.message) for w in caught)
        assert (got[:, ids.shape[1]:] >= 128).all() and len(loops) == before
        for h in hooks:
            h.remove()
        _same(model, ref, ids, **kw)
        assert len(loops) == before + 1  # moec's loop again
    calls = []
    inner = model.forward
    model.forward = lambda *a, **k: calls.append(1) or inner(*a, **k)
    try:
        _same(model, ref, ids, **kw)
        assert calls
    finally:
        model.__dict__["forward"] = inner
    router = next(n for n, m in ref.named_modules() if isinstance(getattr(m, "top_k", None), int))
    k, window = ref.get_submodule(router).top_k, ref.config.sliding_window
    for m in (model, ref):
        m.get_submodule(router).top_k = 1
        m.config.sliding_window = 3
    try:
        _same(model, ref, ids, **kw)
    finally:
        for m in (model, ref):
            m.get_submodule(router).top_k = k
            m.config.sliding_window = window
    _same(model, ref, ids, **kw)


def test_inference_mode_pads_and_long_budgets(pair, loops):
    """torch.inference_mode(): HF's generate (beams, a repetition penalty) and cached calls over the session's cache
    (its tensors are inference tensors, which count no writes); a pad_token_id outside
    the vocabulary raises as the original; max_new_tokens of 2**40 ends at eos without allocating for it."""
    model, ref = pair
    ids, mask = _prompt(model, 2, 6, seed=10)
    with torch.inference_mode():
        for kw in (dict(num_beams=2), dict(repetition_penalty=1.3), {}):
            assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **kw),
                               ref.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **kw))
        assert rel_err(model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits) < 1e-5
    with torch.no_grad():
        for pad in (-1, model.config.vocab_size + 10):  # a row that ends early is padded with it
            first = ref.generate(ids[:1], max_new_tokens=1, do_sample=False)[0, -1].item()
            kw = dict(max_new_tokens=4, do_sample=False, eos_token_id=first, pad_token_id=pad)
            with pytest.raises(IndexError):
                ref.generate(torch.cat([ids[:1], ids[1:]]), **kw)
            with pytest.raises(IndexError):
                model.generate(torch.cat([ids[:1], ids[1:]]), **kw)
        kw = dict(max_new_tokens=2**40, do_sample=False, eos_token_id=first)
        _same(model, ref, ids[:1], **kw)


def test_a_float64_model_runs_its_own_forward():
    """A float64 model (HF's eager experts: grouped_mm takes no float64), made so before or after compile: ONNX
    Runtime's attention takes no float64, so the model's own forward runs, with a warning (it crashed the first
    generate)."""
    ref = models.tiny_model("mixtral", experts_implementation="eager").double()
    before = moec.compile(copy.deepcopy(ref), backend="onnxruntime")
    after = moec.compile(models.tiny_model("mixtral", experts_implementation="eager"), backend="onnxruntime").double()
    ids, mask = _prompt(ref, 2, 5, seed=11)
    for model in (before, after):
        with pytest.warns(UserWarning, match="float64"):
            _same(model, ref, ids, attention_mask=mask, max_new_tokens=4, do_sample=False)


def test_clear_refusals_found_by_a_hostile_probe(pair):
    """A StaticCache (cache_implementation="static") is refused as such (it said HF's 4-D mask was wrong), and so is
    a 4-D attention_mask; an argument moec refuses is named by its type where its repr is long (a ModelOutput
    printed its tensors)."""
    model, ref = pair
    ids, mask = _prompt(model, 2, 6, seed=12)
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match="StaticCache"):
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, cache_implementation="static")
        square = mask[:, None, None, :].expand(2, 1, 6, 6)  # a 4-D mask crashed inside moec's check at 300 tokens
        for use_cache in (False, True):
            with pytest.raises(NotImplementedError, match="4-d attention_mask"):
                model(ids, attention_mask=square, use_cache=use_cache)
    big = types.SimpleNamespace(tensor=torch.randn(50, 50))
    assert ort_session._short(big) == "<SimpleNamespace>" and ort_session._short(3) == "3"
