"""The pure pre-flight of a GPU cluster: NVML's inventory (as the nodes report it) against the
plan's GPU type, count and free memory; and the tp-inside-a-node rule of the worker group."""

from __future__ import annotations

import pytest

from launch.placement import NodeGpu, Workers, check_gpus, matches, workers_for
from planner.errors import PlanInputError
from planner.specs.hardware import dgx_cluster, gpu_by_name
from planner.specs.training import ParallelPlan

GiB = 2**30
H100 = gpu_by_name("h100-80gb")
# Product names as nvidia-smi / NVML print them.
NVML_H100 = ("NVIDIA H100 80GB HBM3", 85_520_809_984)
NVML_A100_40 = ("NVIDIA A100-SXM4-40GB", 42_505_273_344)
NVML_A100_80 = ("NVIDIA A100-SXM4-80GB", 85_198_045_184)


def gpus(n: int, name_total: tuple[str, int], free: int, nodes: int = 1) -> list[NodeGpu]:
    return [NodeGpu(node=f"n{i % nodes}", name=name_total[0], memory_total_bytes=name_total[1], memory_free_bytes=free)
            for i in range(n)]


def workers(n: int = 8, planned: int = 60 * GiB, gpu: str = "h100-80gb") -> Workers:
    return Workers(num_workers=n, use_gpu=True, backend="nccl", gpu_name=gpu,
                   gpu_memory_bytes=gpu_by_name(gpu).memory_bytes, planned_bytes_per_gpu=planned)


def test_the_right_gpus_with_room_pass() -> None:
    check_gpus(workers(), gpus(16, NVML_H100, free=79 * GiB, nodes=2), "cluster")


@pytest.mark.parametrize("catalog, nvml, ok", [
    ("h100-80gb", NVML_H100, True),
    ("a100-80gb", NVML_A100_80, True),
    ("a100-80gb", NVML_A100_40, False),  # same family, half the memory
    ("a100-40gb", NVML_A100_40, True),
    ("h100-80gb", NVML_A100_80, False),
    ("a6000-48gb", ("NVIDIA RTX A6000", 51_041_271_808), True),
    ("rtx4090-24gb", ("NVIDIA GeForce RTX 4090", 25_393_692_672), True),
])
def test_catalog_names_match_nvml_product_names(catalog: str, nvml: tuple[str, int], ok: bool) -> None:
    gpu = NodeGpu(node="n0", name=nvml[0], memory_total_bytes=nvml[1], memory_free_bytes=nvml[1])
    assert matches(catalog, gpu_by_name(catalog).memory_bytes, gpu) is ok


def test_wrong_type_is_refused_naming_what_is_there() -> None:
    with pytest.raises(PlanInputError, match=r"8 x h100-80gb but cluster has 0 of them \(it has: NVIDIA A100-SXM4-80GB"):
        check_gpus(workers(), gpus(8, NVML_A100_80, free=80 * GiB), "cluster")


def test_too_few_gpus_is_refused() -> None:
    with pytest.raises(PlanInputError, match="has 4 of them"):
        check_gpus(workers(), gpus(4, NVML_H100, free=79 * GiB), "cluster")


def test_gpus_held_by_another_process_are_refused() -> None:
    busy = gpus(8, NVML_H100, free=79 * GiB)
    busy[3] = NodeGpu(node="n0", name=NVML_H100[0], memory_total_bytes=NVML_H100[1], memory_free_bytes=20 * GiB)
    with pytest.raises(PlanInputError, match=r"needs 60.0 GiB free per GPU but only 7 of 8 .* 20.0 GiB free"):
        check_gpus(workers(), busy, "cluster")


def test_no_driver_is_refused_and_cpu_clusters_are_not_checked() -> None:
    with pytest.raises(PlanInputError, match="NVML sees no GPU"):
        check_gpus(workers(), [], "cluster")
    check_gpus(Workers(num_workers=2, use_gpu=False, backend="gloo"), [], "cluster")


def test_tensor_parallel_groups_stay_inside_a_node() -> None:
    cluster = dgx_cluster(H100, 16, gpus_per_node=8)
    w = workers_for(ParallelPlan(dp=2, tp=8, pp=1, zero_stage=1, micro_batch=1), cluster, 10 * GiB)
    assert (w.num_workers, w.use_gpu, w.backend, w.placement_strategy) == (16, True, "nccl", "PACK")
    odd = dgx_cluster(H100, 12, gpus_per_node=6)
    with pytest.raises(PlanInputError, match="tp 4 does not divide the 6 GPUs per node"):
        workers_for(ParallelPlan(dp=3, tp=4, pp=1, zero_stage=1, micro_batch=1), odd, 10 * GiB)
