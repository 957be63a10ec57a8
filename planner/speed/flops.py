"""Exact floating-point operations of a training step, from the model shape.

A matmul of (m x k) by (k x n) is 2mkn FLOPs. Per token and layer, the forward pass does
QKV 2h(q + 2kv), scores 2sq, attention over values 2sq, output projection 2qh, MLP 2hf per
matrix, and the logits 2hV once per token (Narayanan et al. 2021, section 5.1, whose total with
full recomputation is 96BsLh^2(1 + s/6h + V/16Lh) for GPT). Attention is counted over the full
s x s square, as Narayanan et al. and PaLM (Chowdhery et al. 2022, Appendix B) count it.
Backward is twice the forward.
"""

from __future__ import annotations

from planner.structure.model import ModelSpec
from planner.specs.training import Recompute


def layer_forward_flops_per_token(m: ModelSpec, seq_len: int) -> tuple[float, float]:
    """(dense matmul FLOPs, attention-core FLOPs) of one layer's forward, per token."""
    h, q, kv, f = m.hidden_size, m.q_width, m.kv_width, m.ffn_hidden_size
    matrices = 3 if m.gated_mlp else 2
    mlp = 2 * h * f * matrices
    if m.is_moe:
        mlp = mlp * m.experts_per_token + 2 * h * m.num_experts  # routed experts + router
    dense = 2 * h * (q + 2 * kv) + 2 * q * h + mlp
    core = 2 * seq_len * q + 2 * seq_len * q
    return float(dense), float(core)


def logits_forward_flops_per_token(m: ModelSpec) -> float:
    return 2.0 * m.hidden_size * m.vocab_size


def pass_multipliers(method: str) -> tuple[float, float]:
    """(matmul, attention-core) work per step in units of one forward. Full training: forward +
    backward = 3 (backward computes input and weight gradients). Parameter-efficient methods: the
    frozen matmuls need input gradients only, so 2 (adapters are negligible); the attention core
    has no weights and stays at 3. MeZO: two forward passes, no backward (Malladi et al. 2023)."""
    if method == "full":
        return 3.0, 3.0
    if method == "mezo":
        return 2.0, 2.0
    return 2.0, 3.0


def model_flops_per_token(m: ModelSpec, seq_len: int, method: str = "full") -> float:
    """Training FLOPs per token without recomputation: 3 x forward for full training (PaLM's
    model FLOPs), less for frozen weights (pass_multipliers)."""
    dense, core = layer_forward_flops_per_token(m, seq_len)
    k_dense, k_core = pass_multipliers(method)
    return m.num_layers * (k_dense * dense + k_core * core) + k_dense * logits_forward_flops_per_token(m)


def hardware_flops_per_token(m: ModelSpec, seq_len: int, recompute: Recompute, method: str = "full") -> float:
    """Training FLOPs per token the GPUs execute, recomputation included (Narayanan et al. 2021
    report this as achieved TFLOP/s): full recompute reruns every layer's forward; selective
    reruns only the attention core (Korthikanti et al. 2022, section 5)."""
    dense, core = layer_forward_flops_per_token(m, seq_len)
    extra = {"none": 0.0, "selective": core, "full": dense + core}[recompute]
    return model_flops_per_token(m, seq_len, method) + m.num_layers * extra
