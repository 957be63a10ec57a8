"""Step time of a plan: compute (roofline per matmul with an achievable-efficiency ceiling),
tensor/context/expert/pipeline/data-parallel communication (planner.speed.comm), the pipeline bubble,
the optimizer step and offload traffic.

The efficiency constants are named below with their sources; they are fitted on the held-out runs
of tests/data/speed_runs.json and validated leave-one-source-out (bench/speed_validation.py,
tests/planner/test_speed_validation.py); tests/planner/test_published_runs.py checks the model on
the runs of tests/data/published_runs.json it was first calibrated on. Two implementations: Megatron's
fused kernels (``implementation="megatron"``, ``--backend megatron``) and plain PyTorch / Hugging
Face modules (the default DeepSpeed backend), which differ in the non-matmul traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from planner.speed.comm import all_gather_s, all_reduce_s, all_to_all_s, group_links, p2p_s, reduce_scatter_s
from planner.finetune.methods import FinetuneSpec, trainable_params
from planner.speed.flops import hardware_flops_per_token, model_flops_per_token, pass_multipliers
from planner.specs.hardware import ClusterSpec
from planner.structure.model import ModelSpec
from planner.structure.params import layers_per_stage, stage_params, total_params
from planner.specs.training import ParallelPlan, TrainingSpec


class SpeedConstants(BaseModel):
    """Achievable fractions of peak; fitted on the held-out published runs (bench/speed_validation.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gemm_efficiency: float = Field(
        default=0.94, gt=0, le=1,
        description="Sustained bf16/fp16 GEMM fraction of the GPU's maximum achievable matmul rate "
        "(GPUSpec.matmul_achievable_fraction x peak) inside a training step: non-ideal shapes, wave "
        "tails and clocks under sustained power bring it below the best-shape benchmark. Fitted by "
        "bench/speed_validation.py on the held-out sources of tests/data/speed_runs.json (the "
        "default is the fit on all of them; the LOSO figures refit it without each source).",
    )
    fp8_gemm_efficiency: float = Field(
        default=0.87, gt=0, le=1,
        description="FP8 GEMM fraction of the FP8 maximum achievable rate (Transformer Engine / torchao Float8 "
        "linears): per-tensor scaling, amax reductions and the casts around every GEMM keep FP8 "
        "steps ~1.3-1.5x faster than BF16, not 2x (NeMo and DGX Cloud tables list both). Fitted "
        "like gemm_efficiency on the fp8 rows.",
    )
    attention_efficiency: float = Field(
        default=0.425, gt=0, le=1,
        description="Attention-core forward+backward fraction of the bf16 achievable rate over the full "
        "s x s square for plain PyTorch / Hugging Face modules (SDPA or flash-attn; FlashAttention-2 "
        "reaches 50-73% forward, less backward, Dao 2023); causal masking skips about half the tiles, "
        "which this fraction absorbs. The core runs in bf16 also in FP8 training (Transformer "
        "Engine's default fp8_dpa=False). Fitted (0.425): the non-Megatron sources include "
        "llm-foundry's MPT runs, whose model yamls default attn_impl to its Triton FlashAttention kernel (Dao "
        "2023: FlashAttention-2 is 1.3-2.5x faster than it), so this is lower than FA2 alone.",
    )
    megatron_attention_efficiency: float = Field(
        default=0.70, gt=0, le=1,
        description="The same for Megatron-Core's attention, Transformer Engine's DotProductAttention "
        "(cuDNN fused attention; on Hopper the FlashAttention-3-class kernels, Shah et al. 2024: "
        "1.5-2x FlashAttention-2's throughput). Fitted with attention_efficiency.",
    )
    kernel_launch_s: float = Field(
        default=4e-6, ge=0, description="Fixed cost of one kernel launch or tiny op, seconds."
    )
    elementwise_bytes_per_token_per_hidden: float = Field(
        default=120.0, ge=0,
        description="Memory traffic of the non-matmul ops of one layer's forward per token, in units of "
        "h bytes, with fused kernels (Megatron's; torch.compile's; hand-fused) (fused layernorm, bias-GeLU/SwiGLU, bias-dropout-add, "
        "fused softmax/rotary: ~20 reads+writes of 16-bit tensors of width h, counted from the layer's "
        "op list, ~40) plus what else the layer streams that the roofline GEMMs do not (GEMM tails, "
        "gradient-buffer accumulation into fp32 main_grad); fitted with gemm_efficiency (120). Plain "
        "PyTorch modules stream this plus what their unfused norms, rotary and activation add "
        "(unfused_extra_bytes, counted from the modules, not fitted).",
    )
    zero3_collective_latency_per_layer: bool = Field(
        default=True,
        description="ZeRO-3/FSDP issue one all-gather and one reduce-scatter per layer (DeepSpeed "
        "fetches each submodule's partition; FSDP each wrapped block), so the ring latency is paid "
        "once per layer and pass.",
    )
    dp_overlap: float = Field(
        default=0.75, ge=0, le=1,
        description="Fraction of the compute behind which bucketed gradient reduction and ZeRO-3 "
        "prefetch hide (DeepSpeed overlap_comm, FSDP forward/backward prefetch); fitted by "
        "bench/speed_validation.py (0.75).",
    )
    cpu_adam_params_per_s: float = Field(
        default=1.0e9, gt=0,
        description="DeepSpeed CPU-Adam updates per second per rank's share of host cores (ZeRO-Offload, "
        "Ren et al. 2021, section 5: 6.4x faster than PyTorch CPU Adam, ~1B params/s per node share).",
    )


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step, by component, and the derived rates."""

    compute_s: float
    bubble_s: float
    tp_comm_s: float
    cp_comm_s: float
    ep_comm_s: float
    pp_comm_s: float
    dp_comm_s: float
    optimizer_s: float
    offload_s: float
    tokens_per_step: int
    num_gpus: int
    hardware_flops: float
    model_flops: float
    peak_flops_per_gpu: float

    @property
    def step_time_s(self) -> float:
        return (
            self.compute_s + self.bubble_s + self.tp_comm_s + self.cp_comm_s + self.ep_comm_s
            + self.pp_comm_s + self.dp_comm_s + self.optimizer_s + self.offload_s
        )

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s

    @property
    def tflops_per_gpu(self) -> float:
        """Achieved hardware FLOP/s per GPU, recomputation counted (Narayanan et al. 2021)."""
        return self.hardware_flops / self.step_time_s / self.num_gpus / 1e12

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation, recomputation not counted (Chowdhery et al. 2022, Appendix B)."""
        return self.model_flops / self.step_time_s / self.num_gpus / self.peak_flops_per_gpu

    def components(self) -> dict[str, float]:
        return {
            "compute": self.compute_s, "pipeline_bubble": self.bubble_s, "tensor_parallel_comm": self.tp_comm_s,
            "context_parallel_comm": self.cp_comm_s, "expert_parallel_comm": self.ep_comm_s,
            "pipeline_comm": self.pp_comm_s, "data_parallel_comm": self.dp_comm_s,
            "optimizer_step": self.optimizer_s, "offload": self.offload_s,
        }


# FP8 linears cast their 16-bit input to FP8 before every GEMM: Transformer Engine's fused
# cast-transpose reads the tensor once (2 bytes/element) and writes the FP8 copy and its transpose
# for the backward (1 + 1 bytes), a separate memory-bound kernel (transformer_engine/common/
# transpose/cast_transpose.cu); the weights' cast is cached across micro-batches
# (is_first_microbatch), so only activations pay it.
FP8_CAST_BYTES_PER_ELEMENT = 4

# Cross-entropy over the vocabulary, forward and backward, per logit: the 16-bit logits upcast to
# fp32 (read 2, write 4), max / subtract / exp / sum passes (read 4 + read 4 + write 4), the
# softmax gradient written in fp32 and cast back for the lm_head's backward (write 4, read 4,
# write 2): ~28 bytes, counted from Megatron-LM's vocab_parallel_cross_entropy
# (megatron/core/tensor_parallel/cross_entropy.py) and transformers' ForCausalLMLoss
# (logits.float() then F.cross_entropy), which do the same passes. Memory bound.
LOSS_BYTES_PER_LOGIT = 28

# LoRA adapters run as separate kernels beside the frozen linear (peft LoraLayer.forward:
# result = base(x) + lora_B(lora_A(dropout(x))) * scaling; NeMo's LoRA adapters likewise): per
# token and adapted k -> n linear, the forward re-reads x (k) for A and reads/writes the base
# output to add B's (about 4n), the backward reads dY (n) and x (k) again for the adapter
# gradients and adds its input gradient into the base's (about 4k): ~5 (k + n) element accesses,
# memory bound (the rank-r GEMMs are small). Summed over the model, sum(k + n) = trainable / r.
LORA_ELEMENT_ACCESSES_PER_WIDTH = 5
# QLoRA: bitsandbytes dequantizes every 4-bit weight to 16 bits on every use
# (bnb.matmul_4bit -> dequantize_4bit, forward, again for the input gradient in backward, and in a
# recomputed forward): 0.5 bytes read + 2 written per weight, then the GEMM reads it (counted).
QLORA_DEQUANT_BYTES_PER_WEIGHT = 2.5


def _gemm_s(m: float, k: float, n: float, peak: float, hbm: float, c: SpeedConstants, elem: int,
            fp8: bool = False) -> float:
    """Roofline time of an (m x k)(k x n) matmul: compute at the GEMM ceiling or memory, plus a
    launch. ``peak`` is the achievable rate (peak x efficiency, ``matmul_rate``); FP8 adds the
    cast of the m x k input."""
    flops = 2 * m * k * n
    traffic = elem * (m * k + k * n + m * n)
    cast = FP8_CAST_BYTES_PER_ELEMENT * m * k / hbm if fp8 else 0.0
    return max(flops / peak, traffic / hbm) + cast + c.kernel_launch_s


def matmul_rate(cluster: ClusterSpec, precision: str, c: SpeedConstants) -> float:
    """Sustained FLOP/s of the linear layers: the precision's dense peak x the GPU's maximum
    achievable matmul fraction (GPUSpec.matmul_achievable_fraction, measured) x the fraction of
    that a training step sustains (the fitted GEMM efficiency)."""
    ceiling = cluster.gpu.matmul_achievable_fraction
    if precision == "fp8":
        return cluster.gpu.peak_tflops("fp8") * 1e12 * ceiling * c.fp8_gemm_efficiency
    return cluster.gpu.peak_tflops(precision) * 1e12 * ceiling * c.gemm_efficiency  # type: ignore[arg-type]


def attention_rate(cluster: ClusterSpec, precision: str, c: SpeedConstants, implementation: str = "huggingface") -> float:
    """Sustained FLOP/s of the fused attention core: 16-bit (bf16 under FP8 training) x the
    implementation's attention efficiency."""
    core = "bf16" if precision == "fp8" else precision
    eff = c.megatron_attention_efficiency if implementation == "megatron" else c.attention_efficiency
    return cluster.gpu.peak_tflops(core) * 1e12 * cluster.gpu.matmul_achievable_fraction * eff  # type: ignore[arg-type]


# Plain PyTorch modules run every non-matmul op as its own kernel, reading and writing full tensors
# (in fp32 where the module upcasts); fused kernels (Megatron's, TorchInductor's, flash-attn's) read
# the input once and write the output once. What the unfused kernels stream beyond the fused ones is
# counted here from the modules, in bytes read + written per element of the tensor they act on
# (forward, 16-bit activations); everything else a layer streams (residual adds, GEMM tails,
# gradient accumulation) is SpeedConstants.elementwise_bytes_per_token_per_hidden for both.
# - RMSNorm as transformers' LlamaRMSNorm (and torchtitan's RMSNorm) computes it: x.float() (2 + 4),
#   pow (4 + 4), mean (4), x * rsqrt (4 + 4), cast back (4 + 2), weight * x (2 + 2) = 36, against
#   a fused norm's 2 + 2: 32 more.
# - LayerNorm under autocast (layer_norm is on autocast's fp32 list): input cast (2 + 4), the native
#   kernel (4 + 4), the next linear's cast of its fp32 output (4 + 2) = 20, against 4: 16 more.
UNFUSED_NORM_EXTRA_BYTES_PER_ELEMENT = {"rmsnorm": 32, "layernorm": 16}
# Rotary as transformers' apply_rotary_pos_emb, per element of q and of k: q * cos (2 + 2),
# rotate_half's neg of one half (1 + 1) and cat (2 + 2), * sin (2 + 2), the add (4 + 2) = 20,
# against a fused rotary's 2 + 2: 16 more.
UNFUSED_ROTARY_EXTRA_BYTES_PER_ELEMENT = 16
# MLP activation per element of f: SwiGLU act_fn(gate) * up as two kernels (LlamaMLP: silu 2 + 2,
# mul 4 + 2 = 10) against a fused SwiGLU's 4 + 2: 4 more; a two-matrix MLP's GELU is one kernel
# either way (nn.GELU; Megatron fuses only the bias into it): 0.
UNFUSED_ACTIVATION_EXTRA_BYTES_PER_ELEMENT = {True: 4, False: 0}


def unfused_extra_bytes(m: ModelSpec, tp: int, sp: bool) -> float:
    """Forward bytes per token that one layer's unfused non-matmul ops (two norms, rotary on q and
    k, the MLP activation) stream beyond fused kernels, on one tensor-parallel rank: q, k and f are
    split over tp; the norms are too only with sequence parallelism."""
    routed = m.experts_per_token if m.is_moe else 1
    norms = 2 * UNFUSED_NORM_EXTRA_BYTES_PER_ELEMENT[m.norm] * m.hidden_size / (tp if sp else 1)
    rotary = UNFUSED_ROTARY_EXTRA_BYTES_PER_ELEMENT * (m.q_width + m.kv_width) / tp if m.positions == "rope" else 0.0
    act = UNFUSED_ACTIVATION_EXTRA_BYTES_PER_ELEMENT[m.gated_mlp] * m.ffn_hidden_size * routed / tp
    return norms + rotary + act


def runs_unfused(m: ModelSpec, training: TrainingSpec) -> bool:
    """Plain PyTorch modules run eagerly, one kernel per op, unless the run fuses them
    (``training.fused_ops``: torch.compile, whose TorchInductor fuses pointwise and reduction chains
    into generated Triton kernels, Ansel et al. 2024 "PyTorch 2", ASPLOS; or hand-fused norm /
    rotary / SwiGLU kernels); Megatron's are always fused."""
    return m.implementation != "megatron" and not training.fused_ops


def layer_forward_s(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, cluster: ClusterSpec, c: SpeedConstants) -> tuple[float, float]:
    """(matmul + elementwise seconds, attention-core seconds) of one layer's forward on one rank."""
    peak = matmul_rate(cluster, training.precision, c)
    hbm = cluster.gpu.hbm_bandwidth_GB_per_s * 1e9
    elem = 4 if training.precision == "fp32" else 2
    s = training.seq_len // plan.cp
    tokens = s * plan.micro_batch
    h, t = m.hidden_size, plan.tp
    q, kv, f = m.q_width, m.kv_width, m.ffn_hidden_size
    f8 = training.precision == "fp8"
    gemm = _gemm_s(tokens, h, (q + 2 * kv) / t, peak, hbm, c, elem, f8) + _gemm_s(tokens, q / t, h, peak, hbm, c, elem, f8)
    matrices_in = 2 if m.gated_mlp else 1
    if m.is_moe:
        # Each expert sees tokens*top_k/E tokens on average; the rank runs E/ep experts' GEMMs.
        routed = tokens * m.experts_per_token * plan.ep / m.num_experts
        experts_here = m.num_experts // plan.ep
        mlp = experts_here * (
            matrices_in * _gemm_s(routed, h, f / t, peak, hbm, c, elem, f8) + _gemm_s(routed, f / t, h, peak, hbm, c, elem, f8)
        ) + _gemm_s(tokens, h, m.num_experts, peak, hbm, c, elem)
    else:
        mlp = matrices_in * _gemm_s(tokens, h, f / t, peak, hbm, c, elem, f8) + _gemm_s(tokens, f / t, h, peak, hbm, c, elem, f8)
    elementwise = c.elementwise_bytes_per_token_per_hidden * tokens * h / (t if plan.sp else 1) / hbm
    if runs_unfused(m, training):
        elementwise += unfused_extra_bytes(m, t, plan.sp) * tokens / hbm
    # Attention core: 4 s_q s_kv q FLOPs per sequence (QK^T and PV); with cp each rank's queries meet
    # the whole sequence's keys.
    core_flops = 4 * plan.micro_batch * s * training.seq_len * q / t
    if training.attention == "flash":
        core = core_flops / attention_rate(cluster, training.precision, c, m.implementation)
    else:
        scores_bytes = plan.micro_batch * m.num_heads / t * s * training.seq_len * elem
        core = core_flops / peak + 6 * scores_bytes / hbm  # softmax/mask/dropout passes
    return gemm + mlp + elementwise, core


def step_time(
    m: ModelSpec,
    cluster: ClusterSpec,
    training: TrainingSpec,
    plan: ParallelPlan,
    c: SpeedConstants | None = None,
    finetune: FinetuneSpec | None = None,
) -> StepTime:
    c = c or SpeedConstants()
    method = finetune.method if finetune is not None else "full"
    k_dense, k_core = pass_multipliers(method)
    links = group_links(cluster, plan)
    peak = cluster.gpu.peak_tflops(training.precision) * 1e12
    rate = matmul_rate(cluster, training.precision, c)
    hbm = cluster.gpu.hbm_bandwidth_GB_per_s * 1e9
    elem = 4 if training.precision == "fp32" else 2
    s_rank = training.seq_len // plan.cp
    tokens_mb = s_rank * plan.micro_batch
    m_micro = plan.grad_accum

    dense_f, core_f = layer_forward_s(m, training, plan, cluster, c)
    # Backward is twice the forward; recompute reruns the forward (full) or the attention core (selective).
    recompute = {"none": 0.0, "selective": core_f, "full": dense_f + core_f}[plan.recompute]
    layer_s = k_dense * dense_f + k_core * core_f + recompute

    # Communication inside a layer per micro-batch: Megatron's 2 all-reduces forward and 2 backward
    # (Shoeybi et al. 2019, Figure 4), plus 2 more when the forward is recomputed; with sequence
    # parallelism each becomes a reduce-scatter + all-gather pair of equal volume (Korthikanti 2022).
    act_bytes = tokens_mb * m.hidden_size * elem
    n_tp = 4 + (2 if plan.recompute == "full" else 0)
    tp_layer = n_tp * all_reduce_s(act_bytes, plan.tp, links.tp)
    # Context parallelism: ring attention passes K and V around the cp ring, forward and backward
    # (twice the K/V bytes backward), overlapped with the attention core where it is longer.
    kv_bytes = 2 * tokens_mb * m.kv_width / plan.tp * elem
    cp_layer = max(0.0, 3 * (plan.cp - 1) * p2p_s(kv_bytes / plan.cp * plan.cp, links.cp) - 3 * core_f) if plan.cp > 1 else 0.0
    # Expert parallelism: two all-to-alls (dispatch, combine) forward and two backward.
    ep_layer = 4 * all_to_all_s(act_bytes * m.experts_per_token, plan.ep, links.ep) if m.is_moe and plan.ep > 1 else 0.0

    counts = layers_per_stage(m.num_layers, plan.pp)
    logits_s = (k_dense * _gemm_s(tokens_mb, m.hidden_size, m.vocab_size / plan.tp, rate, hbm, c, elem)
                + LOSS_BYTES_PER_LOGIT * tokens_mb * m.vocab_size / plan.tp / hbm)
    stage_s = [n * (layer_s + tp_layer + cp_layer + ep_layer) + (logits_s if i == plan.pp - 1 else 0.0) for i, n in enumerate(counts)]
    slowest = max(stage_s)
    slowest += _peft_s(m, training, plan, finetune, hbm, tokens_mb, elem)
    compute = m_micro * slowest
    # Pipeline bubble (pp-1)/(m v) of the ideal time (Narayanan et al. 2021, section 2.2).
    bubble = compute * (plan.pp - 1) / (m_micro * plan.interleave)
    # Stage-to-stage activations and gradients, split over the tensor ranks before the send and
    # all-gathered after it (Narayanan et al. 2021 section 4.1 scatter/gather; DeepSpeed's
    # pipeline.pipe_partitioned, on by default).
    pp_comm = 2 * m_micro * plan.interleave * p2p_s(act_bytes / plan.tp, links.pp) if plan.pp > 1 else 0.0

    tp_part = sum(counts[:1]) * tp_layer * m_micro
    compute_only = compute - sum(counts[:1]) * (tp_layer + cp_layer + ep_layer) * m_micro
    # Data-parallel traffic and the optimizer step scale with what trains: all parameters for full
    # training, the adapters for PEFT (trainable/total), nothing but a scalar for MeZO.
    trained = 1.0 if method == "full" else 0.0 if method == "mezo" else trainable_params(m, finetune) / total_params(m)
    dp_comm = _dp_comm_s(m, plan, training, links.dp, backward_s=compute_only * 2 / 3, c=c, trained=trained)
    optimizer = trained * _optimizer_s(m, plan, hbm, c)
    offload = trained * _offload_s(m, plan, cluster, c)

    tokens_step = plan.micro_batch * m_micro * plan.dp * training.seq_len
    return StepTime(
        compute_s=compute_only,
        bubble_s=bubble,
        tp_comm_s=tp_part,
        cp_comm_s=counts[0] * cp_layer * m_micro,
        ep_comm_s=counts[0] * ep_layer * m_micro,
        pp_comm_s=pp_comm,
        dp_comm_s=dp_comm,
        optimizer_s=optimizer,
        offload_s=offload,
        tokens_per_step=tokens_step,
        num_gpus=plan.world_size,
        hardware_flops=hardware_flops_per_token(m, training.seq_len, plan.recompute, method) * tokens_step,
        model_flops=model_flops_per_token(m, training.seq_len, method) * tokens_step,
        peak_flops_per_gpu=peak,
    )


def _dp_comm_s(m: ModelSpec, plan: ParallelPlan, training: TrainingSpec, link, *, backward_s: float,  # type: ignore[no-untyped-def]
               c: SpeedConstants, trained: float = 1.0) -> float:
    """Exposed data-parallel communication per step. 16-bit gradients and parameters of the rank
    (Rajbhandari et al. 2020, section 7: ZeRO-1/2 move 2 Psi like an all-reduce, ZeRO-3 3 Psi).

    Gradient accumulation: Megatron-LM's DDP accumulates into fp32 main_grad buffers and
    reduce-scatters (distributed optimizer) or all-reduces once per step, after the last
    micro-batch (megatron/core/distributed/distributed_data_parallel.py, no_sync for the others);
    DeepSpeed stage 0/1 also reduce once per step, stage 2 reduces in the backward hooks of every
    micro-batch. ZeRO-3 / FSDP gather every layer's parameters for each micro-batch's forward and
    backward (again for a full recompute) and reduce-scatter its gradients every micro-batch
    (FSDP reshard_after_forward; DeepSpeed stage3 fetch/release per submodule), one collective per
    layer each. Gradient traffic scales with what trains (``trained``, the trainable fraction); a
    frozen base is still gathered under ZeRO-3."""
    if plan.dp == 1:
        return 0.0
    sp = stage_params(m, tp=plan.tp, pp=plan.pp, ep=plan.ep, stage=0)
    param_bytes = sp.total * (4 if training.precision == "fp32" else 2)
    grad_bytes = trained * param_bytes
    n, mm = plan.dp, plan.grad_accum
    z = plan.zero_stage
    per_step_reduce = z <= 1 or (z == 2 and m.implementation == "megatron")
    if z == 0:
        comm, per_micro = all_reduce_s(grad_bytes, n, link), 0.0
    elif per_step_reduce:
        comm, per_micro = reduce_scatter_s(grad_bytes, n, link) + all_gather_s(grad_bytes, n, link), 0.0
    elif z == 2:
        comm = all_gather_s(grad_bytes, n, link)
        per_micro = reduce_scatter_s(grad_bytes, n, link)
    else:
        gathers = 2 + (1 if plan.recompute == "full" else 0)
        layers = layers_per_stage(m.num_layers, plan.pp)[0] if c.zero3_collective_latency_per_layer else 1
        ring_latency = (n - 1) * link.latency_s * (layers - 1)  # the other layers' collectives
        comm = 0.0
        per_micro = (reduce_scatter_s(grad_bytes, n, link) + (ring_latency if trained > 0 else 0.0)
                     + gathers * (all_gather_s(param_bytes, n, link) + ring_latency))
    total = comm + mm * per_micro
    # Bucketed reduction hides behind the backward of the last micro-batch (once per step) or of
    # every micro-batch (stage 2); ZeRO-3 prefetches parameters behind the forward and backward too.
    window = backward_s * (1.5 if z == 3 else 1.0) * (1.0 if z >= 2 and not per_step_reduce else 1.0 / mm)
    hidden = c.dp_overlap * window
    return max(total - hidden, 0.05 * total)


def _peft_s(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, ft: FinetuneSpec | None, hbm: float,
            tokens_mb: int, elem: int) -> float:
    """Per micro-batch, on the slowest stage: LoRA adapter traffic and QLoRA's dequantization."""
    if ft is None or ft.method not in ("lora", "qlora"):
        return 0.0
    from planner.finetune.states import quantized_elements  # planner.finetune.states imports the memory model
    from planner.structure.params import stage_layers

    share = max(layers_per_stage(m.num_layers, plan.pp)) / m.num_layers / plan.tp
    widths = trainable_params(m, ft) / ft.lora_rank  # sum of (k + n) over the adapted linears
    t = LORA_ELEMENT_ACCESSES_PER_WIDTH * elem * tokens_mb * widths * share / hbm
    if ft.method == "qlora":
        uses = 2 + (1 if plan.recompute == "full" else 0)
        weights = sum(quantized_elements(m, i) for i in stage_layers(m.num_layers, plan.pp, 0)) / plan.tp
        t += uses * QLORA_DEQUANT_BYTES_PER_WEIGHT * weights / hbm
    return t


def _optimizer_s(m: ModelSpec, plan: ParallelPlan, hbm: float, c: SpeedConstants) -> float:
    """The fused Adam step streams master weights, moments, gradients and the 16-bit copy:
    about 4+4+4+4 bytes read and 4+4+4+2 written per owned parameter (memory bound)."""
    if plan.offload != "none":
        return 0.0
    sp = stage_params(m, tp=plan.tp, pp=plan.pp, ep=plan.ep, stage=0)
    owned = sp.total / (plan.dp if plan.zero_stage >= 1 else 1)
    return owned * 30 / hbm


def _offload_s(m: ModelSpec, plan: ParallelPlan, cluster: ClusterSpec, c: SpeedConstants) -> float:
    """ZeRO-Offload: gradients down and parameters up over PCIe once per step, the CPU Adam update
    (Ren et al. 2021); ZeRO-Infinity parameter offload fetches the partition for every forward and
    backward of every micro-batch."""
    if plan.offload == "none":
        return 0.0
    sp = stage_params(m, tp=plan.tp, pp=plan.pp, ep=plan.ep, stage=0)
    owned = sp.total / plan.dp
    pcie = cluster.gpu.pcie_GB_per_s * 1e9
    t = 2 * owned * 2 / pcie + owned / c.cpu_adam_params_per_s
    if plan.offload == "optimizer+params":
        t += plan.grad_accum * 2 * owned * 2 / pcie
    return t
