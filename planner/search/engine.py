"""Search every parallel dimension at once for the fastest plan that fits.

Enumerates tp, pp, cp, ep (dp fills the rest), ZeRO stage, offload, recompute, sequence
parallelism, interleaving and micro-batch, as far as the backend can run them and the user left
them free. Pruning keeps a 1T-parameter model on 3072 GPUs well under a second:
- invalid (tp, pp, cp, ep) shapes are rejected before any memory is computed;
- model states do not depend on micro-batch or recompute, so a (shape, ZeRO, offload) whose
  states alone overflow the GPU is rejected once for all its micro-batches;
- activations grow with the micro-batch, so micro-batches are tried in ascending order and the
  first that does not fit ends that branch.
Returns data (ranked plans and rejections with reasons); it never prints.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Literal

from planner.memory.evaluate import PlanMemory, evaluate
from planner.finetune.methods import FinetuneSpec
from planner.specs.hardware import ClusterSpec
from planner.structure.model import ModelSpec
from planner.search.pinned import Pinned
from planner.speed.step import SpeedConstants, StepTime, step_time
from planner.specs.training import ParallelPlan, TrainingSpec
from planner.search.validate import plan_problems

Backend = Literal["deepspeed", "megatron"]


@dataclass(frozen=True)
class Capabilities:
    """What a training backend can run."""

    sequence_parallel: bool
    interleave: bool
    context_parallel: bool
    selective_recompute: bool
    expert_parallel: bool
    zero_with_pipeline: tuple[int, ...]
    tensor_with_pipeline: bool = True  # tp > 1 and pp > 1 in one plan
    pipeline_without_zero: tuple[str, ...] = ("fp32", "fp16", "bf16", "fp8")  # precisions pp > 1 runs in with ZeRO 0


CAPABILITIES: dict[Backend, Capabilities] = {
    # What orch launches: DeepSpeed with AutoTP (no sequence parallelism), PipelineModule (1F1B,
    # no interleaving, ZeRO 0/1 only), per-layer activation checkpointing (full only). AutoTP and
    # PipelineModule do not combine: AutoTP builds its (data, tensor) groups over the whole world,
    # across pipeline stages (deepspeed/runtime/engine.py _configure_tensor_parallel_states).
    # A bf16 pipeline without ZeRO trains, but its checkpoints do not load back: DeepSpeed 0.19 wraps
    # it in BF16_Optimizer, whose _load_legacy_checkpoint indexes a per-rank list where
    # engine._load_checkpoint hands it one dict (KeyError: 0); with ZeRO 1 it loads through the ZeRO
    # checkpoint files.
    "deepspeed": Capabilities(False, False, False, False, False, (0, 1), tensor_with_pipeline=False,
                              pipeline_without_zero=("fp32", "fp16")),
    # Megatron-LM-class frameworks (for comparison with published runs; orch does not launch them):
    # the distributed optimizer shards optimizer states and gradients (ZeRO-2-like) beside pipelines.
    "megatron": Capabilities(True, True, True, True, True, (0, 1, 2)),
}


@dataclass(frozen=True)
class Candidate:
    memory: PlanMemory
    speed: StepTime

    @property
    def plan(self) -> ParallelPlan:
        return self.memory.plan


@dataclass
class SearchResult:
    ranked: list[Candidate]  # fitting plans, fastest first
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one example plan
    evaluated: int = 0
    near_misses: list[Candidate] = field(default_factory=list)  # the smallest non-fitting plans, smallest first
    near_miss_limit: int = 5

    @property
    def closest(self) -> PlanMemory | None:
        """The smallest plan that does not fit (what nothing-fits reports show)."""
        return self.near_misses[0].memory if self.near_misses else None

    def miss(self, mem: PlanMemory, speed: StepTime) -> None:
        """Keep ``mem`` if it is among the smallest plans that do not fit."""
        total = mem.memory.total
        if len(self.near_misses) >= self.near_miss_limit and total >= self.near_misses[-1].memory.memory.total:
            return
        self.near_misses.append(Candidate(mem, speed))
        self.near_misses.sort(key=lambda c: c.memory.memory.total)
        del self.near_misses[self.near_miss_limit:]

    def reject(self, reason: str, example: str) -> None:
        self.rejected[reason] += 1
        self.examples.setdefault(reason, example)

    def slower_buckets(self) -> dict[str, int]:
        """Fitting plans other than the best, grouped by how much slower they are."""
        if not self.ranked:
            return {}
        best = self.ranked[0].speed.tokens_per_s
        buckets: Counter = Counter()
        for cand in self.ranked[1:]:
            pct = (best / cand.speed.tokens_per_s - 1) * 100
            label = "slower by <5%" if pct < 5 else "slower by 5-25%" if pct < 25 else "slower by 25-100%" if pct < 100 else "slower by >100%"
            buckets[label] += 1
        return dict(buckets)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two_upto(n: int) -> list[int]:
    out, p = [], 1
    while p <= n:
        out.append(p)
        p *= 2
    return out


def _choices(pinned_value, free: list) -> list:  # type: ignore[no-untyped-def]
    return [pinned_value] if pinned_value is not None else free


def _shapes(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, pinned: Pinned, caps: Capabilities) -> Iterator[tuple[int, int, int, int, int]]:
    """(dp, tp, pp, cp, ep) whose product is the GPU count."""
    n = cluster.num_gpus
    tps = _choices(pinned.tp, [t for t in _powers_of_two_upto(cluster.gpus_per_node) if n % t == 0])
    # Any stage count up to the layer count: uneven splits (layers_per_stage) are allowed, as the
    # Llama 3 paper (126 layers over 16 stages) and BLOOM (70 over 12) ran them.
    pps = _choices(pinned.pp, [p for p in _divisors(n) if p <= model.num_layers])
    long_seq = training.seq_len >= 16384
    cps = _choices(pinned.cp, [c for c in _powers_of_two_upto(64) if caps.context_parallel and long_seq] or [1])
    for tp in tps:
        for pp in pps:
            for cp in cps:
                if n % (tp * pp * cp):
                    continue
                dp = n // (tp * pp * cp)
                if pinned.dp is not None and pinned.dp != dp:
                    continue
                eps = _choices(pinned.ep, [e for e in _divisors(dp) if model.is_moe and caps.expert_parallel and model.num_experts % e == 0] or [1])
                for ep in eps:
                    yield dp, tp, pp, cp, ep


def _unsupported(pinned: Pinned, caps: Capabilities, backend: str) -> str | None:
    """A pinned dimension the backend cannot run rules out every plan."""
    if pinned.recompute == "selective" and not caps.selective_recompute:
        return f"invalid: selective recompute on {backend}"
    if pinned.sp and not caps.sequence_parallel:
        return f"invalid: sequence parallelism on {backend}"
    if (pinned.cp or 1) > 1 and not caps.context_parallel:
        return f"invalid: context parallelism on {backend}"
    if (pinned.interleave or 1) > 1 and not caps.interleave:
        return f"invalid: interleaved pipeline on {backend}"
    if (pinned.ep or 1) > 1 and not caps.expert_parallel:
        return f"invalid: expert parallelism on {backend}"
    return None


def _full_recompute_blocked(model: ModelSpec, training: TrainingSpec, finetune: FinetuneSpec | None) -> str:
    """Why transformers/peft refuse gradient checkpointing for this job ('' if they do not)."""
    if model.implementation != "huggingface" or (finetune is not None and finetune.method == "mezo"):
        return ""
    from planner.memory.activations import profile_of

    return profile_of(model, training, finetune, "cuda").kept_error


def _micro_batches(training: TrainingSpec, dp: int, pinned: Pinned) -> list[int]:
    if training.global_batch:
        if training.global_batch % dp:
            return []
        per_rank = training.global_batch // dp
        free = [b for b in _divisors(per_rank) if b <= 64]
    else:
        free = [1, 2, 4, 8, 16, 32]
    return _choices(pinned.micro_batch, free)


def _default_accum(pp: int) -> int:
    """Without a global batch, a pipeline gets 4 micro-batches per stage per step, which bounds the
    1F1B bubble (pp-1)/m below 25% (Narayanan et al. 2021, section 2.2); without a pipeline, 1."""
    return 4 * pp if pp > 1 else 1


def search(
    model: ModelSpec,
    cluster: ClusterSpec,
    training: TrainingSpec,
    pinned: Pinned | None = None,
    *,
    backend: Backend = "deepspeed",
    constants: SpeedConstants | None = None,
    finetune: FinetuneSpec | None = None,
) -> SearchResult:
    pinned = pinned or Pinned()
    if backend == "megatron" and model.implementation != "megatron":
        model = model.model_copy(update={"implementation": "megatron"})  # its fused kernels, its vocab split
    caps = CAPABILITIES[backend]
    result = SearchResult(ranked=[])
    unsupported = _unsupported(pinned, caps, backend)
    if unsupported:
        result.reject(unsupported, "every plan")
        return result
    recomputes = ["none", "selective", "full"] if caps.selective_recompute else ["none", "full"]
    for dp, tp, pp, cp, ep in _shapes(model, cluster, training, pinned, caps):
        mbs = _micro_batches(training, dp, pinned)
        shape = ParallelPlan.model_construct(dp=dp, tp=tp, pp=pp, cp=cp, ep=ep, sp=False, interleave=1, zero_stage=0,
                                             offload="none", micro_batch=mbs[0] if mbs else 1, grad_accum=1, recompute="none")
        if not mbs:
            result.reject(f"invalid: global batch {training.global_batch} not divisible by dp={dp}", shape.describe())
            continue
        if tp > 1 and pp > 1 and not caps.tensor_with_pipeline:
            result.reject(f"invalid: tensor with pipeline parallelism on {backend}", shape.describe())
            continue
        problems = plan_problems(model, cluster, training.model_copy(update={"global_batch": 0}), shape)
        if problems:
            result.reject("invalid: " + problems[0].problem.split(" of ")[0].split(" (")[0], shape.describe())
            continue
        zeros = _choices(pinned.zero_stage, [0, 1, 2, 3] if pp == 1 else list(caps.zero_with_pipeline))
        for zero in zeros:
            if pp > 1 and zero not in caps.zero_with_pipeline:
                result.reject(f"invalid: ZeRO {zero} with pipeline parallelism on {backend}", shape.describe())
                continue
            if pp > 1 and zero == 0 and training.precision not in caps.pipeline_without_zero:
                result.reject(f"invalid: {training.precision} pipeline without ZeRO on {backend}", shape.describe())
                continue
            allowed = ["none"] + (["optimizer"] if zero >= 1 else []) + (["optimizer+params"] if zero == 3 else [])
            for offload in _choices(pinned.offload, allowed):
                if offload not in allowed:
                    result.reject(f"invalid: offload {offload} with ZeRO {zero}", shape.describe())
                    continue
                _search_branch(model, cluster, training, pinned, caps, recomputes, shape, zero, offload, mbs, result, constants, finetune)
    # Fastest first by throughput: with a fixed global batch this is the shortest step; without
    # one, plans process different batches and tokens per second is what compares them.
    result.ranked.sort(key=lambda c: -c.speed.tokens_per_s)
    return result


def _search_branch(model, cluster, training, pinned, caps, recomputes, shape, zero, offload, mbs, result, constants, finetune):  # type: ignore[no-untyped-def]
    """All recompute / sp / interleave / micro-batch choices of one (shape, ZeRO, offload)."""
    tp, pp = shape.tp, shape.pp
    sps = _choices(pinned.sp, [False, True] if caps.sequence_parallel and tp > 1 else [False])
    per_stage, uneven = divmod(model.num_layers, pp)
    # Virtual stages dividing an even split; with an already uneven split (Llama 3: 126 layers over
    # 16 stages) any count up to the layers per stage.
    vs = _choices(pinned.interleave, [
        v for v in (1, 2, 3, 4, 6, 8)
        if caps.interleave and pp > 1 and v <= per_stage and (uneven or per_stage % v == 0)
    ] or [1])
    full_blocked = _full_recompute_blocked(model, training, finetune)
    for recompute in _choices(pinned.recompute, recomputes):
        if recompute == "full" and full_blocked:
            result.reject(f"invalid: full recompute ({full_blocked})", shape.describe())
            continue
        for sp in sps:
            for v in vs:
                for mb in mbs:
                    ga = training.global_batch // (mb * shape.dp) if training.global_batch else _default_accum(pp)
                    plan = ParallelPlan.model_construct(
                        dp=shape.dp, tp=tp, pp=pp, cp=shape.cp, ep=shape.ep, sp=sp, interleave=v, zero_stage=zero,
                        offload=offload, micro_batch=mb, grad_accum=ga, recompute=recompute,
                    )
                    mem = evaluate(model, cluster, training, plan, finetune=finetune)
                    result.evaluated += 1
                    if not mem.fits:
                        result.reject("does not fit", plan.describe())
                        if not result.near_misses or mem.memory.total < result.near_misses[-1].memory.memory.total \
                                or len(result.near_misses) < result.near_miss_limit:
                            result.miss(mem, step_time(model, cluster, training, plan, constants, finetune))
                        break  # larger micro-batches need more memory still
                    result.ranked.append(Candidate(mem, step_time(model, cluster, training, plan, constants, finetune)))
