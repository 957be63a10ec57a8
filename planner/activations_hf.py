"""Activations of transformers' PyTorch modules (what orch launches), term by term.

Every term is a tensor that autograd saves for backward on a GPU, found with the exact
FakeTensor trace (the planner/trace/ package) and checked against it byte for byte at tp = 1
(tests/planner/test_activations.py). Symbols: T = b*s tokens on the rank, e bytes per activation
element, h hidden, a heads, k kv heads, d head dim, f MLP width, V vocabulary, E experts.

Tensor parallelism (DeepSpeed AutoTP / Megatron column-row split) divides the tensors that live
in the split width (q, k, v, attention output, MLP inner activations, per-head statistics) by t;
the norm inputs and the inputs of the first matmuls stay whole unless sequence parallelism splits
them too. Context parallelism divides T; eager attention scores are (s/cp) x s per head.
"""

from __future__ import annotations

import math

from planner.model import ModelSpec
from planner.training import ParallelPlan, TrainingSpec


def _dims(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> tuple[int, int, int]:
    """(local sequence, tokens on the rank T, bytes per element e)."""
    s_local = training.seq_len // plan.cp
    e = 4 if training.precision == "fp32" else 2
    return s_local, s_local * plan.micro_batch, e


def _lse_bytes_per_token(m: ModelSpec, training: TrainingSpec, e: int) -> float:
    """Flash keeps an fp32 log-sum-exp per head and query; in fp32 the memory-efficient kernel
    pads it to a multiple of 32 queries."""
    if e == 4:
        return 4 * m.num_heads * math.ceil(training.seq_len / 32) * 32 / training.seq_len
    return 4 * m.num_heads


def _eager_scores_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, e: int, per_score: float) -> float:
    """Eager attention keeps per_score bytes per score of the [b, a, s/cp, s] matrix."""
    s_local = training.seq_len // plan.cp
    return per_score * plan.micro_batch * m.num_heads * s_local * training.seq_len


def _llama_layer(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> tuple[float, float]:
    """(whole, split-by-t) bytes of one Llama/Mistral/Qwen2/Mixtral layer.

    Whole: each RMSNorm keeps an fp32 copy of its input (4h), its bf16 normalised input (eh) and
    its output as the next matmul's input (eh), and its fp32 rsqrt (4 per token): 8h + 4eh + 8.
    Split: flash keeps q and o (2e ad), k and v (2e kd), the fp32 log-sum-exp (4a); SwiGLU keeps
    the gate output, silu output, up output and down input (4e f). Eager keeps q and k, v
    repeated to every head and a copy of o (4e ad), plus the fp32 softmax and its bf16 copy per
    score (6 bytes; 4 in fp32)."""
    _, tokens, e = _dims(m, training, plan)
    h, a, d, kvd, f = m.hidden_size, m.num_heads, m.head_dim, m.kv_width, m.ffn_hidden_size
    whole = tokens * (8 * h + 4 * e * h + 8)
    core = training.attention == "eager" and plan.recompute != "selective"
    if training.attention == "eager":
        split = tokens * 4 * e * a * d
        if core:
            split += _eager_scores_bytes(m, training, plan, e, 4 if e == 4 else 6)
    else:
        split = tokens * (2 * e * a * d + 2 * e * kvd + _lse_bytes_per_token(m, training, e))
    if m.is_moe:
        whole_moe, split_moe = _moe_block(m, tokens, e)
        return whole + whole_moe, split + split_moe
    return whole, split + tokens * 4 * e * f


def _moe_block(m: ModelSpec, tokens: int, e: int) -> tuple[float, float]:
    """Mixtral's sparse block with transformers' grouped_mm experts (S = T*top_k routed rows,
    whatever the routing): the router reads the norm output already counted; fp32 router softmax (4E), top-k indices (8 per
    pick), the renormalised fp32 weights (4 + 4 per pick), three int64 index vectors (24 per
    row), offsets (4E once); per routed row the gathered token and the expert output (2eh),
    fp32 routing weight (4), gate_up output (2ef), silu output and down input (2ef)."""
    k, h, f, experts = m.experts_per_token, m.hidden_size, m.ffn_hidden_size, m.num_experts
    rows = tokens * k
    whole = tokens * (4 * experts + 12 * k + 4) + 4 * experts + rows * (2 * e * h + 28)
    split = rows * 4 * e * f
    return whole, split


def _gpt2_layer(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> tuple[float, float]:
    """(whole, split-by-t) bytes of one GPT-2 block.

    Whole: the residual stream into each LayerNorm (2eh), the c_attn and c_fc inputs (2eh), two
    1-byte residual-dropout masks (2h), LayerNorm mean and rstd in fp32 (16 per token).
    Split: q, k, v in one storage (3eh) and the attention output (eh), the tanh-GELU written in
    Python keeps x, tanh, 0.5x and 1 + tanh (4ef) and the c_proj input (ef); flash keeps the
    log-sum-exp (4a), eager the softmax, its 1-byte dropout mask and the dropped probabilities
    ((2e + 1) bytes per score)."""
    _, tokens, e = _dims(m, training, plan)
    h, f = m.hidden_size, m.ffn_hidden_size
    masks = 2 * h if m.dropout else 0
    whole = tokens * (4 * e * h + masks + 16)
    gelu_tensors = 4 if m.activation == "gelu" else 1
    split = tokens * (4 * e * h + (gelu_tensors + 1) * e * f)
    if training.attention == "eager":
        if plan.recompute != "selective":
            split += _eager_scores_bytes(m, training, plan, e, 2 * e + 1 if m.dropout else e)
    else:
        split += tokens * _lse_bytes_per_token(m, training, e)
    return whole, split


def hf_layer_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    whole, split = _gpt2_layer(m, training, plan) if m.family == "gpt2" else _llama_layer(m, training, plan)
    return whole / (plan.tp if plan.sp else 1) + split / plan.tp


def hf_embedding_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """First stage: the int64 input ids (8 per token); GPT-2 adds the 1-byte embedding dropout
    mask (h) and its int64 position ids (8 per position); rotary models the cos and sin tables
    (2e s d)."""
    s_local, tokens, e = _dims(m, training, plan)
    total = 8 * tokens
    if m.family == "gpt2":
        total += (tokens * m.hidden_size if m.dropout else 0) + 8 * s_local
    else:
        total += 2 * e * s_local * m.head_dim
    return total


def hf_head_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """Last stage: the final norm (RMSNorm: fp32 input copy 4h, normalised input eh, rsqrt 4;
    LayerNorm: its input eh, mean and rstd 8), the lm_head input (eh), the fp32 log-softmax of the
    logits (4V, split by t with the vocabulary), the int64 targets (8; the shifted-label slice
    keeps the whole s+1 storage, 8 bytes more when b = 1) and the loss weight (4)."""
    _, tokens, e = _dims(m, training, plan)
    h = m.hidden_size
    norm = tokens * (e * h + 8) if m.norm == "layernorm" else tokens * (4 * h + e * h + 4)
    lm_head_input = tokens * e * h
    log_softmax = tokens * 4 * m.vocab_size / plan.tp
    targets = 8 * tokens + (8 if plan.micro_batch == 1 else 0) + 4
    return norm + lm_head_input + log_softmax + targets


def hf_loss_grad_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """Bytes the start of the backward adds to the saved activations on the last stage: the loss's
    fp32 gradients over the logits. transformers' ForCausalLMLoss (transformers/loss/loss_utils.py)
    upcasts the logits (``logits.float()``) and calls ``cross_entropy`` = log_softmax + nll_loss; in
    the backward NllLossBackward writes a dense fp32 gradient of the log-softmax output (4V per
    token) and LogSoftmaxBackward (``_log_softmax_backward_data``) the fp32 gradient of the logits
    (4V) while the first and the saved log-softmax are alive: 8V per token (split by t with the
    vocabulary). NllLossBackward has freed its saved targets and weight by then (hf_head_bytes'
    8 per token, 8 more when b = 1, and 4). Later steps hold less: the cast back to the 16-bit
    logits' gradient (2V) comes after the log-softmax and its gradient are freed.
    Measured exactly on CPU ranks (tests/launch/test_profile.py)."""
    _, tokens, _ = _dims(m, training, plan)
    targets = 8 * tokens + (8 if plan.micro_batch == 1 else 0) + 4
    return 8 * tokens * m.vocab_size / plan.tp - targets


def hf_backward_working_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, *, head: bool = False) -> float:
    """The largest working set inside one layer's backward (``head``: the final norm's), beyond the
    activations of the layers before it: the gradients of the residual stream coming in and going
    out (2eh per token), and the largest of
    - RMSNorm's backward (LlamaRMSNorm upcasts to fp32: the fp32 output gradient, the normalised
      input's, the mean's expanded gradient and pow's two products are alive together, about five
      fp32 h-vectors, 20h per token; the peaks it sets are measured within 2%,
      tests/planner/test_phases.py),
    - the gated MLP's (down_proj's input gradient, then the gate and up outputs' from the product's
      backward, 3ef; a GELU MLP: the tanh chain's three, 3ef), split by t with the MLP,
    - eager attention's softmax backward: per score the layer's own fp32 softmax output, its
      incoming gradient cast to fp32 and the fp32 result of ``_softmax_backward_data``, 12 bytes,
      beside what the rest of the layer's backward still needs: q and k (2e ad per token) and the
      input norm's saved tensors (4h + 2eh + 4).
    LayerNorm (GPT-2) runs its backward in one fused kernel: no norm term."""
    _, tokens, e = _dims(m, training, plan)
    h, f = m.hidden_size, m.ffn_hidden_size
    whole = plan.tp if plan.sp else 1
    norm = tokens * 20 * h / whole if m.norm == "rmsnorm" else 0
    mlp = 0.0 if head else tokens * 3 * e * f / plan.tp
    scores = 0.0
    if training.attention == "eager" and plan.recompute != "selective" and not head:
        scores = (_eager_scores_bytes(m, training, plan, e, 12) + tokens * 2 * e * m.q_width) / plan.tp
        scores += tokens * (4 * h + 2 * e * h + 4) / whole
    return tokens * 2 * e * h / whole + max(norm, mlp, scores)
