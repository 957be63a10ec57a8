"""Exact floating-point operations of a training step, from the model's own linear modules.

A matmul of (m x k) by (k x n) is 2mkn FLOPs. Per token and layer, the forward pass does
QKV 2h(q + 2kv), scores 2sq, attention over values 2sq, output projection 2qh, MLP 2hf per
matrix, and the logits 2hV once per token (Narayanan et al. 2021, section 5.1, whose total with
full recomputation is 96BsLh^2(1 + s/6h + V/16Lh) for GPT). Attention is counted over the full
s x s square, as Narayanan et al. and PaLM (Chowdhery et al. 2022, Appendix B) count it.
Backward is twice the forward.
"""

from __future__ import annotations

from planner.structure.layout import LayerKind
from planner.structure.model import ModelSpec
from planner.specs.training import Recompute


def layer_forward_flops_per_token(m: ModelSpec, seq_len: int) -> tuple[float, float]:
    """(dense matmul FLOPs, attention-core FLOPs) of the layers' forward per token, summed over all
    layers, from the model's own modules (planner.structure.layout): 2 x in x out for every linear
    (routers and shared experts included) and top-k of the routed experts' projections; the core
    is 4 s q per layer for q = heads x head dim."""
    layout = m.layout

    def per_kind(kind: LayerKind) -> tuple[float, float]:
        dense = sum(2.0 * x.in_features * x.out_features * (m.experts_per_token if x.experts else 1)
                    for x in kind.linears)
        q = kind.num_heads * kind.head_dim
        return dense, 4.0 * seq_len * q

    def total() -> tuple[float, float]:
        per = [per_kind(kind) for kind in layout.kinds]
        return sum(per[k][0] for k in layout.layer_kinds), sum(per[k][1] for k in layout.layer_kinds)

    return layout.memo(("flops", seq_len, m.experts_per_token), total)


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
    return k_dense * dense + k_core * core + k_dense * logits_forward_flops_per_token(m)


def hardware_flops_per_token(m: ModelSpec, seq_len: int, recompute: Recompute, method: str = "full") -> float:
    """Training FLOPs per token the GPUs execute, recomputation included (Narayanan et al. 2021
    report this as achieved TFLOP/s): full recompute reruns every layer's forward; selective
    reruns only the attention core (Korthikanti et al. 2022, section 5)."""
    dense, core = layer_forward_flops_per_token(m, seq_len)
    extra = {"none": 0.0, "selective": core, "full": dense + core}[recompute]
    return model_flops_per_token(m, seq_len, method) + extra
