"""Fine-tuning methods: trainable-parameter counts against peft, and the published memory points."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from planner.memory.evaluate import evaluate
from planner.finetune.methods import FinetuneSpec, trainable_params
from planner.specs.hardware import dgx_cluster, gpu_by_name
from planner.structure.hf_config import spec_from_hf_config
from planner.structure.presets import preset
from planner.specs.training import ParallelPlan, TrainingSpec

SMALL = {
    "llama": {"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 256, "num_attention_heads": 8,
              "num_key_value_heads": 2, "intermediate_size": 688, "vocab_size": 1000},
    "mistral": {"model_type": "mistral", "num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4,
                "num_key_value_heads": 4, "intermediate_size": 352, "vocab_size": 500},
    "qwen2": {"model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 352, "vocab_size": 500},
    "gpt2": {"model_type": "gpt2", "n_layer": 3, "n_embd": 128, "n_head": 4, "n_positions": 256, "vocab_size": 500},
}


def peft_count(cfg: dict, peft_config) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    trainable, _ = get_peft_model(model, peft_config).get_nb_trainable_parameters()
    return trainable


@pytest.mark.parametrize("family", list(SMALL))
def test_trainable_counts_equal_peft(family):
    cfg = SMALL[family]
    m = spec_from_hf_config(cfg, name=family)
    all_linear = "all-linear"
    cases = [
        (FinetuneSpec(method="lora", lora_rank=8), LoraConfig(r=8, task_type="CAUSAL_LM")),
        (FinetuneSpec(method="lora", lora_rank=16, lora_targets=(all_linear,)), LoraConfig(r=16, target_modules=all_linear, task_type="CAUSAL_LM")),
        (FinetuneSpec(method="prefix", prefix_length=30), PrefixTuningConfig(num_virtual_tokens=30, task_type="CAUSAL_LM")),
        (FinetuneSpec(method="prompt", num_virtual_tokens=20), PromptTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM")),
        (FinetuneSpec(method="ia3"), IA3Config(task_type="CAUSAL_LM")),
    ]
    for ft, peft_config in cases:
        assert trainable_params(m, ft) == peft_count(cfg, peft_config), (family, ft.method, ft.lora_targets)


def test_bitfit_counts_biases():
    assert trainable_params(preset("llama2-7b"), FinetuneSpec(method="bitfit")) == 0  # Llama has no biases
    q = preset("qwen2.5-7b")
    assert trainable_params(q, FinetuneSpec(method="bitfit")) == q.num_layers * (q.q_width + 2 * q.kv_width)


QLORA = dict(method="qlora", lora_rank=64, lora_alpha=16, lora_targets=("all-linear",), lora_dropout=0.05,
             quant="nf4", double_quant=True, paged_optimizer=True, adapter_dtype="bf16")


def test_qlora_65b_fits_one_48gb_gpu():
    """Dettmers et al. 2023: LLaMA-65B fine-tuned on a single 48 GB GPU (Guanaco 65B script: batch 4,
    ~528 tokens, r=64 on all linear layers, NF4 + double quantisation, paged AdamW, gradient
    checkpointing, LoRA in bf16)."""
    model, cluster = preset("llama-65b"), dgx_cluster(gpu_by_name("a6000-48gb"), 1)
    training = TrainingSpec(seq_len=528, optimizer="adamw")
    plan = ParallelPlan(micro_batch=4, grad_accum=4, recompute="full")
    mem = evaluate(model, cluster, training, plan, finetune=FinetuneSpec(**QLORA))
    assert mem.fits, mem.memory.as_dict()
    assert mem.memory.total > 35e9  # the 4-bit base alone is ~34 GB: not trivially small


def test_qlora_33b_fits_24gb():
    model, cluster = preset("llama-33b"), dgx_cluster(gpu_by_name("rtx4090-24gb"), 1)
    training = TrainingSpec(seq_len=528)
    plan = ParallelPlan(micro_batch=1, grad_accum=16, recompute="full")
    mem = evaluate(model, cluster, training, plan, finetune=FinetuneSpec(**QLORA))
    assert mem.fits, mem.memory.as_dict()


def test_full_16bit_finetune_65b_needs_over_780gb():
    """'reduces the average memory requirements of finetuning a 65B parameter model from >780GB'."""
    model = preset("llama-65b")
    one = dgx_cluster(gpu_by_name("h100-80gb"), 1)
    mem = evaluate(model, one, TrainingSpec(seq_len=512), ParallelPlan(recompute="full"), finetune=FinetuneSpec(method="full"))
    states = mem.memory.parameters + mem.memory.gradients + mem.memory.optimizer
    assert states > 780e9


def test_lora_gpt3_175b_350gb_against_1_2tb():
    """Hu et al. 2021, section 4.2: LoRA (r=4 on W_q, W_v) cuts GPT-3 175B training memory from 1.2 TB
    to 350 GB: the frozen fp16 weights dominate."""
    model = preset("gpt3-175b")
    cluster = dgx_cluster(gpu_by_name("a100-80gb"), 1)
    training = TrainingSpec(seq_len=2048, precision="fp16")
    plan = ParallelPlan(recompute="full")
    lora = evaluate(model, cluster, training, plan, finetune=FinetuneSpec(method="lora", lora_rank=4))
    full = evaluate(model, cluster, training, plan, finetune=FinetuneSpec(method="full"))
    lora_states = lora.memory.parameters + lora.memory.gradients + lora.memory.optimizer
    full_states = full.memory.parameters + full.memory.gradients + full.memory.optimizer
    assert lora_states == pytest.approx(350e9, rel=0.10)
    assert full_states >= 1.2e12


def test_zero3_gathers_and_offloads_the_frozen_base():
    """ZeRO-3 partitions every parameter, frozen or not (zero/partition_parameters.py): a rank keeps
    its 1/dp share of the base plus the gathered working set (max_reuse_distance / 2 + the prefetch
    bucket, in elements, as for full training); offload_param moves the share to host memory."""
    from planner.finetune.states import finetune_states
    from planner.memory.evaluate import buffers_for

    model, training = preset("llama3.1-70b"), TrainingSpec(seq_len=2048)
    lora = FinetuneSpec(method="lora", lora_targets=("all-linear",))

    def states(**plan):
        p = ParallelPlan(dp=8, micro_batch=1, recompute="full", **plan)
        return finetune_states(model, lora, training, p, 0, buffers_for(model, p))

    z0, z3, off = states(zero_stage=0), states(zero_stage=3), states(zero_stage=3, offload="optimizer+params")
    buffers = buffers_for(model, ParallelPlan(dp=8, zero_stage=3))
    gathered = 2 * (buffers.stage3_max_reuse_distance // 2 + buffers.stage3_prefetch_bucket_size)  # bf16 elements
    adapters = z0.parameters - 2 * 70_553_706_496
    assert z3.parameters == pytest.approx(2 * 70_553_706_496 / 8 + gathered + adapters / 8, rel=1e-3)
    assert off.parameters == pytest.approx(gathered + adapters / 8, rel=1e-3)
    assert off.host - z3.host == pytest.approx(2 * 70_553_706_496 / 8 + z3.optimizer, rel=1e-3)  # and the adapters' states
