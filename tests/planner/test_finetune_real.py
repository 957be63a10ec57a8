"""Fine-tuning plans against real CPU runs of the standard recipes: the true peak of tensor bytes
over a training step (the CPU allocator's events, tests/planner/realrun.py peak_of_step) within 2%
of the plan's ``peak_allocated``, on one rank without ZeRO.

The recipes are the libraries' own: a bf16 model wrapped by peft (LoRA on all linears with
dropout, (IA)^3 and prefix tuning with peft's defaults; adapters fp32), and QLoRA as in Dettmers
et al.'s qlora.py: a saved model loaded by transformers with bitsandbytes NF4 and double
quantisation, ``prepare_model_for_kbit_training`` (fp32 upcast of every non-4-bit parameter),
LoRA on all linears; plain or with gradient checkpointing. torch.optim.AdamW on the trainable
parameters, the second step measured (its states exist).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from planner.finetune.methods import FinetuneSpec
from planner.memory.evaluate import evaluate
from planner.specs.hardware import dgx_cluster, gpu_by_name
from planner.specs.training import ParallelPlan, TrainingSpec
from planner.structure.hf_config import spec_from_hf_config
from tests.planner.realrun import build_real, peak_of_step

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

CFG = {"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 128, "num_attention_heads": 4,
       "num_key_value_heads": 2, "intermediate_size": 352, "vocab_size": 512, "max_position_embeddings": 1024,
       "tie_word_embeddings": False}
LORA = dict(r=8, target_modules="all-linear", lora_dropout=0.05, task_type="CAUSAL_LM")
TOLERANCE = 0.02


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    build_real(CFG).save_pretrained(path)
    return str(path)


def _lora(_: str) -> torch.nn.Module:
    return peft.get_peft_model(build_real(CFG), peft.LoraConfig(**LORA))


def _ia3(_: str) -> torch.nn.Module:
    return peft.get_peft_model(build_real(CFG), peft.IA3Config(task_type="CAUSAL_LM"))


def _prefix(_: str) -> torch.nn.Module:
    return peft.get_peft_model(build_real(CFG), peft.PrefixTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM"))


def _qlora(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu", dtype=torch.bfloat16)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return peft.get_peft_model(model, peft.LoraConfig(**LORA))


def _lora_no_dropout(_: str) -> torch.nn.Module:
    return peft.get_peft_model(build_real(CFG), peft.LoraConfig(**{**LORA, "lora_dropout": 0.0}))


LORA_SPEC = dict(lora_rank=8, lora_targets=("all-linear",), lora_dropout=0.05)
CASES = {
    "lora": (_lora, FinetuneSpec(method="lora", **LORA_SPEC)),
    "lora-nodropout": (_lora_no_dropout, FinetuneSpec(method="lora", **{**LORA_SPEC, "lora_dropout": 0.0})),
    "qlora": (_qlora, FinetuneSpec(method="qlora", **LORA_SPEC)),
    "prefix": (_prefix, FinetuneSpec(method="prefix", prefix_length=8)),
    "ia3": (_ia3, FinetuneSpec(method="ia3")),
}
# LoRA without dropout under full recompute: the FakeTensor trace of the checkpointed model keeps
# 0.74 MB (10%) less than the real run at b2 s256 (peft 0.22, torch 2.13), while it is exact without
# recompute and with dropout: a known gap, kept as a strict xfail so that a fix shows.
KNOWN_GAP = pytest.mark.xfail(strict=True, reason="LoRA without dropout under full recompute: trace 10% under a real run")
RUNS = [(name, b, s, "none") for name in ("lora", "qlora", "prefix", "ia3") for b, s in ((2, 128), (4, 256))] + [
    ("qlora", 4, 256, "full"), ("lora", 2, 256, "full"), pytest.param("lora-nodropout", 2, 256, "full", marks=KNOWN_GAP)]


def _id(run) -> str:  # type: ignore[no-untyped-def]
    n, b, s, r = run.values if hasattr(run, "values") else run
    return f"{n}-b{b}-s{s}-{r}"


@pytest.mark.parametrize("name, micro_batch, seq_len, recompute", RUNS, ids=[_id(r) for r in RUNS])
def test_planned_peak_equals_a_real_run(saved_model: str, name: str, micro_batch: int, seq_len: int, recompute: str) -> None:
    make, ft = CASES[name]
    model = make(saved_model)
    if recompute == "full":
        model.gradient_checkpointing_enable({"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    measured = peak_of_step(model, optimizer, vocab_size=CFG["vocab_size"], seq_len=seq_len, micro_batch=micro_batch)
    spec = spec_from_hf_config(CFG, name="tiny-llama")
    plan = ParallelPlan(micro_batch=micro_batch, recompute=recompute)
    mem = evaluate(spec, dgx_cluster(gpu_by_name("cpu"), 1), TrainingSpec(seq_len=seq_len), plan, finetune=ft).memory
    assert mem.peak_allocated == pytest.approx(measured, rel=TOLERANCE), (
        f"{name}: planned {mem.peak_allocated:,} ({mem.peak_phase}) vs measured {measured:,}")


def test_qlora_upcast_keeps_more_than_16_bit_recipe() -> None:
    """prepare_model_for_kbit_training's fp32 upcast is the default; the 16-bit variant keeps less."""
    spec = spec_from_hf_config(CFG, name="tiny-llama")
    cluster, training, plan = dgx_cluster(gpu_by_name("cpu"), 1), TrainingSpec(seq_len=256), ParallelPlan(micro_batch=4)
    upcast = evaluate(spec, cluster, training, plan, finetune=FinetuneSpec(method="qlora", **LORA_SPEC)).memory
    kept16 = evaluate(spec, cluster, training, plan,
                      finetune=FinetuneSpec(method="qlora", upcast_fp32=False, **LORA_SPEC)).memory
    assert kept16.activations < upcast.activations and kept16.parameters < upcast.parameters
