"""The DeepSpeed config of a plan is accepted by DeepSpeed's own parser and carries exactly the
bucket sizes the memory model counted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch.deepspeed_config import deepspeed_config
from planner.specs.training import ParallelPlan, TrainingSpec
from planner.memory.zero_buffers import ZeroBuffers
from tests.conftest import ROOT

PLANS = [
    ParallelPlan(dp=8, zero_stage=0, micro_batch=2, grad_accum=4),
    ParallelPlan(dp=8, zero_stage=1, micro_batch=1, grad_accum=8, tp=1),
    ParallelPlan(dp=4, tp=2, zero_stage=2, micro_batch=4, grad_accum=2, recompute="full"),
    ParallelPlan(dp=16, zero_stage=3, offload="optimizer+params", micro_batch=1, grad_accum=1),
    ParallelPlan(dp=2, pp=4, zero_stage=1, micro_batch=1, grad_accum=16, recompute="full"),
]

PARSE = r"""
import json, os, socket, sys
os.environ.setdefault("DS_ACCELERATOR", "cpu")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from deepspeed.runtime.config import DeepSpeedConfig
deepspeed.init_distributed(dist_backend="gloo")
class Mpu:  # DeepSpeed's public hook for the data-parallel size (here: the plan's dp)
    def __init__(self, dp): self.dp = dp
    def get_data_parallel_world_size(self): return self.dp
    def get_data_parallel_rank(self): return 0
out = []
for cfg, dp in json.load(sys.stdin):
    c = DeepSpeedConfig(cfg, mpu=Mpu(dp))
    z = c.zero_config
    out.append({"batch": c.train_batch_size, "micro": c.train_micro_batch_size_per_gpu, "accum": c.gradient_accumulation_steps,
                "stage": int(z.stage), "reduce_bucket_size": int(z.reduce_bucket_size),
                "prefetch": int(z.prefetch_bucket_size), "offload_param": z.offload_param is not None,
                "bf16": c.bfloat16_config.enabled, "checkpointing": c.activation_checkpointing_config.partition_activations})
print(json.dumps(out))
"""


def test_deepspeed_parses_every_plan():
    training = TrainingSpec(seq_len=1024, precision="bf16")
    cfgs = [(deepspeed_config(p, training), p.dp) for p in PLANS]
    out = subprocess.run([sys.executable, "-c", PARSE], input=json.dumps(cfgs), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    parsed = json.loads(out.stdout.strip().splitlines()[-1])
    buffers = ZeroBuffers()
    for plan, got in zip(PLANS, parsed):
        assert got["batch"] == plan.micro_batch * plan.grad_accum * plan.dp
        assert got["micro"] == plan.micro_batch and got["accum"] == plan.grad_accum
        assert got["stage"] == plan.zero_stage and got["bf16"] is True
        if plan.zero_stage:
            assert got["reduce_bucket_size"] == buffers.reduce_bucket_size
        if plan.zero_stage == 3:
            assert got["prefetch"] == buffers.stage3_prefetch_bucket_size
            assert got["offload_param"] == (plan.offload == "optimizer+params")


def test_sections():
    training = TrainingSpec(precision="fp16", optimizer="sgd-momentum")
    cfg = deepspeed_config(ParallelPlan(dp=2, tp=2, pp=2, zero_stage=1, recompute="full", grad_accum=4), training)
    assert cfg["tensor_parallel"] == {"autotp_size": 2}
    assert cfg["pipeline"]["stages"] == 2 and cfg["pipeline"]["activation_checkpoint_interval"] == 1
    assert cfg["fp16"]["enabled"] and not cfg["bf16"]["enabled"]
    assert cfg["optimizer"] == {"type": "SGD", "params": {"lr": 3e-4, "momentum": 0.9}}


def test_cli_writes_the_winner(tmp_path):
    path = tmp_path / "ds.json"
    out = subprocess.run([sys.executable, "-m", "orchestrator", "plan", "--model", "llama2-7b", "--gpu", "a100-80gb",
                          "--gpus", "8", "--global-batch", "64", "--json", "--deepspeed-config", str(path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    best = json.loads(out.stdout)["plans"][0]
    cfg = json.loads(path.read_text())
    assert cfg["zero_optimization"]["stage"] == best["zero_stage"]
    assert cfg["train_batch_size"] == 64 and cfg["train_micro_batch_size_per_gpu"] == best["micro_batch"]


@pytest.mark.parametrize("bad", ["/nonexistent-dir/ds.json"])
def test_cli_unwritable_path(bad):
    out = subprocess.run([sys.executable, "-m", "orchestrator", "plan", "--model", "debug", "--cluster", "cpu-2",
                          "--deepspeed-config", bad], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "cannot write" in out.stderr and "Traceback" not in out.stderr
