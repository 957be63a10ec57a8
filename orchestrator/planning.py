"""Carry out `orch plan`: choose the plan (pinned flags + defaults), evaluate it, gather notes."""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.advice import suggestions
from planner.errors import PlanInputError
from planner.evaluate import PlanMemory, evaluate
from planner.hardware import ClusterSpec
from planner.model import ModelSpec
from planner.pinned import Pinned, default_plan
from planner.training import ParallelPlan, TrainingSpec
from planner.validate import check_plan


@dataclass
class PlanResult:
    best: PlanMemory
    notes: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)


def traced_activations(model: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> dict[int, int]:
    """Activation bytes per pipeline stage from the exact trace of one rank's model."""
    if plan.tp > 1 or plan.cp > 1 or plan.recompute != "none":
        raise PlanInputError(
            "--trace measures an unsplit model without recomputation (tp=1, cp=1, --recompute none)",
            "drop --tp/--cp/--recompute, or drop --trace to use the analytical model",
        )
    from planner.stage_trace import stage_activations_traced

    return stage_activations_traced(model, training, plan)


def run_plan(
    model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, pinned: Pinned, *, trace: bool = False
) -> PlanResult:
    plan, defaulted = default_plan(pinned, cluster, training)
    check_plan(model, cluster, training, plan)
    override = traced_activations(model, training, plan) if trace else None
    best = evaluate(model, cluster, training, plan, activation_bytes_override=override)
    notes = []
    if defaulted:
        notes.append(f"not pinned, so defaulted: {', '.join(defaulted)} (dp fills the cluster, ZeRO 0, micro-batch 1, no recompute)")
    notes.append("activations: " + ("exact FakeTensor trace" if trace else "analytical model"))
    result = PlanResult(best=best, notes=notes)
    if not best.fits:
        result.suggestions = suggestions(model, cluster, training, plan)
    return result
