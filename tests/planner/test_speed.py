"""FLOP counts, the speed model's structure, costs and compute-optimal recipes."""

from __future__ import annotations

import pytest

from planner.speed.cost import run_cost
from planner.speed.flops import hardware_flops_per_token, model_flops_per_token
from planner.specs.hardware import dgx_cluster, gpu_by_name
from planner.structure.params import total_params
from planner.structure.presets import preset
from planner.search.scaling import compute_optimal, generated_llama
from planner.speed.step import step_time
from planner.specs.training import ParallelPlan, TrainingSpec


def test_flops_equal_narayanan_formula():
    """Narayanan et al. 2021 Eq. 3: 96 B s l h^2 (1 + s/6h + V/16lh) FLOPs per step with recompute."""
    m = preset("gpt3-175b")
    s, h, l, V = 2048, m.hidden_size, m.num_layers, m.vocab_size
    per_token = 96 * l * h**2 * (1 + s / (6 * h) + V / (16 * l * h))
    assert hardware_flops_per_token(m, s, "full") == pytest.approx(per_token, rel=1e-12)


def test_model_flops_close_to_6n():
    """PaLM Appendix B: 6N + 12 L H Q T per token."""
    m = preset("llama2-7b")
    s = 4096
    palm = 6 * total_params(m) + 12 * m.num_layers * m.num_heads * m.head_dim * s
    # Embedding lookups are not matmuls: ours counts 6 (N - V h) + the same attention term.
    ours = model_flops_per_token(m, s) + 6 * m.vocab_size * m.hidden_size
    assert ours == pytest.approx(palm, rel=1e-3)


def test_bubble_and_mfu():
    m = preset("gpt3-175b")
    cluster = dgx_cluster(gpu_by_name("a100-80gb"), 384)
    training = TrainingSpec(seq_len=2048, global_batch=1536)
    plan = ParallelPlan(dp=4, tp=8, pp=12, micro_batch=1, grad_accum=384, recompute="full")
    st = step_time(m, cluster, training, plan)
    # The bubble idles a whole stage's time (compute and its tensor-parallel communication).
    assert st.bubble_s == pytest.approx((st.compute_s + st.tp_comm_s) * 11 / 384, rel=1e-6)
    assert 0 < st.mfu < st.tflops_per_gpu * 1e12 / (312e12)  # recompute makes hardware FLOPs larger
    assert st.tokens_per_s == pytest.approx(1536 * 2048 / st.step_time_s)


def test_zero3_gathers_once_per_micro_batch():
    """Eight times the GPUs over InfiniBand: faster, but not 8x. ZeRO-3 gathers the parameters for
    every micro-batch, so the 8-GPU run's 32 micro-batches move more than the 64-GPU run's 4; a
    DGX H100 node's eight 400 Gb/s NICs give the inter-node ring about NVLink's bus bandwidth
    (planner.speed.comm), so crossing nodes is not what costs."""
    m = preset("llama2-7b")
    training = TrainingSpec(seq_len=4096, global_batch=256)
    t8 = step_time(m, dgx_cluster(gpu_by_name("h100-80gb"), 8), training, ParallelPlan(dp=8, zero_stage=3, micro_batch=1, grad_accum=32))
    t64 = step_time(m, dgx_cluster(gpu_by_name("h100-80gb"), 64), training, ParallelPlan(dp=64, zero_stage=3, micro_batch=1, grad_accum=4))
    assert 2 * t8.tokens_per_s < t64.tokens_per_s < 8 * t8.tokens_per_s
    assert t8.dp_comm_s > t64.dp_comm_s


def test_cost():
    cluster = dgx_cluster(gpu_by_name("h100-80gb"), 8).model_copy(update={"cost_per_gpu_hour_usd": 2.0, "pue": 1.5})
    c = run_cost(cluster, tokens=3.6e9, tokens_per_s=1e6)
    assert c.seconds == 3600 and c.gpu_hours == 8 and c.cost_usd == 16
    assert c.energy_kwh == pytest.approx(8 * 0.7 * 1.5)


def test_chinchilla_point():
    """Hoffmann et al. 2022: at 5.76e23 FLOPs, 70B parameters on 1.4T tokens (within 10%)."""
    opt = compute_optimal(5.76e23)
    assert opt.params == pytest.approx(70e9, rel=0.10)
    assert opt.tokens == pytest.approx(1.4e12, rel=0.10)
    assert opt.tokens / opt.params == pytest.approx(20, rel=0.05)


def test_generated_architecture_size():
    for params in (1e9, 7e9, 70e9):
        assert total_params(generated_llama(params)) == pytest.approx(params, rel=0.05)
