"""Rendering of plans for people (rich) and for programs (the JSON contract)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from planner.speed.cost import RunCost
from planner.memory.evaluate import PlanMemory
from planner.finetune.methods import FinetuneSpec, trainable_params
from planner.specs.hardware import ClusterSpec
from planner.structure.model import ModelSpec
from planner.structure.params import total_params
from planner.search.engine import Candidate, SearchResult
from planner.units import GiB

COMPONENTS = ("parameters", "gradients", "optimizer", "activations", "overhead")
COLOURS = {"parameters": "cyan", "gradients": "magenta", "optimizer": "yellow", "activations": "green", "overhead": "grey62"}
BAR_WIDTH = 50


def plan_json(c: Candidate, model: ModelSpec, finetune: FinetuneSpec | None = None) -> dict[str, Any]:
    p, speed = c.memory, c.speed
    plan = p.plan
    ft = finetune or FinetuneSpec()
    return {
        "method": ft.method,
        "trainable_params": trainable_params(model, ft),
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
        "memory": {**p.memory.as_dict(), "peak_allocated": p.memory.peak_allocated},  # total = peak_allocated + overhead
        "peak_phase": p.memory.peak_phase,
        "fits": p.fits,
        "most_loaded_stage": p.stage,
        "params_per_gpu": p.params_on_rank,
        "host_memory_bytes_per_node": p.host_bytes_per_node,
        "step_time_s": speed.step_time_s,
        "tokens_per_s": speed.tokens_per_s,
        "tflops_per_gpu": speed.tflops_per_gpu,
        "mfu": speed.mfu,
        "step_time_breakdown_s": speed.components(),
    }


def cost_json(cost: RunCost) -> dict[str, float]:
    return {
        "tokens": cost.tokens, "seconds": cost.seconds, "days": cost.days, "gpu_hours": cost.gpu_hours,
        "cost_usd": cost.cost_usd, "energy_kwh": cost.energy_kwh,
    }


def report_json(
    model: ModelSpec, cluster: ClusterSpec, plans: list[Candidate], finetune: FinetuneSpec | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "model": {"name": model.name, "num_params": total_params(model), "family": model.family,
                  "model_class": model.layout.extra.get("model_class", "")},
        "cluster": {"name": cluster.name, "num_gpus": cluster.num_gpus, "gpu_memory_bytes": cluster.gpu.memory_bytes},
        "plans": [plan_json(c, model, finetune) for c in plans],
        **extra,
    }


def rejections(found: SearchResult) -> dict[str, int]:
    return {**dict(found.rejected.most_common()), **found.slower_buckets()}


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


PHASES = {"forward": "in the forward", "loss": "at the loss's gradient", "backward": "in the backward",
          "step": "at the optimizer step"}


def plan_table(model: ModelSpec, cluster: ClusterSpec, p: PlanMemory, title: str) -> Table:
    """Each component at its own largest, and the peak (what is alive together at the phase that
    sets it, planner.memory.phases) as the footer: the components do not add up to it."""
    table = Table(title=title, title_justify="left", show_footer=True,
                  caption=f"peak {PHASES[p.memory.peak_phase]}; components at their own largest",
                  caption_justify="left")
    table.add_column("component", footer="peak")
    table.add_column("per GPU", justify="right", footer=gib(p.memory.total))
    table.add_column("share of GPU", justify="right", footer=f"{p.memory.total / p.gpu_memory_bytes:.0%}")
    for name in COMPONENTS:
        value = getattr(p.memory, name)
        table.add_row(Text(name, style=COLOURS[name]), gib(value), f"{value / p.gpu_memory_bytes:.0%}")
    return table


def print_header(console: Console, model: ModelSpec, cluster: ClusterSpec) -> None:
    console.print(
        f"[bold]{model.name}[/] ({total_params(model) / 1e9:,.2f}B parameters) on [bold]{cluster.name}[/]: "
        f"{cluster.num_gpus} x {cluster.gpu.name} ({gib(cluster.gpu.memory_bytes)} each)"
    )


def print_memory(console: Console, model: ModelSpec, cluster: ClusterSpec, p: PlanMemory) -> None:
    console.print(f"plan: [bold]{p.plan.describe()}[/]  (most loaded rank: pipeline stage {p.stage})")
    console.print(plan_table(model, cluster, p, "per-GPU memory, most loaded rank"))
    console.print(stacked_bar(p))
    legend = Text("  ").join(Text(f"█ {n}", style=COLOURS[n]) for n in COMPONENTS)
    console.print(legend)
    if p.host_bytes_per_node:
        style = "" if p.fits_host else "bold red"
        console.print(
            f"host RAM for offloaded states: {gib(p.host_bytes_per_node)} per node "
            f"(of {gib(p.host_memory_bytes)})", style=style,
        )
    if p.fits:
        verdict = Text(f"FITS: {gib(p.headroom_bytes)} free per GPU", style="bold green")
    elif not p.fits_gpu:
        verdict = Text(f"DOES NOT FIT: over by {gib(-p.headroom_bytes)} per GPU", style="bold red")
    else:
        verdict = Text("DOES NOT FIT: offloaded states exceed the host RAM", style="bold red")
    console.print(verdict)


def print_speed(console: Console, c: Candidate) -> None:
    sp = c.speed
    console.print(
        f"step {sp.step_time_s:,.3f} s · {sp.tokens_per_s:,.0f} tokens/s · {sp.tflops_per_gpu:,.1f} TFLOP/s per GPU"
        f" (recompute counted) · MFU {sp.mfu:.1%}"
    )
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.3g}s" for k, v in sp.components().items() if v > 0)
    console.print(f"[dim]step time: {parts}[/]")


def print_top(console: Console, top: list[Candidate]) -> None:
    table = Table(title=f"top {len(top)} plans", title_justify="left")
    for col in ("#", "plan", "step s", "tokens/s", "MFU", "GiB/GPU"):
        table.add_column(col, justify="left" if col == "plan" else "right")
    for i, c in enumerate(top, 1):
        table.add_row(str(i), c.plan.describe(), f"{c.speed.step_time_s:.3f}", f"{c.speed.tokens_per_s:,.0f}",
                      f"{c.speed.mfu:.1%}", f"{c.memory.memory.total / GiB:.1f}")
    console.print(table)


def print_rejections(console: Console, found: SearchResult) -> None:
    rows = rejections(found)
    if rows:
        console.print("not chosen: " + "; ".join(f"{n} {reason}" for reason, n in rows.items()))


def print_explain(console: Console, top: list[Candidate]) -> None:
    """Why the winner beats the runner-up, component by component (time and memory)."""
    if len(top) < 2:
        console.print("explain: no runner-up to compare with")
        return
    win, run = top[0], top[1]
    table = Table(title=f"why '{win.plan.describe()}' beats '{run.plan.describe()}'", title_justify="left")
    for col in ("component", "winner", "runner-up", "difference"):
        table.add_column(col, justify="left" if col == "component" else "right")
    for name, a in win.speed.components().items():
        b = run.speed.components()[name]
        if a or b:
            table.add_row(name.replace("_", " "), f"{a:.3f} s", f"{b:.3f} s", f"{b - a:+.3f} s")
    table.add_row("[bold]step time[/]", f"{win.speed.step_time_s:.3f} s", f"{run.speed.step_time_s:.3f} s",
                  f"{run.speed.step_time_s - win.speed.step_time_s:+.3f} s")
    for name in COMPONENTS:
        a, b = getattr(win.memory.memory, name), getattr(run.memory.memory, name)
        table.add_row(f"{name} memory", gib(a), gib(b), f"{(b - a) / GiB:+.2f} GiB")
    console.print(table)


def print_cost(console: Console, cost: RunCost) -> None:
    money = f" · ${cost.cost_usd:,.0f}" if cost.cost_usd else " · (no $/GPU-hour in the cluster config)"
    console.print(
        f"{cost.tokens:,.3g} tokens: {cost.days:,.2f} days · {cost.gpu_hours:,.0f} GPU-hours{money}"
        f" · {cost.energy_kwh / 1000:,.1f} MWh"
    )
