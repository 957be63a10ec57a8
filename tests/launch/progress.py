"""Waiting on a launched job by its own progress, not on a wall-clock deadline: a slow or busy CI
machine makes a run slower, not stuck. A run is stuck when none of its files (the driver's log,
rank 0's step records, the workers' start records) has changed for ``stall_s`` seconds."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable

STALL_S = 300.0  # longer than any silent phase of a launch here (the first DeepSpeed op build: ~90 s)


def _stamp(run_dirs: list[Path]) -> tuple:
    files = [f for d in run_dirs if d.exists() for f in d.rglob("orch*") if f.is_file()]
    return tuple(sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def wait_until(done: Callable[[], bool], proc: subprocess.Popen, run_dirs: list[Path], stall_s: float = STALL_S,
               what: str = "the job") -> None:
    """Return once ``done()``; fail when ``proc`` ends first or the run stalls."""
    last, changed = None, time.monotonic()
    while not done():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited {proc.returncode} first")
        stamp = _stamp(run_dirs)
        if stamp != last:
            last, changed = stamp, time.monotonic()
        elif time.monotonic() - changed > stall_s:
            proc.kill()
            raise AssertionError(f"{what}: no progress for {stall_s:.0f} s")
        time.sleep(0.5)


def run(cmd: list[str], run_dirs: list[Path], stall_s: float = STALL_S, **popen) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` that waits as long as the run makes progress."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen) as proc:
        import threading

        out: dict[str, str] = {}
        readers = [threading.Thread(target=lambda k=k, s=s: out.__setitem__(k, s.read()), daemon=True)
                   for k, s in (("out", proc.stdout), ("err", proc.stderr))]
        for r in readers:
            r.start()
        try:
            wait_until(lambda: proc.poll() is not None, proc, run_dirs, stall_s, what=" ".join(cmd[3:6]))
        finally:
            for r in readers:
                r.join(timeout=10)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.get("out", ""), out.get("err", ""))
