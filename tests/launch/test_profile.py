"""`orch profile` on CPU: two real DeepSpeed ranks (gloo) per ZeRO stage, every live tensor storage
accounted for, set against the planner's prediction (issue 7: model states within 2%, activations
within 3%, the peak of live tensors within 3%).

The ZeRO reduce bucket is set below the model's size (20,000 elements), so that gradients pass
through several buckets as in a real model (by default the plan caps the bucket at the model's
size, planner.memory.zero_buffers.plan_buffers, and the whole model is one bucket). Stage 3
partitions every parameter (persistence threshold 0): the planner does not model persistent
parameters."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from orchestrator.inputs import load_model, resolve_cluster
from orchestrator.profiling import COMPONENTS, Profile, error_pct, measured_components, profile_plan
from planner.structure.params import total_params
from planner.search.pinned import Pinned
from planner.specs.training import TrainingSpec
from planner.memory.zero_buffers import ZeroBuffers, plan_buffers

ORCH = [sys.executable, "-c", "from orchestrator.cli import main; main()"]
BUFFERS = ZeroBuffers(reduce_bucket_size=20_000, stage3_param_persistence_threshold=0)
STAGES = (1, 2, 3)


def _rec(phase: str, **kw: int) -> dict:
    return {"step": 0, "phase": phase, **dict.fromkeys(("parameters", "gradients", "optimizer", "activations", "other"), 0), **kw}


def test_measured_components_compose_like_the_planner() -> None:
    """Step-time gradient copies count only beyond the activations they replace."""
    records = [
        _rec("init", parameters=10, optimizer=40),
        _rec("forward", parameters=10, optimizer=40, activations=100, other=1),
        _rec("backward", parameters=10, gradients=30, optimizer=40, activations=60),
        _rec("step", parameters=10, gradients=150, optimizer=80),
    ]
    m = measured_components(records)
    assert m == {"parameters": 10, "gradients": 50, "optimizer": 80, "activations": 100, "overhead": 0, "peak": 240,
                 "allocated_peak": 240, "reserved_peak": 240, "device_peak": 240}
    # The allocator's true peak (between snapshots) wins over the snapshots; on GPU the device
    # memory outside the allocator (context, NCCL) is overhead.
    gpu = [{**r, "allocated": 0, "reserved": 0, "peak_allocated": 0, "peak_reserved": 0, "device_used": 500} for r in records]
    gpu[2].update(peak_allocated=300, peak_reserved=320, reserved=310, device_used=810)
    m = measured_components(gpu)
    assert (m["allocated_peak"], m["reserved_peak"], m["peak"], m["overhead"]) == (300, 320, 820, 520)
    assert error_pct(102, 100) == pytest.approx(2.0) and error_pct(5, 0) is None


def test_profile_refuses_a_gpu_cluster_without_its_gpus_before_starting_anything() -> None:
    try:
        import torch

        if torch.cuda.device_count() > 0:
            pytest.skip("this machine has a GPU: h100-1 would be profiled for real")
    except ImportError:
        pass
    proc = subprocess.run([*ORCH, "profile", "--model", "debug", "--cluster", "h100-1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "this machine has 0 CUDA GPU(s)" in proc.stderr and "To fix" in proc.stderr


@pytest.fixture(scope="module")
def profiles() -> dict[int, Profile]:
    """One spawn of two ranks per ZeRO stage, the three stages side by side (2 steps each)."""
    model, cluster = load_model("debug"), resolve_cluster("cpu-2", None, None, None)
    training = TrainingSpec(seq_len=256)

    def run(stage: int) -> Profile:
        return profile_plan(model, cluster, training, Pinned(zero_stage=stage, micro_batch=2), steps=2, buffers=BUFFERS)

    with ThreadPoolExecutor(len(STAGES)) as pool:
        return dict(zip(STAGES, pool.map(run, STAGES)))


@pytest.mark.e2e
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("component", ["parameters", "optimizer"])
def test_model_states_within_2_percent(profiles: dict[int, Profile], stage: int, component: str) -> None:
    p = profiles[stage]
    assert p.plan.plan.zero_stage == stage and p.plan.plan.dp == 2
    assert abs(error_pct(getattr(p.plan.memory, component), p.measured[component])) <= 2.0, p.as_json()


# Gradients (DeepSpeed 0.19.8, debug model, bucket 20,000 elements), each exact to a few bytes:
# stage 1 b(Psi - B_1) + bucket + b P_in -- the partition buffer is allocated inside the first
# bucket's reduce, after that bucket's B_1 = 16,384 elements (the embedding) were freed; the worker
# snapshots each reduce's exit to see it (391,104 B predicted, 391,112 B measured); stage 2
# bucket + b P_in + the largest gradient in flight; stage 3 its partition + bucket + in flight.
@pytest.mark.e2e
@pytest.mark.parametrize("stage", STAGES)
def test_gradients_within_2_percent(profiles: dict[int, Profile], stage: int) -> None:
    p = profiles[stage]
    assert abs(error_pct(p.plan.memory.gradients, p.measured["gradients"])) <= 2.0, p.as_json()


@pytest.mark.e2e
@pytest.mark.parametrize("stage", STAGES)
def test_activations_within_3_percent(profiles: dict[int, Profile], stage: int) -> None:
    p = profiles[stage]
    assert abs(error_pct(p.plan.memory.activations, p.measured["activations"])) <= 3.0, p.as_json()


# The peak: the loss's fp32 gradients over the logits (8V per token) beside every activation, at the
# start of the backward (planner.memory.phases), for every stage here: 5,767,680 B predicted against
# 5,767,768 B measured at stages 1 and 2 (stage 1's sum of the components, 5,114,308 B, was 11% low).
# 3%: the terms of the phase that sets the peak are each counted exactly; the rest is left to
# allocator events that torch or DeepSpeed versions may add.
@pytest.mark.e2e
@pytest.mark.parametrize("stage", STAGES)
def test_peak_within_3_percent(profiles: dict[int, Profile], stage: int) -> None:
    p = profiles[stage]
    assert p.plan.memory.peak_phase == "loss", p.as_json()
    assert abs(error_pct(p.plan.memory.peak_allocated, p.measured["allocated_peak"])) <= 3.0, p.as_json()


# A Llama-shaped model with Llama 2's 32,000-token vocabulary (20M parameters, half of them in the
# embedding and the output layer), two plans (about 20 s each on two free cores):
# - ZeRO-2, micro-batch 4: the loss's fp32 gradients over the logits (8V per token, 131 MB) beside
#   every activation set the peak: 374,841,344 B predicted, 374,841,624 B measured; the sum of the
#   components (301,763,076 B) was 20% low;
# - ZeRO-3, micro-batch 1: the end of the backward sets it, its single reduce copying the whole
#   bucket twice (reduce_scatter_coalesced's flat copy, gloo's clone) beside the partitions, the
#   embedding still gathered: 286,391,808 B predicted, 286,392,625 B measured.
# 3% as above: every term of those phases is counted exactly. (A ZeRO-1 peak at the optimizer step
# is left out: under a loaded CPU, gloo's asynchronous work sometimes keeps a bucket-sized buffer
# alive into the step, 38 MB more in one run of five.)
LLAMA_SHAPED = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 688, "vocab_size": 32000,
                "max_position_embeddings": 1024, "hidden_act": "silu", "tie_word_embeddings": False}
LLAMA_PLANS = {"z2-mb4-s128": (2, 4, 128, "loss"), "z3-mb1-s64": (3, 1, 64, "backward")}


@pytest.fixture(scope="module")
def llama_profiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Profile]:
    """One after the other: the bigger model's ranks take both cores."""
    path = tmp_path_factory.mktemp("llama-shaped") / "config.json"
    path.write_text(json.dumps(LLAMA_SHAPED))
    model, cluster = load_model(str(path)), resolve_cluster("cpu-2", None, None, None)
    # The plan's own buffers (the bucket capped at the model), stage 3 partitioning every parameter.
    buffers = plan_buffers(total_params(model), ZeroBuffers(stage3_param_persistence_threshold=0))
    return {name: profile_plan(model, cluster, TrainingSpec(seq_len=seq), Pinned(zero_stage=zero, micro_batch=mb),
                               steps=2, buffers=buffers)
            for name, (zero, mb, seq, _) in LLAMA_PLANS.items()}


@pytest.mark.e2e
@pytest.mark.parametrize("name", LLAMA_PLANS)
def test_llama_shaped_peak_within_3_percent(llama_profiles: dict[str, Profile], name: str) -> None:
    p = llama_profiles[name]
    assert p.plan.plan.dp == 2 and p.plan.memory.peak_phase == LLAMA_PLANS[name][3], p.as_json()
    assert abs(error_pct(p.plan.memory.peak_allocated, p.measured["allocated_peak"])) <= 3.0, p.as_json()


# Held out: architectures the DeepSpeed accounting was not built on (tests/planner/architectures.py),
# two ranks each, micro-batch 2, 128 tokens. Measured when written (allocated peak, predicted
# against measured): qwen2-moe-shared ZeRO-1 -0.0% (+24% before a Hugging Face model's experts
# were sharded and bucketed with the other parameters, as DeepSpeed does), ZeRO-3 -0.0%; mixtral
# ZeRO-2 -0.0%; gemma2 ZeRO-3 -0.0%; phi3-fused ZeRO-2 full recompute -0.0%; falcon-mqa ZeRO-0 +3.5%.
HELD_OUT = {"qwen2-moe-shared-z1": ("qwen2-moe-shared", 1, "none"), "mixtral-z2": ("mixtral", 2, "none"),
            "phi3-fused-z2-recompute": ("phi3-fused", 2, "full")}


@pytest.mark.e2e
@pytest.mark.parametrize("name", HELD_OUT)
def test_held_out_architecture_peak_within_3_percent(name: str, tmp_path) -> None:
    from tests.planner.architectures import config

    arch, zero, recompute = HELD_OUT[name]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config(arch)))
    model, cluster = load_model(str(path)), resolve_cluster("cpu-2", None, None, None)
    p = profile_plan(model, cluster, TrainingSpec(seq_len=128), Pinned(zero_stage=zero, micro_batch=2, recompute=recompute),
                     steps=2)
    assert abs(error_pct(p.plan.memory.peak_allocated, p.measured["allocated_peak"])) <= 3.0, p.as_json()


@pytest.mark.e2e
def test_json_contract(profiles: dict[int, Profile]) -> None:
    out = json.loads(json.dumps(profiles[2].as_json()))
    assert out["device"] == "cpu" and set(out["components"]) == set(COMPONENTS)
    assert out["allocated_peak"]["phase"] in ("forward", "loss", "backward", "step")
    assert all(set(v) == {"predicted", "measured"} and isinstance(v["measured"], int) for v in out["components"].values())
    assert out["components"]["overhead"]["measured"] == 0 and out["peak"]["measured"] > 0
    # The true peak (allocator events between snapshots) is at least every snapshot's total.
    assert out["peak"]["measured"] >= max(sum(r[k] for k in (*COMPONENTS[:4], "other")) for r in profiles[2].records if "other" in r)


@pytest.mark.e2e
def test_a_profile_is_a_calibration_record(profiles: dict[int, Profile]) -> None:
    """What `orch profile --save` appends: fitted, it leaves the planner's peak within 0.1% of the
    measured one (on CPU the margin takes up what the tensor count misses between components)."""
    from planner.memory.calibration import fit, predicted_device_peak
    from planner.memory.overheads import Overheads

    records = [profiles[s].record(load_model("debug"), TrainingSpec(seq_len=256), BUFFERS) for s in STAGES]
    assert all(r.allocated_peak_bytes == r.device_peak_bytes == profiles[s].measured["peak"] for s, r in zip(STAGES, records))
    cal = fit(records, Overheads())
    assert cal.records == 3 and cal.cuda_context_bytes is None
    for r in records:
        assert abs(predicted_device_peak(r, cal.overheads(Overheads())) - r.device_peak_bytes) / r.device_peak_bytes < 0.05


# Fine-tuning plans profiled as orch launch runs them (launch.trainer.setup_engine on a saved model,
# peft / bitsandbytes NF4 on CPU), allocated peak against the plan. Measured when written (2 ranks,
# micro-batch 4, 64 tokens): LoRA ZeRO-0 +0.5%, ZeRO-1 and ZeRO-2 -0.1%; QLoRA ZeRO-0 -0.1%, ZeRO-2
# -0.5%; (IA)^3 ZeRO-2 -0.1%; prefix ZeRO-2 -0.1%. Before the ZeRO fp32 partition of the adapters
# and the backward-only reduce bucket were modelled (planner.finetune.states), LoRA ZeRO-2 was +18.7%.
# Known gap: LoRA under ZeRO-3 is planned 8% low (the gathered frozen base's working set).
FINETUNE = {"lora-z0": ("lora", 0), "lora-z2": ("lora", 2), "qlora-z2": ("qlora", 2)}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):  # type: ignore[no-untyped-def]
    from tests.launch.saved_model import saved_llama

    return saved_llama(tmp_path_factory.mktemp("saved") / "llama")


@pytest.mark.e2e
@pytest.mark.parametrize("name", FINETUNE)
def test_finetune_peak_within_2_percent(name: str, saved_model) -> None:  # type: ignore[no-untyped-def]
    from planner.finetune.methods import FinetuneSpec

    method, zero = FINETUNE[name]
    model, cluster = load_model(str(saved_model)), resolve_cluster(None, "cpu", 2, None)
    p = profile_plan(model, cluster, TrainingSpec(seq_len=64), Pinned(zero_stage=zero, micro_batch=4), steps=2,
                     finetune=FinetuneSpec(method=method), model_source=str(saved_model))
    assert abs(error_pct(p.plan.memory.peak_allocated, p.measured["allocated_peak"])) <= 2.0, p.as_json()


@pytest.mark.e2e
@pytest.mark.xfail(strict=True, reason="known gap: under ZeRO-1/2 the planner allocates the reduce bucket when the "
                   "backward enters the last layer; DeepSpeed does at the first trainable gradient (likely after the frozen "
                   "MLP's backward; here planned +21.5%, on the safe side; the 64-wide model above: -0.1%)")
def test_finetune_peak_when_the_bucket_outweighs_the_activations(tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    from planner.finetune.methods import FinetuneSpec
    from tests.launch.saved_model import saved_llama

    model_dir = saved_llama(tmp_path_factory.mktemp("wide") / "llama", layers=2, hidden=128)
    model, cluster = load_model(str(model_dir)), resolve_cluster(None, "cpu", 2, None)
    p = profile_plan(model, cluster, TrainingSpec(seq_len=64), Pinned(zero_stage=2, micro_batch=2), steps=2,
                     finetune=FinetuneSpec(method="lora"), model_source=str(model_dir))
    assert abs(error_pct(p.plan.memory.peak_allocated, p.measured["allocated_peak"])) <= 2.0, p.as_json()


@pytest.mark.e2e
def test_profile_takes_the_fine_tuning_flags(saved_model) -> None:  # type: ignore[no-untyped-def]
    """`orch profile --method qlora` runs (the same flags as plan and launch) and prints JSON."""
    proc = subprocess.run([*ORCH, "profile", "--model", str(saved_model), "--gpu", "cpu", "--gpus", "2", "--seq-len", "64",
                           "--micro-batch", "2", "--zero", "0", "--method", "qlora", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    predicted, measured = out["allocated_peak"]["predicted"], out["allocated_peak"]["measured"]
    assert abs(error_pct(predicted, measured)) <= 2.0, out
