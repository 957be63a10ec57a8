"""Exact parameter counts: the analytical count equals transformers' on the meta device."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from planner.structure.params import active_params, layers_per_stage, stage_params, total_params
from planner.structure.presets import PRESETS, preset


def meta_count(hf_config: dict) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_count_equals_transformers(name):
    m = preset(name)
    assert total_params(m) == meta_count(m.hf_config)


def test_published_sizes():
    # Names carry the published sizes: within 3% (Megatron's names round, Mixtral is "46.7B").
    for name, billions in {"gpt3-175b": 175, "gpt3-1t": 1008, "llama3.1-405b": 405.9, "mixtral-8x7b": 46.7}.items():
        assert total_params(preset(name)) / 1e9 == pytest.approx(billions, rel=0.03)


def test_moe_active_params():
    # Mixtral 8x7B: 12.9B active parameters per token (Jiang et al. 2024, section 2).
    assert active_params(preset("mixtral-8x7b")) / 1e9 == pytest.approx(12.9, rel=0.01)


def test_stages_cover_all_params_once():
    m = preset("llama2-7b")
    per_stage = [stage_params(m, tp=1, pp=4, ep=1, stage=s).total for s in range(4)]
    assert sum(per_stage) == total_params(m)


def test_tensor_parallel_split():
    m = preset("gpt3-175b").model_copy(update={"implementation": "megatron"})
    one = stage_params(m, tp=1, pp=1, ep=1, stage=0).total
    eight = stage_params(m, tp=8, pp=1, ep=1, stage=0).total
    # Megatron-LM: only norms, row-parallel biases and the position table stay whole: a hair above 1/8.
    assert one / 8 < eight < one / 8 * 1.01
    # DeepSpeed AutoTP (what orch launches) keeps the (tied) embedding whole on every rank.
    autotp = preset("gpt3-175b")
    embedding = m.vocab_size * m.hidden_size
    assert stage_params(autotp, tp=8, pp=1, ep=1, stage=0).total == pytest.approx(eight + embedding * 7 / 8, rel=1e-4)


def test_bloom_176b_is_read_from_its_modules():
    """BLOOM's MLP is 4h = 57344 (bigscience/bloom config.json has no intermediate size to guess
    from); its published TP=4 / PP=12 layout (Le Scao et al. 2022, section 3.4) is a valid plan."""
    from planner.search.validate import plan_problems
    from planner.specs.hardware import dgx_cluster, gpu_by_name
    from planner.specs.training import ParallelPlan, TrainingSpec
    from planner.structure.hf_config import spec_from_hf_config

    cfg = {"model_type": "bloom", "n_layer": 70, "hidden_size": 14336, "n_head": 112, "vocab_size": 250880,
           "apply_residual_connection_post_layernorm": False, "slow_but_exact": False}
    bloom = spec_from_hf_config(cfg, name="bloom-176b")
    assert bloom.ffn_hidden_size == 57344 and bloom.num_layers == 70
    assert 176e9 < total_params(bloom) < 177e9  # "176B parameters" (the model card: 176,247,271,424)
    plan = ParallelPlan(dp=8, tp=4, pp=12, zero_stage=1, micro_batch=2, grad_accum=128)
    cluster = dgx_cluster(gpu_by_name("a100-80gb"), 384)
    assert not plan_problems(bloom, cluster, TrainingSpec(seq_len=2048, global_batch=2048), plan)


def test_uneven_split_llama3_405b():
    counts = layers_per_stage(126, 16)
    assert sum(counts) == 126 and counts[0] == counts[-1] == 7 and max(counts) == 8
