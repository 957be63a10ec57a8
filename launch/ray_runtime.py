"""The Ray connection and the Ray Train run: the one driver-side module that imports ray.

With no address an embedded local Ray cluster is started for the job and shut down after it; with
an address the job runs on that existing cluster. Workers are started by Ray Train V2's
TorchTrainer (the default Train API in Ray 2.60; ``RAY_TRAIN_V2_ENABLED`` defaults to on).
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Literal

from launch.job import JobSpec
from planner.errors import PlanInputError

Status = Literal["succeeded", "failed", "stopped"]


@dataclass(frozen=True)
class Workers:
    """The Ray Train worker group of a plan: one worker per rank."""

    num_workers: int
    use_gpu: bool
    backend: Literal["gloo", "nccl"]
    cpus_per_worker: int = 1


@dataclass
class Outcome:
    status: Status
    error: str | None = None


def connect(address: str | None, workers: Workers) -> None:
    """Start an embedded cluster (no address) or join ``address``, then check
    that it has the CPUs/GPUs the workers need; raise PlanInputError before any worker starts."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    if address is None:
        need = workers.num_workers * workers.cpus_per_worker
        ray.init(num_cpus=max(need, os.cpu_count() or 1), log_to_driver=True,
                 configure_logging=True, logging_level="WARNING")
    else:
        ray.init(address=address, log_to_driver=True, logging_level="WARNING")
    try:
        _preflight(ray.cluster_resources(), workers, address or "the embedded cluster")
    except PlanInputError:
        shutdown()
        raise


def _preflight(resources: dict[str, float], workers: Workers, where: str) -> None:
    cpus = workers.num_workers * workers.cpus_per_worker
    if resources.get("CPU", 0) < cpus:
        raise PlanInputError(
            f"the plan needs {cpus} CPUs for {workers.num_workers} workers but {where} has {resources.get('CPU', 0):g}",
            "add nodes, or pin a smaller --dp",
        )
    if workers.use_gpu and resources.get("GPU", 0) < workers.num_workers:
        raise PlanInputError(
            f"the plan needs {workers.num_workers} GPUs but {where} has {resources.get('GPU', 0):g}",
            "launch on a cluster with enough GPUs, or plan for the cluster you have",
        )


def run(job: JobSpec, workers: Workers, storage_path: str, max_failures: int) -> Outcome:
    """Run the job to the end with Ray Train; Ctrl-C gives 'stopped', a worker group that failed
    more than ``max_failures`` times gives 'failed'."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from launch.worker import train_loop

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=job.model_dump(),
        scaling_config=ScalingConfig(
            num_workers=workers.num_workers, use_gpu=workers.use_gpu,
            resources_per_worker={"CPU": workers.cpus_per_worker, **({"GPU": 1} if workers.use_gpu else {})},
        ),
        torch_config=TorchConfig(backend=workers.backend),
        run_config=RunConfig(
            name=job.name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    # fit() runs in a helper thread so that Ctrl-C reaches this (main) thread as KeyboardInterrupt;
    # the caller then shuts Ray down, which ends the controller and every worker the driver owns.
    # SIGTERM (a `kill`, a scheduler's stop) is handled like Ctrl-C.
    outcome: list[Outcome] = []
    thread = threading.Thread(target=lambda: outcome.append(_fit(trainer)), name="orch-fit", daemon=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        return Outcome("stopped", "interrupted (Ctrl-C or SIGTERM)")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return outcome[0] if outcome else Outcome("failed", "the Ray Train driver thread ended without a result")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _fit(trainer) -> Outcome:  # type: ignore[no-untyped-def]
    try:
        trainer.fit()
    except Exception as exc:  # Ray Train's TrainingFailedError and its kin
        return Outcome("failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return Outcome("succeeded")


def shutdown() -> None:
    """Disconnect. An embedded cluster stops with its workers and actors; on an existing cluster
    the job's controller and workers, owned by this driver, end with it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
