"""Plan -> DeepSpeed configuration dict (a pure translator; DeepSpeed itself is not imported).

The ZeRO bucket sizes written here are ``planner.memory.zero_buffers.ZeroBuffers``, the very values the
memory model counted. Keys follow DeepSpeed 0.19's config schema (deepspeed/runtime/config.py,
deepspeed/runtime/zero/config.py).
"""

from __future__ import annotations

from typing import Any

from planner.finetune.methods import FinetuneSpec
from planner.specs.training import ParallelPlan, TrainingSpec
from planner.memory.zero_buffers import ZeroBuffers

# Optimizer names as DeepSpeed's config understands them: its own (Adam, AdamW, Lion) or, failing
# that, any torch.optim class by name (engine._configure_basic_optimizer).
_DS_OPTIMIZER = {
    "adamw": ("AdamW", {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}),
    "adam": ("Adam", {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}),
    "lion": ("Lion", {"betas": [0.9, 0.99], "weight_decay": 0.1}),
    "sgd": ("SGD", {"momentum": 0.0}),
    "sgd-momentum": ("SGD", {"momentum": 0.9}),
    "adafactor": ("Adafactor", {}),
}


def _zero_section(plan: ParallelPlan, buffers: ZeroBuffers) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": plan.zero_stage}
    if plan.zero_stage == 0:
        return zero
    zero.update(
        reduce_bucket_size=buffers.reduce_bucket_size,
        allgather_bucket_size=buffers.allgather_bucket_size,
        overlap_comm=buffers.overlap_comm if plan.zero_stage < 3 else True,
        contiguous_gradients=buffers.contiguous_gradients,
        reduce_scatter=True,
    )
    if plan.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=buffers.stage3_prefetch_bucket_size,
            stage3_max_live_parameters=buffers.stage3_max_live_parameters,
            stage3_max_reuse_distance=buffers.stage3_max_reuse_distance,
            stage3_param_persistence_threshold=buffers.stage3_param_persistence_threshold,
            sub_group_size=buffers.sub_group_size,
        )
    if plan.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if plan.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def deepspeed_config(
    plan: ParallelPlan,
    training: TrainingSpec,
    *,
    buffers: ZeroBuffers | None = None,
    lr: float = 3e-4,
    gradient_clipping: float = 1.0,
    finetune: FinetuneSpec | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config of a plan. ``train_batch_size`` counts data-parallel ranks only
    (DeepSpeed divides the world by tensor and pipeline degrees through its mpu/topology).

    A parameter-efficient method trains with DeepSpeed's mixed precision off: the model carries
    its own dtypes, as peft builds it (a 16-bit or 4-bit frozen base, fp32 adapters by
    ``autocast_adapter_dtype``, QLoRA's fp32 upcast), which DeepSpeed's bf16/fp16 mode would cast
    down wholesale (deepspeed/runtime/engine.py ``_configure_distributed_model``). The trainable
    parameters then step in their own dtype with no fp32 master copy, as the planner counts them
    (planner.finetune.states)."""
    buffers = buffers or ZeroBuffers()
    peft = finetune is not None and finetune.method != "full"
    cfg: dict[str, Any] = {
        "train_batch_size": plan.micro_batch * plan.grad_accum * plan.dp,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": gradient_clipping,
        "bf16": {"enabled": training.precision in ("bf16", "fp8") and not peft},
        "fp16": {"enabled": training.precision == "fp16" and not peft, "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": _zero_section(plan, buffers),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    paged = finetune is not None and finetune.paged_optimizer
    if training.optimizer in _DS_OPTIMIZER and not paged:
        name, params = _DS_OPTIMIZER[training.optimizer]
        cfg["optimizer"] = {"type": name, "params": {"lr": lr, **params}}
    else:
        # adamw-8bit and paged optimizers (bitsandbytes) are passed by the training loop as client
        # optimizers (launch/trainer.py); ZeRO accepts one it has not tested only when told to.
        cfg["zero_allow_untested_optimizer"] = True
    if plan.offload != "none":
        cfg["zero_force_ds_cpu_optimizer"] = True
    if plan.tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": plan.tp}
    if plan.pp > 1:
        cfg["pipeline"] = {
            "stages": plan.pp,
            "partition": "parameters",
            "activation_checkpoint_interval": 1 if plan.recompute == "full" else 0,
        }
    if plan.recompute == "full":
        cfg["activation_checkpointing"] = {
            "partition_activations": False,
            "contiguous_memory_optimization": False,
            "cpu_checkpointing": False,
            "synchronize_checkpoint_boundary": False,
        }
    return cfg
