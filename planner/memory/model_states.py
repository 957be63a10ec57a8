"""Model states (parameters, gradients, optimizer states) as DeepSpeed 0.19 allocates them.

Symbols follow the ZeRO paper (Rajbhandari et al. 2020, section 3): Psi parameters on the rank
(after tensor/pipeline/expert splitting), N_d the ZeRO (data-parallel) group, K optimizer bytes
per parameter. With DeepSpeed-specific buffers switched off, stages 1/2/3 reduce to the paper's
(2 + 2 + K/N_d)Psi, (2 + (2 + K)/N_d)Psi and (2 + 2 + K)Psi/N_d.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.specs.training import Optimizer, ParallelPlan, TrainingSpec
from planner.units import DTYPE_BYTES
from planner.memory.zero_buffers import ZeroBuffers

# Optimizer state bytes per trainable parameter, excluding the fp32 master copy.
# adam/adamw: exp_avg + exp_avg_sq in fp32 (torch.optim.AdamW; DeepSpeed FusedAdam/CPUAdam alike).
# sgd-momentum: one fp32 momentum buffer; lion: one fp32 momentum (Chen et al. 2023, Algorithm 2).
# adamw-8bit: two 8-bit states + one fp32 absmax per 2048-element block each (bitsandbytes
# Optimizer8bit, block-wise quantisation, Dettmers et al. 2022).
# adafactor: factored second moment, rows + columns per matrix (Shazeer & Stern 2018): counted per
# tensor shape by the caller through ``adafactor_state_elements``; here 0 per element.
OPTIMIZER_STATE_BYTES: dict[Optimizer, float] = {
    "adamw": 8.0,
    "adam": 8.0,
    "sgd": 0.0,
    "sgd-momentum": 4.0,
    "lion": 4.0,
    "adamw-8bit": 2.0 + 2 * 4 / 2048,
    "adafactor": 0.0,
}

MASTER_BYTES = 4  # fp32 master weights: every ZeRO stage keeps them, even when training in fp32.
FP32_GRAD_BYTES = 4  # fp32 gradient partition the optimizers build for the step.
# The step's gradient norm (for clipping and the overflow check) runs tensor by tensor in fp64 where
# the device has it (zero/utils.py get_norm_dtype; stage_1_and_2.py and stage3.py get_grad_norm_direct:
# ``g.data.to(get_norm_dtype())``): an fp64 copy of the largest gradient tensor of the partition.
NORM_BYTES = 8


@dataclass(frozen=True)
class Backward:
    """How a rank's model states move through one backward as DeepSpeed 0.19 fills its buffers
    (file references to deepspeed/runtime/; the peaks it sets measured on CPU ranks,
    tests/planner/test_phases.py),
    against p, the elements whose gradient the backward has produced so far (in backward order),
    and g, the elements of the gradient produced last. planner.memory.phases walks it beside the
    activations the backward frees."""

    before: int = 0  # gradient bytes alive when the backward starts (stage 3: partition and bucket, from init)
    bucket: int = 0  # bytes allocated with the first gradient (stage_1_and_2.py process_gradients -> setup_buckets)
    kept: int = 0  # bytes per produced element kept to the end of the backward (stage 0/1: full 16-bit gradients)
    partition: int = 0  # bytes allocated at the first reduce (stage 2: copy_grads_in_partition's grads_in_partition)
    first_reduce: int = 0  # elements produced when the first reduce during the backward has run; 0: none runs
    reduce_copy: int = 0  # bytes each reduce during the backward copies (stage 3: see state_bytes)
    in_flight: int = 0  # bytes per element of g, alive while it is copied into the bucket (stage 2/3)
    end: int = 0  # gradient bytes at the end of the backward (its reduce), the activations freed
    gathered: int = 0  # stage 3: parameter elements gathered at the start, each released after its own backward
    gathered_bytes: int = 0  # bytes per gathered element
    first_part: str = ""  # fine-tuning: the part of the model whose backward makes the first trainable gradient
    # ("layer": a frozen head makes none); "": the first part's

    def gradients(self, produced: int, last: int) -> int:
        """Gradient bytes alive once ``produced`` elements' gradients exist, ``last`` the latest."""
        if produced == 0:
            return self.before
        alive = self.before + self.bucket + self.kept * produced + self.in_flight * last
        if self.first_reduce and produced > self.first_reduce:
            alive += self.partition + self.reduce_copy
        return alive

    def released(self, produced: int) -> int:
        """Parameter bytes freed once the backward has passed the modules of ``produced`` elements."""
        return self.gathered_bytes * min(self.gathered, produced)


@dataclass(frozen=True)
class StateBytes:
    """Model-state bytes of one rank on the GPU at the backward peak, the extra gradient bytes the
    optimizer step adds when activations are gone, and what offload puts in host memory."""

    parameters: int
    gradients: int
    optimizer: int
    step_extra: int = 0
    host: int = 0
    step_gradients: int | None = None  # gradient bytes still alive at the optimizer step; None: all of ``gradients``
    step_parameters: int | None = None  # parameter bytes at the optimizer step; None: all of ``parameters``
    backward: Backward | None = None  # how they move through the backward; None: not modelled (all gradients throughout)
    gather_buffers: int = 0  # stage 3: flat all-gather buffers alive in the forward beside the gathered parameters
    step_norm: int = 0  # the step's fp64 copy of one gradient tensor for its norm, beside ``gradients_at_step``

    @property
    def gradients_at_step(self) -> int:
        return self.gradients if self.step_gradients is None else self.step_gradients

    @property
    def parameters_at_step(self) -> int:
        return self.parameters if self.step_parameters is None else self.step_parameters

    def __add__(self, other: StateBytes) -> StateBytes:
        """Two parts of one rank (dense and expert parameters); their backward is not modelled."""
        both_all = self.step_gradients is None and other.step_gradients is None
        both_params = self.step_parameters is None and other.step_parameters is None
        return StateBytes(
            self.parameters + other.parameters,
            self.gradients + other.gradients,
            self.optimizer + other.optimizer,
            self.step_extra + other.step_extra,
            self.host + other.host,
            None if both_all else self.gradients_at_step + other.gradients_at_step,
            None if both_params else self.parameters_at_step + other.parameters_at_step,
        )


@dataclass(frozen=True)
class ShardShape:
    """What ZeRO needs to know of the parameters it shards."""

    psi: int  # parameters on the rank before ZeRO (after tensor/pipeline/expert splitting)
    n: int  # ZeRO group size (data-parallel ranks sharing these parameters)
    largest: int  # largest single parameter tensor, elements
    partition_span: int  # elements of the whole parameters overlapping the fullest partition (P_in)
    first_bucket: int = 0  # elements of the leading parameters the first reduce bucket takes (ZeRO-1, B_1)


def padded(psi: int, n: int) -> int:
    """Stage 1/2 flatten and pad to a multiple of 2N elements (nccl_start_alignment_factor = 2,
    deepspeed/runtime/zero/stage_1_and_2.py)."""
    align = 2 * n
    return -(-psi // align) * align


def state_bytes(
    shape: ShardShape,
    *,
    training: TrainingSpec,
    plan: ParallelPlan,
    buffers: ZeroBuffers | None,
    fp32_grads: bool = False,
    gloo: bool = False,
) -> StateBytes:
    """Model-state bytes of one rank, as DeepSpeed 0.19 allocates them (file references are to
    deepspeed/runtime/; each was measured exactly on 2 CPU ranks, see tests/planner/test_model_states.py).

    ``fp32_grads`` selects Megatron-LM's fp32 gradient accumulation (no ZeRO); ``gloo``: the ranks
    talk over gloo (CPU), whose reduce-scatter copies its input once more.
    ``buffers=None`` gives the ZeRO paper's idealised count: no buckets, no padding, no step-time
    copies, no gathered working set."""
    psi, n = shape.psi, shape.n
    mixed = training.precision != "fp32"
    b = DTYPE_BYTES["bf16"] if mixed else DTYPE_BYTES["fp32"]  # model (and gradient) dtype
    k = OPTIMIZER_STATE_BYTES[training.optimizer]
    z = plan.zero_stage
    ideal = buffers is None
    if z == 0:
        if fp32_grads and mixed:
            # Megatron-LM accumulates gradients in an fp32 main_grad buffer and steps on it directly:
            # 2 + 4 + 4 + 8 = 18 bytes per parameter with Adam (Korthikanti et al. 2022, Figure 1).
            # The buffer is allocated with the model (megatron/core/distributed: _ParamAndGradBuffer).
            main_grad = FP32_GRAD_BYTES * psi
            return _per_micro_batch(StateBytes(b * psi, main_grad, int((MASTER_BYTES + k) * psi),
                                               backward=Backward(before=main_grad, end=main_grad)), plan)
        return _per_micro_batch(_stage0(psi, b, k, mixed, ideal), plan)
    psi_p = psi if ideal else padded(psi, n)
    part = -(-psi_p // n)
    opt = int((MASTER_BYTES + k) * part)
    bucket = 0 if ideal else b * buffers.reduce_bucket_size * (2 if buffers.overlap_comm and z < 3 else 1)
    # While a parameter's gradient is copied into the bucket and reduced, its full 16-bit gradient
    # is alive too: the largest tensor bounds it (measured, tests/launch/test_profile.py).
    in_flight = 0 if ideal else b * shape.largest
    span = part if ideal else shape.partition_span
    step_fp32 = 0 if ideal else (b + FP32_GRAD_BYTES) * part  # flat 16-bit partition, then its fp32 copy
    if z == 1:
        # Every full 16-bit gradient stays until the reduce after backward (engine.py
        # allreduce_gradients -> stage_1_and_2.py reduce_gradients), which copies them into the ipg
        # bucket in registration order, freeing each full gradient as it is copied
        # (reduce_independent_p_g_buckets_and_remove_grads: grad.data = a view of the bucket). The
        # partition buffer (copy_grads_in_partition: grads_in_partition) is allocated at the first
        # bucket's reduce, when the B_1 elements of that bucket are freed already: rank 0's peak is
        # the larger of b Psi + bucket (the reduce's entry) and b(Psi - B_1) + bucket + b P_in
        # (measured exactly, tests/launch/test_profile.py). With overlap_comm the hooks reduce
        # during the backward instead; B_1 is not subtracted then.
        freed = 0 if ideal or buffers.overlap_comm else b * shape.first_bucket
        grads = b * psi if ideal else max(b * psi + bucket, b * psi - freed + bucket + b * span)
        # At the step only the partition buffer is left of them (full gradients and bucket freed,
        # independent_gradient_partition_epilogue: _release_ipg_buffers).
        # In the backward: the bucket is allocated at the first gradient's hook, the full gradients
        # accumulate beside it (the reduce runs after the backward, when the activations are gone).
        bw = Backward(bucket=bucket, kept=b, end=grads)
        state = StateBytes(b * psi_p, grads, opt, step_fp32, step_gradients=None if ideal else b * span, backward=bw,
                           step_norm=0 if ideal else NORM_BYTES * min(shape.largest, part))
    elif z == 2:
        # A bucket holding every parameter (reduce_bucket_size >= Psi) is reduced once, in the
        # backward's epilogue (stage_1_and_2.py independent_gradient_partition_epilogue), after the
        # last gradient was copied in: the gradient in flight and the partition buffer are then
        # never alive together (measured, tests/launch/test_profile.py).
        one_reduce = not ideal and buffers.reduce_bucket_size >= psi
        grads = bucket + (max(b * span, in_flight) if one_reduce else b * span + in_flight)
        # In the backward: the bucket from the first gradient's hook, each gradient in flight while
        # copied into it, the partition buffer from the first reduce (a full bucket) on.
        first = 0 if ideal or one_reduce else buffers.reduce_bucket_size
        bw = Backward(bucket=bucket, partition=b * span, first_reduce=first, in_flight=b, end=grads)
        state = StateBytes(b * psi_p, grads, opt, step_fp32, step_gradients=None if ideal else b * span, backward=bw,
                           step_norm=0 if ideal else NORM_BYTES * min(shape.largest, part))
    else:
        state = _stage3(shape, b, k, part, buffers, ideal)
        # The gradient in flight is gone by the step; the partition and the bucket stay (stage3.py);
        # the step works on the parameter partitions, the gathered parameters released.
        state = StateBytes(state.parameters, state.gradients + in_flight, state.optimizer, state.step_extra,
                           step_gradients=state.gradients, step_parameters=b * part,
                           backward=None if ideal else _stage3_backward(state, shape, b, part, buffers, gloo),
                           gather_buffers=0 if ideal else _gather_buffers(state, b, part, buffers),
                           step_norm=0 if ideal else NORM_BYTES * -(-shape.largest // n))  # per-parameter partitions
    if plan.offload != "none":
        state = _offload(state, shape, b, k, part, plan, buffers)
    return _per_micro_batch(state, plan)


def _per_micro_batch(state: StateBytes, plan: ParallelPlan) -> StateBytes:
    """With gradient accumulation (and pipelines' micro-batches) the gradients of the earlier
    micro-batches are alive through the later ones: the backward's walk is then not modelled, every
    gradient is counted beside every activation (planner.memory.phases)."""
    return state if plan.grad_accum == 1 else replace(state, backward=None)


def _gather_buffers(state: StateBytes, b: int, part: int, buffers: ZeroBuffers) -> int:
    """Stage 3's forward gathers parameters a prefetch bucket at a time into one flat buffer
    (zero/partition_parameters.py _all_gather_dtype), copies each parameter out of it
    (AllGatherCoalescedHandle.wait: ``param.data = torch.cat(partitions)``), and the buffer lives
    until the last parameter of its bucket is fetched (partitioned_param_coordinator.py
    __inflight_param_registry); with the next bucket prefetched, two are in flight (measured on
    CPU ranks, tests/planner/test_phases.py)."""
    gathered = (state.parameters - b * part) // b
    return b * min(gathered, 2 * buffers.stage3_prefetch_bucket_size)


def _stage3_backward(state: StateBytes, shape: ShardShape, b: int, part: int, buffers: ZeroBuffers, gloo: bool) -> Backward:
    """Stage 3 through the backward: the gradient partition and the bucket are there from init;
    each gradient is in flight while copied into the bucket; a full bucket is reduced by
    reduce_scatter_coalesced (runtime/comm/coalesced_collectives.py), which first copies the
    bucket's gradients into one flat buffer (``torch.cat``), and over gloo the reduce-scatter clones
    that buffer again (torch ProcessGroupGloo::reduce_scatter_tensor_coalesced: ``inputTensors[i].clone()``);
    the last reduce runs at the end of the backward (stage3.py independent_gradient_partition_epilogue).
    The gathered parameters are released module by module as the backward passes them."""
    elements = min(buffers.reduce_bucket_size, shape.psi)
    copy = b * elements * (2 if gloo else 1)
    gathered = (state.parameters - b * part) // b
    first = buffers.reduce_bucket_size if buffers.reduce_bucket_size < shape.psi else 0
    return Backward(before=state.gradients, first_reduce=first, reduce_copy=copy, in_flight=b,
                    end=state.gradients + copy, gathered=gathered, gathered_bytes=b)


def _stage0(psi: int, b: int, k: float, mixed: bool, ideal: bool) -> StateBytes:
    """No ZeRO. Mixed precision with torch AdamW goes through FP16_UnfusedOptimizer
    (fp16/unfused_optimizer.py): 16-bit params and grads, fp32 master, moments, and fp32 copies of
    all gradients during the step. fp32 training has no wrapper: params, grads, moments."""
    if not mixed:
        return StateBytes(4 * psi, 4 * psi, int(k * psi), backward=Backward(kept=4, end=4 * psi))
    return StateBytes(b * psi, b * psi, int((MASTER_BYTES + k) * psi), 0 if ideal else FP32_GRAD_BYTES * psi,
                      backward=Backward(kept=b, end=b * psi))


def _stage3(shape: ShardShape, b: int, k: float, part: int, buffers: ZeroBuffers | None, ideal: bool) -> StateBytes:
    """Stage 3 (zero/stage3.py): per-parameter padded partitions of params and gradients, fp32
    master and moments, a reduce bucket allocated at init and kept; gathered parameters stay alive
    while their reuse distance is under stage3_max_reuse_distance (partitioned_param_coordinator.py),
    which keeps about the last max_reuse_distance/2 elements of the forward gathered until their
    backward, plus the prefetch bucket; the step converts one sub-group at a time to fp32."""
    opt = int((MASTER_BYTES + k) * part)
    if ideal:
        return StateBytes(b * part, b * part, opt)
    assert buffers is not None
    psi = shape.psi
    gathered = min(psi, buffers.stage3_max_reuse_distance // 2 + buffers.stage3_prefetch_bucket_size)
    bucket = b * buffers.reduce_bucket_size
    sub_group = min(buffers.sub_group_size, part)
    return StateBytes(b * part + b * gathered, b * part + bucket, opt, (b + FP32_GRAD_BYTES) * sub_group)


def _offload(state: StateBytes, shape: ShardShape, b: int, k: float, part: int, plan: ParallelPlan, buffers: ZeroBuffers | None) -> StateBytes:
    """ZeRO-Offload (offload_optimizer: cpu): master weights, moments and the fp32 gradient move to
    pinned host memory, with a 16-bit staging copy of the partition; stage 1/2 keep a temporary
    gradient buffer of the largest parameter on the GPU instead of the partition buffer
    (stage_1_and_2.py temp_grad_buffer_for_gpu_offload); stage 3 moves its gradient partition to
    the host too. offload_param (stage 3) moves the parameter partition as well."""
    host = state.optimizer + FP32_GRAD_BYTES * part + b * part
    if plan.zero_stage < 3:
        span = part if buffers is None else shape.partition_span
        grads = state.gradients - b * span + b * shape.largest
        host += b * shape.largest
    else:
        grads = state.gradients - b * part
    params = state.parameters
    if plan.offload == "optimizer+params":
        params -= b * part
        host += b * part
    return StateBytes(params, grads, 0, 0, host)
