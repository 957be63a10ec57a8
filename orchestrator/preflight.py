"""`orch launch --preflight`: measure the chosen plan on this machine before the job starts and,
while its measured peak exceeds the device, move down the planner's ranked plans (a higher ZeRO
stage, recomputation, a smaller micro-batch), saying at each move what changed.

``next_plan`` is the policy: pure, it sees the ranked plans, what the current one measured and the
capacity, and returns a decision. ``preflight`` is the controller that profiles
(``orchestrator.profiling``: live tensors on CPU, torch.cuda statistics on GPU) and carries the
decisions out.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Sequence, TextIO

from orchestrator.planning import run_plan
from orchestrator.profiling import Profile, profile_plan
from planner.errors import PlanInputError
from planner.specs.hardware import ClusterSpec
from planner.structure.model import ModelSpec
from planner.finetune.methods import FinetuneSpec
from planner.search.pinned import Pinned
from planner.specs.training import ParallelPlan, TrainingSpec
from planner.units import GiB, KiB, MiB

# The plan dimensions preflight holds as launched: it changes only how much memory a rank needs.
_HELD = ("dp", "tp", "pp", "cp", "ep", "sp", "interleave")
_CHANGED = (("zero_stage", "zero"), ("micro_batch", "mb"), ("grad_accum", "ga"), ("recompute", "recompute"), ("offload", "offload"))


@dataclass(frozen=True)
class Ranked:
    """A plan the search ranked, with the planner's peak for it, bytes per rank."""

    plan: ParallelPlan
    predicted_peak_bytes: int


@dataclass(frozen=True)
class Decision:
    """Launch ``plan`` (keep), measure ``plan`` next, or give up (``plan`` None)."""

    keep: bool
    plan: ParallelPlan | None
    line: str  # what preflight prints


def size(n: float) -> str:
    """Bytes in the largest binary unit that keeps a digit before the point."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def short(plan: ParallelPlan) -> str:
    """'dp2 z1 mb8' (+ recompute, offload when set)."""
    parts = [f"dp{plan.dp}"] + [f"tp{plan.tp}"] * (plan.tp > 1) + [f"pp{plan.pp}"] * (plan.pp > 1)
    parts += [f"z{plan.zero_stage}", f"mb{plan.micro_batch}"] + [f"ga{plan.grad_accum}"] * (plan.grad_accum > 1)
    parts += [f"recompute-{plan.recompute}"] * (plan.recompute != "none") + [f"offload-{plan.offload}"] * (plan.offload != "none")
    return " ".join(parts)


def changes(old: ParallelPlan, new: ParallelPlan) -> str:
    """'zero 1->2, mb 8->4'."""
    return ", ".join(f"{label} {getattr(old, f)}->{getattr(new, f)}" for f, label in _CHANGED if getattr(old, f) != getattr(new, f))


def next_plan(ranked: Sequence[Ranked], measured_peak_bytes: int, capacity_bytes: int) -> Decision:
    """``ranked[0]`` was just measured; the others follow in the search's order (fastest first).

    It fits: keep it. Otherwise scale the planner's peaks by what it missed on this plan
    (measured / predicted) and take the first later plan that needs less memory than this one and
    fits after that correction; none: give up."""
    current = ranked[0]
    head = f"preflight: {short(current.plan)} measured {size(measured_peak_bytes)}"
    if measured_peak_bytes <= capacity_bytes:
        return Decision(True, current.plan, f"{head} <= {size(capacity_bytes)}: fits")
    ratio = measured_peak_bytes / max(1, current.predicted_peak_bytes)
    for cand in ranked[1:]:
        corrected = cand.predicted_peak_bytes * ratio
        if cand.predicted_peak_bytes < current.predicted_peak_bytes and corrected <= capacity_bytes:
            return Decision(False, cand.plan, f"{head} > {size(capacity_bytes)}; next: {short(cand.plan)} "
                                              f"({changes(current.plan, cand.plan)}; predicted {size(cand.predicted_peak_bytes)}"
                                              f" x {ratio:.2f} measured/predicted = {size(corrected)})")
    return Decision(False, None, f"{head} > {size(capacity_bytes)}; no later plan fits after the x {ratio:.2f} correction")


def ranked_plans(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, pinned: Pinned, plan: ParallelPlan,
                 finetune: FinetuneSpec | None = None) -> list[Ranked]:
    """``plan`` first, then every plan the search ranks with the same shape (dp, tp, pp, ...) and
    the user's pins, fastest first. On CPU clusters offload stays off, as orch launch runs it."""
    held = {k: getattr(plan, k) for k in _HELD}
    if cluster.backend == "gloo" and pinned.offload is None:
        held["offload"] = plan.offload
    found = run_plan(model, cluster, training, pinned.model_copy(update=held), top=10**6, finetune=finetune)
    rest = [Ranked(c.plan, c.memory.memory.total) for c in found.top if c.plan != plan]
    first = next((Ranked(c.plan, c.memory.memory.total) for c in found.top if c.plan == plan), None)
    if first is None:  # a plan the search would not rank (pinned beyond it): its own evaluation
        from planner.memory.evaluate import evaluate

        first = Ranked(plan, evaluate(model, cluster, training, plan, finetune=finetune).memory.total)
    return [first, *rest]


def preflight(
    model: ModelSpec,
    cluster: ClusterSpec,
    training: TrainingSpec,
    pinned: Pinned,
    plan: ParallelPlan,
    finetune: FinetuneSpec | None = None,
    *,
    steps: int = 2,
    out: TextIO = sys.stderr,
    measure: Callable[..., Profile] = profile_plan,
) -> ParallelPlan:
    """Profile ``plan`` on this machine; while it does not fit, move to the next ranked plan.
    The plan to launch, or a PlanInputError when no ranked plan fits as measured."""
    ranked = ranked_plans(model, cluster, training, pinned, plan, finetune)
    while True:
        measured = measure(model, cluster, training, pinned, plan=ranked[0].plan, steps=steps, finetune=finetune)
        peak = measured.measured["peak"]
        if getattr(measured, "oom", False):  # ran out of memory: it needs more than the device, by an unknown amount
            peak = max(peak, cluster.gpu.memory_bytes + 1)
        decision = next_plan(ranked, peak, cluster.gpu.memory_bytes)
        print(decision.line, file=out, flush=True)
        if decision.keep:
            assert decision.plan is not None
            return decision.plan
        if decision.plan is None:
            raise PlanInputError(
                f"preflight: no plan of model '{model.name}' fits cluster '{cluster.name}' as measured "
                f"({short(ranked[0].plan)} needs {size(peak)} of {size(cluster.gpu.memory_bytes)})",
                "use a larger device, a smaller model or sequence, or pin --zero 3 / a smaller --micro-batch",
            )
        ranked = ranked[[r.plan for r in ranked].index(decision.plan):]
