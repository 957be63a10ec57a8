"""The activation profile at full depth and under tensor parallelism.

- Full depth: the profile traces a model cut to the layers that differ and maps every real layer to
  a representative; its total equals the exact FakeTensor trace of the preset (1 and 2 layers,
  extrapolated with planner.trace.extrapolate_layers, itself checked against full-depth traces in
  tests/planner/test_trace.py) to the byte, on CUDA kernels.
- Tensor parallelism: a rank of DeepSpeed AutoTP holds a model whose column-parallel outputs have
  1/t of the heads and of the MLP width (the rest whole, the logits gathered whole). For Llama,
  whose config takes an explicit head_dim, that rank's model is the config with heads, kv heads
  and intermediate size divided by t: its exact trace is the ground truth the profile's
  whole + split/t must meet, independently of how the profile tags split storages.
"""

from __future__ import annotations

import pytest

from planner.memory.activations import stage_activation_bytes
from planner.specs.training import ParallelPlan, TrainingSpec
from planner.structure.presets import preset, preset_hf_config
from planner.trace import extrapolate_layers, trace_activations

PRESETS = ("llama3.1-8b", "gpt3-1.7b", "mixtral-8x7b", "qwen2.5-7b", "mistral-7b")


def _traced(cfg: dict, seq_len: int, micro_batch: int, attention: str, layers: int) -> int:
    kw = dict(seq_len=seq_len, micro_batch=micro_batch, attention=attention, dtype="bf16")
    one = trace_activations(cfg, num_layers_override=1, **kw)
    two = trace_activations(cfg, num_layers_override=2, **kw)
    return extrapolate_layers(one, two, layers)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("attention", ["flash", "eager"])
def test_profile_equals_the_exact_trace_at_full_depth(name: str, attention: str) -> None:
    model = preset(name)
    seq = 2048
    training = TrainingSpec(seq_len=seq, attention=attention)  # type: ignore[arg-type]
    for b in (1, 4):
        planned = stage_activation_bytes(model, training, ParallelPlan(micro_batch=b), 0)
        assert planned == _traced(model.hf_config, seq, b, attention, model.num_layers), (name, attention, b)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_rank_equals_the_trace_of_the_split_model(tp: int) -> None:
    cfg = preset_hf_config("llama3.1-8b")
    seq, b, layers = 2048, 2, 4
    cfg = {**cfg, "num_hidden_layers": layers}
    rank = {**cfg, "num_attention_heads": cfg["num_attention_heads"] // tp, "num_key_value_heads": cfg["num_key_value_heads"] // tp,
            "intermediate_size": cfg["intermediate_size"] // tp, "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"]}
    from planner.structure.hf_config import spec_from_hf_config

    model = spec_from_hf_config(cfg, name="llama-4-layers")
    planned = stage_activation_bytes(model, TrainingSpec(seq_len=seq), ParallelPlan(dp=1, tp=tp, micro_batch=b), 0)
    assert planned == pytest.approx(_traced(rank, seq, b, "flash", layers), rel=1e-6)


def test_sequence_parallel_and_recompute_shrink_what_is_kept() -> None:
    model, training = preset("llama2-7b"), TrainingSpec(seq_len=4096)
    one = stage_activation_bytes(model, training, ParallelPlan(), 0)
    eight = stage_activation_bytes(model, training, ParallelPlan(tp=8, dp=1), 0)
    eight_sp = stage_activation_bytes(model, training, ParallelPlan(tp=8, sp=True), 0)
    assert eight_sp == pytest.approx(one / 8, rel=1e-9) and one / 8 < eight < one  # SP divides the whole part too
    full = stage_activation_bytes(model, training, ParallelPlan(recompute="full"), 0)
    assert full < one / 5
