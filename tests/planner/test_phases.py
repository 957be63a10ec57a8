"""The peak of a rank as the largest of what is alive together at one phase of a step
(planner.memory.phases): the composition on made-up numbers, and the planner against true peaks measured
on two CPU ranks."""

from __future__ import annotations

import pytest

from planner.memory.evaluate import COMPONENTS, buffers_for, evaluate
from planner.specs.hardware import dgx_cluster, gpu_by_name
from planner.structure.hf_config import spec_from_hf_config
from planner.memory.model_states import Backward, StateBytes
from planner.memory.phases import Phase, Segment, peak, step_phases
from planner.structure.presets import preset
from planner.specs.training import ParallelPlan, TrainingSpec
from planner.memory.zero_buffers import ZeroBuffers


def _llama(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int) -> dict:
    return {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": ffn, "vocab_size": 32000,
            "max_position_embeddings": 1024, "hidden_act": "silu", "tie_word_embeddings": False}


# Llama-shaped models with Llama 2's vocabulary: a small one and bench/gpu_memory.py's bench-134m.
MODELS = {"debug": None, "llama-mid": _llama(4, 256, 4, 2, 688), "llama-134m": _llama(12, 768, 12, 12, 2048)}

# True peaks of live tensor bytes on the most loaded of 2 CPU ranks (gloo), second step, bf16 +
# AdamW, DeepSpeed 0.19.8, torch 2.13, transformers 5.24: `orch profile` (launch/profile_worker.py,
# torch.profiler's allocator events) with the plan's buffers, or the reduce bucket given (elements),
# stage 3 with stage3_param_persistence_threshold 0.
# (model, zero, micro-batch, seq, bucket, attention, bytes, phase)
MEASURED = [
    ("debug", 1, 2, 256, 20_000, "flash", 5_767_768, "loss"),
    ("debug", 2, 2, 256, 20_000, "flash", 5_767_768, "loss"),
    ("debug", 3, 2, 256, 20_000, "flash", 6_058_781, "loss"),
    ("debug", 1, 32, 256, None, "flash", 77_007_448, "loss"),
    ("debug", 1, 1, 64, None, "flash", 1_761_240, "backward"),
    ("debug", 2, 1, 64, 200_000, "flash", 1_868_504, "backward"),
    ("debug", 1, 2, 128, 2_000_000, "flash", 6_892_504, "backward"),
    ("debug", 2, 4, 128, 2_000_000, "flash", 8_708_952, "backward"),
    ("debug", 1, 2, 256, 20_000, "eager", 12_646_312, "backward"),
    ("debug", 2, 1, 512, 20_000, "eager", 21_991_080, "backward"),
    ("llama-mid", 3, 1, 32, 2_000_000, "flash", 237_013_013, "forward"),
    ("llama-mid", 3, 1, 64, None, "flash", 286_392_625, "backward"),
    ("llama-mid", 1, 1, 128, None, "flash", 239_244_561, "step"),  # 277,686,696 in one run of five, see below
    ("llama-mid", 1, 1, 256, None, "eager", 271_414_584, "loss"),
    ("llama-mid", 2, 4, 128, None, "flash", 374_841_624, "loss"),
    ("llama-134m", 1, 1, 256, None, "flash", 1_610_451_472, "step"),
    ("llama-134m", 2, 1, 256, None, "flash", 1_610_451_472, "step"),
    ("llama-134m", 3, 1, 256, None, "flash", 1_926_636_313, "backward"),
    ("llama-134m", 1, 4, 256, None, "flash", 1_900_939_544, "loss"),
    ("llama-134m", 2, 4, 256, None, "flash", 1_900_939_544, "loss"),
    ("llama-134m", 3, 4, 256, None, "flash", 2_437_362_973, "loss"),
    ("llama-134m", 1, 8, 256, None, "flash", 2_728_966_424, "loss"),
    ("llama-134m", 2, 8, 256, None, "flash", 2_728_966_424, "loss"),
    ("llama-134m", 3, 8, 256, None, "flash", 3_265_392_445, "loss"),
]
# The loss, step and end-of-backward phases are composed of exactly counted terms (each within
# 0.01% above); a point inside the backward adds a layer's working set of activation gradients,
# measured from a fake backward (planner.trace.profile): within 2%. Not modelled: under a
# loaded CPU gloo's asynchronous work can keep a bucket-sized buffer alive into the ZeRO-1 step
# (38 MB more in one run of five on llama-mid z1 mb1 s128).
TOLERANCE = 0.02


def _evaluate(name: str, zero: int, mb: int, seq: int, bucket: int | None, attention: str = "flash"):
    cfg = MODELS[name]
    model = preset(name) if cfg is None else spec_from_hf_config(cfg, name=name)
    plan = ParallelPlan(dp=2, zero_stage=zero, micro_batch=mb)
    buffers = buffers_for(model, plan) if bucket is None else ZeroBuffers(reduce_bucket_size=bucket)
    buffers = buffers.model_copy(update={"stage3_param_persistence_threshold": 0})
    training = TrainingSpec(seq_len=seq, attention=attention)  # type: ignore[arg-type]
    return evaluate(model, dgx_cluster(gpu_by_name("cpu"), 2), training, plan, buffers=buffers)


@pytest.mark.parametrize(("name", "zero", "mb", "seq", "bucket", "attention", "measured", "phase"), MEASURED,
                         ids=[f"{r[0]}-z{r[1]}-mb{r[2]}-s{r[3]}-b{r[4]}-{r[5]}" for r in MEASURED])
def test_peak_as_measured(name: str, zero: int, mb: int, seq: int, bucket: int | None, attention: str, measured: int,
                          phase: str) -> None:
    mem = _evaluate(name, zero, mb, seq, bucket, attention).memory
    assert mem.peak_phase == phase
    assert abs(mem.peak_allocated - measured) / measured <= TOLERANCE, f"{mem.peak_allocated:,} predicted, {measured:,} measured"


def test_the_sum_of_components_misses_both_ways() -> None:
    """Why the peak is composed by phase: the components' sum is 20% low where the loss's fp32
    gradient sets the peak, and 8% high where the gradients grow only as the activations go."""
    def components(name: str, zero: int, mb: int) -> int:
        mem = _evaluate(name, zero, mb, 256, None).memory
        return sum(getattr(mem, c) for c in COMPONENTS if c != "overhead")

    assert components("debug", 1, 32) < 0.85 * 77_007_448
    assert components("llama-134m", 1, 1) > 1.05 * 1_610_451_472


# The composition, on made-up numbers -------------------------------------------------------

SEGMENTS = [Segment("head", activations=30, elements=4, largest=4, working=((1.0, 3),)),
            Segment("layer", activations=20, elements=3, largest=3, working=((1.0, 3),)),
            Segment("embedding", activations=10, elements=5, largest=5)]


def test_loss_phase_adds_the_loss_gradient_to_every_activation() -> None:
    states = StateBytes(parameters=100, gradients=50, optimizer=400, backward=Backward(before=6, end=50))
    phases = step_phases(states, activations=60, loss_grad=25, segments=SEGMENTS)
    assert phases[0] == Phase("loss", 100, 6, 400, 85)


def test_backward_frees_activations_as_the_gradients_grow() -> None:
    """ZeRO-1-like: a bucket with the first gradient, each gradient kept (2 bytes per element), the
    reduce at the end with the activations freed."""
    states = StateBytes(parameters=100, gradients=90, optimizer=400, backward=Backward(bucket=7, kept=2, end=90))
    walk = [(p.gradients, p.activations) for p in step_phases(states, 60, 25, SEGMENTS) if p.name == "backward"]
    assert walk == [(7 + 2 * 4, 30 + 3), (7 + 2 * 7, 10 + 3), (7 + 2 * 12, 0), (90, 0)]


def test_stage2_partition_from_the_first_reduce_and_gradient_in_flight() -> None:
    bw = Backward(bucket=7, partition=11, first_reduce=5, in_flight=2, end=40)
    assert [bw.gradients(p, g) for p, g in ((0, 0), (4, 4), (7, 3))] == [0, 7 + 8, 7 + 11 + 6]


def test_stage3_releases_gathered_parameters_and_reduces_with_a_copy() -> None:
    """Parameters gathered at the start go as the backward passes their modules; the last reduce
    copies the bucket (reduce_scatter_coalesced), activations freed."""
    bw = Backward(before=20, in_flight=2, reduce_copy=9, first_reduce=100, end=29, gathered=12, gathered_bytes=2)
    states = StateBytes(parameters=30, gradients=28, optimizer=400, step_gradients=20, step_parameters=6, backward=bw)
    phases = step_phases(states, 60, 25, SEGMENTS)
    backward = [p for p in phases if p.name == "backward"]
    assert [p.parameters for p in backward] == [30, 30 - 8, 30 - 14, 30 - 14]
    assert backward[-1].gradients == 29 and phases[-1] == Phase("step", 6, 20, 400, 0)


def test_step_takes_the_norm_copy_or_the_fp32_copies() -> None:
    base = {"parameters": 100, "gradients": 50, "optimizer": 400, "step_gradients": 10, "step_extra": 30}
    assert step_phases(StateBytes(**base, step_norm=45), 0, 0, [])[-1].gradients == 10 + 45
    assert step_phases(StateBytes(**base, step_norm=20), 0, 0, [])[-1].gradients == 10 + 30


def test_without_a_walk_every_gradient_is_counted_beside_every_activation() -> None:
    """Gradient accumulation: the earlier micro-batches' gradients are alive through the later ones."""
    states = StateBytes(parameters=100, gradients=50, optimizer=400)
    phases = step_phases(states, activations=60, loss_grad=25, segments=[])
    assert [p.name for p in phases] == ["loss", "step"] and phases[0].total == 100 + 50 + 400 + 85


def test_stage3_forward_holds_the_gather_buffers() -> None:
    states = StateBytes(parameters=100, gradients=50, optimizer=400, gather_buffers=70, backward=Backward(before=20, end=20))
    forward = step_phases(states, 60, 25, SEGMENTS)[0]
    assert forward == Phase("forward", 170, 20, 400, 60 - 30)  # the head's activations not yet made


def test_peak_is_the_earliest_of_the_largest() -> None:
    a, b = Phase("loss", 1, 1, 1, 1), Phase("backward", 2, 0, 1, 1)
    assert peak([a, b]) is a and peak([Phase("step", 0, 0, 0, 0), b]) is b


def test_fits_compares_the_peak() -> None:
    """``total`` is the peak with its overhead: what fits, the search and the JSON contract use;
    the JSON ``memory`` keeps the components and the total."""
    mem = _evaluate("debug", 1, 32, 256, None)
    assert mem.memory.total == mem.memory.peak_allocated + mem.memory.overhead
    assert mem.headroom_bytes == mem.gpu_memory_bytes - mem.memory.total
    assert set(mem.memory.as_dict()) == {*COMPONENTS, "total"}
    tight = mem.model_copy(update={"gpu_memory_bytes": mem.memory.total - 1})
    assert mem.fits_gpu and not tight.fits_gpu
