"""The analytical activation model of each fine-tuning method against the exact trace of the
peft-wrapped model (planner.trace with peft=): within 3%, on several architectures, sequence
lengths, micro-batches and both attention kernels."""

from __future__ import annotations

import pytest

from planner.activations import stage_activation_bytes
from planner.finetune import FinetuneSpec, extra_sequence_tokens, peft_trace_config
from planner.presets import preset
from planner.trace import extrapolate_layers, trace_activations
from planner.training import ParallelPlan, TrainingSpec

METHODS = {
    "lora-qv": FinetuneSpec(method="lora", lora_rank=8),
    "lora-all-r64-dropout": FinetuneSpec(method="lora", lora_rank=64, lora_targets=("all-linear",), lora_dropout=0.05),
    "qlora": FinetuneSpec(method="qlora", lora_rank=64, lora_targets=("all-linear",)),
    "prefix": FinetuneSpec(method="prefix", prefix_length=30),
    "prompt": FinetuneSpec(method="prompt", num_virtual_tokens=20),
    "ia3": FinetuneSpec(method="ia3"),
    "bitfit": FinetuneSpec(method="bitfit"),
    "mezo": FinetuneSpec(method="mezo"),
}
MODELS = ["llama3.1-8b", "mistral-7b", "qwen2.5-7b", "gpt3-1.7b"]
CASES = [
    (model, method, s, b, att)
    for model in MODELS
    for method in METHODS
    for s, b in ((1024, 1), (2048, 2))
    for att in ("flash", "eager")
    if not (method == "bitfit" and model in ("llama3.1-8b", "mistral-7b"))  # no bias terms to train
]


def traced(model, ft: FinetuneSpec, seq_len: int, micro_batch: int, attention: str) -> int:
    kw = dict(seq_len=seq_len, micro_batch=micro_batch, attention=attention, dtype="bf16", peft=peft_trace_config(model, ft))
    one = trace_activations(model.hf_config, num_layers_override=1, **kw)
    two = trace_activations(model.hf_config, num_layers_override=2, **kw)
    return extrapolate_layers(one, two, model.num_layers)


@pytest.mark.parametrize("name, method, seq_len, micro_batch, attention", CASES)
def test_analytical_within_3_percent_of_peft_trace(name, method, seq_len, micro_batch, attention):
    model, ft = preset(name), METHODS[method]
    # QLoRA's activations are LoRA's on a 16-bit compute path (bitsandbytes dequantises each weight).
    trace_ft = ft.model_copy(update={"method": "lora"}) if ft.method == "qlora" else ft
    training = TrainingSpec(seq_len=seq_len + extra_sequence_tokens(ft), attention=attention)
    analytic = stage_activation_bytes(model, training, ParallelPlan(micro_batch=micro_batch), 0, ft)
    if ft.method == "qlora":
        analytic -= _dequant_buffer(model)
    exact = traced(model, trace_ft, seq_len, micro_batch, attention)
    assert analytic == pytest.approx(exact, rel=0.03), f"{method}: analytic {analytic:,} vs trace {exact:,}"


def _dequant_buffer(model) -> int:
    from planner.activations_peft import dequant_buffer_bytes

    return dequant_buffer_bytes(model, TrainingSpec(), ParallelPlan())


def test_mezo_is_inference_sized():
    model, training = preset("llama3.1-8b"), TrainingSpec(seq_len=4096)
    full = stage_activation_bytes(model, training, ParallelPlan(), 0)
    mezo = stage_activation_bytes(model, training, ParallelPlan(), 0, METHODS["mezo"])
    assert mezo < full / 5
