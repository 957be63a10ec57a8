"""Per-pipeline-stage activation bytes from the exact trace (``orch plan --trace``).

The trace runs the whole unsplit model once (planner.trace) and attributes every saved tensor to
a decoder layer or to the model level. A stage holds its layers' bytes for each micro-batch in
flight (planner.activations.in_flight_micro_batches); the first stage adds the input-side
model-level tensors, the last the output side (final norm, logits, loss).
"""

from __future__ import annotations

from planner.activations import in_flight_micro_batches
from planner.activations_hf import hf_embedding_bytes
from planner.errors import PlanInputError
from planner.finetune import FinetuneSpec, extra_sequence_tokens, peft_trace_config
from planner.model import ModelSpec
from planner.params import layers_per_stage
from planner.training import ParallelPlan, TrainingSpec


def stage_activations_traced(
    model: ModelSpec, training: TrainingSpec, plan: ParallelPlan, finetune: FinetuneSpec | None = None
) -> dict[int, int]:
    from planner.trace import trace_activations

    if model.hf_config is None:
        raise PlanInputError(f"model '{model.name}' has no Hugging Face config to trace", "pass a config.json")
    dtype = "bf16" if training.precision in ("bf16", "fp8") else training.precision
    peft = peft_trace_config(model, finetune) if finetune is not None else None
    seq_len = training.seq_len - (extra_sequence_tokens(finetune) if finetune is not None else 0)
    trace = trace_activations(
        model.hf_config, seq_len=seq_len, micro_batch=plan.micro_batch, attention=training.attention, dtype=dtype,
        **({"peft": peft} if peft else {}),
    )
    input_side = min(int(hf_embedding_bytes(model, training, plan)), trace.model_bytes)
    output_side = trace.model_bytes - input_side
    counts = layers_per_stage(model.num_layers, plan.pp)
    result, first = {}, 0
    for stage, n in enumerate(counts):
        layers = sum(trace.layer_bytes[first : first + n])
        first += n
        total = layers * in_flight_micro_batches(plan, stage)
        if stage == 0:
            total += input_side * in_flight_micro_batches(plan, stage)
        if stage == plan.pp - 1:
            total += output_side
        result[stage] = int(total)
    return result
