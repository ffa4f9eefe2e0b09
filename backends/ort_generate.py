"""backend="onnxruntime": greedy `model.generate` as one loop around the KV-cache session.

    model = moec.compile(model, backend="onnxruntime")
    model.generate(input_ids, attention_mask=mask, max_new_tokens=64, do_sample=False)   # this loop
    model.generate(input_ids, max_new_tokens=64, do_sample=True, top_p=0.9)              # HF's generate

Around a session step of a small model (1.5-2 ms), HF's generate spends ~0.5 ms a token in Python (inputs
prepared, processors, stopping criteria) and the backend's HF-cache mirror another ~0.4 ms. When a call asks
for plain greedy search, this loop runs it with nothing else per token:

    logits, present = session(ids [B, S], mask [B, P+S], positions [B, S], past)  # the prompt, then S = 1
    scores = float32(logits[:, -1])                      # [B, V], as HF's greedy search takes them
    scores[:, eos] = -inf  while fewer than min_new_tokens are out
    token = argmax(scores)                                # the first maximum, like torch.argmax
    token = pad where the row already ended (eos)         # then rows that hit eos end
    past = present; mask += [1]; positions = each row's count of real tokens

and returns input_ids with the new tokens, ending when every row hit eos or after max_new_tokens: HF's
greedy search, token for token (tests/test_ort_generate.py). A plain greedy call is: max_new_tokens given,
no sampling or beams, no logits processor, stopping criterion, streamer, return_dict_in_generate or
generation_config argument, no right padding, and a model generation config that differs from the defaults
only in length, special tokens and sampling knobs greedy search ignores. Any other call runs HF's generate,
which calls the session one step at a time.
"""

from __future__ import annotations

import copy

import torch

# generation-config fields a plain greedy call may set: lengths and special tokens (read by this loop), the
# sampling and beam knobs greedy search never reads, and bookkeeping
_FREE = {"max_new_tokens", "max_length", "min_new_tokens", "eos_token_id", "pad_token_id", "bos_token_id",
         "temperature", "top_k", "top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff", "length_penalty",
         "early_stopping", "use_cache", "transformers_version", "_from_model_config"}
# fields that may also hold these values, which ask for plain greedy search
_NEUTRAL = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "min_length": 0,
            "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
            "encoder_no_repeat_ngram_size": 0, "num_beam_groups": 1, "diversity_penalty": 0.0,
            "remove_invalid_values": False, "output_attentions": False, "output_hidden_states": False,
            "output_scores": False, "output_logits": False, "return_dict_in_generate": False}


class OrtGenerate:
    """model.generate on backend="onnxruntime": plain greedy calls run `greedy`, others HF's generate."""

    def __init__(self, forward):
        self.forward = forward  # the model's OrtForward

    def __call__(self, inputs=None, generation_config=None, *args, **kwargs):
        model = self.forward.model
        plan = None if args else _plain_greedy(model, inputs, generation_config, dict(kwargs))
        if plan is None:  # (positional args: HF's logits_processor, stopping_criteria ...)
            return type(model).generate(model, inputs, generation_config, *args, **kwargs)
        return greedy(self.forward, *plan)


def _plain_greedy(model, inputs, generation_config, kwargs) -> tuple | None:
    """(input_ids, attention_mask, max_new_tokens, min_new_tokens, eos ids, pad id) of a plain greedy call, else
    None."""
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
    if extra:
        return None  # logits processors, stopping criteria, a streamer, other model inputs ...
    default = GenerationConfig().to_dict()
    for name, value in config.to_dict().items():
        if name not in _FREE and value != default.get(name) and (name not in _NEUTRAL or value != _NEUTRAL[name]):
            return None
    new = config.max_new_tokens
    if not isinstance(new, int) or new < 1 or config.use_cache is False:
        return None
    eos = config.eos_token_id  # an int, a list, a tensor or a numpy integer
    eos = None if eos is None else [int(e) for e in torch.as_tensor(eos).reshape(-1)]
    pad = config.pad_token_id
    pad = int(torch.as_tensor(pad)) if pad is not None else eos[0] if eos else None
    if mask is None:
        if pad is not None and bool((inputs == pad).any()):
            return None  # HF may infer the mask from the pad tokens
        mask = torch.ones_like(inputs)
    if not isinstance(mask, torch.Tensor) or mask.shape != inputs.shape or bool((mask[:, 1:] < mask[:, :-1]).any()):
        return None  # right padding: HF's positions for the new tokens are its own
    return inputs, mask, new, config.min_new_tokens or 0, eos, pad


@torch.no_grad()
def greedy(forward, ids: torch.Tensor, mask: torch.Tensor, new: int, min_new: int, eos: list[int] | None,
           pad: int | None) -> torch.Tensor:
    """Greedy search in the KV-cache session (the module docstring); [B, S] -> [B, S + up to `new`]."""
    from moec.backends.ort_session import empty_past

    session, names, layout, _ = forward.cached_session(ids, mask)
    B = ids.shape[0]
    seq, mask = ids.cpu().long(), mask.long().cpu()  # the result is int64, as HF's
    feed, pos = ids.cpu(), (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # HF's positions under left padding
    past = empty_past(layout, B)
    stop = None if eos is None else torch.tensor(eos)
    ended = torch.zeros(B, dtype=torch.bool)
    for step in range(new):
        outs = session.run(None, {"input_ids": feed.numpy(), "attention_mask": mask.numpy(),
                                  "position_ids": pos.numpy(), **dict(zip(names[3:], past))})
        scores = torch.from_numpy(outs[0][:, -1]).float()  # [B, V]
        if stop is not None and step < min_new:
            scores[:, stop] = -float("inf")
        token = scores.argmax(-1)  # [B]
        if stop is not None:
            token = token.masked_fill(ended, pad)
            ended |= torch.isin(token, stop)
        seq = torch.cat([seq, token[:, None]], 1)
        if bool(ended.all()):
            break
        past, feed = outs[1:], token[:, None].to(ids.dtype)
        pos = mask.sum(-1, keepdim=True)  # the new token's position: the count of its row's real tokens before it
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
    return seq.to(ids.device)
