"""`orch plan --method all`: every fine-tuning method's best plan, side by side."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from orchestrator.inputs import pydantic_problem
from orchestrator.planning import PlanResult, run_plan
from orchestrator.render import plan_json, print_header
from planner.errors import PlanInputError
from planner.finetune.methods import METHODS, FinetuneSpec, trainable_params
from planner.specs.hardware import ClusterSpec
from planner.structure.model import ModelSpec
from planner.search.pinned import Pinned
from planner.specs.training import TrainingSpec
from planner.units import GiB


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:,.2f}{unit}"
    return str(n)


def _specs(ft_fields: dict[str, Any]) -> list[FinetuneSpec]:
    try:
        return [FinetuneSpec(method=m, **ft_fields) for m in METHODS]  # type: ignore[arg-type]
    except ValidationError as exc:
        raise pydantic_problem(exc, "fine-tuning flags") from None


def compare_methods(
    console: Console, model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, pinned: Pinned,
    ft_fields: dict[str, Any], backend: str, as_json: bool,
) -> int:
    """Exit 0 when at least one method fits."""
    rows: list[tuple[FinetuneSpec, PlanResult | str]] = []
    counts: dict[str, int] = {}
    for ft in _specs(ft_fields):
        try:
            counts[ft.method] = trainable_params(model, ft)
            rows.append((ft, run_plan(model, cluster, training, pinned, top=1, backend=backend, finetune=ft)))  # type: ignore[arg-type]
        except PlanInputError as exc:  # a method that cannot apply to this model (BitFit without biases)
            rows.append((ft, exc.problem))
    if as_json:
        methods = {
            ft.method: (
                {"trainable_params": counts.get(ft.method, 0), "fits": False, "plans": [], "not_applicable": r}
                if isinstance(r, str)
                else {"trainable_params": counts[ft.method], "fits": r.best is not None,
                      "plans": [plan_json(c, model, ft) for c in (r.top[:1] or r.search.near_misses[:1])],
                      "would_fit": r.suggestions}
            )
            for ft, r in rows
        }
        print(json.dumps({"model": {"name": model.name}, "cluster": {"name": cluster.name, "num_gpus": cluster.num_gpus},
                          "methods": methods}))
    else:
        print_header(console, model, cluster)
        table = Table(title="fine-tuning methods, best plan of each", title_justify="left")
        for col in ("method", "fits", "GiB/GPU", "trainable", "step s", "tokens/s", "best plan"):
            table.add_column(col, justify="left" if col in ("method", "best plan") else "right")
        for ft, r in rows:
            n = _count(counts.get(ft.method, 0))
            if isinstance(r, str):
                table.add_row(ft.method, "n/a", "-", n, "-", "-", r)
                continue
            if r.best is None:
                table.add_row(ft.method, "[red]no[/]", "-", n, "-", "-", (r.suggestions or ["-"])[0])
                continue
            b = r.best
            table.add_row(ft.method, "[green]yes[/]", f"{b.memory.memory.total / GiB:.1f}", n,
                          f"{b.speed.step_time_s:.3f}", f"{b.speed.tokens_per_s:,.0f}", b.plan.describe())
        console.print(table)
    return 0 if any(not isinstance(r, str) and r.best is not None for _, r in rows) else 1
