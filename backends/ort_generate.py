"""backend="onnxruntime": greedy and sampled `model.generate` as one loop around the KV-cache session.

    model = moec.compile(model, backend="onnxruntime")
    model.generate(input_ids, attention_mask=mask, max_new_tokens=64, do_sample=False)   # this loop
    model.generate(input_ids, max_new_tokens=64, do_sample=True, top_p=0.9)              # this loop, sampled
    model.generate(input_ids, max_new_tokens=64, num_beams=2)                            # HF's generate

Around a session step of a small model (1.5-2 ms), HF's generate spends ~0.5 ms a token in Python (inputs
prepared, processors, stopping criteria) and the backend's HF-cache mirror another ~0.4 ms: sampled through it,
the Mixtral-style benchmark model decoded at half its greedy rate in this loop. When a call asks for plain greedy
search or plain sampling, this loop runs it with nothing else per token:

    logits, present = session(ids [B, S], mask [B, P+S], positions [B, S], past)  # the prompt, then S = 1
    scores = float32(logits[:, -1])                      # [B, V], as HF's search takes them (a bf16 model's
                                                         # logits rounded to bf16 first, as its forward gives them)
    greedy:  scores[:, eos] = -inf  while fewer than min_new_tokens are out
             token = argmax(scores)                       # the first maximum, like torch.argmax
    sampled: scores[:, eos] = -inf  while fewer than min_new_tokens are out (HF's processor for it, when first)
             scores = processors(sequence so far, scores) # HF's own, built from the call's generation config
                                                          # (its top-k warper in C: the same numbers)
             token = multinomial(softmax(scores), 1)      # as HF's sampling draws it: same seed, same tokens
                                                          # (in C: the same numbers from torch's generator;
                                                          # with top-k alone, softmax too: one C call a step)
    token = pad where the row already ended (eos)         # then rows that hit eos end
    past = present; mask += [1]; positions = each row's count of real tokens
    (a session that keeps its cache in place, moec::CachedAttention's: the pasts are arrays with room for every
    token of the call, bound once; the session writes each step's rows there and hands back the logits alone;
    after the prompt the token, its position and the logits are arrays bound once too, written in place)
    (between two runs, the rounding, eos held back, the argmax, padding, ending rows and the next inputs are one C
    call, csrc/greedy.c; sampling calls it before HF's processors and after the draw; numpy where it is not built,
    and there HF's top-k warper and torch's multinomial)

and returns input_ids with the new tokens, ending when every row hit eos or after max_new_tokens: HF's
greedy search or sampling, token for token (tests/test_ort_generate.py). A `streamer` gets what HF's generate gives
it: put(the prompt), put(each step's tokens [B], pads included), end(). A plain call is: max_new_tokens given,
no beams, one sequence a prompt, no logits processor, stopping criterion, return_dict_in_generate or
generation_config argument, no right padding, and a model generation config that differs from the defaults
only in length, special tokens, do_sample and the sampling knobs (temperature, top_k, top_p, min_p, typical_p,
epsilon_cutoff, eta_cutoff, top_h; greedy search ignores them). Any other call runs HF's generate, which calls
the session one step at a time.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading

import ml_dtypes
import numpy as np
import torch

from moec.backends.ort_session import eager_reason, embedding_table

# generation-config fields a plain call may set: lengths and special tokens (read by this loop), the sampling knobs
# (HF's processors built from them when sampling; greedy search never reads them), the beam knobs neither reads,
# and bookkeeping
_FREE = {"max_new_tokens", "max_length", "min_new_tokens", "eos_token_id", "pad_token_id", "bos_token_id",
         "do_sample", "temperature", "top_k", "top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff", "top_h",
         "length_penalty", "early_stopping", "use_cache", "transformers_version", "_from_model_config"}
# outputs a call without return_dict_in_generate never returns (a model config with output_hidden_states=True
# passes it to the generation config): the loop's tokens are the same
_DISCARDED = {"output_attentions", "output_hidden_states", "output_scores", "output_logits"}
# fields that may also hold these values, which ask for plain greedy search or sampling
_NEUTRAL = {"num_beams": 1, "num_return_sequences": 1, "min_length": 0,
            "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
            "encoder_no_repeat_ngram_size": 0, "num_beam_groups": 1, "diversity_penalty": 0.0,
            "remove_invalid_values": False, "output_attentions": False, "output_hidden_states": False,
            "output_scores": False, "output_logits": False, "return_dict_in_generate": False}


class OrtGenerate:
    """model.generate on backend="onnxruntime": plain greedy and sampling calls run `loop`, others HF's
    generate."""

    def __init__(self, forward):
        self.forward = forward  # the model's OrtForward

    def __call__(self, inputs=None, generation_config=None, *args, **kwargs):
        model = self.forward.model
        self.forward._check_ids({"input_ids": kwargs.get("input_ids", inputs)})  # (HF's loop gets its own check)
        # (in train() mode HF's generate runs the model's own forward, as a call does: OrtForward; so with hooks, and
        # through a forward the user wrapped after compile)
        own = args or model.training or eager_reason(model, self.forward.walk) or \
            model.__dict__.get("forward") is not self.forward
        plan = None if own else _plain(model, inputs, generation_config, dict(kwargs))
        if plan is None:  # (positional args: HF's logits_processor, stopping_criteria ...)
            return type(model).generate(model, inputs, generation_config, *args, **kwargs)
        return loop(self.forward, *plan)


def _plain(model, inputs, generation_config, kwargs) -> tuple | None:
    """(input_ids, attention_mask, max_new_tokens, min_new_tokens, eos ids, pad id, HF's logits processors when
    sampling else None, the streamer or None) of a plain greedy or sampling call, else None."""
    from transformers import GenerationConfig

    if inputs is None:
        inputs = kwargs.pop("input_ids", None)
    if not (isinstance(inputs, torch.Tensor) and inputs.dim() == 2 and not inputs.is_floating_point()
            and inputs.shape[1] > 0):
        return None
    if hasattr(model.config, "_get_generation_parameters") and model.config._get_generation_parameters():
        return None  # generation settings in model.config: HF's generate refuses them, say it there
    if generation_config is not None:
        return None  # HF fills its unset fields from model.generation_config: left to HF
    config = copy.deepcopy(model.generation_config)
    extra = config.update(**kwargs)  # the arguments that are not generation settings go to the model
    mask = extra.pop("attention_mask", None)
    streamer = extra.pop("streamer", None)
    if extra:
        return None  # logits processors, stopping criteria, other model inputs ...
    default = GenerationConfig().to_dict()
    for name, value in config.to_dict().items():
        if name in _DISCARDED and not config.return_dict_in_generate:
            continue  # HF's generate computes them and hands back the tokens alone
        if name not in _FREE and value != default.get(name) and (name not in _NEUTRAL or value != _NEUTRAL[name]):
            return None
    new = config.max_new_tokens
    if not isinstance(new, int) or new < 1 or config.use_cache is False:
        return None
    eos = config.eos_token_id  # an int, a list, a tensor or a numpy integer
    eos = None if eos is None else [int(e) for e in torch.as_tensor(eos).reshape(-1)]
    pad = config.pad_token_id
    pad = int(torch.as_tensor(pad)) if pad is not None else eos[0] if eos else None
    if eos is not None and pad is None:
        return None  # eos_token_id=[] without a pad token: HF's generate says what is wrong
    table = embedding_table(model, False)
    if pad is not None and table is not None and not 0 <= pad < table.num_embeddings:
        return None  # a pad outside the vocabulary: HF's loop feeds it to the model, which raises
    if inputs.shape[1] + new > max(getattr(model.config, "max_position_embeddings", 0) or 0, 1 << 14):
        return None  # this loop holds every step's arrays from the start: HF's cache grows as it goes
    if mask is None:
        if pad is not None and bool((inputs == pad).any()):
            return None  # HF may infer the mask from the pad tokens
        mask = torch.ones_like(inputs)
    if not isinstance(mask, torch.Tensor) or mask.shape != inputs.shape or bool((mask[:, 1:] < mask[:, :-1]).any()):
        return None  # right padding: HF's positions for the new tokens are its own
    processors = None
    if config.do_sample:  # HF's processors for this call, its config prepared as its generate prepares it
        try:
            config, _ = model._prepare_generation_config(None, **kwargs)  # global defaults too (top_k 50)
            model._prepare_special_tokens(config, True, device=inputs.device, batch_size=inputs.shape[0])
            processors = model._get_logits_processor(generation_config=config, input_ids_seq_length=inputs.shape[1],
                                                     encoder_input_ids=inputs, device=inputs.device,
                                                     model_kwargs={"attention_mask": mask})
        except Exception:  # noqa: BLE001 - a config HF refuses (or an HF without these): its generate says why
            return None
        # called one by one in the loop, as LogitsProcessorList calls those of two arguments (it inspects each
        # one's signature at every step: ~10 us each)
        if any(len(inspect.signature(p.__call__).parameters) != 2 for p in processors):
            return None
        processors = list(processors)
    min_new = _min_new(config.min_new_tokens or 0, eos, inputs.shape[1], processors)
    return inputs, mask, new, min_new, eos, pad, processors, streamer


def _min_new(min_new: int, eos: list[int] | None, prompt: int, processors: list | None) -> int:
    """How many steps the loop itself holds eos back. Greedy: min_new_tokens. Sampling: those of min_new_tokens'
    processor when it comes first and holds back the loop's eos ids, which it then takes out of `processors` (it
    sets the same -inf; torch's ops cost 30-60 us a token with the caches cold after a step); else none, the
    processors do."""
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

    if processors is None:
        return min_new
    first = processors[0] if processors else None
    if (type(first) is MinNewTokensLengthLogitsProcessor and first.prompt_length_to_skip == prompt and eos is not None
            and sorted(set(first.eos_token_id.reshape(-1).tolist())) == sorted(set(eos))):
        processors.pop(0)
        return first.min_new_tokens
    return 0


def loop(forward, ids: torch.Tensor, mask: torch.Tensor, new: int, min_new: int, eos: list[int] | None,
         pad: int | None, processors=None, streamer=None) -> torch.Tensor:
    """Greedy search, or sampling with HF's logits `processors`, in the KV-cache session (the module docstring);
    [B, S] -> [B, S + up to `new`], each step's tokens put to `streamer` as HF's generate puts them. In C calls
    (`_Steps`; sampling: HF's processors but top-k, then the draw, `_process` and `_Draws`) or numpy, the presents
    handed back to the session as its OrtValues (an IOBinding): per token, torch's dispatch of ~15 small ops cost
    ~0.15 ms, as much as a tenth of the step. After a step the weights have gone through the CPU's
    caches: each Python operation then costs several times what it does warm (np.isin 60 us, not 11), hence few of
    them; in one C call, a greedy step's Python time outside the session went from ~60 to ~25 us (mix int4)."""
    from moec.backends.ort_session import empty_past, in_place

    if streamer is not None:
        streamer.put(ids.cpu())
    session, names, layout, _ = forward.cached_session(ids, mask)
    outputs = [o.name for o in session.get_outputs()]  # logits, then the presents in the order of names[3:]
    kept = in_place(session)  # logits only: the session writes each step's keys and values into the pasts
    B = ids.shape[0]
    feed, mask = ids.cpu().numpy(), mask.cpu().long().numpy()
    pos = np.where(mask == 0, 1, mask.cumsum(-1) - 1)  # HF's positions under left padding
    count = mask.sum(-1, keepdims=True)  # each row's real tokens so far: the next token's position
    stop = np.zeros(0, np.int64) if eos is None else np.asarray(eos, dtype=np.int64)  # [] too: indices, not floats
    pad = 0 if pad is None else pad  # (no eos: no row ends, none is padded)
    ended = np.zeros(B, bool)
    nxt, npos = np.zeros((B, 1), feed.dtype), np.zeros((B, 1), pos.dtype)  # after the prompt: the step's inputs
    bind = _Binding(session)
    for name, past in zip(names[3:], empty_past(layout, B, ids.shape[1] + new if kept else 0)):
        bind.input(name, past)
    # after the prompt, a session that keeps its cache in place takes the token and its position from two arrays
    # bound once and written in place, and writes the logits into a third: a step then costs Python a few small
    # operations, each slow with the caches cold after the step
    steady = kept and session.get_outputs()[0].type == "tensor(float)"
    full = np.ones((B, ids.shape[1] + new), mask.dtype)  # the mask of every step: step t reads its first T columns
    full[:, :mask.shape[1]] = mask
    T = S = mask.shape[1]
    seq = np.zeros((B, S + new), np.int64)  # the prompt, then each step's tokens (pads too): what HF's processors
    seq[:, :S] = feed                       # read, and the result
    bf16 = forward._bf16()  # its session computes in fp32; its forward hands back bf16 logits, as the model does
    native = _native() if feed.dtype in (np.int32, np.int64) else None  # the step's bookkeeping in C (csrc/greedy.c)
    top_k = 0  # HF's top-k warper as the first processor: in the C call before the others (the default sampling's)
    if native is not None and processors and _native_top_k(processors[0]):
        top_k, processors = processors[0].top_k, processors[1:]
    token = np.zeros(B, np.int64)  # sampling's tokens without the C steps (with them: steps.given)
    # what a streamer is given, each step's tokens [B]: with the C steps, tensors made PUTS steps ahead that the
    # steps fill (making one after a step, torch.from_numpy of a copy, costs ~70 us with the caches cold)
    puts = streamer is not None and native is not None
    for step in range(new):
        if step < 2 or not steady:
            bind.input("input_ids", feed)
            bind.input("position_ids", pos)
        bind.input("attention_mask", full[:, :T])
        if step and steady:
            bind.run_bound()
            scores = last  # [B, V] float32, the bound buffer
        else:
            outs = bind.run(outputs)  # each step's presents are new arrays: the last ones are this step's past
            scores = outs[0].numpy()[:, -1].astype(np.float32)  # [B, V], as HF's search takes them
            if steady:  # from the next step on, the logits [B, 1, V] go into one array
                last = bind.output(outputs[0], (B, 1, scores.shape[-1]))[:, -1]
        if step == 0:
            held = stop[(stop >= 0) & (stop < scores.shape[-1])]  # ids outside the vocabulary: no token (HF)
            if native is not None:
                steps = _Steps(native, scores, bf16, held, min_new, stop, ended, pad, seq, S, nxt, npos, count,
                               top_k)
            draw = _Draws(processors is not None, token if native is None else steps.given)
        if native is not None:
            steps.address(scores)
            if puts and step % PUTS == 0:
                rows = steps.rows(min(PUTS, new - step))
            if processors == [] and native.sample is not None:  # sampling with top-k at most: one C call
                going = draw.sample(steps)
            else:
                if processors is not None:  # sampling: HF's processors and draw between two calls
                    steps.prepare()
                    draw(torch.softmax(_process(processors, seq[:, :S + step], steps.tensor), -1))
                going = steps.next(processors is not None)
        else:
            if bf16:
                scores = _round_bf16(scores)
            if step < min_new and held.size:
                scores[:, held] = -np.inf
            if processors is None:
                token = scores.argmax(-1)  # [B]: the first maximum (NaN first), as torch.argmax
            else:  # HF's sampling step
                token = draw(torch.softmax(_process(processors, seq[:, :S + step], scores), -1))
            if stop.size:
                token[ended] = pad
                ended |= (token[:, None] == stop).any(-1)  # np.isin: ~50 us a token with the caches cold
            seq[:, S + step] = nxt[:, 0] = token
            npos[:, 0] = count[:, 0]
            count += 1
            going = not ended.all()
        if streamer is not None:
            streamer.put(rows[step % PUTS] if puts else torch.from_numpy(seq[:, S + step].copy()))
        if not going:
            break
        for i, name in enumerate([] if kept else names[3:]):
            bind.value(name, outs[i + 1])
        feed, pos = nxt, npos  # bound again at step 1 (and every step unless steady), then written in place
        T += 1
    if streamer is not None:
        streamer.end()
    return torch.from_numpy(seq[:, :S + step + 1].copy()).to(ids.device)  # int64, as HF's


@functools.cache
def _native():
    """csrc/greedy.c's functions from cpu_native's library (next_tokens, prepare, top_k, draw, softmax, sample), or
    None where it is not built; draw is None where torch's generator is not what moec_draw replicates
    (`_draws_as_torch`), sample (a whole sampled step, its softmax by torch's exp at address `exp`) None where
    moec_softmax's numbers are not torch.softmax's (`_softmax_as_torch`) or draw is None"""
    import ctypes
    import types

    from moec.backends import cpu_native

    path = cpu_native.library()
    if path is None:
        return None
    lib, i64, ptr = ctypes.CDLL(str(path)), ctypes.c_int64, ctypes.c_void_p
    for name, args, result in (("next_tokens", [i64] * 2, i64), ("prepare", [i64], i64),
                               ("top_k", [ptr] + [i64] * 4, i64), ("draw", [ptr, i64, i64] + [ptr] * 3, i64),
                               ("softmax", [ptr] + [i64] * 3 + [ptr] * 2, i64), ("sample", [i64] + [ptr] * 3, i64)):
        fn = getattr(lib, "moec_" + name)
        fn.argtypes, fn.restype = args, result
    draw = lib.moec_draw if _draws_as_torch(lib.moec_draw) else None
    exp = _torch_exp()
    fused = draw is not None and exp is not None and _softmax_as_torch(lib.moec_softmax, exp)
    return types.SimpleNamespace(next_tokens=lib.moec_next_tokens, prepare=lib.moec_prepare, top_k=lib.moec_top_k,
                                 draw=draw, softmax=lib.moec_softmax, sample=lib.moec_sample if fused else None,
                                 exp=exp)


def _torch_exp() -> int | None:
    """the address of torch's Sleef_expf16_u10 (its 16-lane Vectorized<float>::exp, which its softmax calls), or
    None where its CPU library does not export it"""
    import ctypes
    import os

    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return ctypes.cast(lib.Sleef_expf16_u10, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def _softmax_as_torch(softmax, exp: int) -> bool:
    """whether moec_softmax computes torch.softmax's numbers here, to the bit: vocabularies under, at and past
    16-lane multiples (its sums' order), scores from 1e-3 to 1e4 apart, -inf (filtered tokens) and ties"""
    gen = torch.Generator().manual_seed(0)
    for V in (1, 5, 16, 17, 31, 1000, 1024, 32003):
        for scale in (1e-3, 1.0, 30.0, 1e4):
            x = torch.randn(2, V, generator=gen) * scale
            x[:, 1::3] = -float("inf")
            x[:, -1] = x[:, 0]
            p = np.empty((2, V), np.float32)
            if softmax(x.data_ptr(), 2, V, V, p.ctypes.data, exp) != 0:
                return False
            if not np.array_equal(p.view(np.uint32), torch.softmax(x, -1).numpy().view(np.uint32)):
                return False
    return True


def _draws_as_torch(draw) -> bool:
    """whether moec_draw draws what this torch does: its q against exponential_'s from the generator as it is now,
    across several twists of its state, and the state after both (the generator is put back after; under
    `_DRAWING`, as the loops' draws)"""
    with _DRAWING:
        state = torch.get_rng_state()
        if state.numel() < 24 + 624 * 8:  # torch_rng's size (greedy.c)
            return False
        try:
            want = torch.empty(3, 1000).exponential_(1)
            after, mine = torch.get_rng_state(), state.clone()
            got, tokens = np.empty((3, 1000), np.float32), np.empty(3, np.int64)
            ones = np.ones((3, 1000), np.float32)
            drawn = draw(ones.ctypes.data, 3, 1000, mine.data_ptr(), tokens.ctypes.data, got.ctypes.data) == 0
            same = np.array_equal(got.view(np.uint32), want.numpy().view(np.uint32))
            return drawn and same and torch.equal(mine, after)
        finally:
            torch.set_rng_state(state)


class _Steps:
    """The loop's numpy lines after a session run as C calls on the loop's arrays, their addresses and sizes in
    one struct (csrc/greedy.c's moec_steps) written once: a ctypes call of one argument costs a few us with the
    caches cold, numpy's .ctypes ~1 us each. Greedy: `next(False)`, the first maximum of the scores rounded to bf16
    when `bf16`, the `held` ids at -inf for the first `hold_steps` steps. Sampling: `prepare()` before HF's
    processors (the same rounding and held ids, then the top-k warper of k `top_k` when it is the first processor,
    taken out of the processors), the drawn tokens into `given`, then `next(True)`; with no processor left, all of
    it in one call (`_Draws.sample`). Either: pad for rows that ended, rows ending at a `stop` id, the token into
    seq[:, S + step], `nxt` and the step's tensor from `rows` (when made), `npos` = count, count += 1."""

    FIELDS = ("scores B V ld bf16 held nheld hold_steps stop nstop ended pad out ldo next ids32 pos count given "
              "step top_k rows rows_from nrows").split()

    def __init__(self, native, scores: np.ndarray, bf16: bool, held, hold_steps: int, stop, ended, pad: int, seq,
                 S: int, nxt, npos, count, top_k: int = 0):
        import ctypes

        class Struct(ctypes.Structure):  # every field 8 bytes: pointers as int64
            _fields_ = [(name, ctypes.c_int64) for name in self.FIELDS]

        B, V = scores.shape
        self.given = np.zeros(B, np.int64)
        self.arrays = (held, stop, ended, seq, nxt, npos, count, self.given)  # kept alive while addressed
        assert all(a.flags.c_contiguous and a.dtype == t for a, t in zip(self.arrays, (np.int64,) * 2 + (
            bool, np.int64, nxt.dtype, np.int64, np.int64, np.int64))) and nxt.dtype in (np.int32, np.int64)
        self.s = Struct(B=B, V=V, bf16=int(bf16), held=held.ctypes.data, nheld=len(held), hold_steps=hold_steps,
                        stop=stop.ctypes.data, nstop=len(stop), ended=ended.ctypes.data, pad=pad,
                        out=seq.ctypes.data + 8 * S, ldo=seq.shape[1], next=nxt.ctypes.data,
                        ids32=int(nxt.dtype == np.int32), pos=npos.ctypes.data, count=count.ctypes.data,
                        given=self.given.ctypes.data, step=0, top_k=min(top_k, V))  # HF's min(k, V); any int
        self.at, self.native = ctypes.addressof(self.s), native
        self.scores = None
        self.probs = np.empty((B, V), np.float32)  # moec_sample's softmax
        self.probs_at = self.probs.ctypes.data

    def rows(self, n: int) -> list[torch.Tensor]:
        """n new tensors [B] int64, which the next n steps fill with their tokens (each its own storage, as HF's
        `next_tokens`: a streamer may keep, move or pickle it)"""
        rows = [torch.empty(self.s.B, dtype=torch.int64) for _ in range(n)]
        self.table = np.array([t.data_ptr() for t in rows], np.int64)  # their addresses, for moec_next_tokens
        self.s.rows, self.s.rows_from, self.s.nrows = self.table.ctypes.data, self.s.step, n
        self.held_rows = rows  # alive while addressed
        return rows

    def address(self, scores: np.ndarray) -> None:
        """this step's scores [B, V] (float32, rows contiguous): a steady loop's are the same array every step"""
        if scores is not self.scores:
            assert scores.dtype == np.float32 and scores.strides[1] == 4 and scores.shape == (self.s.B, self.s.V)
            self.scores, self.s.scores, self.s.ld = scores, scores.ctypes.data, scores.strides[0] // 4
            self.tensor = torch.from_numpy(scores)  # for HF's processors: made once for a steady loop's buffer

    def prepare(self) -> None:
        """the scores rounded to bf16 in place when `bf16` (as torch's cast; NaN stays NaN), the held ids at -inf
        while held, then HF's top-k warper when `top_k`"""
        if self.native.prepare(self.at):
            raise MemoryError("top-k: no memory for its heap of k scores")

    def next(self, sampled: bool) -> bool:
        """whether a row goes on, after this step's tokens: `given` when `sampled`, else greedy search's"""
        return self.native.next_tokens(self.at, int(sampled)) > 0


def _round_bf16(scores: np.ndarray) -> np.ndarray:
    """scores rounded to bf16 and back, as torch's cast rounds them (to nearest even; NaN stays NaN, the same for
    every float32: checked on all 2^32): ml_dtypes' cast, 12-23 us a token with the caches cold after a step where
    torch's costs 25-32. A signaling NaN would set numpy's invalid flag: quiet, as torch's."""
    with np.errstate(all="ignore"):
        return scores.astype(ml_dtypes.bfloat16).astype(np.float32)


def _process(processors: list, seq: np.ndarray, scores: np.ndarray) -> torch.Tensor:
    """HF's logits `processors` called in order on scores [B, V] (seq: the tokens so far); each top-k warper (the
    default sampling's only processor) as csrc/greedy.c's moec_top_k where it is built, in place: its torch ops
    (topk, compare, masked_fill) cost 90-100 us a token with the caches cold after a step. The same numbers: the
    k-th largest score (NaN above all, as topk orders it) and the scores below it set to the warper's -inf."""
    native = _native()
    for processor in processors:
        scores = _tensor(scores)
        if (native is not None and _native_top_k(processor) and scores.dtype == torch.float32 and scores.dim() == 2
                and scores.stride(-1) == 1):
            B, V = scores.shape
            if processor.top_k < V and native.top_k(scores.data_ptr(), B, V, scores.stride(0), processor.top_k):
                raise MemoryError("top-k: no memory for its heap of k scores")
        else:
            scores = processor(torch.from_numpy(seq), scores)
    return _tensor(scores)


def _native_top_k(processor) -> bool:
    """whether `processor` is HF's top-k warper itself, filling with -inf, of a k its constructor allows (>= 1):
    moec_top_k's numbers"""
    from transformers.generation.logits_process import TopKLogitsWarper

    return (type(processor) is TopKLogitsWarper and processor.filter_value == -np.inf
            and isinstance(processor.top_k, int) and processor.top_k >= 1)


def _tensor(a) -> torch.Tensor:
    """a numpy array as a tensor on its memory (torch.from_numpy: 2-3x cheaper than torch.as_tensor)"""
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


class _Draws:
    """torch.multinomial(probs, 1)[:, 0] for probs [B, V], the loop's draws, the same numbers from torch's global
    generator: by csrc/greedy.c's moec_draw where it is built and draws as this torch does (torch's exponential_
    draws each of the V q alone: ~1 ms a token at a vocabulary of 32000) on the generator's state, read and written
    back around each draw under `_DRAWING` (moec's loops in other threads wait for it; a draw another thread makes
    from torch's generator during the C call, some us, is lost: torch's own draw holds the generator's lock); else
    by torch.multinomial itself, which also raises its error for probabilities it refuses (NaN)."""

    def __init__(self, sampling: bool, into: np.ndarray):
        native = _native()
        self.draw = native.draw if sampling and native is not None else None
        self.into, self.out = into, into.ctypes.data

    def sample(self, steps: _Steps) -> bool:
        """A whole sampled step, the scores prepared by `steps` and no processor left, in one C call (moec_sample:
        prepare, torch's softmax, the draw into steps.given, next); where its softmax or draw refuses (NaN, a
        state torch never reaches), torch's softmax and this draw on the prepared scores. Whether a row goes on."""
        with _DRAWING:
            state = torch.get_rng_state()
            going = steps.native.sample(steps.at, state.data_ptr(), steps.probs_at, steps.native.exp)
            if going >= 0:
                torch.set_rng_state(state)
        if going == -1:
            raise MemoryError("top-k: no memory for its heap of k scores")
        if going == -2:
            self(torch.softmax(steps.tensor, -1))
            return steps.next(True)
        return going > 0

    def __call__(self, probs: torch.Tensor) -> np.ndarray:
        """the tokens [B] into the int64 array `into`, returned"""
        if self.draw is not None and probs.dtype == torch.float32 and probs.is_contiguous():
            B, V = probs.shape
            with _DRAWING:
                state = torch.get_rng_state()
                if self.draw(probs.data_ptr(), B, V, state.data_ptr(), self.out, None) == 0:
                    torch.set_rng_state(state)
                    return self.into
        np.copyto(self.into, torch.multinomial(probs, num_samples=1)[:, 0].numpy())
        return self.into


_DRAWING = threading.Lock()
PUTS = 64  # a streamer's tensors made this many steps at a time


class _Binding:
    """The session's inputs and outputs bound on ONNX Runtime's own binding object (`SessionIOBinding`, which its
    Python IOBinding wraps): the wrapper's checks (WebGPU graph capture) cost ~50 us a token, 4% of a bf16 step.
    Holds the numpy arrays it binds: their OrtValues read those buffers in place."""

    def __init__(self, session):
        from onnxruntime.capi import _pybind_state as C

        self.session, self.held = session._sess, {}
        self.raw = C.SessionIOBinding(self.session)
        self.cpu = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)

    def input(self, name: str, array: np.ndarray) -> None:
        self.held[name] = array = np.ascontiguousarray(array)
        self.raw.bind_input(name, array)

    def value(self, name: str, value) -> None:
        """an output OrtValue of the last run as an input of the next"""
        self.held[name] = value
        self.raw.bind_ortvalue_input(name, value)

    def run(self, outputs: list[str]) -> list:
        """the outputs `outputs` (ORT allocates them) as OrtValues with .numpy()"""
        self.raw.clear_binding_outputs()
        for name in outputs:
            self.raw.bind_output(name, self.cpu)
        self.session.run_with_iobinding(self.raw, None)
        return list(self.raw.get_outputs())

    def output(self, name: str, shape: tuple) -> np.ndarray:
        """a float32 array of `shape` that the session's output `name` is written into from the next run on (the
        only output then)"""
        self.held[name] = array = np.empty(shape, np.float32)
        self.raw.clear_binding_outputs()
        self.raw.bind_output(name, self.cpu, array.dtype, list(shape), array.ctypes.data)
        return array

    def run_bound(self) -> None:
        """a run into the outputs bound by `output`"""
        self.session.run_with_iobinding(self.raw, None)
