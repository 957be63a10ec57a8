"""Per-pipeline-stage activation bytes from the exact trace (``orch plan --trace``).

The trace runs the whole unsplit model once (planner.trace) and attributes every saved tensor to
a decoder layer or to the model level. A stage holds its layers' bytes for each micro-batch in
flight (planner.memory.activations.in_flight_micro_batches); the first stage adds the input-side
model-level tensors, the last the output side (final norm, logits, loss).
"""

from __future__ import annotations

from planner.memory.activations import in_flight_micro_batches, profile_of
from planner.errors import PlanInputError
from planner.finetune.methods import FinetuneSpec, extra_sequence_tokens, trace_spec
from planner.structure.model import ModelSpec
from planner.structure.params import layers_per_stage
from planner.specs.training import ParallelPlan, TrainingSpec


def stage_activations_traced(
    model: ModelSpec, training: TrainingSpec, plan: ParallelPlan, finetune: FinetuneSpec | None = None
) -> dict[int, int]:
    from planner.trace import trace_activations

    dtype = "bf16" if training.precision in ("bf16", "fp8") else training.precision
    peft, quant = trace_spec(model, finetune)
    if quant is not None or (peft or {}).get("method") == "adapter":
        raise PlanInputError(
            f"--trace cannot build --method {finetune.method if finetune else 'full'} as one plain trace",
            "drop --trace: the default activations of this method are already traced from the model itself",
        )
    seq_len = training.seq_len - (extra_sequence_tokens(finetune) if finetune is not None else 0)
    trace = trace_activations(
        model.hf_config, seq_len=seq_len, micro_batch=plan.micro_batch, attention=training.attention, dtype=dtype,
        **({"peft": peft} if peft else {}),
    )
    # The first stage's model-level share (ids, embedding output, rotary tables) as the profile
    # attributes it; the rest (final norm, logits, loss) is the last stage's.
    prof = profile_of(model, training, finetune, "cuda")
    input_side = min(int(prof.input.at(plan.micro_batch) + prof.shared.at(plan.micro_batch)), trace.model_bytes)
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
