"""`orch status`, `orch list`, `orch logs` and `orch stop`: the view and control of launched jobs.

Foreground jobs are known from their records and step files (and their driver's PID on this
host); detached jobs are also asked through the Ray Jobs API of the cluster they run on.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator import jobs
from orchestrator.launch_plan import DEFAULT_STORAGE
from planner.errors import PlanInputError

# Ray's JobStatus -> ours (ray/dashboard/modules/job/common.py); UNKNOWN: the head forgot the job.
_RAY_STATE = {
    "PENDING": jobs.JobState.PENDING, "RUNNING": jobs.JobState.RUNNING, "STOPPED": jobs.JobState.STOPPED,
    "SUCCEEDED": jobs.JobState.SUCCEEDED, "FAILED": jobs.JobState.FAILED, "UNKNOWN": jobs.JobState.LOST,
}


def storage_path(storage: Path | None) -> Path:
    return (storage or DEFAULT_STORAGE).expanduser().resolve()


def current_state(record: jobs.JobRecord) -> jobs.JobState:
    """The job's state now: detached jobs from the Ray Jobs API (the record if it is unreachable)."""
    if record.mode == "detached" and record.dashboard and not record.state.is_terminal:
        from launch import ray_runtime

        try:
            return _RAY_STATE[ray_runtime.job_status(record.dashboard, record.name)]
        except PlanInputError:
            return record.state
    return jobs.observed_state(record)


def status(record: jobs.JobRecord) -> dict[str, Any]:
    """One job's status: state, plan, progress and where its checkpoints are."""
    return {
        "name": record.name,
        "state": current_state(record).value,
        "mode": record.mode,
        "model": record.model,
        "cluster": record.cluster,
        "plan": record.plan,
        **jobs.progress(record),
        "run_dir": str(record.run_dir),
        "address": record.address,
        "error": record.error,
    }


def find(name: str | None, storage: Path | None) -> jobs.JobRecord:
    """The named job, or the newest one when no name is given."""
    root = storage_path(storage)
    if name is not None:
        return jobs.load(name, root)
    records = jobs.all_records(root)
    if not records:
        raise PlanInputError(f"no orch job under {root}", "launch one with 'orch launch', or pass --checkpoint-dir")
    return records[-1]


def list_jobs(storage: Path | None) -> list[dict[str, Any]]:
    return [status(r) for r in jobs.all_records(storage_path(storage))]


def stop(name: str, storage: Path | None, timeout_s: float = 120.0) -> jobs.JobState:
    """End every worker and actor of the job: detached jobs through the Ray Jobs API, foreground
    jobs by SIGTERM to their driver (handled like Ctrl-C: Ray Train ends the worker group)."""
    record = jobs.load(name, storage_path(storage))
    state = current_state(record)
    if state.is_terminal or state is jobs.JobState.LOST:
        return state
    if record.mode == "detached":
        from launch import ray_runtime

        final = _RAY_STATE[ray_runtime.stop_job(record.dashboard or ray_runtime.LOCAL_DASHBOARD, name, timeout_s)]
        jobs.update(record, state=final if final.is_terminal else record.state, error="stopped by orch stop")
        return final
    if record.driver_host != socket.gethostname() or record.driver_pid is None:
        raise PlanInputError(f"job '{name}' runs in the foreground on {record.driver_host}",
                             f"run 'orch stop {name}' on {record.driver_host}, or press Ctrl-C in its terminal")
    _terminate(record.driver_pid, timeout_s)
    record = jobs.load(name, storage_path(storage))
    return record.state if record.state.is_terminal else jobs.observed_state(record)


def _terminate(pid: int, timeout_s: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise PlanInputError(f"driver pid {pid} did not exit within {timeout_s:.0f} s of SIGTERM",
                         f"kill it with 'kill -9 {pid}' and then 'ray stop'")


def logs(name: str, storage: Path | None, follow: bool) -> Iterator[str]:
    """The job's log: a detached job's driver output from the Ray Jobs API; a foreground job's
    progress lines and errors from its log file (followed until the job ends)."""
    record = jobs.load(name, storage_path(storage))
    if record.mode == "detached" and record.dashboard:
        from launch import ray_runtime

        try:
            yield from (ray_runtime.follow_logs(record.dashboard, name) if follow
                        else [ray_runtime.job_logs(record.dashboard, name)])
            return
        except PlanInputError:
            pass  # the cluster is gone: fall back to the log file the driver wrote
    yield from _tail(record, follow)


def _tail(record: jobs.JobRecord, follow: bool) -> Iterator[str]:
    path = record.run_dir / jobs.LOG_FILE
    pos = 0
    while True:
        running = follow and current_state(jobs.load(record.name, Path(record.storage))) in (
            jobs.JobState.PENDING, jobs.JobState.RUNNING)
        try:
            with open(path) as fh:
                fh.seek(pos)
                chunk = fh.read()
                pos = fh.tell()
        except OSError:
            chunk = ""
        if chunk:
            yield chunk
        if not running:
            return
        time.sleep(0.5)
