"""Tiny Hugging Face MoE models for moec's tests, demo and benchmarks.

Every supported transformers MoE family is described by one row of `_SPECS`
(config class, model class, config kwargs). The builders here turn a row into a
model with random, seeded weights; no checkpoint is ever downloaded.

    tiny_config("mixtral")            -> a tiny MixtralConfig (hidden 64, 2 layers, 8 experts, top-2)
    tiny_model("deepseek_v3")         -> DeepseekV3ForCausalLM, eval mode, decisive routing
    example_inputs(model, batch=2)    -> kwargs for model(**inputs)
    demo_model() / deepseek_style_model()  -> the larger models used by the demo and benchmarks

Random init makes routers nearly uniform (some families even init them to zeros), so
top-k would be decided by ties and rounding noise. `_make_routing_decisive` re-draws
every router with a large std and gives DeepSeek-style correction biases random values,
so the expert choice is stable and any routing bug shows up in the outputs.
"""

from __future__ import annotations

import re

import torch
import transformers

FAMILIES: tuple[str, ...] = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "gpt_oss",
    "phimoe",
    "ernie4_5_moe",
    "granitemoe",
    "jamba",
    "qwen3_next",
    "llama4",
    "jetmoe",
    "dbrx",
    "switch_transformers",
    "nllb_moe",
)

SEQ2SEQ_FAMILIES = ("switch_transformers", "nllb_moe")
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")

# Shared by every decoder LM below; a family's own kwargs win.
_DECODER_BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.08,  # expert weights std 0.08: MoE outputs well above zero
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# MLA: one cached latent for every head, so DeepSeek's own configs set num_key_value_heads = num_attention_heads
# (transformers' eager attention and a traced sdpa repeat the expanded keys otherwise, and fail).
_DEEPSEEK_ATTN = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                      num_key_value_heads=4)

# family -> (config class, model class, config kwargs)
_SPECS: dict[str, tuple[str, str, dict]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16, norm_topk_prob=True,
             decoder_sparse_step=1, mlp_only_layers=[]),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32,
                                                      norm_topk_prob=True)),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
             first_k_dense_replace=0, topk_method="group_limited_greedy", n_group=2, topk_group=1,
             routed_scaling_factor=2.0, **_DEEPSEEK_ATTN),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
             first_k_dense_replace=0, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
             **_DEEPSEEK_ATTN),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
             first_k_dense_replace=0, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
             head_dim=16),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=16, sliding_window=4,
             layer_types=["sliding_attention", "full_attention"]),
    ),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2)),
    "ernie4_5_moe": (  # softmax, top-k on the scores + a [1, E] correction bias, a shared expert
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1, moe_layer_start_index=0,
             moe_layer_interval=1),
    ),
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, embedding_multiplier=2.0,
             residual_multiplier=0.5, attention_multiplier=0.25, logits_scaling=2.0),
    ),
    "jamba": (
        "JambaConfig",
        "JambaForCausalLM",
        # layer 0: mamba + MoE, layer 1: attention + MoE
        dict(num_experts=8, num_experts_per_tok=2, expert_layer_period=1, expert_layer_offset=0,
             attn_layer_period=2, attn_layer_offset=1, use_mamba_kernels=False, mamba_d_state=8),
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        # layer 0: gated-delta-net linear attention, layer 1: full attention; both MoE
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], head_dim=16,
             layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=4,
             linear_key_head_dim=16, linear_value_head_dim=16),
    ),
    "llama4": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, intermediate_size_mlp=64, head_dim=16,
             interleave_moe_layer_step=1, attention_chunk_size=128),
    ),
    "jetmoe": (
        "JetMoeConfig",
        "JetMoeForCausalLM",
        # attention heads = num_key_value_heads * top_k (the MoA experts are attention, not FFN)
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, kv_channels=16,
             tie_word_embeddings=False),
    ),
    "dbrx": (
        "DbrxConfig",
        "DbrxForCausalLM",
        dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=256, initializer_range=0.08,
             attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
             ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2, moe_normalize_expert_weights=1.0),
             pad_token_id=0, bos_token_id=1, eos_token_id=2),
    ),
    "switch_transformers": (
        "SwitchTransformersConfig",
        "SwitchTransformersForConditionalGeneration",
        # top-1 only; layer 1 of encoder and decoder is sparse. expert_capacity=2 tokens per expert per
        # sequence, so prompts of ~8 tokens already drop some (pass expert_capacity=64 to rule that out).
        dict(vocab_size=256, d_model=64, d_kv=16, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=2,
             num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=8, expert_capacity=2,
             router_jitter_noise=0.0, dropout_rate=0.0, decoder_start_token_id=0, tie_word_embeddings=False),
    ),
    "nllb_moe": (
        "NllbMoeConfig",
        "NllbMoeForConditionalGeneration",
        # layer 1 of encoder and decoder is sparse (top-2 router)
        dict(vocab_size=256, d_model=64, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
             encoder_attention_heads=4, decoder_attention_heads=4, max_position_embeddings=256, num_experts=8,
             expert_capacity=64, encoder_sparse_step=2, decoder_sparse_step=2, encoder_layerdrop=0.0,
             decoder_layerdrop=0.0, dropout=0.0, attention_dropout=0.0, init_std=0.08, tie_word_embeddings=False),
    ),
}

_ROUTER_CLASS = re.compile(r"Router|Gating")  # e.g. MixtralTopKRouter, JetMoeTopKGating, NllbMoeTop2Router
_ROUTER_NAME = "router"  # a plain nn.Linear called `router` (Jamba in transformers 5.17)
_ROUTER_GAIN = 4.0  # router weight std = gain / sqrt(hidden): logits of std ~4 on normalised inputs


def _check_family(family: str) -> None:
    if family not in _SPECS:
        raise ValueError(f"unknown MoE family {family!r}; expected one of {FAMILIES}")


def supports_experts_implementation(family: str) -> bool:
    """True when the family's experts are `@use_experts_implementation` modules (eager/grouped_mm/batched_mm)."""
    _check_family(family)
    return getattr(transformers, _SPECS[family][1])._can_set_experts_implementation()


def _spec(family: str) -> tuple[str, str, dict]:
    """(config class, model class, full config kwargs) of `family`."""
    _check_family(family)
    config_cls, model_cls, kwargs = _SPECS[family]
    base = {} if family in ("dbrx", *SEQ2SEQ_FAMILIES) else _DECODER_BASE
    return config_cls, model_cls, {**base, **kwargs}


def tiny_config(family: str, **overrides) -> transformers.PretrainedConfig:
    """A tiny config for `family`; every key of `overrides` is set on the config.

    `experts_implementation=...` in overrides selects the experts kernel (families that support it only).
    """
    return _config(*_spec(family), overrides)


def _config(config_cls: str, model_cls: str, kwargs: dict, overrides: dict) -> transformers.PretrainedConfig:
    overrides = dict(overrides)
    experts_impl = overrides.pop("experts_implementation", None)
    # Overrides go through the constructor so derived fields (e.g. llama4 moe_layers) follow them.
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    if experts_impl is not None and getattr(transformers, model_cls)._can_set_experts_implementation():
        config._experts_implementation = experts_impl
    return config


@torch.no_grad()
def _make_routing_decisive(model: torch.nn.Module, hidden_size: int) -> None:
    """Re-draw router weights (std gain/sqrt(H)), router biases and DeepSeek correction biases."""
    routers = [m for name, m in model.named_modules()
               if _ROUTER_CLASS.search(type(m).__name__) or name.rpartition(".")[2] == _ROUTER_NAME]
    if not routers:
        raise RuntimeError(f"no router found in {type(model).__name__}")
    for router in routers:
        for name, param in router.named_parameters():
            if param.dim() == 2 and param.shape[-1] == hidden_size:  # [E, H]
                param.normal_(0.0, _ROUTER_GAIN / hidden_size**0.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
        for name, buf in router.named_buffers():
            if name.endswith("e_score_correction_bias"):  # selection-only bias (DeepSeek-V3, GLM4)
                buf.copy_(torch.randn_like(buf) * 0.1)
    # Zero-initialised biases (gpt-oss experts, JetMoE MoE output, ...) get small random values.
    for name, param in model.named_parameters():
        if name.endswith("bias") and param.dim() <= 2 and not param.any():
            param.normal_(0.0, 0.02)


def _build(config_cls: str, model_cls: str, kwargs: dict, overrides: dict, *,
           experts_implementation: str | None, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    if experts_implementation is not None:
        overrides = {**overrides, "experts_implementation": experts_implementation}
    config = _config(config_cls, model_cls, kwargs, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_cls)(config)
        _make_routing_decisive(model, config.hidden_size)
    model.to(dtype)
    # Like from_pretrained: some buffers stay fp32 whatever the model dtype.
    keep_fp32 = getattr(model, "_keep_in_fp32_modules_strict", None) or []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if any(k in name for k in keep_fp32):
            tensor.data = tensor.data.float()
    model.config.dtype = dtype
    return model.eval()


def tiny_model(family: str, *, experts_implementation: str | None = None, dtype: torch.dtype = torch.float32,
               seed: int = 0, **overrides) -> torch.nn.Module:
    """Seeded random tiny model of `family` in eval mode (ForCausalLM, or ForConditionalGeneration for seq2seq).

    `experts_implementation` ("eager", "grouped_mm", "batched_mm") is applied where the family supports it and
    ignored otherwise; None keeps transformers' default ("grouped_mm" for supporting families).
    """
    return _build(*_spec(family), overrides, experts_implementation=experts_implementation, dtype=dtype, seed=seed)


def example_inputs(model_or_family: torch.nn.Module | str, *, batch: int = 1, seq: int = 8, seed: int = 0) -> dict:
    """Random token ids for model(**inputs); seq2seq models also get decoder_input_ids and attention_mask."""
    config = tiny_config(model_or_family) if isinstance(model_or_family, str) else model_or_family.config
    # Stay clear of the special ids (pad/bos/eos are all < 4 in these configs).
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, config.vocab_size, (batch, seq), generator=gen, device="cpu")
    if not config.is_encoder_decoder:
        return {"input_ids": ids}
    dec = torch.randint(4, config.vocab_size, (batch, seq), generator=gen, device="cpu")
    dec[:, 0] = config.decoder_start_token_id
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": dec}


_DEMO = dict(
    vocab_size=1024, hidden_size=512, intermediate_size=1792, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048,
    initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
_DEEPSEEK_STYLE = dict(
    vocab_size=1024, hidden_size=512, intermediate_size=1408, moe_intermediate_size=320, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=8, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=1,
    n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=0,
    kv_lora_rank=128, q_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64,
    max_position_embeddings=2048, initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def demo_model(*, experts_implementation: str | None = None, dtype: torch.dtype = torch.float32, seed: int = 0,
               **overrides) -> torch.nn.Module:
    """moec's built-in demo model: a small Mixtral (hidden 512, 8 experts of 1792, top-2, 4 layers), random weights."""
    return _build("MixtralConfig", "MixtralForCausalLM", _DEMO, overrides,
                  experts_implementation=experts_implementation, dtype=dtype, seed=seed)


def deepseek_style_model(*, experts_implementation: str | None = None, dtype: torch.dtype = torch.float32,
                         seed: int = 0, **overrides) -> torch.nn.Module:
    """A DeepSeek-V3-style fine-grained MoE: 64 experts of 320, top-6, 1 shared expert, 8 groups (best 4 kept)."""
    return _build("DeepseekV3Config", "DeepseekV3ForCausalLM", _DEEPSEEK_STYLE, overrides,
                  experts_implementation=experts_implementation, dtype=dtype, seed=seed)
