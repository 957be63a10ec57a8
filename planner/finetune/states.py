"""Model states of fine-tuning methods: frozen base weights, trainable parameters with their
gradients and optimizer states (symbols as in planner.memory.model_states)."""

from __future__ import annotations

from planner.finetune.methods import FinetuneSpec, quantized_bytes_per_param, trainable_params
from planner.structure.model import ModelSpec
from dataclasses import replace

from planner.memory.model_states import MASTER_BYTES, OPTIMIZER_STATE_BYTES, Backward, StateBytes
from planner.structure.params import layers_per_stage, stage_layers, stage_params
from planner.specs.training import ParallelPlan, TrainingSpec
from planner.memory.zero_buffers import ZeroBuffers


def quantized_elements(m: ModelSpec, layer: int) -> int:
    """Elements of layer ``layer`` that bitsandbytes stores in 4 bits: the weights of its nn.Linear /
    Conv1D modules, routers included (transformers ``replace_with_bnb_linear`` converts every one but
    the output embedding); fused 3-D expert tensors, norms and biases stay in 16 bits."""
    return sum(x.in_features * x.out_features for x in m.layout.kind(layer).linears if not x.experts)


def _stage_base_bytes(m: ModelSpec, ft: FinetuneSpec, training: TrainingSpec, plan: ParallelPlan, stage: int) -> tuple[float, int]:
    """(bytes, elements) of the frozen base of one pipeline stage and tensor rank, unpartitioned."""
    sp = stage_params(m, tp=plan.tp, pp=plan.pp, ep=plan.ep, stage=stage)
    elem = 4 if training.precision == "fp32" else 2
    if ft.method == "qlora":
        quantized = sum(quantized_elements(m, i) for i in stage_layers(m.num_layers, plan.pp, stage)) / plan.tp
        rest = 4 if ft.upcast_fp32 else elem
        return quantized * quantized_bytes_per_param(ft) + (sp.total - quantized) * rest, sp.total
    return sp.total * elem, sp.total


def frozen_base_bytes(m: ModelSpec, ft: FinetuneSpec, training: TrainingSpec, plan: ParallelPlan, stage: int) -> int:
    """The frozen base weights of a rank: 16-bit (fp32 when training in fp32), or for QLoRA the
    4-bit linears with their constants and every other parameter in fp32 (peft's
    prepare_model_for_kbit_training; 16-bit with ``upcast_fp32=False``); ZeRO-3 partitions them over dp."""
    base, _ = _stage_base_bytes(m, ft, training, plan, stage)
    return int(base / plan.dp) if plan.zero_stage == 3 else int(base)


def gathered_base_bytes(m: ModelSpec, ft: FinetuneSpec, training: TrainingSpec, plan: ParallelPlan, stage: int,
                        buffers: ZeroBuffers | None) -> int:
    """ZeRO-3 gathers frozen parameters like trainable ones (zero/partition_parameters.py partitions
    every parameter of the module, requires_grad or not): the working set alive is bounded as for
    full training (planner.memory.model_states._stage3: max_reuse_distance / 2 plus the prefetch
    bucket, in elements), at the stage's mean bytes per base element."""
    if plan.zero_stage != 3 or buffers is None:
        return 0
    base, elements = _stage_base_bytes(m, ft, training, plan, stage)
    if elements == 0:
        return 0
    gathered = min(elements, buffers.stage3_max_reuse_distance // 2 + buffers.stage3_prefetch_bucket_size)
    return int(base / elements * gathered)


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
    host = 0
    if plan.offload == "optimizer+params":  # offload_param: the partition lives in host memory
        host, base = base, 0
    base += gathered_base_bytes(m, ft, training, plan, stage, buffers)
    if ft.method == "mezo":
        return StateBytes(parameters=base, gradients=0, optimizer=0, host=host)
    n = trainable_on_rank(m, ft, plan, stage)
    ab, z, dp = ft.adapter_bytes, plan.zero_stage, plan.dp
    k = OPTIMIZER_STATE_BYTES[training.optimizer]
    params = n * ab // (dp if z == 3 else 1)
    grads = n * ab // (dp if z >= 2 else 1)
    # Every ZeRO stage keeps an fp32 partition of the trainable parameters beside the model's own
    # copy, even when they are fp32 already (stage_1_and_2.py single_partition_of_fp32_groups,
    # stage3.py fp32_partitioned_groups_flat): MASTER_BYTES more per element (measured on 2 CPU
    # ranks: LoRA under ZeRO-2, 12 bytes per trainable parameter with AdamW, not 8).
    optimizer = int(n * (k + (MASTER_BYTES if z >= 1 else 0))) // (dp if z >= 1 else 1)
    backward = None
    if buffers is not None and z >= 1:
        # The reduce bucket is allocated at the first gradient's hook and released at the end of
        # the backward (stage_1_and_2.py independent_gradient_partition_epilogue: _release_ipg_buffers),
        # so it is not alive at the loss or the step (measured: LoRA, ZeRO-2, 2 CPU ranks).
        bucket = buffers.reduce_bucket_size * ab
        # The head is frozen under every method: the first trainable gradient comes from a layer
        # (prompt tuning's from the embedding, the last part: then the bucket is the end's only).
        first = "embedding" if ft.method == "prompt" else "layer"
        backward = Backward(bucket=bucket, end=bucket + grads, first_part=first) if z < 3 else None
        if z == 3:
            grads += bucket  # stage 3 keeps its bucket from init (stage3.py)
    if ft.paged_optimizer:
        # Paged optimizers live in unified memory and page out to host RAM under pressure
        # (Dettmers et al. 2023, section 3): the GPU need not hold them.
        host, optimizer = optimizer, 0
    if plan.offload != "none":
        host += optimizer
        optimizer = 0
    if backward is not None:
        state = StateBytes(parameters=base + params, gradients=backward.end, optimizer=optimizer, host=host,
                           step_gradients=grads, backward=backward)
        return state if plan.grad_accum == 1 else replace(state, backward=None)
    return StateBytes(parameters=base + params, gradients=grads, optimizer=optimizer, host=host)
