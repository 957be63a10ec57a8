"""Validity of a ParallelPlan for a model, cluster and training spec.

``plan_problems`` returns every problem (the search records them as rejection reasons);
``check_plan`` raises the first as a PlanInputError for a plan the user pinned.
"""

from __future__ import annotations

from planner.errors import PlanInputError
from planner.specs.hardware import ClusterSpec
from planner.structure.model import ModelSpec
from planner.specs.training import ParallelPlan, TrainingSpec


def plan_problems(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, plan: ParallelPlan) -> list[PlanInputError]:
    problems: list[PlanInputError] = []

    def bad(problem: str, fix: str) -> None:
        problems.append(PlanInputError(problem, fix))

    p = plan
    try:
        cluster.gpu.peak_tflops(training.precision)
    except PlanInputError as exc:
        problems.append(exc)
    if p.world_size != cluster.num_gpus:
        bad(
            f"dp*tp*pp*cp = {p.dp}*{p.tp}*{p.pp}*{p.cp} = {p.world_size} differs from the cluster's {cluster.num_gpus} GPUs",
            "choose degrees whose product is the GPU count",
        )
    if p.tp > cluster.gpus_per_node or cluster.gpus_per_node % p.tp:
        bad(
            f"tp={p.tp} does not fit inside a node of {cluster.gpus_per_node} GPUs",
            "use a tensor degree that divides the GPUs per node",
        )
    for label, count in (("num_heads", model.num_heads), ("num_kv_heads", model.num_kv_heads)):
        if count % p.tp:
            bad(f"tp={p.tp} does not divide {label}={count} of {model.name}", f"use a tp that divides {count}")
    if model.ffn_hidden_size % p.tp:
        bad(f"tp={p.tp} does not divide ffn_hidden_size={model.ffn_hidden_size}", "use a tp that divides it")
    if p.pp > model.num_layers:
        bad(f"pp={p.pp} exceeds the {model.num_layers} layers", f"use pp <= {model.num_layers}")
    if p.interleave > 1 and model.num_layers < p.pp * p.interleave:
        bad(
            f"pp*interleave = {p.pp * p.interleave} exceeds num_layers={model.num_layers}",
            "use fewer virtual stages: each needs at least one layer",
        )
    if p.pp > 1 and p.zero_stage > 1:
        # deepspeed/runtime/pipe/engine.py asserts zero stage < 2 with PipelineModule.
        bad(
            f"ZeRO stage {p.zero_stage} with pp={p.pp}: DeepSpeed's pipeline engine supports ZeRO 0 and 1 only",
            "use --zero 0 or 1 with pipeline parallelism, or pp=1",
        )
    if p.cp > 1 and training.seq_len % (2 * p.cp):
        bad(
            f"seq_len={training.seq_len} is not divisible by 2*cp={2 * p.cp} (load-balanced ring attention)",
            "choose a sequence length divisible by twice the context degree",
        )
    if p.ep > 1 and (not model.is_moe or model.num_experts % p.ep):
        bad(
            f"ep={p.ep} needs a MoE model whose expert count it divides ({model.name} has {model.num_experts})",
            "drop --ep or choose a divisor of the expert count",
        )
    if training.global_batch and p.micro_batch * p.grad_accum * p.dp != training.global_batch:
        bad(
            f"micro_batch*grad_accum*dp = {p.micro_batch}*{p.grad_accum}*{p.dp} = "
            f"{p.micro_batch * p.grad_accum * p.dp} differs from global_batch={training.global_batch}",
            "choose a micro-batch and accumulation that multiply with dp to the global batch",
        )
    if training.seq_len > model.max_position_embeddings and model.positions == "learned":
        bad(
            f"seq_len={training.seq_len} exceeds the {model.max_position_embeddings} learned positions of {model.name}",
            f"use --seq-len <= {model.max_position_embeddings}",
        )
    return problems


def check_plan(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, plan: ParallelPlan) -> None:
    problems = plan_problems(model, cluster, training, plan)
    if problems:
        raise problems[0]
