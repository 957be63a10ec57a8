"""Analytical activation memory: the bytes the forward pass keeps alive for backward.

Two implementations are modelled:
- ``megatron``: Megatron-LM's fused kernels, Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", section 4, Table 2), generalised to GQA and any MLP
  width by keeping each term's tensor;
- ``huggingface``: what transformers' PyTorch modules save, term by term, derived from and tested
  against the exact FakeTensor trace (``planner.trace``; tests/planner/test_activations.py).

Symbols (paper's): s sequence, b micro-batch, h hidden, a heads, t tensor degree, f MLP width,
V vocabulary. All results are bytes per rank for one micro-batch unless named otherwise.
"""

from __future__ import annotations

from planner.activations_hf import (
    hf_backward_working_bytes,
    hf_embedding_bytes,
    hf_head_bytes,
    hf_layer_bytes,
    hf_loss_grad_bytes,
)
from planner.finetune import FinetuneSpec
from planner.model import ModelSpec
from planner.params import layers_per_stage
from planner.training import ParallelPlan, TrainingSpec


def activation_dtype_bytes(training: TrainingSpec) -> int:
    """Activations are kept in the compute dtype; fp8 training (Transformer Engine) keeps bf16
    copies for backward in the general case, so it is counted as bf16."""
    return 4 if training.precision == "fp32" else 2


def megatron_layer_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """One transformer layer, Korthikanti et al. 2022 section 4.1 and Table 2.

    With q = a*d = h, kv = h and f = 4h this is sbh(34 + 5as/h) without parallelism,
    sbh(10 + 24/t + 5as/(ht)) with tensor parallelism and sbh(34 + 5as/h)/t with sequence
    parallelism; selective recompute drops the 5as^2b attention-core term."""
    s = training.seq_len // plan.cp
    b, h, t = plan.micro_batch, m.hidden_size, plan.tp
    e = activation_dtype_bytes(training)  # paper: 2 bytes (16-bit)
    q, kv, f = m.q_width, m.kv_width, m.ffn_hidden_size
    sb = s * b
    # Not split by tensor parallelism unless sequence parallel: two layernorm inputs (2 x 2sbh),
    # the QKV and MLP-in matmul inputs (2 x 2sbh), two 1-byte dropout masks (2 x sbh).
    masks = 2 * h if m.dropout else 0
    replicated = sb * (2 * e * h + 2 * e * h + masks)
    # Split by t: Q, K, V (2sb each), attention output (2sbh), GeLU input and second matmul input
    # (2sbf each); a gated MLP (SwiGLU) keeps both the gate and up outputs (3 x 2sbf).
    mlp_tensors = 3 if m.gated_mlp else 2
    split = sb * e * (2 * q + 2 * kv + mlp_tensors * f) / t
    # Attention core, eager: softmax output 2as^2b, its 1-byte dropout mask as^2b, dropout output 2as^2b.
    if training.attention == "eager" and plan.recompute != "selective":
        per_score = 2 * e + 1 if m.dropout else e
        split += per_score * m.num_heads * s * s * b / t
    elif training.attention == "flash":
        # Flash attention keeps only the fp32 log-sum-exp per row (Dao et al. 2022, Algorithm 2).
        split += 4 * m.num_heads * s * b / t
    if plan.sp:
        replicated /= t
    return replicated + split


def megatron_embedding_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """Embedding dropout mask, sbh bytes (Korthikanti et al. 2022 section 4.3); /t under SP."""
    s = training.seq_len // plan.cp
    mask = s * plan.micro_batch * m.hidden_size if m.dropout else 0
    return mask / plan.tp if plan.sp else mask


def megatron_head_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """Final layernorm input 2sbh (/t under SP), output-projection input 2sbh, and the fp32 logits
    the cross entropy keeps, 4sbV/t: 4sbh/t(1 + V/h) with SP (Korthikanti et al. 2022, section 4.3)."""
    s = training.seq_len // plan.cp
    sbh = s * plan.micro_batch * m.hidden_size
    norm = 2 * sbh / (plan.tp if plan.sp else 1)
    return norm + 2 * sbh / (plan.tp if plan.sp else 1) + 4 * s * plan.micro_batch * m.vocab_size / plan.tp


def megatron_loss_grad_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """Megatron-LM's vocab-parallel cross entropy keeps the fp32 softmax (4sbV/t, in
    megatron_head_bytes) and writes the loss gradient into it in place
    (megatron/core/tensor_parallel/cross_entropy.py, _VocabParallelCrossEntropy.backward:
    ``grad_input = softmax``); what the backward adds is that gradient cast back to the 16-bit
    logits, 2sbV/t (none in fp32)."""
    s = training.seq_len // plan.cp
    if activation_dtype_bytes(training) == 4:
        return 0.0
    return 2 * s * plan.micro_batch * m.vocab_size / plan.tp


def loss_grad_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, stage: int,
                    finetune: FinetuneSpec | None = None) -> int:
    """Bytes the loss's gradient adds to the saved activations at the start of the backward, on the
    last pipeline stage (none elsewhere, and none for MeZO, which has no backward)."""
    if stage != plan.pp - 1 or (finetune is not None and finetune.method == "mezo"):
        return 0
    grad = megatron_loss_grad_bytes if m.implementation == "megatron" else hf_loss_grad_bytes
    return int(grad(m, training, plan))


def backward_working_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, *, head: bool = False) -> int:
    """The working set inside one layer's backward (``head``: the final norm's) beyond the
    activations of the layers before it (planner.activations_hf.hf_backward_working_bytes;
    Megatron-LM's fused kernels: the residual stream's two gradients, and in a layer the MLP's
    three, 2sbh + 3sbf/t in 16-bit)."""
    if m.implementation == "megatron":
        s = training.seq_len // plan.cp
        e = activation_dtype_bytes(training)
        mlp = 0 if head else 3 * m.ffn_hidden_size / plan.tp
        return int(s * plan.micro_batch * e * (2 * m.hidden_size / (plan.tp if plan.sp else 1) + mlp))
    return int(hf_backward_working_bytes(m, training, plan, head=head))


def backward_activation_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, stage: int) -> tuple[int, ...]:
    """Activation bytes of one micro-batch each part of a stage frees as the backward passes it, in
    backward order: the head (last stage), each layer, the embedding (first stage); they sum to
    stage_activation_bytes with one micro-batch in flight. Under full recompute a layer frees its
    checkpointed input, and the one layer rebuilt for the backward is freed last (counted one layer
    high in between)."""
    n_layers = layers_per_stage(m.num_layers, plan.pp)[stage]
    per_layer = layer_bytes(m, training, plan)
    kept = layer_input_bytes(m, training, plan) if plan.recompute == "full" else per_layer
    rebuilt = per_layer if plan.recompute == "full" else 0.0
    embed, head = (megatron_embedding_bytes, megatron_head_bytes) if m.implementation == "megatron" else (hf_embedding_bytes, hf_head_bytes)
    parts = [head(m, training, plan)] if stage == plan.pp - 1 else []
    parts += [kept] * n_layers
    parts.append((embed(m, training, plan) if stage == 0 else 0.0) + rebuilt)
    return tuple(int(p) for p in parts)


def layer_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """Bytes one layer keeps for one micro-batch, before recomputation."""
    if m.implementation == "megatron":
        return megatron_layer_bytes(m, training, plan)
    return hf_layer_bytes(m, training, plan)


def layer_input_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """Full recompute keeps only each layer's input, 2sbh (/t under SP) (Korthikanti et al. 2022, Table 2)."""
    s = training.seq_len // plan.cp
    sbh = s * plan.micro_batch * m.hidden_size * activation_dtype_bytes(training)
    return sbh / plan.tp if plan.sp else sbh


def in_flight_micro_batches(plan: ParallelPlan, stage: int) -> float:
    """Micro-batches whose activations a stage holds at the 1F1B peak: min(pp - stage, m)
    (DeepSpeed ``TrainSchedule.num_pipe_buffers``; Narayanan et al. 2021 section 2.2.1). Interleaving
    with v virtual stages multiplies the first stage's by 1 + (p - 1)/(p v) (Korthikanti et al. 2022,
    section 4.2.3)."""
    if plan.pp == 1:
        return 1.0
    n = min(plan.pp - stage, plan.grad_accum)
    if plan.interleave > 1 and stage == 0:
        return n * (1 + (plan.pp - 1) / (plan.pp * plan.interleave))
    return float(n)


def stage_activation_bytes(
    m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, stage: int, finetune: FinetuneSpec | None = None
) -> int:
    """Peak activation bytes of a rank in pipeline stage ``stage``."""
    if finetune is not None and finetune.method != "full":
        return peft_stage_activation_bytes(m, training, plan, stage, finetune)
    n_layers = layers_per_stage(m.num_layers, plan.pp)[stage]
    per_layer = layer_bytes(m, training, plan)
    if plan.recompute == "full":
        # Checkpointed layer inputs for every layer, plus one layer's activations rebuilt in backward.
        kept = layer_input_bytes(m, training, plan) * n_layers * in_flight_micro_batches(plan, stage)
        total = kept + per_layer
    else:
        total = per_layer * n_layers * in_flight_micro_batches(plan, stage)
    if m.implementation == "megatron":
        embed, head = megatron_embedding_bytes, megatron_head_bytes
    else:
        embed, head = hf_embedding_bytes, hf_head_bytes
    if stage == 0:
        total += embed(m, training, plan) * in_flight_micro_batches(plan, stage)
    if stage == plan.pp - 1:
        total += head(m, training, plan)
    return int(total)


def peft_stage_activation_bytes(
    m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, stage: int, ft: FinetuneSpec
) -> int:
    """Activations of a parameter-efficient method or MeZO (planner.activations_peft)."""
    from planner.activations_peft import dequant_buffer_bytes, mezo_peak_bytes, peft_layer_bytes, peft_model_bytes

    last = stage == plan.pp - 1
    if ft.method == "mezo":
        return int(mezo_peak_bytes(m, training, plan, last_stage=last))
    n_layers = layers_per_stage(m.num_layers, plan.pp)[stage]
    in_flight = in_flight_micro_batches(plan, stage)
    first_layer, layer = peft_layer_bytes(m, training, plan, ft)
    if plan.recompute == "full":
        total = layer_input_bytes(m, training, plan) * n_layers * in_flight + layer
    elif stage == 0:
        total = (first_layer + (n_layers - 1) * layer) * in_flight
    else:
        total = n_layers * layer * in_flight
    first, head = peft_model_bytes(m, training, plan, ft)
    if stage == 0:
        total += first * in_flight
    if last:
        total += head
    if ft.method == "qlora":
        total += dequant_buffer_bytes(m, training, plan)
    return int(total)
