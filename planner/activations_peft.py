"""Activations of parameter-efficient methods and MeZO, term by term from the exact trace of the
peft-wrapped model (planner.trace with ``peft=``; verified to the byte on Llama and GPT-2 shapes,
tests/planner/test_finetune_activations.py).

With the base frozen, a frozen linear no longer saves its input and a frozen norm weight no longer
needs its normalised input: the "frozen base" layer FB keeps what gradients need to flow back to
the trainable parts. Layer 0's input comes from the frozen embedding and does not require grad,
so its input norm saves nothing. Symbols as in planner.activations_hf; r LoRA rank, p virtual
tokens; adapters are fp32 (peft's autocast_adapter_dtype), so their saved inputs are 4 bytes.
Prompt tuning arrives here with seq_len already s + p (orchestrator.planning adds p).
"""

from __future__ import annotations

from planner.activations_hf import hf_layer_bytes
from planner.errors import PlanInputError
from planner.finetune import FinetuneSpec, _linear_shapes, lora_targets, trainable_params
from planner.model import ModelSpec
from planner.training import ParallelPlan, TrainingSpec

UNSPLIT = ParallelPlan()  # the formulas below are for one unsplit rank; tensor parallelism scales them


def _sym(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> dict[str, float]:
    s = training.seq_len // plan.cp
    b = plan.micro_batch
    return dict(s=s, b=b, T=s * b, e=4 if training.precision == "fp32" else 2, h=m.hidden_size, a=m.num_heads,
                d=m.head_dim, kd=m.kv_width, f=m.ffn_hidden_size, V=m.vocab_size)


def _frozen_base(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """FB: full fine-tuning's layer less the inputs of frozen linears and of frozen norm weights."""
    x = _sym(m, training, plan)
    T, e, h, a, d, kd, f, s, b = x["T"], x["e"], x["h"], x["a"], x["d"], x["kd"], x["f"], x["s"], x["b"]
    if m.family == "gpt2":
        full = hf_layer_bytes(m, training, plan.model_copy(update={"tp": 1, "sp": False}))
        return full - T * ((3 if training.attention == "eager" else 2) * e * h + e * f)
    if training.attention == "eager":
        return T * (8 * h + 8 + 3 * e * a * d + 3 * e * f) + (4 + e) * b * a * s * s
    return T * (8 * h + 2 * e * a * d + 2 * e * kd + 3 * e * f + 4 * a + 8)


def _first_layer_saving(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """Layer 0 keeps less: its input norm's statistics (RMSNorm: fp32 input copy and rsqrt;
    GPT-2's LayerNorm: mean and rstd)."""
    x = _sym(m, training, plan)
    return 8 * x["T"] if m.family == "gpt2" else x["T"] * (4 * x["h"] + 4)


def _lora_extra(m: ModelSpec, ft: FinetuneSpec, training: TrainingSpec, plan: ParallelPlan) -> tuple[float, float]:
    """(every layer, layer-0 reduction): each adapter's lora_A keeps an fp32 copy of its input (or,
    with dropout, the fp32 dropout output and a 1-byte mask), lora_B the fp32 rank-r output."""
    x = _sym(m, training, plan)
    T = x["T"]
    shapes = _linear_shapes(m)
    targets = lora_targets(m, ft)
    if m.family == "gpt2" and targets & {"q", "k", "v"}:
        targets = (targets - {"q", "k", "v"}) | {"qkv"}
    extra, first_masks = 0.0, 0.0
    for name in targets:
        in_f = shapes[name][0]
        extra += T * (4 * in_f + 4 * ft.lora_rank)
        if ft.lora_dropout > 0:
            extra += T * in_f
            if name in ("q", "k", "v", "qkv"):
                first_masks += T * in_f  # layer 0's attention input does not require grad
    if m.family != "gpt2" and training.attention == "eager" and "k" not in targets:
        first_masks += x["e"] * T * x["a"] * x["d"]  # q @ k^T need not save q when k is constant
    return extra, first_masks


def _ia3_extra(m: ModelSpec, ft: FinetuneSpec, training: TrainingSpec, plan: ParallelPlan) -> tuple[float, float]:
    """(IA)^3 scales outputs of attention targets (their 16-bit output is saved) and inputs of
    feed-forward targets (an fp32 copy is saved), plus the learned vectors themselves."""
    x = _sym(m, training, plan)
    T, e = x["T"], x["e"]
    vectors = trainable_params(m, ft) / m.num_layers
    if m.family == "gpt2":
        return T * (3 * e * x["h"] + 4 * x["f"]) + 4 * vectors, 12 * x["h"]
    out_widths = vectors - x["f"]  # attention targets' output widths (k, v for llama; q, v for qwen2)
    # Layer 0 keeps neither the attention targets' scaling vectors nor (eager) q for q @ k^T.
    first = 4 * out_widths + (e * T * x["a"] * x["d"] if training.attention == "eager" else 0)
    return T * (e * out_widths + 4 * x["f"]) + 4 * vectors, first


def _prefix_layer(m: ModelSpec, ft: FinetuneSpec, training: TrainingSpec, plan: ParallelPlan) -> tuple[float, float]:
    """Prefix tuning: keys and values of p virtual tokens join every layer's attention."""
    x = _sym(m, training, plan)
    T, e, h, a, d, kd, f, s, b = x["T"], x["e"], x["h"], x["a"], x["d"], x["kd"], x["f"], x["s"], x["b"]
    p = ft.prefix_length
    if m.family == "gpt2":
        if training.attention == "eager":
            layer = _frozen_base(m, training, plan) - 2 * e * T * h + 2 * e * b * (s + p) * h + (2 * e + 1) * b * a * s * p
            layer += 2 * e * T * h if b == 1 else 0
            return layer, 8 * T + e * b * (s + p) * h
        return _frozen_base(m, training, plan) + 2 * e * b * (s + p) * h, 8 * T
    if training.attention == "eager":
        layer = T * (8 * h + 8 + e * a * d + 3 * e * f) + 2 * e * b * (s + p) * a * d + (4 + e) * b * a * s * (s + p)
        return layer, T * (4 * h + 4) + e * b * (s + p) * a * d
    layer = T * (8 * h + 8 + 2 * e * a * d + 4 * a + 3 * e * f) + 2 * e * b * (s + p) * kd
    return layer, T * (4 * h + 4)


def _unsplit_layers(m: ModelSpec, ft: FinetuneSpec, training: TrainingSpec, plan: ParallelPlan) -> tuple[float, float]:
    """(layer 0, each later layer) on one unsplit rank."""
    fb = _frozen_base(m, training, plan)
    first = _first_layer_saving(m, training, plan)
    if ft.method in ("lora", "qlora"):
        extra, first_extra = _lora_extra(m, ft, training, plan)
        return fb + extra - first - first_extra, fb + extra
    if ft.method == "ia3":
        extra, first_extra = _ia3_extra(m, ft, training, plan)
        return fb + extra - first - first_extra, fb + extra
    if ft.method == "prefix":
        layer, first = _prefix_layer(m, ft, training, plan)
        return layer - first, layer
    if ft.method == "prompt":
        return fb, fb  # the virtual tokens require grad from the very first layer
    if ft.method == "bitfit":
        if trainable_params(m, ft) == 0:
            raise PlanInputError(f"{m.name} has no bias terms, so BitFit has nothing to train", "choose another --method")
        return (fb, fb) if m.family == "gpt2" else (fb - first, fb)
    if ft.method == "adapter":
        # Bottleneck adapters (Houlsby et al. 2019) after attention and MLP: each keeps its input h
        # and its m-wide hidden (pre- and post-activation) in the compute dtype.
        e = _sym(m, training, plan)["e"]
        extra = 2 * _sym(m, training, plan)["T"] * e * (m.hidden_size + 2 * ft.adapter_size)
        return fb + extra - first, fb + extra
    raise ValueError(ft.method)


def peft_layer_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, ft: FinetuneSpec) -> tuple[float, float]:
    """(layer 0, each later layer) per rank: the unsplit figures scaled by how tensor and sequence
    parallelism shrink a full fine-tuning layer (an approximation for tp > 1; exact at tp = 1)."""
    first, layer = _unsplit_layers(m, ft, training, plan.model_copy(update={"tp": 1, "sp": False}))
    if plan.tp == 1:
        return first, layer
    scale = hf_layer_bytes(m, training, plan) / hf_layer_bytes(m, training, plan.model_copy(update={"tp": 1, "sp": False}))
    return first * scale, layer * scale


def peft_model_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, ft: FinetuneSpec) -> tuple[float, float]:
    """(first stage, last stage) model-level bytes: with a frozen embedding the ids are not saved,
    nor the final norm's output and the lm_head input; the fp32 log-softmax (4V), the final norm's
    fp32 input and statistics, the targets and cos/sin remain."""
    x = _sym(m, training, plan)
    T, e, h, s, b, V = x["T"], x["e"], x["h"], x["s"], x["b"], x["V"]
    b1 = 8 if b == 1 else 0
    if m.family == "gpt2":
        head = T * (4 * V / plan.tp + 16) + 4 + b1
        if ft.method in ("prompt", "bitfit"):
            head += T * e * h + (T * h if ft.method == "prompt" else 0)
        first = 0.0
    else:
        head = T * (4 * V / plan.tp + 4 * h + 12) + 4 + b1
        first = 2 * e * s * m.head_dim
    if ft.method == "prefix":
        first += 8 * b * ft.prefix_length
    if ft.method == "prompt":
        first += 8 * b * ft.num_virtual_tokens
    return first, head


def mezo_peak_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan, last_stage: bool) -> float:
    """MeZO keeps nothing for backward: its activation memory is the peak of live tensors in an
    inference forward (Malladi et al. 2023), the largest of the loss computation (16-bit and fp32
    logits and the log-softmax), an MLP (its inner activations) and eager attention's scores."""
    x = _sym(m, training, plan)
    T, e, h, a, d, kd, f, s, b, V = (x[k] for k in ("T", "e", "h", "a", "d", "kd", "f", "s", "b", "V"))
    loss = T * ((e + 8) * V / plan.tp + e * h + 24) + 8 * b + 8 + (8 * T if b > 1 else 0)
    scores = e * b * a * s * s / plan.tp + e * b * s * s
    if m.family == "gpt2":
        mlp = T * (5 * e * h + 4 * e * f / plan.tp + 16) + 8 * s + e * s * h
        att = T * (6 * e * h + 16) + 2 * e * b * a * s * s / plan.tp + e * b * s * s + 8 * s + e * s * h
    else:
        mlp = T * (4 * e * h + 3 * e * f / plan.tp + 16) + 8 * s + 2 * e * s * d
        att = 10 * b * a * s * s / plan.tp + e * b * s * s + T * (3 * e * h + (3 * e * a * d + 2 * e * kd) / plan.tp + 16) + 8 * s + 2 * e * s * d
    if training.attention == "eager":
        mlp += scores
        peaks = [mlp, att]
    else:
        peaks = [mlp]
    return max(peaks + ([loss] if last_stage else []))


def dequant_buffer_bytes(m: ModelSpec, training: TrainingSpec, plan: ParallelPlan) -> float:
    """QLoRA computes in 16 bits: bitsandbytes dequantises one 4-bit weight at a time into a
    temporary 16-bit copy (Dettmers et al. 2023, section 3, "we dequantize the storage data type
    to the computation data type"), so the largest linear weight is held once more."""
    e = 4 if training.precision == "fp32" else 2
    largest = max(in_f * out_f for in_f, out_f in _linear_shapes(m).values())
    return e * largest / plan.tp
