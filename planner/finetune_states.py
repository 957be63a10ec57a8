"""Model states of fine-tuning methods: frozen base weights, trainable parameters with their
gradients and optimizer states (symbols as in planner.model_states)."""

from __future__ import annotations

from planner.finetune import FinetuneSpec, quantized_bytes_per_param, trainable_params
from planner.model import ModelSpec
from planner.model_states import OPTIMIZER_STATE_BYTES, StateBytes
from planner.params import layer_tensors, layers_per_stage, stage_params
from planner.training import ParallelPlan, TrainingSpec
from planner.zero_buffers import ZeroBuffers


def _quantized_share(m: ModelSpec) -> float:
    """Fraction of a layer's parameters in linear weights (what bitsandbytes quantises: every
    nn.Linear of the blocks; embeddings, norms, biases and lm_head stay 16-bit)."""
    tensors = layer_tensors(m)
    linear = sum(t.numel for t in tensors if t.name.endswith(".weight") and t.cols > 1 and not t.name.startswith("router"))
    return linear / sum(t.numel for t in tensors)


def frozen_base_bytes(m: ModelSpec, ft: FinetuneSpec, training: TrainingSpec, plan: ParallelPlan, stage: int) -> int:
    """The frozen base weights of a rank: 16-bit (fp32 when training in fp32), or 4-bit plus
    constants for QLoRA's quantised linear layers; ZeRO-3 partitions them over dp."""
    sp = stage_params(m, tp=plan.tp, pp=plan.pp, ep=plan.ep, stage=stage)
    elem = 4 if training.precision == "fp32" else 2
    if ft.method == "qlora":
        n_layers = layers_per_stage(m.num_layers, plan.pp)[stage]
        layer_total = sum(t.numel for t in layer_tensors(m)) * n_layers / plan.tp
        quantized = layer_total * _quantized_share(m)
        base = quantized * quantized_bytes_per_param(ft) + (sp.total - quantized) * elem
    else:
        base = sp.total * elem
    return int(base / plan.dp) if plan.zero_stage == 3 else int(base)


def trainable_on_rank(m: ModelSpec, ft: FinetuneSpec, plan: ParallelPlan, stage: int) -> int:
    """Trainable parameters of a rank: the method's count spread over layers (pipeline stages by
    their layer share) and tensor ranks. Prompt tuning's embedding sits on the first stage."""
    total = trainable_params(m, ft)
    if ft.method == "prompt":
        return total if stage == 0 else 0
    share = layers_per_stage(m.num_layers, plan.pp)[stage] / m.num_layers
    return int(total * share / plan.tp)


def finetune_states(
    m: ModelSpec, ft: FinetuneSpec, training: TrainingSpec, plan: ParallelPlan, stage: int, buffers: ZeroBuffers | None
) -> StateBytes:
    """Parameters = frozen base + trainable; gradients and optimizer states for the trainable part
    only, in the adapters' dtype (fp32 by default in peft), sharded by ZeRO like any parameters.
    MeZO (Malladi et al. 2023) keeps no gradients and no optimizer state: it perturbs the weights in
    place from a random seed and steps with a stateless SGD."""
    base = frozen_base_bytes(m, ft, training, plan, stage)
    if ft.method == "mezo":
        return StateBytes(parameters=base, gradients=0, optimizer=0)
    n = trainable_on_rank(m, ft, plan, stage)
    ab, z, dp = ft.adapter_bytes, plan.zero_stage, plan.dp
    k = OPTIMIZER_STATE_BYTES[training.optimizer]
    params = n * ab // (dp if z == 3 else 1)
    grads = n * ab // (dp if z >= 2 else 1)
    optimizer = int(n * k) // (dp if z >= 1 else 1)
    if buffers is not None and z >= 1:
        grads += buffers.reduce_bucket_size * ab  # DeepSpeed allocates the whole bucket
    host = 0
    if ft.paged_optimizer:
        # Paged optimizers live in unified memory and page out to host RAM under pressure
        # (Dettmers et al. 2023, section 3): the GPU need not hold them.
        host, optimizer = optimizer, 0
    if plan.offload != "none":
        host += optimizer
        optimizer = 0
    return StateBytes(parameters=base + params, gradients=grads, optimizer=optimizer, host=host)
