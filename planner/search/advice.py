"""What would make a job that does not fit fit: each hint is a plan the search really found fitting
under the user's other pinned flags, or names the flag or backend limit that blocks every plan.

Changes are tried in order of how little they cost in speed (sharding first, recomputation next,
then host offload), then more GPUs of the same kind.
"""

from __future__ import annotations

from planner.finetune.methods import FinetuneSpec
from planner.specs.hardware import ClusterSpec
from planner.structure.model import ModelSpec
from planner.search.pinned import Pinned
from planner.specs.training import TrainingSpec

_CHANGES: list[tuple[str, dict[str, object]]] = [
    ("--zero 1", {"zero_stage": 1}),
    ("--zero 2", {"zero_stage": 2}),
    ("--zero 3", {"zero_stage": 3}),
    ("--recompute selective", {"recompute": "selective"}),
    ("--recompute full", {"recompute": "full"}),
    ("--zero 3 --recompute full", {"zero_stage": 3, "recompute": "full"}),
    ("--zero 3 --recompute full --offload optimizer", {"zero_stage": 3, "recompute": "full", "offload": "optimizer"}),
    ("--zero 3 --recompute full --offload optimizer+params",
     {"zero_stage": 3, "recompute": "full", "offload": "optimizer+params"}),
]
_FLAGS = {"zero_stage": "--zero", "recompute": "--recompute", "offload": "--offload", "dp": "--dp", "tp": "--tp",
          "pp": "--pp", "cp": "--cp", "ep": "--ep", "sp": "--sp", "interleave": "--interleave", "micro_batch": "--micro-batch"}

# Rejection reasons of the search (planner.search.engine) that no memory change can cure, with the
# flag that would.
_BLOCKERS = {
    "invalid: tensor with pipeline parallelism on deepspeed":
        "tp with pp needs --backend megatron (DeepSpeed AutoTP and its PipelineModule do not combine): drop --tp or --pp",
    "invalid: ZeRO 2 with pipeline parallelism on deepspeed": "pp with ZeRO 2 needs --zero 0 or 1 (DeepSpeed's pipeline engine)",
    "invalid: ZeRO 3 with pipeline parallelism on deepspeed": "pp with ZeRO 3 needs --zero 0 or 1 (DeepSpeed's pipeline engine)",
    "invalid: bf16 pipeline without ZeRO on deepspeed": "a bf16 pipeline needs --zero 1 on deepspeed (its ZeRO-0 checkpoints do not load)",
    "invalid: selective recompute on deepspeed": "--recompute selective needs --backend megatron (orch's DeepSpeed runs full recompute)",
    "invalid: sequence parallelism on deepspeed": "--sp needs --backend megatron (DeepSpeed AutoTP has no sequence parallelism)",
    "invalid: context parallelism on deepspeed": "--cp needs --backend megatron",
    "invalid: interleaved pipeline on deepspeed": "--interleave needs --backend megatron (DeepSpeed's pipeline is plain 1F1B)",
    "invalid: expert parallelism on deepspeed": "--ep needs --backend megatron",
}


def _search(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, pinned: Pinned, backend: str,
            ft: FinetuneSpec | None):  # type: ignore[no-untyped-def]
    from planner.search.engine import search

    return search(model, cluster, training, pinned, backend=backend, finetune=ft)  # type: ignore[arg-type]


def blocking_reasons(found) -> list[str]:  # type: ignore[no-untyped-def]
    """When no plan was even evaluated for memory, what rules every one out."""
    if found.rejected.get("does not fit") or found.ranked:
        return []
    return [_BLOCKERS.get(reason, reason.removeprefix("invalid: ")) for reason, _ in found.rejected.most_common(2)]


def _overrides(pinned: Pinned, update: dict[str, object]) -> str:
    """' (instead of --zero 1)' when the change replaces a flag the user pinned."""
    given = pinned.given()
    replaced = [f"{_FLAGS.get(k, k)} {given[k]}" for k, v in update.items() if k in given and given[k] != v]
    return f" (instead of {', '.join(replaced)})" if replaced else ""


def suggestions(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, pinned: Pinned, found,  # type: ignore[no-untyped-def]
                *, backend: str = "deepspeed", ft: FinetuneSpec | None = None) -> list[str]:
    """Up to two single changes that the search finds fitting on this cluster, and the smallest
    cluster of the same GPUs that fits; or what blocks every plan."""
    blocked = blocking_reasons(found)
    if blocked:
        return blocked
    hints: list[str] = []
    for label, update in _CHANGES:
        if all(pinned.given().get(k) == v for k, v in update.items()):
            continue  # already what the user asked for
        try:
            changed = Pinned.model_validate({**pinned.model_dump(), **update})
        except ValueError:
            continue
        result = _search(model, cluster, training, changed, backend, ft)
        if result.ranked:
            hints.append(f"{label}{_overrides(pinned, update)} on this cluster: {result.ranked[0].plan.describe()}")
            if len(hints) == 2:
                break
    more = _more_gpus(model, cluster, training, pinned, backend, ft)
    if more:
        hints.append(more)
    return hints


def _more_gpus(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, pinned: Pinned, backend: str,
               ft: FinetuneSpec | None) -> str | None:
    """The smallest multiple (2x-64x) of the GPUs on which the search finds a fitting plan with the
    user's pinned flags (dp freed: it grows with the cluster), or else with the change that saves the
    most memory."""
    free_dp = pinned.model_copy(update={"dp": None})
    label, update = _CHANGES[-1]
    try:
        saving = Pinned.model_validate({**free_dp.model_dump(), **update})
    except ValueError:
        saving = None
    for factor in (2, 4, 8, 16, 32, 64):
        gpus = cluster.num_gpus * factor
        per_node = cluster.gpus_per_node
        if gpus % per_node and gpus > per_node:
            continue
        bigger = cluster.model_copy(update={"num_nodes": max(1, gpus // per_node), "gpus_per_node": min(per_node, gpus)})
        unbatched = training.model_copy(update={"global_batch": 0})
        for extra, pins in (("", free_dp), (f" with {label}{_overrides(pinned, update)}", saving)):
            if pins is None:
                continue
            result = _search(model, bigger, unbatched, pins, backend, ft)
            if result.ranked:
                return f"{gpus} GPUs{extra}: {result.ranked[0].plan.describe()}"
    return None
