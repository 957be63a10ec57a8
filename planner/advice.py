"""What would make a plan that does not fit fit: the smallest single changes, tried in order of cost."""

from __future__ import annotations

from planner.evaluate import evaluate
from planner.finetune import FinetuneSpec
from planner.hardware import ClusterSpec
from planner.model import ModelSpec
from planner.training import ParallelPlan, TrainingSpec
from planner.validate import plan_problems

# Each change in order of how little it costs in speed (a rough ordering: sharding first,
# recomputation next, then host offload).
_CHANGES: list[tuple[str, dict[str, object]]] = [
    ("--zero 1", {"zero_stage": 1}),
    ("--zero 2", {"zero_stage": 2}),
    ("--zero 3", {"zero_stage": 3}),
    ("--recompute selective", {"recompute": "selective"}),
    ("--recompute full", {"recompute": "full"}),
    ("--zero 3 --recompute full", {"zero_stage": 3, "recompute": "full"}),
    ("--zero 3 --recompute full --offload optimizer", {"zero_stage": 3, "recompute": "full", "offload": "optimizer"}),
    (
        "--zero 3 --recompute full --offload optimizer+params",
        {"zero_stage": 3, "recompute": "full", "offload": "optimizer+params"},
    ),
]


def _fits(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, plan: ParallelPlan, ft: FinetuneSpec | None) -> bool:
    return not plan_problems(model, cluster, training, plan) and evaluate(model, cluster, training, plan, finetune=ft).fits


def suggestions(
    model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, plan: ParallelPlan, ft: FinetuneSpec | None = None
) -> list[str]:
    """Up to two plan changes that fit on this cluster, and the smallest cluster that fits."""
    found: list[str] = []
    for label, update in _CHANGES:
        try:
            candidate = plan.model_copy(update=update)
            candidate = ParallelPlan.model_validate(candidate.model_dump())
        except ValueError:
            continue
        if _fits(model, cluster, training, candidate, ft):
            found.append(f"{label} fits on this cluster")
            if len(found) == 2:
                break
    more = _more_gpus(model, cluster, training, plan, ft)
    if more:
        found.append(more)
    return found


def _more_gpus(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, plan: ParallelPlan, ft: FinetuneSpec | None) -> str | None:
    """Double the data-parallel degree (ZeRO 3, full recompute) until it fits, up to 64x the GPUs."""
    base = plan.model_copy(update={"zero_stage": 3, "recompute": "full", "pp": 1})
    for factor in (2, 4, 8, 16, 32, 64):
        gpus = cluster.num_gpus * factor
        per_node = cluster.gpus_per_node
        bigger = cluster.model_copy(update={"num_nodes": max(1, gpus // per_node)})
        dp = gpus // (base.tp * base.cp)
        candidate = base.model_copy(update={"dp": dp, "grad_accum": 1, "ep": 1})
        if evaluate(model, bigger, training.model_copy(update={"global_batch": 0}), candidate, finetune=ft).fits:
            return f"{gpus} GPUs with --zero 3 --recompute full would fit"
    return None
