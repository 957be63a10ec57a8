"""Alpha-beta cost model of collectives (Hockney 1994; Thakur, Rabenseifner & Gropp 2005), by
where each group's ranks sit.

A message of n bytes on a link costs alpha + n/beta. NCCL runs rings and (double binary) trees;
both move the same bytes per rank asymptotically, so the bandwidth term is the ring's. The
latency term is the cheaper of ring (n-1 steps) and tree (2 log2 n steps) for all-reduce, the one
collective NCCL runs as a tree (NCCL_ALGO: Tree/Ring for AllReduce only; AllGather and
ReduceScatter are rings, NCCL 2.18 user guide, "NCCL_ALGO"), and the ring's for the others.

Placement (``placement``): the rank order is Megatron-LM's parallel_state, tensor fastest, then
context, data, pipeline. A group whose ranks are ``stride`` apart has ``gpus_per_node // stride``
of them on each node (all of them when it fits in one node, one when ``stride`` is a node or
more). Across nodes NCCL builds one ring per NIC rail and gives each of the group's ranks its
own GPU's NIC (NCCL tuning guide: "NCCL will use one ring per NIC"; nccl-tests on DGX nodes reach
all_reduce_perf busbw ~180-190 GB/s over 8 x 200 Gb/s HDR and ~360-450 GB/s over 8 x 400 Gb/s
NDR, i.e. the node's eight NICs, not one), so a group with r ranks per node moves r NICs' worth
of bus bandwidth, capped by NVLink for the steps inside the node. With one rank per node
(e.g. data parallelism over tp=8 Megatron nodes) it has one NIC, and the node's other NICs carry
the other groups of the same kind at the same time.
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


@dataclass(frozen=True)
class Placement:
    """Where one parallel group's ranks sit and which links carry its traffic."""

    size: int  # ranks in the group
    stride: int  # global-rank distance between its consecutive ranks
    ranks_per_node: int  # of the group's ranks, how many share one node
    nodes: int  # nodes the group spans
    nics_per_node: int  # NICs carrying its inter-node traffic on each node (0 inside one node)

    @property
    def inside_node(self) -> bool:
        return self.nodes == 1


def placement(cluster: ClusterSpec, *, stride: int, size: int) -> Placement:
    """The placement of a group of ``size`` ranks, ``stride`` apart, in Megatron's rank order."""
    g = cluster.gpus_per_node
    per_node = size if stride * size <= g else max(1, min(size, g // stride))
    nodes = math.ceil(size / per_node)
    return Placement(size, stride, per_node, nodes, 0 if nodes == 1 else per_node)


def link_of(cluster: ClusterSpec, where: Placement) -> Link:
    """The bus bandwidth and per-step latency of ring collectives of a group placed ``where``."""
    nvlink = cluster.intra_node_GB_per_s * 1e9 * INTRA_NODE_BUS_EFFICIENCY
    if where.inside_node:
        return Link(nvlink, cluster.intra_node_latency_us * 1e-6)
    nics = where.nics_per_node * cluster.inter_node_GB_per_s * 1e9 * INTER_NODE_BUS_EFFICIENCY
    bandwidth = min(nics, nvlink) if where.ranks_per_node > 1 else nics
    return Link(bandwidth, cluster.inter_node_latency_us * 1e-6)


def link_for(cluster: ClusterSpec, *, stride: int, size: int) -> Link:
    """The ring link of a group of ``size`` ranks, ``stride`` apart (see ``placement``)."""
    return link_of(cluster, placement(cluster, stride=stride, size=size))


def _latency_steps(n: int, steps_ring: int) -> float:
    return min(steps_ring, 2 * math.ceil(math.log2(n)))


def all_reduce_s(nbytes: float, n: int, link: Link) -> float:
    """Ring all-reduce: 2(n-1)/n of the bytes cross every link (reduce-scatter + all-gather);
    latency of the ring or the tree, whichever NCCL's tuner finds cheaper."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / link.bandwidth_bytes_per_s + _latency_steps(n, 2 * (n - 1)) * link.latency_s


def reduce_scatter_s(nbytes: float, n: int, link: Link) -> float:
    """Reduce-scatter (or all-gather) of ``nbytes`` in total: (n-1)/n of the bytes per link, n-1
    ring steps."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / link.bandwidth_bytes_per_s + (n - 1) * link.latency_s


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


@dataclass(frozen=True)
class GroupPlacements:
    tp: Placement
    cp: Placement
    dp: Placement
    ep: Placement
    pp: Placement


def group_placements(cluster: ClusterSpec, plan: ParallelPlan) -> GroupPlacements:
    """Placement of each parallel group under Megatron's order tp < cp < dp < pp."""
    tp, cp, dp = plan.tp, plan.cp, plan.dp
    return GroupPlacements(
        tp=placement(cluster, stride=1, size=tp),
        cp=placement(cluster, stride=tp, size=cp),
        dp=placement(cluster, stride=tp * cp, size=dp),
        ep=placement(cluster, stride=tp * cp, size=plan.ep),
        # Adjacent stages are tp*cp*dp ranks apart: inside a node only if that block fits twice.
        pp=placement(cluster, stride=tp * cp * dp, size=2),
    )


def group_links(cluster: ClusterSpec, plan: ParallelPlan) -> GroupLinks:
    """Links of each parallel group. Ring collectives (tp, cp, dp) get their placement's bus
    bandwidth; all-to-all (ep) and point-to-point (pp) traffic leaves each rank through its own
    NIC once it crosses nodes."""
    where = group_placements(cluster, plan)

    def own_nic(p: Placement) -> Link:
        return link_of(cluster, p if p.inside_node else Placement(p.size, p.stride, 1, p.nodes, 1))

    return GroupLinks(
        tp=link_of(cluster, where.tp), cp=link_of(cluster, where.cp), dp=link_of(cluster, where.dp),
        ep=own_nic(where.ep), pp=own_nic(where.pp),
    )
