"""What one launched job runs: a frozen spec the driver builds and each Ray Train worker receives
(a pure module: no ray, no deepspeed). Also the DeepSpeed config a job trains with (the plan's
config plus the learning-rate schedule)."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

STEPS_FILE = "orch_steps.jsonl"  # rank 0's per-step records, inside the run directory
RANKS_FILE = "orch_ranks.jsonl"  # one line per worker start: rank, node, host, pid, started_at (epoch s)
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
    code_dir: str | None = Field(default=None, description="Directory the --entrypoint's module is imported from (the launching directory); None = installed packages only.")
    dataset: str | None = Field(default=None, description="Local .txt/.jsonl file to train on; None = synthetic tokens.")
    tokenizer: str | None = Field(default=None, description="Local tokenizer directory for the dataset; None = UTF-8 bytes.")
    pretrained_dir: str | None = Field(default=None, description="Local directory of weights (save_pretrained) to start from; None = random init.")
    pack: bool = Field(default=False, description="Instruction datasets: pack examples into each sequence (False: pad each to seq_len).")
    finetune: dict[str, Any] | None = Field(default=None, description="Fine-tuning method as launch/models.py builds it: method, dtype, peft options, 4-bit base, adapter size; None = full training.")
    client_optimizer: str | None = Field(default=None, description="bitsandbytes optimizer passed to DeepSpeed as a client optimizer (adamw-8bit, paged-adamw[-8bit]); None = the config's.")
    worker_log: str | None = Field(default=None, description="File every worker appends its stdout and stderr to (the run's log); None = the process's own (Ray prints it on the driver).")
    lr: float = Field(default=3e-4, gt=0, description="Peak learning rate (also in ds_config's optimizer when DeepSpeed builds it).")
    fail_at_step: int = Field(default=0, ge=0, description="Test hook: rank 0 dies once after this step; 0 = never.")
    # Monitoring (launch/metrics.py): where each node serves its metrics, and the plan to measure against.
    metrics_host: str = Field(default="127.0.0.1", description="Address each node's metrics endpoint binds to; 0.0.0.0 = every interface.")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Port of each node's metrics endpoint; 0 = an ephemeral port.")
    planned_bytes: dict[str, int] = Field(default_factory=dict, description="Bytes per rank the plan predicts, by component (parameters, gradients, optimizer, activations, overhead); empty = unknown.")
    planned_step_time_s: float = Field(default=0.0, ge=0, description="Step time the planner predicts, seconds; 0 = unknown.")
    planned_mfu: float = Field(default=0.0, ge=0, description="MFU the planner predicts (fraction of peak); 0 = unknown.")
    flops_per_step: float = Field(default=0.0, ge=0, description="Model FLOPs of one optimizer step of the whole job (no recomputation); 0 = unknown.")
    peak_flops_per_gpu: float = Field(default=0.0, ge=0, description="Peak FLOP/s of one GPU at the training precision (the cluster's GPU spec); 0 = unknown.")


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
