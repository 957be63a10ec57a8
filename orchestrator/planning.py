"""Carry out `orch plan`: search, optionally trace the winner, gather notes and advice."""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.search.advice import suggestions
from planner.speed.cost import RunCost, run_cost
from planner.errors import PlanInputError
from planner.memory.activations import traced_attention
from planner.memory.evaluate import buffers_for, evaluate, kernels_of
from planner.finetune.methods import FinetuneSpec, extra_sequence_tokens
from planner.specs.hardware import ClusterSpec
from planner.structure.model import ModelSpec
from planner.search.pinned import Pinned, default_plan
from planner.search.engine import Backend, Candidate, SearchResult, search
from planner.speed.step import step_time
from planner.specs.training import ParallelPlan, TrainingSpec
from planner.search.validate import check_plan


@dataclass
class PlanResult:
    search: SearchResult
    top: list[Candidate]
    notes: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    cost: RunCost | None = None

    @property
    def best(self) -> Candidate | None:
        return self.top[0] if self.top else None


def traced_candidate(
    model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, cand: Candidate, finetune: FinetuneSpec | None = None
) -> Candidate:
    """Re-evaluate a plan with activations from the exact FakeTensor trace of one rank's model."""
    plan = cand.plan
    if plan.tp > 1 or plan.cp > 1 or plan.recompute != "none":
        raise PlanInputError(
            f"--trace measures an unsplit model without recomputation, but the plan is {plan.describe()}",
            "pin --tp 1 --recompute none (and no --cp) with --trace, or drop --trace",
        )
    from planner.trace.stages import stage_activations_traced

    acts = stage_activations_traced(model, training, plan, finetune)
    memory = evaluate(model, cluster, training, plan, activation_bytes_override=acts, finetune=finetune)
    return Candidate(memory, cand.speed)


def _check_pinned(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, pinned: Pinned) -> None:
    """A fully or partly pinned plan that is invalid gets its own error, not 'nothing fits'."""
    plan, _ = default_plan(pinned, cluster, training)
    if pinned.dp is not None or pinned.tp is not None or pinned.pp is not None or pinned.cp is not None:
        check_plan(model, cluster, training.model_copy(update={"global_batch": 0}), plan)


def run_plan(
    model: ModelSpec,
    cluster: ClusterSpec,
    training: TrainingSpec,
    pinned: Pinned,
    *,
    top: int = 5,
    trace: bool = False,
    backend: Backend = "deepspeed",
    tokens: float | None = None,
    finetune: FinetuneSpec | None = None,
) -> PlanResult:
    cluster.gpu.peak_tflops(training.precision)  # an unsupported precision is a usage error
    if backend == "megatron":
        model = model.model_copy(update={"implementation": "megatron"})  # its fused kernels, its vocab split
    _check_pinned(model, cluster, training, pinned)
    if finetune is not None and finetune.method == "prompt":
        # Prompt tuning lengthens every sequence by its virtual tokens.
        training = training.model_copy(update={"seq_len": training.seq_len + extra_sequence_tokens(finetune)})
    found = search(model, cluster, training, pinned, backend=backend, finetune=finetune)
    result = PlanResult(search=found, top=found.ranked[:top])
    if pinned.given():
        result.notes.append("pinned: " + ", ".join(f"{k}={v}" for k, v in pinned.given().items()))
    result.notes.append(f"searched {found.evaluated} plans for the {backend} backend")
    if not trace or not found.ranked:
        result.notes.append(activation_note(model, cluster, training, finetune))
    if not found.ranked:
        result.suggestions = suggestions(model, cluster, training, pinned, found, backend=backend, ft=finetune)
        return result
    if trace:
        result.top[0] = traced_candidate(model, cluster, training, result.top[0], finetune)
        result.notes.append("activations of the best plan: exact FakeTensor trace")
    if tokens:
        result.cost = run_cost(cluster, tokens=tokens, tokens_per_s=result.top[0].speed.tokens_per_s)
    return result


def activation_note(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec,
                    finetune: FinetuneSpec | None = None) -> str:
    """Say whose kernels the activation figures assume (they depend on it), and when the model's
    class cannot run the attention kernel asked for."""
    if model.implementation == "megatron":
        return "activations: Megatron-LM's fused kernels (Korthikanti et al. 2022), as --backend megatron runs them"
    cls = model.layout.extra.get("model_class", "the model")
    version = model.layout.extra.get("transformers", "")
    impl = traced_attention(model, training, finetune, kernels_of(cluster))
    device = "CPU" if cluster.gpu.name == "cpu" else "CUDA"
    kernels = f"{device} {'flash' if impl == 'flash' else impl or training.attention} attention"
    note = (f"activations: traced from transformers {version} {cls} ({kernels}) under DeepSpeed, "
            "as orch launches it; --backend megatron models Megatron-LM's kernels instead")
    if training.attention == "flash" and impl == "eager":
        note += (f"; {cls} has no flash or SDPA attention in transformers {version}, so it keeps the "
                 "s x s attention scores whatever --attention says")
    return note


def evaluate_plan(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, plan: ParallelPlan,
                  finetune: FinetuneSpec | None = None) -> Candidate:
    """One given plan, evaluated (used by the compute-optimal recipe and the launcher)."""
    return Candidate(evaluate(model, cluster, training, plan, buffers=buffers_for(model, plan), finetune=finetune),
                     step_time(model, cluster, training, plan, finetune=finetune))
