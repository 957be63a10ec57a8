"""TrainingSpec (what is trained and how) and ParallelPlan (how it is spread over GPUs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from planner.errors import PlanInputError
from planner.specs.hardware import Precision

Optimizer = Literal["adamw", "adam", "sgd", "sgd-momentum", "adafactor", "lion", "adamw-8bit"]
Attention = Literal["flash", "eager"]
Recompute = Literal["none", "selective", "full"]
Offload = Literal["none", "optimizer", "optimizer+params"]


class TrainingSpec(BaseModel):
    """The training job, independent of how it is parallelised."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seq_len: int = Field(default=2048, gt=0, description="Tokens per sequence, s.")
    global_batch: int = Field(default=0, ge=0, description="Sequences per optimizer step; 0 = micro_batch x dp.")
    precision: Precision = Field(default="bf16", description="Training precision (mixed with fp32 master weights).")
    optimizer: Optimizer = Field(default="adamw", description="Optimizer, which sets the state bytes per parameter.")
    attention: Attention = Field(default="flash", description="flash: fused kernel (no s x s scores kept); eager: scores kept.")
    fused_ops: bool = Field(
        default=False,
        description="The layers' non-matmul ops (norms, activations, rotary, residual adds) run fused, a few "
        "kernels per layer instead of one per op: under torch.compile (TorchInductor generates the fused "
        "kernels) or with hand-fused kernels (flash-attn's fused layernorm / rotary / SwiGLU). Megatron's "
        "kernels are always fused. orch's own DeepSpeed launch runs transformers' modules eagerly (False); "
        "set it to plan a published run that states it.",
    )


class ParallelPlan(BaseModel):
    """One way to run a TrainingSpec on a cluster. Degrees multiply to the GPU count: dp*tp*pp*cp."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dp: int = Field(default=1, gt=0, description="Data-parallel degree (ZeRO shards over it).")
    tp: int = Field(default=1, gt=0, description="Tensor-parallel degree (inside a node).")
    pp: int = Field(default=1, gt=0, description="Pipeline stages.")
    cp: int = Field(default=1, gt=0, description="Context-parallel degree: the sequence split over ranks.")
    ep: int = Field(default=1, gt=0, description="Expert-parallel degree (MoE): experts split over dp ranks.")
    sp: bool = Field(default=False, description="Megatron sequence parallelism in the non-tensor-parallel regions.")
    interleave: int = Field(default=1, gt=0, description="Virtual pipeline stages per rank, v (interleaved 1F1B).")
    zero_stage: Literal[0, 1, 2, 3] = Field(default=0, description="DeepSpeed ZeRO stage.")
    offload: Offload = Field(default="none", description="What ZeRO moves to host memory.")
    micro_batch: int = Field(default=1, gt=0, description="Sequences per micro-batch per data-parallel rank, b.")
    grad_accum: int = Field(default=1, gt=0, description="Micro-batches per optimizer step per rank (pipeline: m).")
    recompute: Recompute = Field(default="none", description="Activation recomputation.")

    @model_validator(mode="after")
    def _check(self) -> ParallelPlan:
        if self.offload != "none" and self.zero_stage == 0:
            raise PlanInputError("--offload needs ZeRO (stage 0 given)", "use --zero 1, 2 or 3 with offload")
        if self.offload == "optimizer+params" and self.zero_stage != 3:
            raise PlanInputError(
                f"--offload optimizer+params needs ZeRO stage 3 (stage {self.zero_stage} given)",
                "use --zero 3 or --offload optimizer",
            )
        if self.sp and self.tp == 1:
            raise PlanInputError("--sp needs tensor parallelism (tp=1 given)", "set --tp 2 or more, or drop --sp")
        if self.interleave > 1 and self.pp == 1:
            raise PlanInputError("--interleave needs pipeline parallelism (pp=1 given)", "set --pp 2 or more")
        if self.dp % self.ep:
            raise PlanInputError(
                f"--ep={self.ep} does not divide dp={self.dp}", "choose an expert degree that divides dp"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def describe(self) -> str:
        parts = [f"dp{self.dp}", f"tp{self.tp}", f"pp{self.pp}"]
        parts += [f"cp{self.cp}"] if self.cp > 1 else []
        parts += [f"ep{self.ep}"] if self.ep > 1 else []
        parts += ["sp"] if self.sp else []
        parts += [f"v{self.interleave}"] if self.interleave > 1 else []
        parts += [f"zero{self.zero_stage}", f"mb{self.micro_batch}", f"ga{self.grad_accum}"]
        parts += [f"recompute-{self.recompute}"] if self.recompute != "none" else []
        parts += [f"offload-{self.offload}"] if self.offload != "none" else []
        return " ".join(parts)
