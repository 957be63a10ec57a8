"""Activation memory: the bytes the forward pass keeps alive for backward, per pipeline stage.

Two implementations are modelled:
- ``huggingface`` (what orch launches): the activation profile of the model's own modules
  (planner.memory.profile, traced by planner.trace.profile), exact against real CPU runs for every
  architecture under test (tests/planner/test_architectures.py), whatever the family;
- ``megatron``: Megatron-LM's fused kernels, Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", section 4, Table 2), generalised to GQA and any MLP
  width by keeping each term's tensor.

Symbols (paper's): s sequence, b micro-batch, h hidden, a heads, t tensor degree, f MLP width,
V vocabulary. All results are bytes per rank for one micro-batch unless named otherwise.
"""

from __future__ import annotations

from typing import Any

from planner.errors import PlanInputError
from planner.finetune.methods import FinetuneSpec, extra_sequence_tokens, trace_spec, trainable_params
from planner.memory.profile import ActivationProfile, Kernels, load_profile, profile_key
from planner.structure.model import ModelSpec
from planner.structure.params import layers_per_stage, stage_layers
from planner.specs.training import ParallelPlan, TrainingSpec


def trace_dtype(training: TrainingSpec) -> str:
    """The dtype the model runs in: bf16 also for fp8 training (Transformer Engine keeps bf16 copies)."""
    return {"fp32": "fp32", "fp16": "fp16"}.get(training.precision, "bf16")


def profile_of(m: ModelSpec, training: TrainingSpec, finetune: FinetuneSpec | None, kernels: Kernels) -> ActivationProfile:
    """The activation profile of this job (traced once, cached)."""
    if finetune is not None and finetune.method not in ("full", "mezo", "adapter") and trainable_params(m, finetune) == 0:
        what = "has no bias terms, so BitFit" if finetune.method == "bitfit" else f"has nothing {finetune.method} can adapt, so it"
        raise PlanInputError(f"{m.name} {what} has nothing to train", "choose another --method")
    peft, quant = trace_spec(m, finetune)
    seq = training.seq_len - (extra_sequence_tokens(finetune) if finetune is not None else 0)
    dtype = trace_dtype(training)
    # The key hashes the whole config; a search asks for the same profile thousands of times.
    key = m.layout.memo(("profile_key", seq, training.attention, dtype, repr(peft), repr(quant)), lambda: profile_key(
        m.hf_config, seq_len=seq, attention=training.attention, dtype=dtype, peft=peft, quant=quant))
    return load_profile(m.hf_config, m.layout.layer_kinds, seq_len=seq, attention=training.attention,
                        dtype=dtype, peft=peft, quant=quant, kernels=kernels, name=m.name, key=key)


def traced_attention(m: ModelSpec, training: TrainingSpec, finetune: FinetuneSpec | None, kernels: Kernels) -> str:
    """The attention implementation the model's profile really ran ("flash", "sdpa", "eager"), or
    "" where no profile applies (Megatron kernels, MeZO's inference-only trace)."""
    if m.implementation != "huggingface" or (finetune is not None and finetune.method == "mezo"):
        return ""
    return profile_of(m, training, finetune, kernels).attention_impl


def _check_hf(plan: ParallelPlan) -> None:
    if plan.cp > 1:
        raise PlanInputError(
            f"context parallelism (cp={plan.cp}) is not modelled for Hugging Face modules",
            "use --backend megatron for context parallelism, or drop --cp",
        )


def _mezo(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, finetune: FinetuneSpec) -> bool:
    return finetune is not None and finetune.method == "mezo"


def mezo_peak_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, kernels: Kernels) -> int:
    """MeZO keeps nothing for backward: its activation memory is the peak of live tensors in an
    inference forward (Malladi et al. 2023), traced at the plan's micro-batch (planner.trace.live)
    and cached; a pipeline stage or a tensor rank is not modelled (it runs one unsplit rank)."""
    from planner.cache import cached, key_of

    key = key_of("mezo", m.hf_config, training.seq_len, plan.micro_batch, training.attention, trace_dtype(training))

    def trace() -> dict[str, Any]:
        from planner.trace import extrapolate_layers, trace_activations

        kw = dict(seq_len=training.seq_len, micro_batch=plan.micro_batch, attention=training.attention,
                  dtype=trace_dtype(training), peft={"method": "mezo"})
        one = trace_activations(m.hf_config, num_layers_override=1, **kw)
        two = trace_activations(m.hf_config, num_layers_override=min(2, m.num_layers), **kw) if m.num_layers > 1 else one
        cpu = max(one.cpu_trace_bytes, two.cpu_trace_bytes)
        return {"cuda": extrapolate_layers(one, two, m.num_layers) if m.num_layers > 1 else one.total_bytes, "cpu": cpu}

    return int(cached("mezo", key, trace)[kernels])


def adapter_layer_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, ft: FinetuneSpec) -> float:
    """Bottleneck adapters (Houlsby et al. 2019) after attention and after the MLP, which peft does
    not build: each keeps its input h and its m-wide hidden, before and after the non-linearity, in
    the compute dtype (beside the frozen base the profile measures with gradients flowing through)."""
    e = 4 if training.precision == "fp32" else 2
    return 2 * training.seq_len * plan.micro_batch * e * (m.hidden_size + 2 * ft.adapter_size) / plan.tp


def _layer_saved(m: ModelSpec, prof: ActivationProfile, training: TrainingSpec, plan: ParallelPlan, layer: int,
                 ft: FinetuneSpec | None) -> float:
    extra = adapter_layer_bytes(m, training, plan, ft) if ft is not None and ft.method == "adapter" else 0.0
    return prof.layer(layer).at(plan.micro_batch, plan.tp, plan.sp) + extra


def stage_activation_bytes(
    m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, stage: int, finetune: FinetuneSpec | None = None,
    kernels: Kernels = "cuda",
) -> int:
    """Peak activation bytes of a rank in pipeline stage ``stage``: every layer's saved bytes for
    each micro-batch in flight (full recompute: the layers' checkpointed inputs, plus one layer
    rebuilt in the backward), the input side on the first stage, the output side on the last."""
    if m.implementation == "megatron":
        return _megatron_stage_bytes(m, training, plan, stage)
    if _mezo(m, training, plan, finetune):
        return mezo_peak_bytes(m, training, plan, kernels)
    _check_hf(plan)
    prof = profile_of(m, training, finetune, kernels)
    b, tp, sp = plan.micro_batch, plan.tp, plan.sp
    n_flight = in_flight_micro_batches(plan, stage)
    layers = stage_layers(m.num_layers, plan.pp, stage)
    if plan.recompute == "full":
        kept = sum(prof.kept(i).at(b) / (tp if sp else 1) for i in layers)
        rebuilt = max((_layer_saved(m, prof, training, plan, i, finetune) for i in layers), default=0.0)
        first = prof.kept_input.at(b) / (tp if sp else 1) if stage == 0 else prof.shared.at(b, tp, sp)
        total = (kept + first) * n_flight + rebuilt
    else:
        total = sum(_layer_saved(m, prof, training, plan, i, finetune) for i in layers)
        total += prof.shared.at(b, tp, sp) + (prof.input.at(b, tp, sp) if stage == 0 else 0.0)
        total *= n_flight
    if stage == plan.pp - 1:
        total += prof.output.at(b, tp, sp)
    return int(total)


def rebuilt_layer_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, stage: int,
                        finetune: FinetuneSpec | None = None, kernels: Kernels = "cuda") -> int:
    """Under full recompute, the saved bytes of the largest layer of the stage, rebuilt in the
    backward (in stage_activation_bytes, but alive only from the backward on); 0 otherwise."""
    if plan.recompute != "full" or _mezo(m, training, plan, finetune):
        return 0
    if m.implementation == "megatron":
        return int(megatron_layer_bytes(m, training, plan))
    prof = profile_of(m, training, finetune, kernels)
    return int(max((_layer_saved(m, prof, training, plan, i, finetune) for i in stage_layers(m.num_layers, plan.pp, stage)),
                   default=0.0))


def loss_grad_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, stage: int,
                    finetune: FinetuneSpec | None = None, kernels: Kernels = "cuda") -> int:
    """Bytes the loss's gradient adds to the saved activations at the start of the backward, on the
    last pipeline stage (none elsewhere, and none for MeZO, which has no backward). Hugging Face
    models: measured (the fp32 gradients of transformers' ForCausalLMLoss over the logits, about 8V
    per token; DeepSpeed AutoTP gathers the logits, so tensor parallelism does not divide them)."""
    if stage != plan.pp - 1 or _mezo(m, training, plan, finetune):
        return 0
    if m.implementation == "megatron":
        return int(megatron_loss_grad_bytes(m, training, plan))
    return int(profile_of(m, training, finetune, kernels).loss_grad.at(plan.micro_batch))


Working = tuple[tuple[float, int], ...]  # (fraction of the part's gradients produced, bytes)


def backward_parts(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, stage: int,
                   finetune: FinetuneSpec | None = None, kernels: Kernels = "cuda") -> list[tuple[int, Working]]:
    """(activation bytes its backward frees, its working set) of one micro-batch, for each part of
    a stage in backward order: the head (last stage), each layer, the embedding (first stage; an
    empty part elsewhere). The frees sum to stage_activation_bytes with one micro-batch in flight,
    less the rebuilt layer under full recompute (rebuilt_layer_bytes). The working set is what the
    part's backward holds beyond the saved bytes of the parts after it (activation gradients, the
    layer's own saved tensors not yet freed: under full recompute, the rebuilt ones), given at
    fractions of the part's parameter gradients produced; under full recompute a layer frees its
    checkpointed input."""
    layers = list(stage_layers(m.num_layers, plan.pp, stage))
    if m.implementation == "megatron":
        return _megatron_parts(m, training, plan, stage, len(layers))
    if _mezo(m, training, plan, finetune):
        return []
    _check_hf(plan)
    prof = profile_of(m, training, finetune, kernels)
    b, tp, sp = plan.micro_batch, plan.tp, plan.sp
    whole = tp if sp else 1
    full = plan.recompute == "full"

    def at(points: tuple, scale: float) -> Working:
        return tuple((g, int(w.at(b) * scale)) for g, w in zip(prof.grid, points))

    parts: list[tuple[float, Working]] = []
    if stage == plan.pp - 1:
        parts.append((prof.output.at(b, tp, sp), at(prof.working_output, 1 / whole)))
    for i in reversed(layers):
        share = prof.layer(i).split_share(b)
        scale = share / tp + (1 - share) / whole
        freed = prof.kept(i).at(b) / whole if full else _layer_saved(m, prof, training, plan, i, finetune)
        parts.append((freed, at(prof.working(i, full), scale)))
    if stage == 0:
        first = prof.kept_input.at(b) / whole if full else prof.input.at(b, tp, sp) + prof.shared.at(b, tp, sp)
        parts.append((first, at(prof.working_input, 1 / whole)))
    else:
        parts.append((prof.shared.at(b, tp, sp), ((1.0, 0),)))
    return [(int(a), w) for a, w in parts]


def in_flight_micro_batches(plan: ParallelPlan, stage: int) -> float:
    """Micro-batches whose activations a stage holds at the 1F1B peak: min(pp - stage, m)
    (DeepSpeed ``TrainSchedule.num_pipe_buffers``; Narayanan et al. 2021 section 2.2.1). Interleaving
    with v virtual stages multiplies the first stage's by 1 + (p - 1)/(p v) (Korthikanti et al. 2022,
    section 4.2.3)."""
    if plan.pp == 1:
        return 1.0
    n = min(plan.pp - stage, plan.grad_accum)
    if plan.interleave > 1 and stage == 0:
        return n * (1 + (plan.pp - 1) / (plan.pp * plan.interleave))
    return float(n)


# Megatron-LM's fused kernels (--backend megatron) ---------------------------------------------

def activation_dtype_bytes(training: TrainingSpec) -> int:
    """Activations are kept in the compute dtype; fp8 training (Transformer Engine) keeps bf16
    copies for backward in the general case, so it is counted as bf16."""
    return 4 if training.precision == "fp32" else 2


def megatron_layer_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """One transformer layer, Korthikanti et al. 2022 section 4.1 and Table 2.

    With q = a*d = h, kv = h and f = 4h this is sbh(34 + 5as/h) without parallelism,
    sbh(10 + 24/t + 5as/(ht)) with tensor parallelism and sbh(34 + 5as/h)/t with sequence
    parallelism; selective recompute drops the 5as^2b attention-core term."""
    s = training.seq_len // plan.cp
    b, h, t = plan.micro_batch, m.hidden_size, plan.tp
    e = activation_dtype_bytes(training)  # paper: 2 bytes (16-bit)
    q, kv, f = m.q_width, m.kv_width, m.ffn_hidden_size
    sb = s * b
    # Not split by tensor parallelism unless sequence parallel: two layernorm inputs (2 x 2sbh),
    # the QKV and MLP-in matmul inputs (2 x 2sbh), two 1-byte dropout masks (2 x sbh).
    masks = 2 * h if m.dropout else 0
    replicated = sb * (2 * e * h + 2 * e * h + masks)
    # Split by t: Q, K, V (2sb each), attention output (2sbh), GeLU input and second matmul input
    # (2sbf each); a gated MLP (SwiGLU) keeps both the gate and up outputs (3 x 2sbf).
    mlp_tensors = 3 if m.gated_mlp else 2
    split = sb * e * (2 * q + 2 * kv + mlp_tensors * f) / t
    # Attention core, eager: softmax output 2as^2b, its 1-byte dropout mask as^2b, dropout output 2as^2b.
    if training.attention == "eager" and plan.recompute != "selective":
        per_score = 2 * e + 1 if m.dropout else e
        split += per_score * m.num_heads * s * s * b / t
    elif training.attention == "flash":
        # Flash attention keeps only the fp32 log-sum-exp per row (Dao et al. 2022, Algorithm 2).
        split += 4 * m.num_heads * s * b / t
    if plan.sp:
        replicated /= t
    return replicated + split


def megatron_embedding_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """Embedding dropout mask, sbh bytes (Korthikanti et al. 2022 section 4.3); /t under SP."""
    s = training.seq_len // plan.cp
    mask = s * plan.micro_batch * m.hidden_size if m.dropout else 0
    return mask / plan.tp if plan.sp else mask


def megatron_head_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """Final layernorm input 2sbh (/t under SP), output-projection input 2sbh, and the fp32 logits
    the cross entropy keeps, 4sbV/t: 4sbh/t(1 + V/h) with SP (Korthikanti et al. 2022, section 4.3)."""
    s = training.seq_len // plan.cp
    sbh = s * plan.micro_batch * m.hidden_size
    norm = 2 * sbh / (plan.tp if plan.sp else 1)
    return norm + 2 * sbh / (plan.tp if plan.sp else 1) + 4 * s * plan.micro_batch * m.vocab_size / plan.tp


def megatron_loss_grad_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """Megatron-LM's vocab-parallel cross entropy keeps the fp32 softmax (4sbV/t, in
    megatron_head_bytes) and writes the loss gradient into it in place
    (megatron/core/tensor_parallel/cross_entropy.py, _VocabParallelCrossEntropy.backward:
    ``grad_input = softmax``); what the backward adds is that gradient cast back to the 16-bit
    logits, 2sbV/t (none in fp32)."""
    s = training.seq_len // plan.cp
    if activation_dtype_bytes(training) == 4:
        return 0.0
    return 2 * s * plan.micro_batch * m.vocab_size / plan.tp


def layer_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """Bytes one Megatron-LM layer keeps for one micro-batch, before recomputation."""
    return megatron_layer_bytes(m, training, plan)


def layer_input_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """Full recompute keeps only each layer's input, 2sbh (/t under SP) (Korthikanti et al. 2022, Table 2)."""
    s = training.seq_len // plan.cp
    sbh = s * plan.micro_batch * m.hidden_size * activation_dtype_bytes(training)
    return sbh / plan.tp if plan.sp else sbh


def _megatron_stage_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, stage: int) -> int:
    n_layers = layers_per_stage(m.num_layers, plan.pp)[stage]
    per_layer = megatron_layer_bytes(m, training, plan)
    if plan.recompute == "full":
        total = layer_input_bytes(m, training, plan) * n_layers * in_flight_micro_batches(plan, stage) + per_layer
    else:
        total = per_layer * n_layers * in_flight_micro_batches(plan, stage)
    if stage == 0:
        total += megatron_embedding_bytes(m, training, plan) * in_flight_micro_batches(plan, stage)
    if stage == plan.pp - 1:
        total += megatron_head_bytes(m, training, plan)
    return int(total)


def _megatron_working(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, head: bool) -> float:
    """Megatron-LM's fused kernels: the residual stream's two gradients, and in a layer the MLP's
    three, 2sbh + 3sbf/t in 16-bit."""
    s = training.seq_len // plan.cp
    e = activation_dtype_bytes(training)
    mlp = 0 if head else 3 * m.ffn_hidden_size / plan.tp
    return s * plan.micro_batch * e * (2 * m.hidden_size / (plan.tp if plan.sp else 1) + mlp)


def _megatron_parts(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, stage: int, n_layers: int) -> list[tuple[int, Working]]:
    per_layer = megatron_layer_bytes(m, training, plan)
    full = plan.recompute == "full"
    kept = layer_input_bytes(m, training, plan) if full else per_layer
    layer_work = _megatron_working(m, training, plan, False) + (per_layer if full else 0.0)  # the rebuilt layer
    parts: list[tuple[float, float]] = []
    if stage == plan.pp - 1:
        parts.append((megatron_head_bytes(m, training, plan), _megatron_working(m, training, plan, True)))
    parts += [(kept, layer_work)] * n_layers
    parts.append((megatron_embedding_bytes(m, training, plan) if stage == 0 else 0.0, 0.0))
    return [(int(a), ((1.0, int(w)),)) for a, w in parts]
