"""`orch plan --budget-gpu-hours H | --budget-flops F`: the compute-optimal model and corpus for a
budget, the model to train, its best plan, and what the run costs."""

from __future__ import annotations

import json

from rich.console import Console

from orchestrator.planning import run_plan
from orchestrator.render import cost_json, print_cost, print_memory, print_speed, report_json
from planner.speed.cost import run_cost
from planner.errors import PlanInputError
from planner.specs.hardware import ClusterSpec
from planner.structure.params import total_params
from planner.search.pinned import Pinned
from planner.structure.presets import preset, preset_names
from planner.search.scaling import ComputeOptimal, compute_optimal, nearest_model
from planner.specs.training import TrainingSpec

FIRST_GUESS_MFU = 0.4  # refined by the best plan's own predicted MFU
ITERATIONS = 3


def run_recipe(
    console: Console,
    cluster: ClusterSpec,
    training: TrainingSpec,
    pinned: Pinned,
    gpu_hours: float | None,
    flops: float | None,
    backend: str,
    as_json: bool,
) -> int:
    if gpu_hours is not None and flops is not None:
        raise PlanInputError("both --budget-gpu-hours and --budget-flops given", "pass one budget")
    budget = gpu_hours if gpu_hours is not None else flops
    if budget is None or budget <= 0:
        raise PlanInputError(f"budget {budget} must be positive", "pass a positive --budget-gpu-hours or --budget-flops")
    peak = cluster.gpu.peak_tflops(training.precision) * 1e12
    mfu = FIRST_GUESS_MFU
    candidates = [preset(n) for n in preset_names() if n != "debug"]
    result = None
    for _ in range(ITERATIONS):
        total_flops = flops if flops is not None else gpu_hours * 3600 * peak * mfu  # type: ignore[operator]
        optimal = compute_optimal(total_flops)
        model = nearest_model(optimal.params, candidates)
        result = run_plan(model, cluster, training, pinned, top=1, backend=backend)  # type: ignore[arg-type]
        if result.best is None or flops is not None:
            break
        mfu = result.best.speed.mfu
    assert result is not None
    tokens = optimal.tokens
    if as_json:
        extra = {"compute_optimal": {"flops": optimal.flops, "params": optimal.params, "tokens": optimal.tokens,
                                     "source": "Hoffmann et al. 2022, Approach 1"}}
        if result.best:
            extra["cost"] = cost_json(run_cost(cluster, tokens=tokens, tokens_per_s=result.best.speed.tokens_per_s))
        print(json.dumps(report_json(model, cluster, result.top, **extra)))
        return 0 if result.best else 1
    _print(console, cluster, optimal, model, result, tokens)
    return 0 if result.best else 1


def _print(console, cluster, optimal: ComputeOptimal, model, result, tokens: float) -> None:  # type: ignore[no-untyped-def]
    console.print(
        f"compute-optimal for {optimal.flops:.3g} FLOPs (Hoffmann et al. 2022): "
        f"{optimal.params / 1e9:,.1f}B parameters on {optimal.tokens / 1e12:,.2f}T tokens"
    )
    console.print(
        f"model: [bold]{model.name}[/] ({total_params(model) / 1e9:,.1f}B: {model.num_layers} layers, "
        f"hidden {model.hidden_size}, {model.num_heads} heads / {model.num_kv_heads} kv)"
    )
    if result.best is None:
        console.print("[bold red]NOTHING FITS[/] on this cluster; " + "; ".join(result.suggestions))
        return
    print_memory(console, model, cluster, result.best.memory)
    print_speed(console, result.best)
    print_cost(console, run_cost(cluster, tokens=tokens, tokens_per_s=result.best.speed.tokens_per_s))
