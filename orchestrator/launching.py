"""Carry out `orch launch`: plan, refuse what cannot run, then train the plan on Ray.

Everything before ``launch.ray_runtime.connect`` is pure: a plan that does not fit, or a dimension
this launcher cannot run yet, is refused with a PlanInputError (exit 2) before Ray starts.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from launch.deepspeed_config import deepspeed_config
from launch.job import ATTEMPTS_FILE, STEPS_FILE, JobSpec, job_ds_config
from orchestrator.planning import run_plan
from planner.errors import PlanInputError
from planner.evaluate import buffers_for
from planner.hardware import ClusterSpec
from planner.model import ModelSpec
from planner.pinned import Pinned
from planner.training import ParallelPlan, TrainingSpec

DEFAULT_STORAGE = Path.home() / ".orch" / "runs"
CPU_PRECISIONS = ("bf16", "fp32")  # DeepSpeed's CPU accelerator rejects fp16 ("not supported on your device")


@dataclass(frozen=True)
class LaunchOptions:
    """Run options that are not part of the plan."""

    steps: int
    lr: float = 3e-4
    name: str | None = None
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    max_failures: int = 0
    address: str | None = None
    log_jsonl: Path | None = None
    seed: int = 0
    fail_at_step: int = 0
    entrypoint: str | None = None  # 'package.module:function'; None = the built-in trainer


def choose_plan(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, pinned: Pinned) -> ParallelPlan:
    """The planner's best plan among those this launcher runs. On gloo (CPU) clusters only data
    parallelism (ZeRO 0-3) runs now: tp/pp/cp are pinned to 1, and offload to none unless pinned,
    since a CPU worker's "device" memory is host memory already."""
    if cluster.backend == "gloo":
        if training.precision not in CPU_PRECISIONS:
            raise PlanInputError(
                f"--precision {training.precision}: DeepSpeed on CPU trains in bf16 or fp32 only",
                "use --precision bf16 or --precision fp32 on a CPU cluster",
            )
        for dim in ("tp", "pp", "cp", "ep"):
            value = getattr(pinned, dim)
            if value is not None and value > 1:
                raise PlanInputError(
                    f"--{dim} {value}: orch launch runs only data parallelism (ZeRO 0-3) on gloo/CPU clusters so far",
                    f"drop --{dim}, or plan it with 'orch plan' for a GPU cluster",
                )
        defaults = {"tp": 1, "pp": 1, "cp": 1, "ep": 1, "sp": False, "interleave": 1, "offload": "none"}
        pinned = pinned.model_copy(update={k: v for k, v in defaults.items() if getattr(pinned, k) is None})
    result = run_plan(model, cluster, training, pinned, top=1)
    if result.best is None:
        closest = result.search.closest
        need = f" (the smallest plan, {closest.plan.describe()}, needs {closest.memory.total / 2**30:,.1f} GiB per worker" \
               f" of {cluster.gpu.memory_bytes / 2**30:,.1f})" if closest is not None else ""
        hint = result.suggestions[0] if result.suggestions else "a larger cluster or a smaller model ('orch plan' shows what fits)"
        raise PlanInputError(f"no plan of model '{model.name}' fits cluster '{cluster.name}'{need}", f"use {hint}")
    plan = result.best.plan
    if plan.tp > 1 or plan.pp > 1 or plan.cp > 1 or plan.ep > 1:
        raise PlanInputError(
            f"the best plan is {plan.describe()}, but orch launch runs only data parallelism (ZeRO 0-3) so far",
            "pin --tp 1 --pp 1 to launch a data-parallel plan",
        )
    return plan


def _job_name(model: ModelSpec) -> str:
    return f"orch-{model.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_job(model: ModelSpec, training: TrainingSpec, plan: ParallelPlan, opts: LaunchOptions) -> tuple[JobSpec, Path]:
    """The job spec the workers receive and the storage path of its checkpoints."""
    if model.hf_config is None:
        raise PlanInputError(f"model '{model.name}' has no Hugging Face config to build", "pass a preset or a config.json")
    storage = (opts.checkpoint_dir or DEFAULT_STORAGE).expanduser().resolve()
    name = opts.name or _job_name(model)
    ds = job_ds_config(deepspeed_config(plan, training, buffers=buffers_for(model, plan)), opts.steps, opts.lr)
    job = JobSpec(
        name=name, run_dir=str(storage / name), hf_config=model.hf_config, ds_config=ds, steps=opts.steps,
        plan=plan.model_dump(), entrypoint=opts.entrypoint,
        seq_len=training.seq_len, seed=opts.seed, checkpoint_every=opts.checkpoint_every,
        log_jsonl=str(opts.log_jsonl.resolve()) if opts.log_jsonl else None, fail_at_step=opts.fail_at_step,
    )
    return job, storage


class Progress(threading.Thread):
    """Tails rank 0's step file and prints one progress line per step (step, loss, tokens/s, ETA)."""

    def __init__(self, path: Path, steps: int, out: TextIO = sys.stderr) -> None:
        super().__init__(daemon=True)
        self.path, self.steps, self.out = path, steps, out
        self.done = threading.Event()

    def run(self) -> None:
        seen = 0
        while not self.done.wait(0.5):
            seen = self._print_new(seen)
        self._print_new(seen)

    def _print_new(self, seen: int) -> int:
        records = read_steps(self.path)
        for r in records[seen:]:
            print(progress_line(r, self.steps), file=self.out, flush=True)
        return max(seen, len(records))


def progress_line(r: dict[str, Any], steps: int) -> str:
    """One step record as a progress line; an --entrypoint may report only some of the keys."""
    parts = [f"step {r.get('step', '?')}/{steps}"]
    if isinstance(r.get("loss"), (int, float)):
        parts.append(f"loss {r['loss']:.4f}")
    dt = r.get("step_time_s")
    if isinstance(dt, (int, float)) and dt > 0:
        if isinstance(r.get("tokens"), (int, float)):
            parts.append(f"{r['tokens'] / dt:,.0f} tokens/s")
        if isinstance(r.get("step"), int):
            parts.append(f"ETA {(steps - r['step']) * dt:.0f}s")
    if r.get("restarts"):
        parts.append(f"restarts {r['restarts']}")
    return "  ".join(parts)


def read_steps(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def summary(job: JobSpec, plan: ParallelPlan, status: str, storage: Path) -> dict[str, Any]:
    """The --json summary, from rank 0's step records (the last record of each step wins)."""
    by_step = {r["step"]: r for r in read_steps(Path(job.run_dir) / STEPS_FILE)}
    records = [by_step[s] for s in sorted(by_step)]
    return {
        "name": job.name,
        "status": status,
        "steps": records[-1]["step"] if records else 0,
        "initial_loss": records[0]["loss"] if records else None,
        "final_loss": records[-1]["loss"] if records else None,
        "restarts": max((r["restarts"] for r in records), default=0),
        "checkpoint_dir": str(storage / job.name) if job.checkpoint_every else None,
        "plan": {**plan.model_dump(), "describe": plan.describe()},
    }


def launch(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, pinned: Pinned,
           opts: LaunchOptions) -> dict[str, Any]:
    """Plan, start (or join) Ray, train, and return the summary. Refusals raise before Ray starts."""
    plan = choose_plan(model, cluster, training, pinned)
    job, storage = build_job(model, training, plan, opts)
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (STEPS_FILE, ATTEMPTS_FILE):
        (run_dir / stale).unlink(missing_ok=True)
    print(f"orch: launching {job.name}: {model.name} on {cluster.name}, plan {plan.describe()}, "
          f"{opts.steps} steps", file=sys.stderr, flush=True)

    from launch import ray_runtime

    workers = ray_runtime.Workers(num_workers=plan.world_size, use_gpu=cluster.backend == "nccl", backend=cluster.backend)
    ray_runtime.connect(opts.address, workers)
    progress = Progress(run_dir / STEPS_FILE, opts.steps)
    progress.start()
    try:
        outcome = ray_runtime.run(job, workers, str(storage), opts.max_failures)
    except KeyboardInterrupt:
        outcome = ray_runtime.Outcome("stopped", "interrupted")
    finally:
        progress.done.set()
        progress.join(timeout=5)
        ray_runtime.shutdown()
    if outcome.error:
        print(f"orch: job {job.name} {outcome.status}: {outcome.error}", file=sys.stderr, flush=True)
    return summary(job, plan, outcome.status, storage)
