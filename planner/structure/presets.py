"""Model presets: one registry of small builders, each returning a Hugging Face config dict.

Shapes come from each model's published config.json (Llama 2/3.1, Mistral, Mixtral, Qwen2.5)
or, for the GPT-3-style models, from Narayanan et al. 2021 Table 1 and Korthikanti et al. 2022
Table 3 (vocabulary 51200, sequence 2048, GPT-2 architecture as Megatron-LM trains it).
"""

from __future__ import annotations

from typing import Any, Callable

from planner.errors import PlanInputError
from planner.structure.hf_config import spec_from_hf_config
from planner.structure.model import ModelSpec

HfConfig = dict[str, Any]


def _gpt3(layers: int, hidden: int, heads: int) -> Callable[[], HfConfig]:
    def build() -> HfConfig:
        return {
            "model_type": "gpt2",
            "n_layer": layers,
            "n_embd": hidden,
            "n_head": heads,
            "n_inner": 4 * hidden,
            "n_positions": 2048,
            "vocab_size": 51200,
            "activation_function": "gelu_new",
            "tie_word_embeddings": True,
        }

    return build


def _llama(
    family: str,
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    ffn: int,
    vocab: int,
    max_pos: int,
    rope_theta: float = 10000.0,
    **extra: Any,
) -> Callable[[], HfConfig]:
    def build() -> HfConfig:
        return {
            "model_type": family,
            "num_hidden_layers": layers,
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "intermediate_size": ffn,
            "vocab_size": vocab,
            "max_position_embeddings": max_pos,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": rope_theta,
            "tie_word_embeddings": False,
            **extra,
        }

    return build


_LLAMA31 = dict(vocab=128256, max_pos=131072, rope_theta=500000.0)
_QWEN25 = dict(vocab=152064, max_pos=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)

PRESETS: dict[str, Callable[[], HfConfig]] = {
    # GPT-3 style (Narayanan et al. 2021 Table 1; 22B and 175B from Korthikanti et al. 2022 Table 3).
    "gpt3-1.7b": _gpt3(24, 2304, 24),
    "gpt3-3.6b": _gpt3(30, 3072, 32),
    "gpt3-7.5b": _gpt3(36, 4096, 32),
    "gpt3-18b": _gpt3(40, 6144, 48),
    "gpt3-22b": _gpt3(48, 6144, 64),
    "gpt3-39b": _gpt3(48, 8192, 64),
    "gpt3-76b": _gpt3(60, 10240, 80),
    "gpt3-145b": _gpt3(80, 12288, 96),
    "gpt3-175b": _gpt3(96, 12288, 96),
    "gpt3-310b": _gpt3(96, 16384, 128),
    "gpt3-530b": _gpt3(105, 20480, 128),
    "gpt3-1t": _gpt3(128, 25600, 160),
    # LLaMA 1 (Touvron et al. 2023a, Table 2), the QLoRA paper's base models.
    "llama-33b": _llama("llama", layers=60, hidden=6656, heads=52, kv_heads=52, ffn=17920, vocab=32000, max_pos=2048, rms_norm_eps=1e-6),
    "llama-65b": _llama("llama", layers=80, hidden=8192, heads=64, kv_heads=64, ffn=22016, vocab=32000, max_pos=2048, rms_norm_eps=1e-5),
    # Llama 2 (Touvron et al. 2023; meta-llama/Llama-2-*-hf config.json).
    "llama2-7b": _llama("llama", layers=32, hidden=4096, heads=32, kv_heads=32, ffn=11008, vocab=32000, max_pos=4096),
    "llama2-13b": _llama("llama", layers=40, hidden=5120, heads=40, kv_heads=40, ffn=13824, vocab=32000, max_pos=4096),
    "llama2-70b": _llama("llama", layers=80, hidden=8192, heads=64, kv_heads=8, ffn=28672, vocab=32000, max_pos=4096),
    # Llama 3.1 (Dubey et al. 2024, Table 3; meta-llama/Llama-3.1-*B config.json).
    "llama3.1-8b": _llama("llama", layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, **_LLAMA31),
    "llama3.1-70b": _llama("llama", layers=80, hidden=8192, heads=64, kv_heads=8, ffn=28672, **_LLAMA31),
    "llama3.1-405b": _llama("llama", layers=126, hidden=16384, heads=128, kv_heads=8, ffn=53248, **_LLAMA31),
    # Mistral 7B v0.1 and Mixtral 8x7B (mistralai/*/config.json).
    "mistral-7b": _llama(
        "mistral", layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=32000, max_pos=32768
    ),
    "mixtral-8x7b": _llama(
        "mixtral", layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=32000, max_pos=32768,
        rope_theta=1000000.0, num_local_experts=8, num_experts_per_tok=2,
    ),
    # Qwen2.5 (Qwen/Qwen2.5-7B, Qwen/Qwen2.5-72B config.json).
    "qwen2.5-7b": _llama("qwen2", layers=28, hidden=3584, heads=28, kv_heads=4, ffn=18944, **_QWEN25),
    "qwen2.5-72b": _llama("qwen2", layers=80, hidden=8192, heads=64, kv_heads=8, ffn=29568, **_QWEN25),
    # A tiny Llama for tests and demos: byte-level vocabulary, trains in seconds on a CPU.
    "debug": _llama("llama", layers=2, hidden=64, heads=4, kv_heads=2, ffn=176, vocab=256, max_pos=1024),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_hf_config(name: str) -> HfConfig:
    key = name.lower()
    if key not in PRESETS:
        raise PlanInputError(
            f"unknown model preset '{name}'",
            "run 'orch models' for the list, or pass the path of a Hugging Face config.json",
        )
    return PRESETS[key]()


def preset(name: str) -> ModelSpec:
    """The ModelSpec of a preset, read through the same path as a user's config.json."""
    return spec_from_hf_config(preset_hf_config(name), name=name.lower())
