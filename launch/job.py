"""What one launched job runs: a frozen spec the driver builds and each Ray Train worker receives
(a pure module: no ray, no deepspeed). Also the DeepSpeed config a job trains with (the plan's
config plus the learning-rate schedule)."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

STEPS_FILE = "orch_steps.jsonl"  # rank 0's per-step records, inside the run directory
ATTEMPTS_FILE = "orch_attempts"  # one line per start of the worker group (restarts = lines - 1)


class JobSpec(BaseModel):
    """One training job, as the worker function sees it (passed as Ray Train's loop config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Job name: the run directory under the storage path.")
    run_dir: str = Field(description="Directory of this run's step records and Ray Train checkpoints (storage_path/name).")
    hf_config: dict[str, Any] = Field(description="Hugging Face config of the causal LM built with random weights.")
    ds_config: dict[str, Any] = Field(description="DeepSpeed config dict (plan + schedule).")
    plan: dict[str, Any] = Field(default_factory=dict, description="The ParallelPlan the job runs, as a dict (ParallelPlan.model_dump()).")
    entrypoint: str | None = Field(default=None, description="'package.module:function' run by every worker; None = the built-in trainer (launch.trainer:train).")
    steps: int = Field(gt=0, description="Optimizer steps in total, across restarts.")
    seq_len: int = Field(gt=0, description="Tokens per sequence.")
    seed: int = Field(default=0, description="Seed of the weights and the synthetic tokens.")
    checkpoint_every: int = Field(default=0, ge=0, description="Steps between checkpoints; 0 = none.")
    log_jsonl: str | None = Field(default=None, description="Extra file rank 0 appends one JSON object per step to.")
    fail_at_step: int = Field(default=0, ge=0, description="Test hook: rank 0 dies once after this step; 0 = never.")


def warmup_steps(steps: int) -> int:
    """Linear warm-up over 10% of the run (at least one step)."""
    return max(1, steps // 10)


def job_ds_config(plan_config: dict[str, Any], steps: int, lr: float) -> dict[str, Any]:
    """The plan's DeepSpeed config with the learning rate and a warm-up + cosine schedule
    (DeepSpeed's ``WarmupCosineLR``, deepspeed/runtime/lr_schedules.py), which DeepSpeed keeps in
    its checkpoints so a resumed run continues the same curve."""
    cfg = copy.deepcopy(plan_config)
    if "optimizer" in cfg:
        cfg["optimizer"]["params"]["lr"] = lr
    cfg["scheduler"] = {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": steps,
            "warmup_num_steps": warmup_steps(steps),
            "warmup_min_ratio": 0.0,
            "cos_min_ratio": 0.1,
            "warmup_type": "linear",
        },
    }
    return cfg
