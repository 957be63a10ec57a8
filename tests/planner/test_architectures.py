"""The planner's default activations and parameter counts against real CPU runs, for every
architecture of tests/planner/architectures.py (26 causal LMs transformers ships, none of which
has a reader of its own): the model is built with real tensors, one training forward runs on an
unpadded batch, and what it keeps is measured.

- no recompute: the bytes of the unique storages autograd saves (``saved_tensors_hooks``, keyed by
  data pointer, parameters excluded) while only the loss is alive, at two (micro-batch, sequence)
  shapes: within 1% of ``stage_activation_bytes`` on CPU kernels (micro-batch 4 is outside the
  profile's traced micro-batches 1-3, so the affine extension is checked too);
- full recompute (transformers' non-reentrant gradient checkpointing, as orch launches it): the
  bytes the CPU allocator still holds after the forward (torch.profiler's memory events), which
  saved-tensor hooks cannot see, against the kept bytes the plan counts (its activations less the
  one layer it rebuilds in the backward);
- parameters: transformers' own unique count of the real model, exactly.
"""

from __future__ import annotations

import pytest

from planner.memory.activations import profile_of, stage_activation_bytes
from planner.specs.training import ParallelPlan, TrainingSpec
from planner.structure.hf_config import spec_from_hf_config
from planner.structure.params import total_params
from tests.planner.architectures import ARCHITECTURES, config
from tests.planner.realrun import build_real, live_bytes_after_forward, saved_bytes_of_forward, unique_params

SHAPES = ((1, 64), (4, 128))  # (micro-batch, sequence)
TOLERANCE = 0.01


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    cfg = config(request.param)
    return request.param, cfg, spec_from_hf_config(cfg, name=request.param)


def test_enough_architectures_of_every_kind() -> None:
    assert len(ARCHITECTURES) >= 25
    specs = [spec_from_hf_config(config(n), name=n) for n in ARCHITECTURES]
    assert any(s.num_experts for s in specs) and any(s.num_kv_heads == 1 for s in specs)
    assert any(1 < s.num_kv_heads < s.num_heads for s in specs)
    assert {s.norm for s in specs} == {"layernorm", "rmsnorm"} and {s.tied_embeddings for s in specs} == {True, False}
    assert any(len(s.layout.kinds) > 1 for s in specs)  # alternating sliding / global layers


def test_parameter_count_is_exact(arch) -> None:  # type: ignore[no-untyped-def]
    name, cfg, spec = arch
    assert total_params(spec) == unique_params(build_real(cfg)), name


@pytest.mark.parametrize("micro_batch, seq_len", SHAPES)
def test_activations_equal_a_real_forward(arch, micro_batch: int, seq_len: int) -> None:  # type: ignore[no-untyped-def]
    name, cfg, spec = arch
    predicted = stage_activation_bytes(spec, TrainingSpec(seq_len=seq_len), ParallelPlan(micro_batch=micro_batch), 0,
                                       None, "cpu")
    measured = saved_bytes_of_forward(build_real(cfg), vocab_size=spec.vocab_size, seq_len=seq_len, micro_batch=micro_batch)
    assert predicted == pytest.approx(measured, rel=TOLERANCE), f"{name}: planned {predicted:,} vs measured {measured:,}"


def test_full_recompute_keeps_what_a_real_checkpointed_forward_keeps(arch) -> None:  # type: ignore[no-untyped-def]
    name, cfg, spec = arch
    b, s = 2, 128
    training = TrainingSpec(seq_len=s)
    planned = stage_activation_bytes(spec, training, ParallelPlan(micro_batch=b, recompute="full"), 0, None, "cpu")
    prof = profile_of(spec, training, None, "cpu")
    rebuilt = max(prof.layer(i).at(b) for i in range(spec.num_layers))
    measured = live_bytes_after_forward(build_real(cfg, recompute=True), vocab_size=spec.vocab_size, seq_len=s, micro_batch=b)
    assert planned - rebuilt == pytest.approx(measured, rel=TOLERANCE), f"{name}: kept {planned - rebuilt:,} vs {measured:,}"
