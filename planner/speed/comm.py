"""Alpha-beta cost model of collectives (Hockney 1994; Thakur, Rabenseifner & Gropp 2005).

A message of n bytes on a link costs alpha + n/beta. NCCL runs rings and (double binary) trees;
both move the same bytes per rank asymptotically, so the bandwidth term is the ring's and the
latency term the cheaper of ring (n-1 steps) and tree (log2 n steps). Which link a group crosses
follows the rank order of Megatron-LM's parallel_state: tensor fastest, then context, data,
pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.specs.hardware import ClusterSpec
from planner.specs.training import ParallelPlan

# Bus bandwidth NCCL reaches as a fraction of a link's nominal rate at large messages:
# NVLink/NVSwitch ~0.77 (nccl-tests all_reduce_perf busbw ~230 GB/s on A100's 300 GB/s per
# direction); InfiniBand ~0.9 (busbw ~180 GB/s per DGX A100 node on 8 x 25 GB/s HDR ports).
# Model constants; `orch calibrate` may refit them.
INTRA_NODE_BUS_EFFICIENCY = 0.77
INTER_NODE_BUS_EFFICIENCY = 0.9


@dataclass(frozen=True)
class Link:
    bandwidth_bytes_per_s: float
    latency_s: float


def link_for(cluster: ClusterSpec, *, stride: int, size: int) -> Link:
    """The slowest link a group of ``size`` ranks, ``stride`` apart, crosses."""
    inside = stride * size <= cluster.gpus_per_node
    if inside:
        return Link(cluster.intra_node_GB_per_s * 1e9 * INTRA_NODE_BUS_EFFICIENCY, cluster.intra_node_latency_us * 1e-6)
    return Link(cluster.inter_node_GB_per_s * 1e9 * INTER_NODE_BUS_EFFICIENCY, cluster.inter_node_latency_us * 1e-6)


def _latency_steps(n: int, steps_ring: int) -> float:
    return min(steps_ring, 2 * math.ceil(math.log2(n)))


def all_reduce_s(nbytes: float, n: int, link: Link) -> float:
    """Ring all-reduce: 2(n-1)/n of the bytes cross every link (reduce-scatter + all-gather)."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / link.bandwidth_bytes_per_s + _latency_steps(n, 2 * (n - 1)) * link.latency_s


def reduce_scatter_s(nbytes: float, n: int, link: Link) -> float:
    """Reduce-scatter (or all-gather) of ``nbytes`` in total: (n-1)/n of the bytes per link."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / link.bandwidth_bytes_per_s + _latency_steps(n, n - 1) * link.latency_s


all_gather_s = reduce_scatter_s


def all_to_all_s(nbytes: float, n: int, link: Link) -> float:
    """All-to-all: each rank sends (n-1)/n of its bytes to the others."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / link.bandwidth_bytes_per_s + (n - 1) * link.latency_s


def p2p_s(nbytes: float, link: Link) -> float:
    return nbytes / link.bandwidth_bytes_per_s + link.latency_s


@dataclass(frozen=True)
class GroupLinks:
    tp: Link
    cp: Link
    dp: Link
    ep: Link
    pp: Link


def group_links(cluster: ClusterSpec, plan: ParallelPlan) -> GroupLinks:
    """Links of each parallel group under Megatron's order tp < cp < dp < pp."""
    tp, cp, dp = plan.tp, plan.cp, plan.dp
    return GroupLinks(
        tp=link_for(cluster, stride=1, size=tp),
        cp=link_for(cluster, stride=tp, size=cp),
        dp=link_for(cluster, stride=tp * cp, size=dp),
        ep=link_for(cluster, stride=tp * cp, size=plan.ep),
        # Adjacent stages are tp*cp*dp ranks apart: inside a node only if that block fits twice.
        pp=link_for(cluster, stride=tp * cp * dp, size=2),
    )
