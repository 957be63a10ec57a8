"""Compute-optimal model and data size (Hoffmann et al. 2022, "Training Compute-Optimal Large
Language Models", arXiv 2203.15556).

Approach 1 (Table 2): N_opt = k C^a and D_opt = C / (6 N_opt) with a = 0.50; k is fixed by Table 3's
row "1 billion parameters, 1.21e20 FLOPs, 20.2 billion tokens" (training FLOPs C = 6 N D, Kaplan et
al. 2020). At Chinchilla's budget, 5.76e23 FLOPs, this gives 69B parameters and 1.39T tokens
(Chinchilla: 70B, 1.4T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.structure.hf_config import spec_from_hf_config
from planner.structure.model import ModelSpec
from planner.structure.params import total_params

CHINCHILLA_A = 0.50  # N_opt ~ C^a (Table 2, Approach 1)
TABLE3_PARAMS = 1.0e9  # Table 3, first full row used as the anchor
TABLE3_FLOPS = 1.21e20
CHINCHILLA_K = TABLE3_PARAMS / TABLE3_FLOPS**CHINCHILLA_A


@dataclass(frozen=True)
class ComputeOptimal:
    flops: float
    params: float
    tokens: float


def compute_optimal(flops: float) -> ComputeOptimal:
    params = CHINCHILLA_K * flops**CHINCHILLA_A
    return ComputeOptimal(flops=flops, params=params, tokens=flops / (6 * params))


def generated_llama(params: float, *, vocab: int = 32000, seq_len: int = 4096) -> ModelSpec:
    """A Llama-style architecture of about ``params`` parameters: 128-wide heads, SwiGLU of
    width ~8h/3 (rounded to 256), GQA with 8 key/value heads for wide models, width from the
    width/depth ratio ~ 128 of Kaplan et al. 2020 (section 3.1) and depth to reach ``params``."""
    step = 1024 if params > 3e9 else 128  # wide models: head counts divisible by 8 for GQA
    hidden = max(256, step * round((params * 128 / 12) ** (1 / 3) / step))
    heads = hidden // 128
    kv_heads = 8 if heads >= 32 and heads % 8 == 0 else heads
    ffn = 256 * math.ceil(8 * hidden / 3 / 256)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * 128 + 3 * hidden * ffn  # q, o, k, v, SwiGLU
    layers = max(2, round((params - 2 * vocab * hidden) / per_layer))
    cfg = {
        "model_type": "llama", "num_hidden_layers": layers, "hidden_size": hidden,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "intermediate_size": ffn, "vocab_size": vocab, "max_position_embeddings": seq_len, "tie_word_embeddings": False,
    }
    return spec_from_hf_config(cfg, name=f"generated-{total_params_guess(params)}")


def total_params_guess(params: float) -> str:
    return f"{params / 1e9:.1f}b" if params >= 1e9 else f"{params / 1e6:.0f}m"


def nearest_model(params: float, candidates: list[ModelSpec], tolerance: float = 0.15) -> ModelSpec:
    """The candidate whose size is within ``tolerance`` of params (the closest), else a generated one."""
    best = min(candidates, key=lambda m: abs(math.log(total_params(m) / params)))
    if abs(total_params(best) / params - 1) <= tolerance:
        return best
    return generated_llama(params)
