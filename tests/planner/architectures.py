"""Tiny random configs of causal-LM architectures that transformers ships, chosen to cover the
structures users bring: dense and MoE (with and without shared experts), MHA / GQA / MQA, fused
QKV, parallel attention and MLP blocks, LayerNorm and RMSNorm, learned / rotary / partial rotary /
ALiBi positions, sliding windows, logit soft-capping, tied and untied embeddings. Each is the
family's own defaults with its widths cut down (3 layers unless the family needs more to repeat
its layer pattern), so the planner meets them as a user's config.json."""

from __future__ import annotations

from typing import Any

TINY = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=320, max_position_embeddings=512)
LLAMA_LIKE = dict(TINY, num_hidden_layers=3, num_key_value_heads=2)


def _cfg(model_type: str, **fields: Any) -> dict[str, Any]:
    return {"model_type": model_type, **fields}


ARCHITECTURES: dict[str, dict[str, Any]] = {
    # dense, GQA, RMSNorm, SwiGLU, rotary, untied
    "llama": _cfg("llama", **LLAMA_LIKE),
    "mistral-sliding": _cfg("mistral", **LLAMA_LIKE, sliding_window=48),
    "qwen2-tied": _cfg("qwen2", **LLAMA_LIKE, tie_word_embeddings=True),
    "qwen3": _cfg("qwen3", **LLAMA_LIKE, head_dim=16),
    "granite": _cfg("granite", **LLAMA_LIKE, embedding_multiplier=12.0, residual_multiplier=0.22),
    "olmo2": _cfg("olmo2", **LLAMA_LIKE),
    "gemma-mqa": _cfg("gemma", **dict(LLAMA_LIKE, num_key_value_heads=1), head_dim=16),
    # soft-capping, alternating sliding/global layers
    "gemma2": _cfg("gemma2", **LLAMA_LIKE, head_dim=16, sliding_window=32,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                   num_hidden_layers_override=4),
    "gemma3": _cfg("gemma3_text", **LLAMA_LIKE, head_dim=16, sliding_window=32,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                   num_hidden_layers_override=4),
    "cohere-parallel": _cfg("cohere", **LLAMA_LIKE, use_qk_norm=False),
    # fused QKV / gate_up
    "phi3-fused": _cfg("phi3", **dict(LLAMA_LIKE, vocab_size=320), pad_token_id=0),
    # LayerNorm, biases, GELU; learned positions, tied, dropout
    "gpt2": _cfg("gpt2", n_layer=3, n_embd=64, n_head=4, n_positions=512, vocab_size=320),
    "gpt2-mpt-style": _cfg("gpt2", n_layer=3, n_embd=64, n_head=4, n_positions=512, vocab_size=320,
                           activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt-bigcode-mqa": _cfg("gpt_bigcode", n_layer=3, n_embd=64, n_head=4, n_positions=512, vocab_size=320, multi_query=True),
    "opt-relu": _cfg("opt", num_hidden_layers=3, hidden_size=64, num_attention_heads=4, ffn_dim=128, vocab_size=320,
                     max_position_embeddings=512, word_embed_proj_dim=64, pad_token_id=1),
    "starcoder2": _cfg("starcoder2", **LLAMA_LIKE, sliding_window=None),
    # parallel attention + MLP, partial rotary
    "gpt-neox": _cfg("gpt_neox", num_hidden_layers=3, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                     vocab_size=320, max_position_embeddings=512, rotary_pct=0.25),
    "gptj": _cfg("gptj", n_layer=3, n_embd=64, n_head=4, n_positions=512, vocab_size=320, rotary_dim=8),
    "phi-partial-rotary": _cfg("phi", **dict(TINY, num_hidden_layers=3, num_key_value_heads=4), partial_rotary_factor=0.5),
    "stablelm": _cfg("stablelm", **dict(LLAMA_LIKE), partial_rotary_factor=0.25),
    "falcon-mqa": _cfg("falcon", num_hidden_layers=3, hidden_size=64, num_attention_heads=4, vocab_size=320,
                       multi_query=True, parallel_attn=True, new_decoder_architecture=False, ffn_hidden_size=128),
    # ALiBi
    "bloom": _cfg("bloom", n_layer=3, hidden_size=64, n_head=4, vocab_size=320),
    # MoE: routed only; with shared experts
    "mixtral": _cfg("mixtral", **LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2-moe-shared": _cfg("qwen2_moe", **LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[]),
    "olmoe": _cfg("olmoe", **LLAMA_LIKE, num_experts=4, num_experts_per_tok=2),
    "qwen3-moe": _cfg("qwen3_moe", **LLAMA_LIKE, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
}


def config(name: str) -> dict[str, Any]:
    """The config dict of an architecture under test (with its own layer count)."""
    cfg = dict(ARCHITECTURES[name])
    layers = cfg.pop("num_hidden_layers_override", None)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg
