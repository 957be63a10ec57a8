"""Carry out `orch profile` on CPU: plan as `orch launch` does, run the plan's data-parallel ranks
locally for a few steps (``launch.profile_worker``, gloo), and set each measured memory component
of the most loaded rank against the planner's prediction.

Measured components (bytes of unique live storages, see ``launch.profile_worker``), mirroring how
``planner.evaluate`` composes its peak:
- parameters, optimizer: the largest over all snapshots;
- activations: the saved-for-backward storages at the end of the forward;
- gradients: the largest at the backward, or at the optimizer step less the activations (the
  planner adds the step's fp32 gradient copies only beyond the activations they replace);
- overhead: 0 on CPU -- no CUDA context or communicator buffers, and glibc's fragmentation is not
  visible to tensor accounting; the prediction is the plan's fragmentation margin;
- peak: the largest sum of all live storages (the batch and module buffers included) at any snapshot.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.deepspeed_config import deepspeed_config
from orchestrator.launching import choose_plan
from planner.errors import PlanInputError
from planner.evaluate import PlanMemory, evaluate
from planner.hardware import ClusterSpec
from planner.model import ModelSpec
from planner.pinned import Pinned
from planner.training import TrainingSpec
from planner.zero_buffers import ZeroBuffers

COMPONENTS = ("parameters", "gradients", "optimizer", "activations", "overhead")
WORKER_TIMEOUT_S = 600


@dataclass(frozen=True)
class Profile:
    """Predicted against measured bytes of the most loaded rank."""

    device: str
    plan: PlanMemory
    measured: dict[str, int]  # COMPONENTS + "peak"
    rank: int
    records: list[dict[str, Any]]  # that rank's snapshots

    def as_json(self) -> dict[str, Any]:
        mem = self.plan.memory
        return {
            "device": self.device,
            "components": {c: {"predicted": getattr(mem, c), "measured": self.measured[c]} for c in COMPONENTS},
            "peak": {"predicted": mem.total, "measured": self.measured["peak"]},
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(job: dict[str, Any], world: int, workdir: Path) -> list[dict[str, Any]]:
    """Run ``world`` ranks of ``launch.profile_worker`` as local processes (gloo on 127.0.0.1)."""
    (workdir / "job.json").write_text(json.dumps(job))
    port = str(_free_port())
    threads = str(max(1, (os.cpu_count() or 1) // world))
    procs = []
    for rank in range(world):
        env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), OMP_NUM_THREADS=threads)
        log = open(workdir / f"rank{rank}.log", "w")
        cmd = [sys.executable, "-m", "launch.profile_worker", str(workdir / "job.json"), str(workdir / f"rank{rank}.json")]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for rank, (proc, log) in enumerate(procs):
        try:
            code = proc.wait(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        log.close()
        if code != 0:
            failed.append(rank)
    if failed:
        tail = (workdir / f"rank{failed[0]}.log").read_text()[-2000:]
        raise PlanInputError(f"profile rank(s) {failed} failed:\n{tail}", "see the worker log above")
    return [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(world)]


def measured_components(records: list[dict[str, Any]]) -> dict[str, int]:
    """Components of one rank from its snapshots, composed as the planner composes its peak."""
    acts = max(r["activations"] for r in records if r["phase"] == "forward")
    grads_bwd = max(r["gradients"] for r in records if r["phase"] != "step")
    grads_step = max(r["gradients"] for r in records if r["phase"] == "step")
    return {
        "parameters": max(r["parameters"] for r in records),
        "gradients": max(grads_bwd, grads_step - acts),
        "optimizer": max(r["optimizer"] for r in records),
        "activations": acts,
        "overhead": 0,
        "peak": max(sum(r[k] for k in (*COMPONENTS[:4], "other")) for r in records),
    }


def profile_plan(
    model: ModelSpec,
    cluster: ClusterSpec,
    training: TrainingSpec,
    pinned: Pinned,
    *,
    steps: int = 2,
    seed: int = 0,
    buffers: ZeroBuffers | None = None,
) -> Profile:
    """Plan, run the plan's ranks on this machine and measure them (CPU clusters only for now).
    ``buffers``: ZeRO bucket sizes, written into the DeepSpeed config and counted by the planner alike."""
    if cluster.backend != "gloo":
        raise PlanInputError(
            f"orch profile measures on CPU so far, but cluster '{cluster.name}' is {cluster.gpu.name} ({cluster.backend})",
            "profile on a CPU cluster, e.g. --cluster cpu-2",
        )
    if model.hf_config is None:
        raise PlanInputError(f"model '{model.name}' has no Hugging Face config to build", "pass a preset or a config.json")
    plan = choose_plan(model, cluster, training, pinned)
    predicted = evaluate(model, cluster, training, plan, buffers=buffers)
    job = {"hf_config": model.hf_config, "ds_config": deepspeed_config(plan, training, buffers=buffers), "steps": steps,
           "micro_batch": plan.micro_batch, "seq_len": training.seq_len, "seed": seed}
    with tempfile.TemporaryDirectory(prefix="orch-profile-") as tmp:
        results = _spawn(job, plan.dp, Path(tmp))
    per_rank = {r["rank"]: measured_components(r["records"]) for r in results}
    rank = max(per_rank, key=lambda k: per_rank[k]["peak"])
    records = next(r["records"] for r in results if r["rank"] == rank)
    return Profile(device="cpu", plan=predicted, measured=per_rank[rank], rank=rank, records=records)


def error_pct(predicted: int, measured: int) -> float | None:
    """(predicted - measured) / measured in percent; None when nothing was measured."""
    return None if measured == 0 else 100.0 * (predicted - measured) / measured


def print_profile(console: Any, result: Profile) -> None:
    """Predicted against measured, per component, with the error in percent."""
    from rich.table import Table

    table = Table(title=f"memory per rank: {result.plan.plan.describe()} ({result.device}, rank {result.rank})")
    for col in ("component", "predicted", "measured", "error"):
        table.add_column(col, justify="left" if col == "component" else "right")
    rows = result.as_json()
    for name, row in [*rows["components"].items(), ("peak", rows["peak"])]:
        err = error_pct(row["predicted"], row["measured"])
        table.add_row(name, f"{row['predicted']:,}", f"{row['measured']:,}", "n/a" if err is None else f"{err:+.1f}%")
    console.print(table)
    console.print("[dim]overhead on CPU: not measurable by tensor accounting (no CUDA context or NCCL buffers; "
                  "malloc fragmentation unseen); measured 0. Error = (predicted - measured) / measured.[/]")
