"""A small MoE language model trained here, whose routing means something.

Unlike the random-weight models of `moec.models`, `tiny_moe_lm()` was trained (by
`examples/train_tiny_moe.py`) to predict the bytes of Python's standard-library sources, so
its experts and routers are worth measuring: e.g. the perplexity lost by quantizing experts.

    tiny_moe_lm()                  -> MixtralForCausalLM (3 layers, hidden 128, 8 experts of 256, top-2), eval mode
    fine_moe_lm()                  -> Qwen2MoeForCausalLM (4 layers, hidden 128, 64 experts of 80, top-6, a shared
                                      expert): fine-grained experts, for offloading and model-level passes
    byte_tokenizer()               -> the models' tokenizer (token = byte), for text in and out and export_genai
    heldout_batches(seq_len=128)   -> deterministic [batch, seq_len] byte-token batches from held-out files
    perplexity(model, batches)     -> exp(mean next-byte NLL)
    expert_load(model, batches)    -> [layers, experts] fraction of routed (token, slot) pairs per expert

Tokens are raw bytes (vocab 256; `byte_tokenizer()` maps text to them). The corpus is every `*.py` under the stdlib
directory (site-packages and test directories excluded) in sorted path order; a file is
held out when a hash of its relative path says so (~5%), so the split does not depend on
the file system. The corpus is the running Python's stdlib: `train_log.json` records the
version the shipped weights were trained on.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from pathlib import Path

import torch

DATA_DIR = Path(__file__).parent / "data" / "tiny_moe_lm"
FINE_DATA_DIR = Path(__file__).parent / "data" / "fine_moe_lm"
SEED = 0
HELDOUT_EVERY = 20  # 1 file in 20 held out
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


def tiny_moe_config():
    """The architecture of `tiny_moe_lm` (fp32 weights: ~2.5M params, ~10 MB)."""
    import transformers

    return transformers.MixtralConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
        tie_word_embeddings=True, router_aux_loss_coef=0.01, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative posix path, path) of the stdlib's `*.py` sources, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not _SKIP_DIRS.intersection(rel.parts[:-1]) and path.is_file():
            files.append((rel.as_posix(), path))
    return sorted(files)


def is_heldout(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % HELDOUT_EVERY == 0


def corpus(split: str) -> torch.Tensor:
    """All bytes of the `split` ("train" or "heldout") files, joined by b"\\n", as a uint8 tensor."""
    assert split in ("train", "heldout"), split
    want = split == "heldout"
    data = b"\n".join(path.read_bytes() for rel, path in stdlib_files() if is_heldout(rel) == want)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[len(starts), seq_len] int64 tokens data[s : s + seq_len]."""
    return data[starts[:, None] + torch.arange(seq_len)].long()


def evenly_spaced_batches(data: torch.Tensor, seq_len: int, n_batches: int, batch_size: int) -> list[torch.Tensor]:
    """n_batches of batch_size windows at evenly spaced offsets over `data` (deterministic)."""
    n = n_batches * batch_size
    starts = torch.linspace(0, len(data) - seq_len - 1, n).long()
    return list(windows(data, starts, seq_len).split(batch_size))


def heldout_batches(seq_len: int = 128, n_batches: int = 2, batch_size: int = 8) -> list[torch.Tensor]:
    """Deterministic byte-token batches ([batch_size, seq_len] int64) from the held-out files."""
    return evenly_spaced_batches(corpus("heldout"), seq_len, n_batches, batch_size)


def tiny_moe_lm():
    """The shipped trained model (MixtralForCausalLM, fp32, eval mode); reads local files only."""
    import transformers

    return transformers.MixtralForCausalLM.from_pretrained(DATA_DIR, local_files_only=True,
                                                           dtype=torch.float32).eval()


def fine_moe_config():
    """The architecture of `fine_moe_lm`: fine-grained experts like DeepSeek/Qwen MoE (64 experts of 80, top-6,
    one sigmoid-gated shared expert; ~10M params, bf16 on disk)."""
    import transformers

    return transformers.Qwen2MoeConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=64, num_experts_per_tok=6, moe_intermediate_size=80,
        shared_expert_intermediate_size=256, norm_topk_prob=False, max_position_embeddings=256,
        tie_word_embeddings=True, router_aux_loss_coef=0.01, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, decoder_sparse_step=1, mlp_only_layers=[],
    )


def fine_moe_lm(dtype: torch.dtype = torch.float32):
    """The shipped fine-grained trained model (Qwen2MoeForCausalLM, eval mode; stored in bf16, returned in
    `dtype`); reads local files only. Trained like tiny_moe_lm (`examples/train_tiny_moe.py --model fine`)."""
    import transformers

    return transformers.Qwen2MoeForCausalLM.from_pretrained(FINE_DATA_DIR, local_files_only=True, dtype=dtype).eval()


def byte_tokenizer():
    """The tokenizer of tiny_moe_lm and fine_moe_lm (token id = byte value), as a transformers tokenizer: GPT-2's
    byte-level BPE with its 256 byte symbols at their byte values and no merges, so deployment folders
    (moec.export_genai) and text generation encode text to the models' tokens. Built here, offline. Its eos is
    byte 0 (NUL), which the stdlib sources never hold: generation runs to its length."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbol = bytes_to_unicode()  # byte -> the printable character byte-level BPE writes for it
    tok = Tokenizer(models.BPE(vocab={symbol[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=symbol[0])


@torch.no_grad()
def mean_nll(model, batches: list[torch.Tensor]) -> float:
    """Mean next-token negative log-likelihood (nats) over all predicted positions of `batches`."""
    total, count = 0.0, 0
    for ids in batches:
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total, count = total + nll.item(), count + ids[:, 1:].numel()
    return total / count


def perplexity(model, batches: list[torch.Tensor]) -> float:
    """exp(mean next-byte NLL) of `model` on `batches`."""
    return math.exp(mean_nll(model, batches))


@torch.no_grad()
def expert_load(model, batches: list[torch.Tensor]) -> torch.Tensor:
    """[layers, experts]: fraction of each layer's top-k (token, slot) assignments going to each expert."""
    k = model.config.num_experts_per_tok
    num_experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    counts = 0
    for ids in batches:
        router_logits = model(input_ids=ids, output_router_logits=True).router_logits  # per layer: [tokens, E]
        chosen = [logits.topk(k, dim=-1).indices.reshape(-1) for logits in router_logits]
        counts = counts + torch.stack([torch.bincount(c, minlength=num_experts) for c in chosen])
    return counts / counts.sum(-1, keepdim=True)
