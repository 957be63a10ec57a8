"""Carry out `orch profile`: plan as `orch launch` does, run the plan's data-parallel ranks on this
machine for a few steps (``launch.profile_worker``; gloo on CPU, NCCL on local GPUs), and set each
measured memory component of the most loaded rank against the planner's prediction.

Measured components (bytes of unique live storages, see ``launch.profile_worker``), each at its
largest as ``planner.memory.evaluate`` counts the components:
- parameters, optimizer: the largest over all snapshots;
- activations: the saved-for-backward storages at the end of the forward;
- gradients: the largest at the backward, or at the optimizer step less the activations (the
  planner adds the step's fp32 gradient copies only beyond the activations they replace);
- allocated peak A: the true peak of live tensor bytes, transients between snapshots included
  (GPU: torch.cuda.max_memory_allocated; CPU: the allocator events torch.profiler reports);
- reserved peak R: GPU torch.cuda.max_memory_reserved; CPU A;
- device peak D: GPU R + the device memory outside the allocator (context, NCCL, cuBLAS; from
  torch.cuda.mem_get_info); CPU A;
- peak and overhead: GPU D and D - A (against the planner's context + NCCL + fragmentation
  margin); CPU A and 0.
The bytes glibc malloc holds free on CPU (mallinfo2, in each snapshot as ``malloc_free``) are not
counted: they grow with the steps run and hardly with the model. The planner's peak is not the sum
of its components but the largest of what is alive together at one phase of the step
(planner.memory.phases); its live bytes (``peak_allocated``) are set against A.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from launch.deepspeed_config import deepspeed_config
from launch.job import JobSpec
from orchestrator.launch_plan import choose_plan, client_optimizer, finetune_job, job_hf_config, pretrained_dir
from planner.finetune.methods import FinetuneSpec
from planner.memory.calibration import MeasuredRecord
from planner.errors import PlanInputError
from planner.memory.evaluate import PlanMemory, buffers_for, evaluate
from planner.specs.hardware import ClusterSpec
from planner.structure.model import ModelSpec
from planner.memory.overheads import process_groups
from planner.search.pinned import Pinned
from planner.structure.presets import PRESETS
from planner.specs.training import ParallelPlan, TrainingSpec
from planner.memory.zero_buffers import ZeroBuffers

COMPONENTS = ("parameters", "gradients", "optimizer", "activations", "overhead")
WORKER_TIMEOUT_S = 600


@dataclass(frozen=True)
class Profile:
    """Predicted against measured bytes of the most loaded rank."""

    device: str  # 'cpu' or the GPU's name
    plan: PlanMemory
    measured: dict[str, int]  # COMPONENTS + peak, allocated_peak, reserved_peak
    rank: int
    records: list[dict[str, Any]]  # that rank's snapshots
    gpu: str = "cpu"  # the cluster's GPU catalog key
    oom: bool = False  # a rank ran out of device memory (the measured peaks are then lower bounds)

    def as_json(self) -> dict[str, Any]:
        """Components, the peak (with overhead) and the allocated peak (live tensors: the planner's
        peak phase against A), predicted against measured."""
        mem = self.plan.memory
        return {
            "device": self.device,
            "components": {c: {"predicted": getattr(mem, c), "measured": self.measured[c]} for c in COMPONENTS},
            "peak": {"predicted": mem.total, "measured": self.measured["peak"]},
            "allocated_peak": {"predicted": mem.peak_allocated, "measured": self.measured["allocated_peak"],
                               "phase": mem.peak_phase},
        }

    def record(self, model: ModelSpec, training: TrainingSpec, buffers: ZeroBuffers) -> MeasuredRecord:
        """This profile as a calibration record (planner.memory.calibration; the format bench/gpu_memory.py writes)."""
        p = self.plan.plan
        return MeasuredRecord(
            model=model.name, hf_config=None if model.name in PRESETS else model.hf_config,
            gpu=None if self.device == "cpu" else self.gpu,
            plan=p.model_dump(), training=training.model_dump(), buffers=buffers.model_dump(),
            device=self.device, is_gpu=self.device != "cpu",
            num_groups=process_groups(dp=p.dp, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep),
            predicted={**{c: getattr(self.plan.memory, c) for c in COMPONENTS}, "peak_allocated": self.plan.memory.peak_allocated},
            allocated_peak_bytes=self.measured["allocated_peak"], reserved_peak_bytes=self.measured["reserved_peak"],
            device_peak_bytes=self.measured["device_peak"], capacity_bytes=self.plan.gpu_memory_bytes, oom=self.oom,
            phases=self.records,
        )


def profile_job(model: ModelSpec, training: TrainingSpec, plan: ParallelPlan, buffers: ZeroBuffers, *,
                steps: int, seed: int, device: str, tensors: bool = True, finetune: FinetuneSpec | None = None,
                pretrained_dir: str | None = None) -> dict[str, Any]:
    """What ``launch.profile_worker`` runs: the JobSpec a launched worker would get for the plan
    (the same model, method and DeepSpeed config; launch.trainer.setup_engine builds both), and
    what to measure."""
    if model.hf_config is None:
        raise PlanInputError(f"model '{model.name}' has no Hugging Face config to build", "pass a preset or a config.json")
    spec = JobSpec(
        name="orch-profile", run_dir=tempfile.gettempdir(), hf_config=job_hf_config(model, training),
        ds_config=deepspeed_config(plan, training, buffers=buffers, finetune=finetune), plan=plan.model_dump(),
        steps=steps, seq_len=training.seq_len, seed=seed, pretrained_dir=pretrained_dir,
        finetune=finetune_job(model, training, finetune), client_optimizer=client_optimizer(training, finetune),
    )
    return {"spec": spec.model_dump(), "steps": steps, "micro_batch": plan.micro_batch, "seq_len": training.seq_len,
            "seed": seed, "device": device, "tensors": tensors, "tp": plan.tp,
            "vocab_size": int(model.hf_config["vocab_size"])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(job: dict[str, Any], world: int, workdir: Path) -> list[dict[str, Any]]:
    """Run ``world`` ranks of ``launch.profile_worker`` as local processes (rank r on GPU r)."""
    (workdir / "job.json").write_text(json.dumps(job))
    port = str(_free_port())
    threads = str(max(1, (os.cpu_count() or 1) // world))
    device_env = {"DS_ACCELERATOR": "cpu"} if job["device"] == "cpu" else {}
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), OMP_NUM_THREADS=threads, **device_env)
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
    """Components of one rank from its snapshots, each at its largest as the planner counts it,
    and its allocated, reserved and device peaks (see the module docstring)."""
    snaps = [r for r in records if "parameters" in r]
    out = dict.fromkeys(COMPONENTS, 0)
    snapshot_peak = 0
    if snaps:
        acts = max((r["activations"] for r in snaps if r["phase"] == "forward"), default=0)  # none: out of memory first
        grads_bwd = max(r["gradients"] for r in snaps if r["phase"] != "step")
        grads_step = max((r["gradients"] for r in snaps if r["phase"] == "step"), default=0)
        out.update(parameters=max(r["parameters"] for r in snaps), gradients=max(grads_bwd, grads_step - acts),
                   optimizer=max(r["optimizer"] for r in snaps), activations=acts)
        snapshot_peak = max(sum(r[k] for k in (*COMPONENTS[:4], "other")) for r in snaps)
    allocated = max([snapshot_peak, *(r["peak_allocated"] for r in records if "peak_allocated" in r)])
    gpu = [r for r in records if "peak_reserved" in r]
    if gpu:
        reserved = max(r["peak_reserved"] for r in gpu)
        device = reserved + max(r["device_used"] - r["reserved"] for r in gpu)
        out.update(overhead=device - allocated, peak=device)
    else:
        # CPU: live tensors only (overhead 0, peak A): exact, and the same run after run. The bytes
        # glibc holds free (malloc_free, kept in the records) are not counted: they grow with the
        # steps run and hardly with the model (16 MB beside 5 MB of tensors on the debug model).
        reserved = device = allocated
        out.update(overhead=0, peak=allocated)
    out.update(allocated_peak=allocated, reserved_peak=reserved, device_peak=device)
    return out


def _device(cluster: ClusterSpec, world: int) -> str:
    """'cpu' for a gloo cluster; 'cuda' when this machine has the plan's GPUs."""
    if cluster.backend == "gloo":
        return "cpu"
    import torch

    have = torch.cuda.device_count()
    if have < world:
        raise PlanInputError(
            f"cluster '{cluster.name}' runs on {cluster.gpu.name} GPUs and the plan needs {world} of them here, "
            f"but this machine has {have} CUDA GPU(s)",
            f"profile on a machine with {world} GPU(s), pin --dp {have} if it has some, or use a CPU cluster, e.g. --cluster cpu-2",
        )
    return "cuda"


def profile_plan(
    model: ModelSpec,
    cluster: ClusterSpec,
    training: TrainingSpec,
    pinned: Pinned,
    *,
    plan: ParallelPlan | None = None,
    steps: int = 2,
    seed: int = 0,
    buffers: ZeroBuffers | None = None,
    finetune: FinetuneSpec | None = None,
    model_source: str | None = None,
) -> Profile:
    """Plan (or take ``plan``), run the plan's ranks on this machine and measure them.
    ``buffers``: ZeRO bucket sizes, written into the DeepSpeed config and counted by the planner
    alike (default: the plan's own, planner.memory.evaluate.buffers_for)."""
    if model.hf_config is None:
        raise PlanInputError(f"model '{model.name}' has no Hugging Face config to build", "pass a preset or a config.json")
    plan = plan or choose_plan(model, cluster, training, pinned, finetune)
    if plan.pp > 1:
        raise PlanInputError(
            f"the plan is {plan.describe()}, but orch profile measures data- and tensor-parallel ranks only so far",
            "pin --pp 1 to profile (and --preflight) a plan without pipeline stages",
        )
    device = _device(cluster, plan.world_size)
    buffers = buffers or buffers_for(model, plan)
    predicted = evaluate(model, cluster, training, plan, buffers=buffers, finetune=finetune)
    job = profile_job(model, training, plan, buffers, steps=steps, seed=seed, device=device, finetune=finetune,
                      pretrained_dir=pretrained_dir(model_source))
    with tempfile.TemporaryDirectory(prefix="orch-profile-") as tmp:
        results = _spawn(job, plan.world_size, Path(tmp))
    per_rank = {r["rank"]: measured_components(r["records"]) for r in results}
    rank = max(per_rank, key=lambda k: per_rank[k]["peak"])
    result = next(r for r in results if r["rank"] == rank)
    return Profile(device=result.get("device_name", device), plan=predicted, measured=per_rank[rank], rank=rank,
                   records=result["records"], gpu=cluster.gpu.name, oom=any(r.get("oom") for r in results))


def versions() -> dict[str, str]:
    """Software versions of a measurement (package metadata; nothing imported)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "deepspeed", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def save_record(path: Path, record: MeasuredRecord, hardware: dict[str, Any]) -> int:
    """Append a record to a measurement file (created if missing); the records it now holds."""
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanInputError(f"--save {path}: cannot read it as a measurement file ({exc})", "pass a new path or a file orch profile wrote") from None
    data.setdefault("hardware", hardware)
    data.setdefault("software", versions())
    data.setdefault("records", []).append(record.model_dump())
    try:
        path.write_text(json.dumps(data, indent=1) + "\n")
    except OSError as exc:
        raise PlanInputError(f"--save {path}: cannot write ({exc.strerror})", "pass a writable path") from None
    return len(data["records"])


def cpu_hardware() -> dict[str, Any]:
    """The machine a CPU profile ran on."""
    return {"device": "cpu", "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}


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
    phase = rows["allocated_peak"]["phase"]
    for name, row in [*rows["components"].items(), ("peak", rows["peak"]), (f"allocated peak ({phase})", rows["allocated_peak"])]:
        err = error_pct(row["predicted"], row["measured"])
        table.add_row(name, f"{row['predicted']:,}", f"{row['measured']:,}", "n/a" if err is None else f"{err:+.1f}%")
    console.print(table)
    if result.device != "cpu":
        where = "bytes the device holds beyond live tensors (allocator slack, CUDA context, NCCL, cuBLAS); peak: both"
    else:
        where = "0 on CPU (no CUDA context or NCCL; glibc's free bytes not counted); peak: the true peak of live tensors"
    console.print(f"[dim]overhead measured: {where}. Allocated peak: live tensors at the peak, the planner's at the "
                  f"phase of the step that sets it. Error = (predicted - measured) / measured.[/]")
