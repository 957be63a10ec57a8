"""Carry out `orch launch`: write the job's record (orchestrator/jobs.py), then be its driver in the
foreground (start or join Ray, train, print progress, record how it ended), or submit it as a
detached Ray job; `--resume` runs a recorded job again from its last checkpoint.

The plan and the JobSpec come from orchestrator/launch_plan.py; everything refused there is
refused before Ray starts.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from launch import placement
from launch.context import resolve_entrypoint
from launch.job import ATTEMPTS_FILE, STEPS_FILE
from orchestrator import jobs
from orchestrator.launch_plan import (
    DEFAULT_STORAGE,
    LaunchOptions,
    check_storage,
    build_job,
    choose_plan,
)
from planner.errors import PlanInputError
from planner.memory.evaluate import buffers_for, evaluate
from planner.specs.hardware import ClusterSpec
from planner.structure.model import ModelSpec
from planner.finetune.methods import FinetuneSpec
from planner.search.pinned import Pinned
from planner.specs.training import TrainingSpec


class Progress(threading.Thread):
    """Tails rank 0's step file and prints one progress line per step (step, loss, tokens/s, ETA)
    to the terminal and to the job's log file."""

    def __init__(self, run_dir: Path, steps: int, outs: tuple[TextIO, ...] = (sys.stderr,)) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.steps, self.outs = run_dir, steps, outs
        self.done = threading.Event()

    def run(self) -> None:
        seen = len(jobs.read_steps(self.run_dir))  # a resumed run prints only its own steps
        while not self.done.wait(0.5):
            seen = self._print_new(seen)
        self._print_new(seen)

    def _print_new(self, seen: int) -> int:
        records = jobs.read_steps(self.run_dir)
        for r in records[seen:]:
            _say(progress_line(r, self.steps), self.outs)
            if isinstance(r.get("checkpoint_time_s"), (int, float)):
                _say(f"orch: checkpoint of step {r.get('step')} saved ({r['checkpoint_time_s']:.1f} s)", self.outs)
        return max(seen, len(records))


def _say(line: str, outs: tuple[TextIO, ...]) -> None:
    for out in outs:
        print(line, file=out, flush=True)


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


def summary(record: jobs.JobRecord, status: str) -> dict[str, Any]:
    """The --json summary, from rank 0's step records (the last record of each step wins)."""
    p = jobs.progress(record)
    return {
        "name": record.name,
        "status": status,
        "steps": p["steps"],
        "initial_loss": p["initial_loss"],
        "final_loss": p["final_loss"],
        "restarts": p["restarts"],
        "checkpoint_dir": str(record.run_dir) if record.job.checkpoint_every else None,
        "plan": {**record.job.plan, "describe": record.plan},
    }


def prepare(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, pinned: Pinned,
            opts: LaunchOptions, finetune: FinetuneSpec | None = None) -> jobs.JobRecord:
    """Plan and write the job's record; everything here is refused before Ray starts."""
    check_storage(opts.checkpoint_dir)
    if opts.entrypoint:  # a bad --entrypoint is refused before any worker starts (the built-in one is there)
        resolve_entrypoint(opts.entrypoint, os.getcwd())
    plan = choose_plan(model, cluster, training, pinned, finetune)
    if opts.preflight:  # measure the plan here first; move down the ranked plans until it fits
        from orchestrator.preflight import preflight
        plan = preflight(model, cluster, training, pinned, plan, finetune)
    job, storage = build_job(model, training, plan, opts, cluster=cluster, finetune=finetune)
    run_dir = Path(job.run_dir)
    if jobs.record_path(run_dir).exists():
        raise PlanInputError(f"a job named '{job.name}' already exists in {storage}",
                             f"continue it with 'orch launch --resume {job.name}', or pick another --name")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (STEPS_FILE, ATTEMPTS_FILE):
        (run_dir / stale).unlink(missing_ok=True)
    planned = evaluate(model, cluster, training, plan, buffers=buffers_for(model, plan), finetune=finetune).memory.total
    workers = asdict(placement.workers_for(plan, cluster, planned))
    return jobs.save(jobs.JobRecord(
        job=job, storage=str(storage), address=opts.address or cluster.ray_address, mode="detached" if opts.detach else "foreground",
        model=model.name, cluster=cluster.name, plan=plan.describe(), workers=workers,
        max_failures=opts.max_failures,
    ))


def launch(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, pinned: Pinned,
           opts: LaunchOptions, finetune: FinetuneSpec | None = None) -> dict[str, Any]:
    """Plan, then train in this process (the summary) or submit a detached Ray job (its record)."""
    record = prepare(model, cluster, training, pinned, opts, finetune)
    if opts.detach:
        return detach(record)
    return run_foreground(record, verbose=opts.verbose)


def resume(name: str, storage: Path | None, address: str | None, verbose: bool = False) -> dict[str, Any]:
    """Run a job again from its record: Ray Train restores its latest checkpoint from the storage
    path, and the run ends at the same total step count."""
    record = jobs.load(name, (storage or DEFAULT_STORAGE).expanduser().resolve())
    state = jobs.observed_state(record)
    if state is jobs.JobState.SUCCEEDED:
        raise PlanInputError(f"job '{name}' already succeeded ({record.job.steps} steps)", "launch a new job instead")
    if state is jobs.JobState.RUNNING and record.mode == "foreground" and record.driver_pid != os.getpid():
        raise PlanInputError(f"job '{name}' is still running (driver pid {record.driver_pid} on {record.driver_host})",
                             f"stop it first with 'orch stop {name}'")
    if address is not None:
        record = jobs.update(record, address=address)
    return run_foreground(record, verbose=verbose)


def run_foreground(record: jobs.JobRecord, verbose: bool = False) -> dict[str, Any]:
    """Be the job's driver: start (or join) Ray, train with a live progress line, record the end.

    The console shows orch's own lines (plan, progress, checkpoints, the outcome); Ray's,
    DeepSpeed's and the workers' output go to the run's log file (``verbose``: live as well).
    A stop at any moment (Ctrl-C or SIGTERM during start-up, a step, a checkpoint or a restart)
    ends the run as 'stopped': the job's processes are shut down, its checkpoints stay."""
    record = jobs.mark_driver(record)
    from launch import ray_runtime

    with open(record.run_dir / jobs.LOG_FILE, "a") as log, _console(log, verbose) as console, _Interrupts() as stop:
        outs = (console, log)
        _say(f"orch: launching {record.name}: {record.model} on {record.cluster}, plan {record.plan}, "
             f"{record.job.steps} steps" + ("" if verbose else f" (log: {record.run_dir / jobs.LOG_FILE})"), outs)
        workers = ray_runtime.Workers(**record.workers)
        embedded = record.address is None  # connect starts a cluster of this driver's own
        job = record.job if verbose else record.job.model_copy(update={"worker_log": str(record.run_dir / jobs.LOG_FILE)})
        progress = Progress(record.run_dir, record.job.steps, outs)
        outcome = ray_runtime.Outcome("stopped", "interrupted (Ctrl-C or SIGTERM)")
        try:
            ray_runtime.connect(record.address, workers, log_to_driver=verbose)
            progress.start()
            outcome = ray_runtime.run(job, workers, record.storage, record.max_failures, embedded=embedded)
        except PlanInputError as exc:
            outcome = ray_runtime.Outcome("failed", str(exc))
            stop.cleanup(lambda: ray_runtime.shutdown(embedded=embedded))
            jobs.update(record, state=jobs.JobState.FAILED, error=str(exc))
            raise
        except KeyboardInterrupt:
            pass
        finally:
            stop.cleanup(lambda: _end_progress(progress))
            stop.cleanup(lambda: ray_runtime.shutdown(embedded=embedded))
        if stop.requested:  # a stop that raced the end of the run (workers gone first) is still a stop
            outcome = ray_runtime.Outcome("stopped", "interrupted (Ctrl-C or SIGTERM)")
        if outcome.error:
            _say(f"orch: job {record.name} {outcome.status}: {outcome.error}", outs)
        jobs.update(record, state=jobs.JobState(outcome.status), error=outcome.error)
    _forget_metrics_targets(record)
    return summary(record, outcome.status)


def _end_progress(progress: Progress) -> None:
    progress.done.set()
    if progress.is_alive():
        progress.join(timeout=5)


class _Interrupts:
    """SIGINT and SIGTERM raise KeyboardInterrupt once in the driver's main thread and are
    recorded; a second signal during the clean-up is recorded only, so the clean-up completes."""

    def __init__(self) -> None:
        self.requested = False
        self._cleaning = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        if not self._cleaning:
            self._cleaning = True
            raise KeyboardInterrupt

    def cleanup(self, fn) -> None:  # type: ignore[no-untyped-def]
        """Run one clean-up step to its end: signals are deferred, an error is logged, not raised."""
        self._cleaning = True
        try:
            fn()
        except KeyboardInterrupt:
            self.requested = True
        except Exception as exc:  # noqa: BLE001 - a clean-up failure must not hide the run's outcome
            print(f"orch: clean-up: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _console(log: TextIO, verbose: bool) -> Iterator[TextIO]:
    """The terminal for orch's own lines. Unless ``verbose``, this process's stdout and stderr
    (file descriptors 1 and 2: Ray's and its C++ core's messages, Python warnings) go to ``log``
    until the run ends."""
    if verbose:
        yield sys.stderr
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    console = os.fdopen(os.dup(saved[2]), "w", buffering=1)
    try:
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
        yield console
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        console.close()


def _forget_metrics_targets(record: jobs.JobRecord) -> None:
    """The job's Prometheus file_sd entries go with it (workers remove theirs on a normal exit;
    a stopped or failed group may not have)."""
    from launch.metrics import TARGETS_DIR

    for path in (Path(record.storage) / TARGETS_DIR).glob(f"{record.name}.node*.json"):
        path.unlink(missing_ok=True)


def detach(record: jobs.JobRecord) -> dict[str, Any]:
    """Submit the job's driver (``orch launch --resume NAME``) through the Ray Jobs API and return;
    with no --address a persistent local Ray head is started (or reused) first."""
    from launch import ray_runtime

    if record.address is None:
        dashboard = ray_runtime.ensure_local_head(max(record.workers["num_workers"], os.cpu_count() or 1))
    else:
        dashboard = ray_runtime.jobs_address(record.address)
    record = jobs.update(record, address="auto", dashboard=dashboard)
    entrypoint = " ".join(shlex.quote(a) for a in (
        sys.executable, "-m", "orchestrator", "launch", "--resume", record.name,
        "--checkpoint-dir", record.storage, "--json"))
    ray_runtime.submit(dashboard, record.name, entrypoint, {"PYTHONPATH": _source_root()})
    print(f"orch: submitted {record.name} to {dashboard}; follow it with 'orch logs {record.name} --follow', "
          f"stop it with 'orch stop {record.name}'", file=sys.stderr, flush=True)
    return {"name": record.name, "status": "submitted", "dashboard": dashboard, "plan": record.job.plan}


def _source_root() -> str:
    """The directory holding this package, so the Ray job's driver imports the same code."""
    return str(Path(__file__).resolve().parent.parent)
