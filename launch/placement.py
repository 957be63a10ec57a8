"""Plan -> Ray Train worker group, and the pre-flight check of the GPUs a cluster really has (pure:
no ray, no pynvml; the Ray module feeds it what each node's NVML reported).

Placement: one worker per rank. Ray Train assigns world ranks node by node (workers sorted by
node, ray/train/v2/_internal/execution/worker_group/worker_group.py), and the PACK strategy fills
a node before the next, so with ``gpus_per_node`` a multiple of tp, every tensor-parallel group
(consecutive ranks, as DeepSpeed AutoTP groups them) lies inside one node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from planner.errors import PlanInputError
from planner.specs.hardware import ClusterSpec
from planner.specs.training import ParallelPlan


@dataclass(frozen=True)
class Workers:
    """The Ray Train worker group of a plan."""

    num_workers: int
    use_gpu: bool
    backend: Literal["gloo", "nccl"]
    cpus_per_worker: int = 1
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    gpu_name: str = ""  # catalog name of the GPU the plan is for ('h100-80gb'); '' on CPU clusters
    gpu_memory_bytes: int = 0  # the catalog's memory of that GPU
    planned_bytes_per_gpu: int = 0  # the plan's peak on its most loaded rank


def workers_for(plan: ParallelPlan, cluster: ClusterSpec, planned_bytes_per_gpu: int) -> Workers:
    if plan.tp > 1 and cluster.gpus_per_node % plan.tp:
        raise PlanInputError(f"tp {plan.tp} does not divide the {cluster.gpus_per_node} GPUs per node of '{cluster.name}'",
                             "pin a --tp that divides the GPUs per node, so each tensor-parallel group stays in one node")
    gpu = cluster.backend == "nccl"
    return Workers(
        num_workers=plan.world_size, use_gpu=gpu, backend=cluster.backend,
        gpu_name=cluster.gpu.name if gpu else "", gpu_memory_bytes=cluster.gpu.memory_bytes if gpu else 0,
        planned_bytes_per_gpu=planned_bytes_per_gpu,
    )


@dataclass(frozen=True)
class NodeGpu:
    """One GPU of one node, as NVML reported it."""

    node: str
    name: str  # NVML's product name, e.g. 'NVIDIA H100 80GB HBM3'
    memory_total_bytes: int
    memory_free_bytes: int


def model_key(catalog_name: str) -> str:
    """'h100-80gb' -> 'h100'; the family the NVML product name must contain."""
    return catalog_name.split("-", 1)[0].lower()


def matches(catalog_name: str, catalog_bytes: int, gpu: NodeGpu) -> bool:
    """NVML's name holds the catalog's model ('H100' in 'NVIDIA H100 80GB HBM3', 'A6000' in
    'NVIDIA RTX A6000') and its memory is within 10% of the catalog's (40 GB vs 80 GB A100)."""
    key = re.sub(r"[^a-z0-9]", "", model_key(catalog_name))
    name = re.sub(r"[^a-z0-9]", "", gpu.name.lower())
    return key in name and abs(gpu.memory_total_bytes - catalog_bytes) <= 0.10 * catalog_bytes


def check_gpus(workers: Workers, gpus: list[NodeGpu], where: str) -> None:
    """Refuse, before any worker starts, a cluster whose GPUs are not those of the plan, too few,
    or without the free memory the plan needs on its most loaded rank."""
    if not workers.use_gpu:
        return
    if not gpus:
        raise PlanInputError(f"the plan needs {workers.num_workers} {workers.gpu_name} GPUs but NVML sees no GPU on {where}",
                             "check the NVIDIA driver on the nodes, or plan for a CPU cluster (e.g. --cluster cpu-2)")
    right = [g for g in gpus if matches(workers.gpu_name, workers.gpu_memory_bytes, g)]
    if len(right) < workers.num_workers:
        seen = sorted({f"{g.name} ({g.memory_total_bytes / 2**30:.0f} GiB)" for g in gpus})
        raise PlanInputError(
            f"the plan is for {workers.num_workers} x {workers.gpu_name} but {where} has {len(right)} of them "
            f"(it has: {', '.join(seen)})",
            "plan with the cluster file of the GPUs you have (--cluster), or launch on the cluster the plan is for",
        )
    roomy = sorted((g for g in right if g.memory_free_bytes >= workers.planned_bytes_per_gpu),
                   key=lambda g: g.memory_free_bytes, reverse=True)
    if len(roomy) < workers.num_workers:
        tight = min(right, key=lambda g: g.memory_free_bytes)
        raise PlanInputError(
            f"the plan needs {workers.planned_bytes_per_gpu / 2**30:.1f} GiB free per GPU but only {len(roomy)} of "
            f"{workers.num_workers} GPUs on {where} have it (GPU on node {tight.node}: "
            f"{tight.memory_free_bytes / 2**30:.1f} GiB free)",
            "free the GPUs (another process holds memory), or plan with a higher --zero or a smaller --micro-batch",
        )
