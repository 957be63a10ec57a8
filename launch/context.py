"""What a training function receives besides the plan and the DeepSpeed config: who it is, where
its checkpoints go, and how it reports (a pure module: no ray, no deepspeed).

The built-in trainer (``launch.trainer.train``) and a user's ``--entrypoint package.module:function``
have the same signature, ``fn(plan: dict, ds_config: dict, ctx: WorkerContext) -> None``. The Ray
Train worker (``launch.worker``) backs ``report``/``latest_checkpoint`` with Ray Train; a plain
``torchrun``/``deepspeed`` launch (``bench/launch_vs_deepspeed.py``) backs them with files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ContextManager

from launch.job import JobSpec

Report = Callable[[dict[str, Any], "str | None"], None]
LatestCheckpoint = Callable[[], ContextManager["str | None"]]


@contextlib.contextmanager
def _no_checkpoint() -> Iterator[str | None]:
    yield None


@dataclass(frozen=True)
class WorkerContext:
    """One rank's view of the job."""

    job: JobSpec
    rank: int
    world_size: int
    local_rank: int
    restarts: int = 0  # starts of the worker group before this one
    _report: Report = field(default=lambda metrics, checkpoint_dir: None, repr=False)
    _latest: LatestCheckpoint = field(default=_no_checkpoint, repr=False)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Called by every rank once per optimizer step with the same ``step``; rank 0's record
        is the job's. ``checkpoint_dir``: a local directory this rank has just saved its shards
        into; it is persisted to the job's storage and offered back by ``latest_checkpoint``."""
        self._report(metrics, checkpoint_dir)

    def latest_checkpoint(self) -> ContextManager[str | None]:
        """``with ctx.latest_checkpoint() as path:`` the newest persisted checkpoint as a local
        directory, or None on a fresh start."""
        return self._latest()

    @property
    def checkpoint_dir(self) -> str:
        """The job's storage directory (checkpoints and step records)."""
        return self.job.run_dir


BUILTIN_ENTRYPOINT = "launch.trainer:train"


def resolve_entrypoint(spec: str | None, code_dir: str | None = None) -> Callable[[dict[str, Any], dict[str, Any], WorkerContext], None]:
    """``package.module:function`` (default: the built-in trainer) as a callable, importable from
    ``code_dir`` (the launching directory) too; raises PlanInputError naming what is wrong (the
    driver calls this before any worker starts, too)."""
    import importlib
    import sys

    if code_dir and code_dir not in sys.path:
        sys.path.insert(0, code_dir)

    from planner.errors import PlanInputError

    spec = spec or BUILTIN_ENTRYPOINT
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise PlanInputError(f"--entrypoint {spec!r} is not 'package.module:function'",
                             "pass e.g. --entrypoint mypkg.train:main")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PlanInputError(f"--entrypoint {spec}: cannot import {module_name} ({exc})",
                             "check the module name and that it is importable (on PYTHONPATH) where the workers run") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise PlanInputError(f"--entrypoint {spec}: {module_name} has no function {attr}",
                             "name a function fn(plan, ds_config, ctx) in that module")
    return fn
