"""Launched jobs on disk: one record per job in its run directory (``<storage>/<name>/orch_job.json``),
the job lifecycle, and the views `orch status`, `orch list` and `orch logs` read.

The record holds everything needed to run the job again (its JobSpec, the Ray address, the Ray
Train storage path), so ``orch launch --resume NAME`` and a detached launch (whose Ray job runs
``orch launch --resume NAME``) need nothing else.
"""

from __future__ import annotations

import json
import os
import socket
import time
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from launch.job import STEPS_FILE, JobSpec
from planner.errors import PlanInputError

RECORD_FILE = "orch_job.json"
LOG_FILE = "orch.log"  # the driver's progress lines and errors


class JobState(str, Enum):
    """The lifecycle of a launched job. ``lost``: its driver is gone before the end (a crash, a
    killed terminal); ``orch launch --resume NAME`` continues it from its last checkpoint."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    LOST = "lost"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED)

    @property
    def resumable(self) -> bool:
        return self is not JobState.SUCCEEDED


class JobRecord(BaseModel):
    """What `orch` remembers of one job."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job: JobSpec = Field(description="What every worker runs.")
    storage: str = Field(description="Ray Train storage path (the parent of the run directory).")
    address: str | None = Field(default=None, description="Ray address it runs on; None = an embedded local cluster.")
    mode: Literal["foreground", "detached"] = Field(default="foreground", description="How it was launched.")
    model: str = Field(description="Model name, for display.")
    cluster: str = Field(description="Cluster name, for display.")
    plan: str = Field(description="The plan in one line (ParallelPlan.describe()).")
    workers: dict[str, Any] = Field(description="The Ray Train worker group (launch.ray_runtime.Workers fields).")
    max_failures: int = Field(default=0, description="Worker-group restarts allowed per driver run (-1: unlimited).")
    state: JobState = Field(default=JobState.PENDING, description="Last state this machine saw.")
    driver_pid: int | None = Field(default=None, description="PID of the driver process (foreground runs).")
    driver_host: str | None = Field(default=None, description="Host name of the driver process.")
    dashboard: str | None = Field(default=None, description="Ray Jobs API address of a detached job.")
    created_s: float = Field(default_factory=time.time, description="Unix time of the first launch.")
    error: str | None = Field(default=None, description="Why it failed or stopped, one line.")

    @property
    def run_dir(self) -> Path:
        return Path(self.job.run_dir)

    @property
    def name(self) -> str:
        return self.job.name


def record_path(run_dir: Path) -> Path:
    return run_dir / RECORD_FILE


def save(record: JobRecord) -> JobRecord:
    """Write atomically (a reader never sees half a record)."""
    path = record_path(record.run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(record.model_dump_json(indent=1))
    tmp.replace(path)
    return record


def update(record: JobRecord, **changes: Any) -> JobRecord:
    return save(record.model_copy(update=changes))


def mark_driver(record: JobRecord) -> JobRecord:
    """This process is now the job's driver."""
    return update(record, state=JobState.RUNNING, driver_pid=os.getpid(), driver_host=socket.gethostname(), error=None)


def load(name: str, storage: Path) -> JobRecord:
    path = record_path(storage / name)
    if not path.exists():
        known = ", ".join(r.name for r in all_records(storage)[-5:]) or "none"
        raise PlanInputError(f"no job named '{name}' under {storage} (recent: {known})",
                             "run 'orch list' (with the --checkpoint-dir the job was launched with)")
    try:
        return JobRecord.model_validate_json(path.read_text())
    except (OSError, ValidationError) as exc:
        raise PlanInputError(f"{path}: not a readable orch job record ({str(exc).splitlines()[0]})",
                             "relaunch the job under a new --name") from None


def all_records(storage: Path) -> list[JobRecord]:
    """Every readable job record under the storage path, oldest first."""
    records = []
    for path in sorted(storage.glob(f"*/{RECORD_FILE}")):
        try:
            records.append(JobRecord.model_validate_json(path.read_text()))
        except (OSError, ValidationError):
            continue  # a half-deleted run directory is not worth failing `orch list` over
    return sorted(records, key=lambda r: r.created_s)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def observed_state(record: JobRecord) -> JobState:
    """The state of a foreground job as seen from this machine: a running record whose local
    driver process is gone is ``lost``. (Detached jobs are asked through the Ray Jobs API.)"""
    if record.state.is_terminal or record.mode == "detached":
        return record.state
    if record.driver_pid and record.driver_host == socket.gethostname() and not _pid_alive(record.driver_pid):
        return JobState.LOST
    return record.state


def read_steps(run_dir: Path) -> list[dict[str, Any]]:
    """Rank 0's step records; after a restart a step may appear twice (the last one wins)."""
    try:
        lines = (run_dir / STEPS_FILE).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return records


def latest_by_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_step = {r["step"]: r for r in records if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def progress(record: JobRecord) -> dict[str, Any]:
    """Steps done, losses, restarts and throughput from the step records."""
    steps = latest_by_step(read_steps(record.run_dir))
    last = steps[-1] if steps else {}
    recent = steps[-10:]
    time_s = sum(r.get("step_time_s", 0.0) for r in recent)
    tokens = sum(r.get("tokens", 0) for r in recent)
    return {
        "steps": last.get("step", 0),
        "total_steps": record.job.steps,
        "initial_loss": steps[0].get("loss") if steps else None,
        "final_loss": last.get("loss"),
        "restarts": max((r.get("restarts", 0) for r in steps), default=0),
        "tokens_per_s": tokens / time_s if time_s > 0 else None,
    }
