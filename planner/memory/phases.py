"""The peak of one rank: the largest of what is alive together at each phase of a training step.

The memory components (planner.memory.evaluate.MemoryBreakdown) are each at their own largest, and those
are not alive at the same time: the gradients grow as the backward frees the activations. What is
alive together (measured on CPU ranks from the allocator's events: tests/planner/test_phases.py,
tests/launch/test_profile.py):

- forward, stage 3 only: the flat buffers of its coalesced all-gathers beside the gathered
  parameters (planner.memory.model_states, gather_buffers), at the forward's last gathers;
- loss, the start of the backward: parameters, optimizer, the gradients alive before the backward
  (stage 3: its partition and bucket), every saved activation, and the loss's fp32 gradients over
  the logits (planner.memory.activations.loss_grad_bytes, 8V bytes per token on Hugging Face models);
- backward: at the end of each part of the model (head, layers, embedding, in backward order) the
  activations not yet freed and the part's working set of activation gradients, beside the
  gradients produced so far as ZeRO buckets them (planner.memory.model_states.Backward); then the end of
  the backward, its reduce, activations freed;
- step: the optimizer step, activations freed: parameters (stage 3: the partitions), optimizer,
  the gradients that outlive the backward and the larger of the gradient norm's fp64 copy of one
  tensor and the step's fp32 copies.

Otherwise the forward does not set the peak: its largest point, the loss's forward (the 16-bit
logits and their fp32 copy, 6V per token), stays under the loss phase's 8V. Where the backward is
not modelled (gradient accumulation and pipelines, whose earlier micro-batches' gradients live on;
offload; fine-tuning methods), every gradient is counted beside every activation from the loss on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from planner.finetune.methods import FinetuneSpec
from planner.memory.activations import backward_parts
from planner.memory.profile import Kernels
from planner.structure.model import ModelSpec
from planner.memory.model_states import Backward, StateBytes
from planner.structure.params import ParamTensor, embedding_tensors, experts_apart, head_tensors, numel_per_rank, stage_layers
from planner.specs.training import ParallelPlan, TrainingSpec

PhaseName = Literal["forward", "loss", "backward", "step"]
Part = Literal["head", "layer", "embedding"]


@dataclass(frozen=True)
class Segment:
    """A part of the model as the backward passes it."""

    part: Part
    activations: int  # bytes its backward frees
    elements: int  # gradient elements its backward produces
    largest: int  # elements of its largest gradient
    working: tuple[tuple[float, int], ...] = ()  # (fraction of its gradients produced, bytes its backward holds
    # beyond the saved activations of the parts after it)
    count: int = 1  # consecutive identical parts this segment stands for (the layers of one kind)


@dataclass(frozen=True)
class Phase:
    """Bytes alive together at one point of a step."""

    name: PhaseName
    parameters: int
    gradients: int
    optimizer: int
    activations: int  # saved activations, with the loss's gradients in the loss phase

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations


def backward_segments(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, stage: int,
                      finetune: FinetuneSpec | None = None, kernels: Kernels = "cuda") -> list[Segment]:
    """The parts of a stage in backward order, one micro-batch: the head (last stage; with tied
    embeddings and pp = 1 the shared matrix's gradient comes with the embedding, whose backward
    completes it), each layer, the embedding (first stage; an empty part elsewhere), with the
    activations each frees and its working set (planner.memory.activations.backward_parts). Expert
    parameters kept apart (params.experts_apart) are not walked (StateBytes.__add__)."""
    # What a part's backward frees and holds does not depend on dp, ZeRO, offload or accumulation:
    # a search evaluates many such plans per shape, so the segments are memoized per layout.
    key = ("segments", m.implementation, training, plan.micro_batch, plan.tp, plan.pp, plan.cp, plan.ep, plan.sp,
           plan.interleave, plan.recompute, stage, finetune, kernels)
    return m.layout.memo(key, lambda: _segments(m, training, plan, stage, finetune, kernels))


def _segments(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, stage: int,
              finetune: FinetuneSpec | None, kernels: Kernels) -> list[Segment]:
    acts = backward_parts(m, training, plan, stage, finetune, kernels)
    if not acts:
        return []
    layers = stage_layers(m.num_layers, plan.pp, stage)
    parts: list[tuple[Part, object]] = [("head", "head")] if stage == plan.pp - 1 else []
    parts += [("layer", m.layout.layer_kinds[i]) for i in reversed(layers)]
    parts.append(("embedding", "embedding" if stage == 0 else None))
    runs: list[list] = []  # [key, count]: the same layer again makes one segment, counted
    for (freed, working), (part, which) in zip(acts, parts):
        key = (part, which, freed, working)
        if runs and runs[-1][0] == key:
            runs[-1][1] += 1
        else:
            runs.append([key, 1])
    out = []
    for (part, which, freed, working), count in runs:
        elements, largest = _dense_sizes(m, which, plan.tp, plan.ep, plan.pp > 1)
        out.append(Segment(part, activations=freed, elements=elements, largest=largest, working=working, count=count))
    return out


def _dense_sizes(m: ModelSpec, which: object, tp: int, ep: int, tied_copy: bool) -> tuple[int, int]:
    """(elements, largest tensor) per tensor rank of the parameters of a part whose states the
    backward walk follows (experts too, where they are not kept apart: params.experts_apart): "head",
    "embedding", a layer kind's index, or None (an empty part); memoized per layout."""
    def compute() -> tuple[int, int]:
        if which is None:
            return 0, 0
        tensors: tuple[ParamTensor, ...] = (
            head_tensors(m, with_tied_copy=tied_copy) if which == "head"
            else embedding_tensors(m) if which == "embedding" else m.layout.kinds[which].tensors  # type: ignore[index]
        )
        sizes = [numel_per_rank(t, m, tp) for t in tensors if not (t.expert and apart)]
        return sum(sizes), max(sizes, default=0)

    apart = experts_apart(m, ep)
    return m.layout.memo(("dense_sizes", m.implementation, which, tp, apart, tied_copy and which == "head"), compute)


def step_phases(states: StateBytes, activations: int, loss_grad: int, segments: Sequence[Segment],
                rebuilt: int = 0) -> list[Phase]:
    """Every point of a step that can set the peak, in the order of the step. ``segments`` are
    those of backward_segments, or none where the backward is not walked. ``rebuilt``: under full
    recompute, the layer rebuilt in the backward, counted in ``activations`` but not alive yet in
    the forward and at the loss."""
    p, o = states.parameters, states.optimizer
    bw = states.backward
    # Without a modelled backward every gradient is counted beside every activation from the start.
    before = states.gradients if bw is None else bw.before
    phases = []
    if states.gather_buffers:
        # Stage 3's last all-gathers of the forward (the head's), the head's activations not yet made.
        head = sum(seg.activations for seg in segments if seg.part == "head")
        phases.append(Phase("forward", p + states.gather_buffers, before, o, max(0, activations - rebuilt - head)))
    phases.append(Phase("loss", p, before, o, activations - rebuilt + loss_grad))
    if bw is not None:
        phases += _backward(p, o, bw, activations - rebuilt, segments)
    else:
        phases += _backward_all_gradients(p, o, states.gradients, activations - rebuilt, segments)
    # The gradient norm's fp64 copy, then the fp32 copies: one after the other, beside what the step keeps.
    gradients = states.gradients_at_step + max(states.step_norm, states.step_extra)
    phases.append(Phase("step", states.parameters_at_step, gradients, o, 0))
    return phases


def _backward(p: int, o: int, bw: Backward, activations: int, segments: Sequence[Segment]) -> list[Phase]:
    """Inside each segment's backward: its working set at each fraction of its gradients produced
    (with the largest of them in flight), beside the activations of the segments after it and its
    gathered parameters not yet released; then the end of the backward."""
    phases, produced, freed, before = [], 0, 0, 0
    started = not bw.first_part  # a frozen part's backward makes no gradient, so no bucket yet
    for seg in segments:
        started = started or seg.part == bw.first_part
        for _ in range(seg.count):
            before = produced
            freed += seg.activations
            alive = max(0, activations - freed)
            for fraction, working in seg.working or ((1.0, 0),):
                made = before + int(round(fraction * seg.elements))
                grads = bw.gradients(made, seg.largest if made > before else 0) if started else bw.before
                phases.append(Phase("backward", p - bw.released(before), grads, o, alive + working))
            produced += seg.elements
    phases.append(Phase("backward", p - bw.released(before), bw.end, o, 0))
    return phases


def _backward_all_gradients(p: int, o: int, gradients: int, activations: int, segments: Sequence[Segment]) -> list[Phase]:
    """Where the states do not say how the gradients fill, each part's backward with every gradient
    already counted (an upper bound on the gradients, exact on the activations)."""
    phases, freed = [], 0
    for seg in segments:
        freed += seg.activations  # the first of identical parts holds the most: the rest free more
        working = max((w for _, w in seg.working), default=0)
        phases.append(Phase("backward", p, gradients, o, max(0, activations - freed) + working))
        freed += seg.activations * (seg.count - 1)
    return phases


def peak(phases: Sequence[Phase]) -> Phase:
    """The phase that holds the most (the earliest of equals)."""
    return max(phases, key=lambda ph: ph.total)
