"""Fast checks of `orch launch` before Ray starts: plan choice, refusals, the job's config and data."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from launch.job import job_ds_config, warmup_steps
from launch.synthetic import batch
from orchestrator.inputs import load_model, resolve_cluster
from orchestrator.launch_plan import choose_plan
from planner.errors import PlanInputError
from planner.search.pinned import Pinned
from planner.specs.training import TrainingSpec

CPU2 = resolve_cluster("cpu-2", None, None, None)
TRAINING = TrainingSpec(seq_len=64)


def test_cpu_plan_is_data_parallel_without_offload() -> None:
    plan = choose_plan(load_model("debug"), CPU2, TRAINING, Pinned())
    assert (plan.dp, plan.tp, plan.pp, plan.cp, plan.offload) == (2, 1, 1, 1, "none")


def test_pinned_zero_stage_is_kept() -> None:
    assert choose_plan(load_model("debug"), CPU2, TRAINING, Pinned(zero_stage=3)).zero_stage == 3


def test_fp16_on_cpu_is_refused() -> None:
    with pytest.raises(PlanInputError, match="--precision fp16: DeepSpeed on CPU trains in bf16 or fp32 only"):
        choose_plan(load_model("debug"), CPU2, TrainingSpec(seq_len=64, precision="fp16"), Pinned())


def test_model_that_does_not_fit_is_refused() -> None:
    with pytest.raises(PlanInputError, match="no plan of model 'llama3.1-70b' fits cluster 'cpu-2'"):
        choose_plan(load_model("llama3.1-70b"), CPU2, TRAINING, Pinned())


def test_schedule_and_lr_are_added_to_the_plan_config() -> None:
    cfg = job_ds_config({"optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}}, steps=30, lr=1e-3)
    assert cfg["optimizer"]["params"]["lr"] == 1e-3
    assert cfg["scheduler"]["type"] == "WarmupCosineLR"
    assert cfg["scheduler"]["params"]["total_num_steps"] == 30
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == warmup_steps(30) == 3


def test_synthetic_batches_are_deterministic_and_periodic() -> None:
    a, b = batch(3, 1, 4, 64, 256), batch(3, 1, 4, 64, 256)
    assert torch.equal(a, b) and a.shape == (4, 64)
    assert torch.equal(a[:, :16], a[:, 16:32])  # the pattern repeats: the loss can fall
    assert not torch.equal(batch(3, 0, 4, 64, 256), a)  # ranks see different offsets


def test_refusal_exits_2_before_ray_is_imported() -> None:
    code = (
        "import sys\n"
        "from orchestrator.cli import main\n"
        "try:\n"
        "    main(['launch', '--model', 'llama3.1-70b', '--cluster', 'cpu-2', '--steps', '5'])\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, 'ray' in sys.modules, 'deepspeed' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "exit 2 False False", out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orch: error: no plan of model 'llama3.1-70b'") and "To fix:" in lines[0]


def test_importing_the_launcher_loads_neither_ray_nor_deepspeed() -> None:
    """ray is imported only when a job starts (launch.ray_runtime) and deepspeed only in workers."""
    code = (
        "import sys\n"
        "import orchestrator.cli, orchestrator.launching, launch.ray_runtime, launch.worker\n"
        "print('ray' in sys.modules, 'deepspeed' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False False", out.stdout + out.stderr


def test_selective_recompute_is_refused_full_is_planned() -> None:
    with pytest.raises(PlanInputError, match="--recompute selective: that is Megatron's"):
        choose_plan(load_model("debug"), CPU2, TRAINING, Pinned(recompute="selective"))
    assert choose_plan(load_model("debug"), CPU2, TRAINING, Pinned(recompute="full")).recompute == "full"
