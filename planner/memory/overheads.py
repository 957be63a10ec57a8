"""Per-GPU memory that is neither model state nor activation: runtime context, communicator
buffers, allocator fragmentation. Each constant is named, sourced and overridable (``orch
calibrate`` fits them to measurements).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from planner.units import MiB


class Overheads(BaseModel):
    """Overhead constants, bytes (or a fraction where named so)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cuda_context_bytes: int = Field(
        default=512 * MiB,
        ge=0,
        description=(
            "CUDA context + loaded kernels of torch on first use. PyTorch's CUDA semantics notes put the "
            "context at 300-500+ MiB depending on the GPU; with lazy module loading (CUDA >= 11.7) "
            "H100 runs measure about 500 MiB of torch.cuda.mem_get_info not seen by the allocator."
        ),
    )
    cublas_workspace_bytes: int = Field(
        default=32 * MiB,
        ge=0,
        description="cuBLAS workspace per handle on Hopper (CUBLAS_WORKSPACE_CONFIG default :4096:8 = 32 MiB).",
    )
    nccl_bytes_per_group: int = Field(
        default=8 * 4 * MiB * 2,
        ge=0,
        description=(
            "Device buffers of one NCCL communicator: NCCL_BUFFSIZE (4 MiB default, NCCL env docs) per "
            "channel and direction; 8 channels assumed."
        ),
    )
    fragmentation_ratio: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        description="Caching-allocator fragmentation margin, as a fraction of allocated bytes.",
    )


def process_groups(*, dp: int, tp: int, pp: int, cp: int, ep: int) -> int:
    """NCCL communicators a rank joins: the world, plus one per parallel dimension of degree > 1
    (Megatron-LM parallel_state creates data, tensor, pipeline, context, expert groups; pipeline
    point-to-point adds one group per neighbour)."""
    groups = 1
    groups += int(dp > 1) + int(tp > 1) + int(cp > 1) + int(ep > 1)
    groups += 2 * int(pp > 1)
    return groups


def overhead_bytes(o: Overheads, *, allocated_bytes: int, num_groups: int, is_gpu: bool) -> int:
    """Runtime overhead of one rank. A CPU worker has no CUDA context or NCCL buffers; its allocator
    (glibc malloc) fragmentation is still counted."""
    runtime = o.cuda_context_bytes + o.cublas_workspace_bytes + num_groups * o.nccl_bytes_per_group if is_gpu else 0
    return runtime + int(o.fragmentation_ratio * allocated_bytes)
