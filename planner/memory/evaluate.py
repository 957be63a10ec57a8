"""Evaluate one ParallelPlan: the memory of the most loaded rank and whether it fits."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from planner.memory.activations import loss_grad_bytes, rebuilt_layer_bytes, stage_activation_bytes
from planner.memory.profile import Kernels
from planner.finetune.methods import FinetuneSpec
from planner.finetune.states import finetune_states
from planner.specs.hardware import ClusterSpec
from planner.structure.model import ModelSpec
from planner.memory.model_states import ShardShape, StateBytes, state_bytes
from planner.memory.partition import first_bucket, partition_span
from planner.memory.overheads import Overheads, overhead_bytes, process_groups
from planner.structure.params import layers_per_stage, experts_apart, stage_params, stage_tensor_sizes
from planner.memory.phases import Phase, PhaseName, backward_segments, peak, step_phases
from planner.specs.training import ParallelPlan, TrainingSpec
from planner.memory.zero_buffers import ZeroBuffers, plan_buffers


COMPONENTS = ("parameters", "gradients", "optimizer", "activations", "overhead")


class MemoryBreakdown(BaseModel):
    """Bytes of one rank: each component at its own largest over the step, and the peak, the
    largest of what is alive together at one phase of the step (planner.memory.phases). The components
    are not alive together, so they add up to more than the peak's live bytes, or, where the
    loss's gradient sets the peak, to less."""

    model_config = ConfigDict(frozen=True)

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int  # context, communicators, and allocator slack on the peak's live bytes
    peak_allocated: int  # live tensor bytes at the peak (the planner's torch.cuda.max_memory_allocated)
    peak_phase: PhaseName  # the phase of the step that sets the peak (planner.memory.phases)

    @property
    def total(self) -> int:
        """What the rank needs at its peak: what ``fits`` compares with the device."""
        return self.peak_allocated + self.overhead

    def as_dict(self) -> dict[str, int]:
        """The components and the peak's total, bytes (the JSON contract's ``memory``)."""
        return {**{c: getattr(self, c) for c in COMPONENTS}, "total": self.total}


class PlanMemory(BaseModel):
    """The evaluation of one plan."""

    model_config = ConfigDict(frozen=True)

    plan: ParallelPlan
    memory: MemoryBreakdown
    stage: int  # pipeline stage of the most loaded rank
    params_on_rank: int
    host_bytes_per_node: int
    gpu_memory_bytes: int
    host_memory_bytes: int

    @property
    def fits_gpu(self) -> bool:
        return self.memory.total <= self.gpu_memory_bytes

    @property
    def fits_host(self) -> bool:
        """Offloaded states must fit in the node's RAM too."""
        return self.host_bytes_per_node <= self.host_memory_bytes

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    @property
    def headroom_bytes(self) -> int:
        return self.gpu_memory_bytes - self.memory.total


def rank_states(
    model: ModelSpec,
    training: TrainingSpec,
    plan: ParallelPlan,
    stage: int,
    buffers: ZeroBuffers | None,
    finetune: FinetuneSpec | None = None,
    *,
    gloo: bool = False,
) -> tuple[StateBytes, int]:
    """Model states of a rank in ``stage``: dense parameters shard over dp, expert parameters over
    the expert-data-parallel group dp/ep (DeepSpeed MoE, ``expert_data_parallel_group``). ``gloo``:
    the ranks talk over gloo (planner.memory.model_states.state_bytes)."""
    sp = stage_params(model, tp=plan.tp, pp=plan.pp, ep=plan.ep, stage=stage)
    if finetune is not None and finetune.method != "full":
        return finetune_states(model, finetune, training, plan, stage, buffers), sp.total
    fp32_grads = model.implementation == "megatron"
    apart = sp.expert > 0 and experts_apart(model, plan.ep)
    dense = _shape(model, plan, stage, expert=False if apart else None, buffers=buffers)
    states = state_bytes(dense, training=training, plan=plan, buffers=buffers, fp32_grads=fp32_grads, gloo=gloo)
    if apart:
        expert = _shape(model, plan, stage, expert=True, buffers=None)
        states += state_bytes(expert, training=training, plan=plan, buffers=buffers, fp32_grads=fp32_grads, gloo=gloo)
    return states, sp.total


def _shape(model: ModelSpec, plan: ParallelPlan, stage: int, *, expert: bool | None, buffers: ZeroBuffers | None) -> ShardShape:
    """Dense parameters (``expert=None``: all of them, experts kept with the rest) shard over dp;
    expert parameters (E/ep experts per rank) over dp/ep. The first reduce bucket (ZeRO-1) is
    counted for the dense parameters only, which DeepSpeed reduces first; ``buffers=None`` counts
    none (conservative)."""
    sizes = stage_tensor_sizes(model, tp=plan.tp, pp=plan.pp, stage=stage, expert=expert, ep=plan.ep)
    n = plan.dp // plan.ep if expert else plan.dp
    span = partition_span(sizes, n) if plan.zero_stage in (1, 2) else 0
    b1 = first_bucket(tuple(sizes), buffers.reduce_bucket_size) if buffers is not None and plan.zero_stage == 1 else 0
    return ShardShape(psi=sum(sizes), n=n, largest=max(sizes, default=0), partition_span=span, first_bucket=b1)


def evaluate(
    model: ModelSpec,
    cluster: ClusterSpec,
    training: TrainingSpec,
    plan: ParallelPlan,
    *,
    overheads: Overheads | None = None,
    buffers: ZeroBuffers | None = None,
    activation_bytes_override: dict[int, int] | None = None,
    finetune: FinetuneSpec | None = None,
) -> PlanMemory:
    """Memory of the most loaded rank over all pipeline stages: the rank with the highest peak.

    ``activation_bytes_override`` maps stage -> activation bytes measured by the trace."""
    overheads = overheads or cluster.overheads
    buffers = buffers if buffers is not None else buffers_for(model, plan)
    groups = process_groups(dp=plan.dp, tp=plan.tp, pp=plan.pp, cp=plan.cp, ep=plan.ep)
    gloo = cluster.backend == "gloo"
    kernels = kernels_of(cluster)
    best: PlanMemory | None = None
    for stage in _candidate_stages(model.num_layers, plan.pp):
        states, n_params = rank_states(model, training, plan, stage, buffers, finetune, gloo=gloo)
        if activation_bytes_override is not None:
            acts = activation_bytes_override[stage]
        else:
            acts = stage_activation_bytes(model, training, plan, stage, finetune, kernels)
        top = stage_peak(model, training, plan, stage, states, acts, finetune, kernels)
        mem = MemoryBreakdown(
            **_components(states, acts),
            overhead=overhead_bytes(
                overheads, allocated_bytes=top.total, num_groups=groups, is_gpu=cluster.gpu.name != "cpu"
            ),
            peak_allocated=top.total,
            peak_phase=top.name,
        )
        result = PlanMemory(
            plan=plan,
            memory=mem,
            stage=stage,
            params_on_rank=n_params,
            host_bytes_per_node=states.host * cluster.gpus_per_node,
            gpu_memory_bytes=cluster.gpu.memory_bytes,
            host_memory_bytes=cluster.host_memory_bytes,
        )
        if best is None or mem.total > best.memory.total:
            best = result
    assert best is not None
    return best


def _components(states: StateBytes, acts: int) -> dict[str, int]:
    """Each component at its own largest. The optimizer step adds fp32 gradient copies after the
    activations are freed, beside the gradient bytes that outlive the backward (ZeRO-1/2: the
    partition buffer, not the bucket); where the step's gradients exceed the backward's gradients
    and activations together, the excess is shown under gradients (measured,
    tests/launch/test_profile.py)."""
    step_excess = max(0, states.gradients_at_step + states.step_extra - states.gradients - acts)
    return {"parameters": states.parameters, "gradients": states.gradients + step_excess,
            "optimizer": states.optimizer, "activations": acts}


def kernels_of(cluster: ClusterSpec) -> Kernels:
    """Whose kernels keep the activations: a CPU cluster's own (what a CPU run keeps), else CUDA's."""
    return "cpu" if cluster.gpu.name == "cpu" else "cuda"


def stage_peak(model: ModelSpec, training: TrainingSpec, plan: ParallelPlan, stage: int, states: StateBytes,
               acts: int, finetune: FinetuneSpec | None = None, kernels: Kernels = "cuda") -> Phase:
    """The phase of a step with the most bytes alive on a rank of ``stage`` (planner.memory.phases). The
    backward is walked part by part; where the states do not model how the gradients fill (gradient
    accumulation, pipelines, offload, fine-tuning methods) every gradient is counted from the loss on."""
    segments = backward_segments(model, training, plan, stage, finetune, kernels)
    rebuilt = rebuilt_layer_bytes(model, training, plan, stage, finetune, kernels)
    return peak(step_phases(states, acts, loss_grad_bytes(model, training, plan, stage, finetune, kernels), segments, rebuilt))


def buffers_for(model: ModelSpec, plan: ParallelPlan) -> ZeroBuffers:
    """The ZeRO buffers of a plan (planner.memory.zero_buffers.plan_buffers): what evaluate counts and what
    the DeepSpeed config writes."""
    largest = max(stage_params(model, tp=plan.tp, pp=plan.pp, ep=plan.ep, stage=s).total for s in {0, plan.pp - 1})
    return plan_buffers(largest)


def _candidate_stages(num_layers: int, pp: int) -> list[int]:
    """Stages that can be the most loaded: the first (embedding, most micro-batches in flight), the
    last (output layer, logits), and the earliest stage of each layer count under an uneven split
    (earlier stages hold more micro-batches in flight, so the earliest of equals dominates)."""
    counts = layers_per_stage(num_layers, pp)
    first_of_count = {c: counts.index(c) for c in set(counts)}
    return sorted({0, pp - 1, *first_of_count.values()})
