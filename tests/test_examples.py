"""moec.examples.tiny_moe_lm: the shipped trained byte-level MoE LM (examples/train_tiny_moe.py)."""

import copy

import torch

import moec
from moec import examples

from conftest import TOL, rel_err

# Regression bound, not a quality target: held-out perplexity of the shipped weights on these 2 batches,
# measured 4.50 (Python 3.11.7 stdlib), times 1.1. A unigram byte model scores 33.2 on them.
PPL_BOUND = 4.50 * 1.1


def _batches():
    return examples.heldout_batches(seq_len=128, n_batches=2, batch_size=4)


def test_heldout_perplexity():
    batches = _batches()
    assert [b.shape for b in batches] == [torch.Size([4, 128])] * 2
    assert all(torch.equal(a, b) for a, b in zip(batches, _batches()))  # deterministic
    ppl = examples.perplexity(examples.tiny_moe_lm(), batches)
    assert ppl < PPL_BOUND, ppl


def test_compile_detects_all_blocks_and_matches():
    model = examples.tiny_moe_lm()
    ref = copy.deepcopy(model)
    moec.compile(model)
    report = moec.inspect(model)
    assert len(report.blocks) == model.config.num_hidden_layers and not report.rejected, report
    assert all(b.num_experts == 8 and b.top_k == 2 for b in report.blocks), report
    ids = _batches()[0]
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).logits, ref(input_ids=ids).logits) < TOL[torch.float32]
