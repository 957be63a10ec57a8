"""Rendering of plans for people (rich) and for programs (the JSON contract)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from planner.evaluate import PlanMemory
from planner.hardware import ClusterSpec
from planner.model import ModelSpec
from planner.params import total_params
from planner.units import GiB

COMPONENTS = ("parameters", "gradients", "optimizer", "activations", "overhead")
COLOURS = {"parameters": "cyan", "gradients": "magenta", "optimizer": "yellow", "activations": "green", "overhead": "grey62"}
BAR_WIDTH = 50


def plan_json(p: PlanMemory) -> dict[str, Any]:
    plan = p.plan
    return {
        "dp": plan.dp,
        "tp": plan.tp,
        "pp": plan.pp,
        "cp": plan.cp,
        "ep": plan.ep,
        "sp": plan.sp,
        "interleave": plan.interleave,
        "zero_stage": plan.zero_stage,
        "micro_batch": plan.micro_batch,
        "grad_accum": plan.grad_accum,
        "recompute": plan.recompute,
        "offload": plan.offload,
        "memory": p.memory.as_dict(),
        "fits": p.fits,
        "most_loaded_stage": p.stage,
        "params_per_gpu": p.params_on_rank,
        "host_memory_bytes_per_node": p.host_bytes_per_node,
    }


def report_json(model: ModelSpec, cluster: ClusterSpec, plans: list[PlanMemory], **extra: Any) -> dict[str, Any]:
    return {
        "model": {"name": model.name, "num_params": total_params(model)},
        "cluster": {"name": cluster.name, "num_gpus": cluster.num_gpus, "gpu_memory_bytes": cluster.gpu.memory_bytes},
        "plans": [plan_json(p) for p in plans],
        **extra,
    }


def gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def stacked_bar(p: PlanMemory) -> Text:
    """Each component's share of the GPU as coloured blocks; free memory as dots."""
    capacity = max(p.gpu_memory_bytes, p.memory.total)
    bar = Text()
    for name in COMPONENTS:
        cells = round(BAR_WIDTH * getattr(p.memory, name) / capacity)
        bar.append("█" * cells, style=COLOURS[name])
    free = BAR_WIDTH - len(bar.plain)
    if p.memory.total <= p.gpu_memory_bytes:
        bar.append("·" * max(free, 0), style="dim")
    else:
        bar.append("  over by " + gib(p.memory.total - p.gpu_memory_bytes), style="bold red")
    return bar


def plan_table(model: ModelSpec, cluster: ClusterSpec, p: PlanMemory, title: str) -> Table:
    table = Table(title=title, title_justify="left", show_footer=True)
    table.add_column("component", footer="total")
    table.add_column("per GPU", justify="right", footer=gib(p.memory.total))
    table.add_column("share of GPU", justify="right", footer=f"{p.memory.total / p.gpu_memory_bytes:.0%}")
    for name in COMPONENTS:
        value = getattr(p.memory, name)
        table.add_row(Text(name, style=COLOURS[name]), gib(value), f"{value / p.gpu_memory_bytes:.0%}")
    return table


def print_plan(console: Console, model: ModelSpec, cluster: ClusterSpec, p: PlanMemory, notes: list[str]) -> None:
    console.print(
        f"[bold]{model.name}[/] ({total_params(model) / 1e9:,.2f}B parameters) on [bold]{cluster.name}[/]: "
        f"{cluster.num_gpus} x {cluster.gpu.name} ({gib(cluster.gpu.memory_bytes)} each)"
    )
    console.print(f"plan: [bold]{p.plan.describe()}[/]  (most loaded rank: pipeline stage {p.stage})")
    console.print(plan_table(model, cluster, p, "per-GPU memory, most loaded rank"))
    console.print(stacked_bar(p))
    legend = Text("  ").join(Text(f"█ {n}", style=COLOURS[n]) for n in COMPONENTS)
    console.print(legend)
    if p.host_bytes_per_node:
        console.print(f"host RAM for offloaded states: {gib(p.host_bytes_per_node)} per node")
    verdict = (
        Text(f"FITS: {gib(p.headroom_bytes)} free per GPU", style="bold green")
        if p.fits
        else Text(f"DOES NOT FIT: over by {gib(-p.headroom_bytes)} per GPU", style="bold red")
    )
    console.print(verdict)
    for note in notes:
        console.print(f"[dim]note:[/] {note}")
