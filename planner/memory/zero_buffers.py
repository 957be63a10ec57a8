"""DeepSpeed ZeRO communication buffers: the one source of the bucket sizes that the memory
model counts and that ``launch.deepspeed_config`` writes into the DeepSpeed config.

Defaults are DeepSpeed 0.19's own (deepspeed/runtime/zero/config.py), counted in elements.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ZeroBuffers(BaseModel):
    """ZeRO bucket and prefetch sizes, in elements (DeepSpeed's unit for these keys)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reduce_bucket_size: int = Field(
        default=500_000_000, gt=0, description="Gradient reduce bucket, elements (zero_optimization.reduce_bucket_size)."
    )
    allgather_bucket_size: int = Field(
        default=500_000_000, gt=0, description="Stage 1/2 parameter all-gather bucket, elements."
    )
    stage3_prefetch_bucket_size: int = Field(
        default=50_000_000, gt=0, description="Stage 3 parameters fetched ahead of use, elements."
    )
    stage3_max_live_parameters: int = Field(
        default=1_000_000_000, gt=0, description="Stage 3 cap on gathered parameters alive at once, elements."
    )
    stage3_max_reuse_distance: int = Field(
        default=1_000_000_000, gt=0, description="Stage 3 keeps a gathered parameter reused within this many elements, elements."
    )
    stage3_param_persistence_threshold: int = Field(
        default=100_000, ge=0, description="Stage 3 parameters smaller than this stay whole on every rank, elements."
    )
    sub_group_size: int = Field(
        default=1_000_000_000, gt=0, description="Stage 3 optimizer sub-group (fp32 gradient staging), elements."
    )
    overlap_comm: bool = Field(
        default=False, description="Stage 1/2: overlap reduction with backward (two ipg buckets). Stage 3 always overlaps."
    )
    contiguous_gradients: bool = Field(default=True, description="Copy gradients into one contiguous partition buffer.")


def plan_buffers(stage_params_max: int, base: ZeroBuffers | None = None) -> ZeroBuffers:
    """The buffers a plan uses. DeepSpeed allocates the whole reduce bucket whatever the model's
    size (stage_1_and_2.py setup_buckets, stage3.py: torch.empty(reduce_bucket_size)), so a bucket
    larger than the rank's parameters is pure waste: cap both buckets at the parameters of the
    rank's largest pipeline stage. The memory model counts these values and the DeepSpeed config
    writes them."""
    base = base or ZeroBuffers()
    cap = max(1, stage_params_max)
    return base.model_copy(update={
        "reduce_bucket_size": min(base.reduce_bucket_size, cap),
        "allgather_bucket_size": min(base.allgather_bucket_size, cap),
    })
