"""The Ray Train worker: ``train_loop`` is TorchTrainer's ``train_loop_per_worker``. It gives the
job's training function (the built-in ``launch.trainer.train`` or the user's ``--entrypoint``) a
WorkerContext backed by Ray Train: reports go to ``ray.train.report`` (checkpoints into the run's
storage path), the latest checkpoint comes from ``ray.train.get_checkpoint``, and rank 0 appends
one JSON record per step to the run's step file, which the driver tails for its progress line.
Every report also passes through this rank's metrics observer (launch/metrics.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from launch.context import WorkerContext, resolve_entrypoint
from launch.job import ATTEMPTS_FILE, RANKS_FILE, STEPS_FILE, JobSpec


def _append(path: str | Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _count_attempt(run_dir: Path) -> int:
    """Restarts so far: rank 0 adds one line per start of the worker group."""
    marker = run_dir / ATTEMPTS_FILE
    with open(marker, "a") as fh:
        fh.write(f"{time.time()}\n")
    return len(marker.read_text().splitlines()) - 1


def _output_to(path: str) -> None:
    """This worker's stdout and stderr (file descriptors 1 and 2: Python, DeepSpeed's op builder,
    C++ libraries) appended to ``path``."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)


def _quiet() -> None:
    """No INFO line per report from Ray Train's worker context (a module logger named by its
    file), and no torch deprecation warning per collective."""
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.")
    try:
        from ray.train.v2._internal.execution import context

        context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # a Ray without that module: keep its logging
        pass


@contextlib.contextmanager
def _ray_latest() -> Iterator[str | None]:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as path:
        yield path


def _ray_reporter(job: JobSpec, rank: int, restarts: int, observe=None):  # type: ignore[no-untyped-def]
    """``observe(record, persist_s)``: the metrics hook (launch/metrics.py), every rank, every step."""
    import ray.train
    from ray.train.v2.api.report_config import CheckpointConsistencyMode

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        record = {**metrics, "restarts": restarts}
        if rank == 0:
            _append(Path(job.run_dir) / STEPS_FILE, record)
            if job.log_jsonl:
                _append(job.log_jsonl, {k: record[k] for k in STEP_KEYS if k in record})
        # ray.train.report synchronises every rank with the controller (about a second per call
        # on 2 CPUs, ray/train/v2/_internal/execution/context.py ``report``), so it is called
        # only to persist a checkpoint; the step records and metrics take their own paths.
        persist_s = None
        if checkpoint_dir:
            started = time.perf_counter()
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))
            # Block until the controller has committed it: a rank that dies right after must find
            # this checkpoint on restart (ray/train/v2/api/train_fn_utils.py
            # ``get_all_reported_checkpoints``: "blocks until Ray Train has finished processing
            # every in-flight report call").
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
            persist_s = time.perf_counter() - started
        if observe is not None:
            observe(record, persist_s)
        if job.fail_at_step and record.get("step") == job.fail_at_step and restarts == 0 and rank == 0:
            os._exit(1)  # test hook: a worker dies mid-run

    return report


STEP_KEYS = ("step", "loss", "tokens", "step_time_s", "restarts")  # the --log-jsonl record


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: torch.distributed (gloo or nccl) is already set up."""
    import ray
    import ray.train
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    job = JobSpec(**config)
    if job.worker_log:
        _output_to(job.worker_log)
    _quiet()
    rc = ray.train.get_context()
    rank = rc.get_world_rank()
    os.environ["LOCAL_RANK"] = str(rc.get_local_rank())
    restarts = _count_attempt(Path(job.run_dir)) if rank == 0 else 0
    restarts_t = _broadcast_int(restarts)
    _append(Path(job.run_dir) / RANKS_FILE, {
        "rank": rank, "local_rank": rc.get_local_rank(), "node_rank": rc.get_node_rank(),
        "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
        "pid": os.getpid(), "restarts": restarts_t, "started_at": time.time(),
    })
    watch = _start_metrics(job, restarts_t)
    ctx = WorkerContext(
        job=job, rank=rank, world_size=rc.get_world_size(), local_rank=rc.get_local_rank(),
        restarts=restarts_t, _report=_ray_reporter(job, rank, restarts_t, watch.observe), _latest=_ray_latest,
    )
    state = "failed"
    try:
        resolve_entrypoint(job.entrypoint, job.code_dir)(job.plan, job.ds_config, ctx)
        state = "succeeded"
    finally:
        watch.close(state)


def _start_metrics(job: JobSpec, restarts: int):  # type: ignore[no-untyped-def]
    """This rank's metrics observer and endpoint (launch/metrics.py), on its own GPU under nccl."""
    import ray.train
    import ray.train.torch
    import ray.util
    import torch.distributed as dist

    from launch.metrics import start_worker_metrics

    rc = ray.train.get_context()
    cuda = (ray.train.torch.get_device().index or 0) if dist.get_backend() == "nccl" else None
    return start_worker_metrics(job, rank=rc.get_world_rank(), local_rank=rc.get_local_rank(), node_rank=rc.get_node_rank(),
                                world_size=rc.get_world_size(), restarts=restarts, cuda_device=cuda,
                                node_ip=ray.util.get_node_ip_address())


def _broadcast_int(value: int) -> int:
    """Rank 0's value on every rank (the restart count only rank 0 can read)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.long)
    dist.broadcast(t, src=0)
    return int(t.item())
