"""What a training run costs: wall-clock time, GPU-hours, money and energy."""

from __future__ import annotations

from dataclasses import dataclass

from planner.specs.hardware import ClusterSpec


@dataclass(frozen=True)
class RunCost:
    tokens: float
    seconds: float
    gpu_hours: float
    cost_usd: float  # 0 when the cluster has no price
    energy_kwh: float

    @property
    def days(self) -> float:
        return self.seconds / 86400


def run_cost(cluster: ClusterSpec, *, tokens: float, tokens_per_s: float) -> RunCost:
    """Time = tokens / throughput; energy = GPUs x TDP x time x PUE (GPUs drawn at their board
    power limit, the facility overhead through PUE; host CPUs and network are not counted)."""
    seconds = tokens / tokens_per_s
    gpu_hours = seconds * cluster.num_gpus / 3600
    energy_kwh = cluster.num_gpus * cluster.gpu.tdp_watts * seconds * cluster.pue / 3.6e6
    return RunCost(tokens, seconds, gpu_hours, gpu_hours * cluster.cost_per_gpu_hour_usd, energy_kwh)
