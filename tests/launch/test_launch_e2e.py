"""End-to-end `orch launch` runs: the debug model trained for real with DeepSpeed on an embedded
local Ray cluster (2 CPU workers, gloo). The first DeepSpeed CPU run on a machine JIT-compiles its
shared-memory op (~90 s on 2 cores, then cached); later launches take ~75 s each."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import progress

pytestmark = pytest.mark.e2e

ORCH = [sys.executable, "-c", "from orchestrator.cli import main; main()"]
COMMON = ["launch", "--model", "debug", "--cluster", "cpu-2", "--steps", "20", "--seq-len", "64", "--lr", "1e-3", "--json"]


def _launch(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict, list[dict]]:
    log = tmp_path / "steps.jsonl"
    args = [*COMMON, "--checkpoint-dir", str(tmp_path / "ckpt"), "--log-jsonl", str(log), *extra]
    proc = progress.run([*ORCH, *args], [tmp_path / "ckpt"])  # as long as the job makes progress
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return proc, summary, records


def test_zero3_dp2_survives_a_killed_worker(tmp_path: Path) -> None:
    """Rank 0 dies after step 12; the group restarts from the step-10 checkpoint and still ends at
    step 20, repeating steps 11-12 with the same losses (data and state are restored exactly)."""
    _, summary, records = _launch(
        tmp_path, "--zero", "3", "--checkpoint-every", "5", "--max-failures", "1", "--fail-at-step", "12"
    )
    assert summary["status"] == "succeeded" and summary["steps"] == 20 and summary["restarts"] == 1
    assert summary["plan"]["zero_stage"] == 3
    assert summary["final_loss"] < summary["initial_loss"] - 0.5
    steps = [r["step"] for r in records]
    assert steps == list(range(1, 13)) + list(range(11, 21))
    first, again = records[10], records[12]
    assert first["step"] == again["step"] == 11 and again["restarts"] == 1
    assert again["loss"] == pytest.approx(first["loss"], rel=1e-5)
    assert Path(summary["checkpoint_dir"]).is_dir()
    shutil.rmtree(tmp_path / "ckpt", ignore_errors=True)


def test_ctrl_c_stops_the_job_and_leaves_no_process(tmp_path: Path) -> None:
    """SIGINT once training runs: exit 130, status 'stopped', and every process the launch started
    (the embedded Ray cluster, the controller, the workers) is gone."""
    import signal
    import time

    import psutil

    log = tmp_path / "steps.jsonl"
    args = [*COMMON, "--steps", "5000", "--checkpoint-dir", str(tmp_path / "ckpt"), "--log-jsonl", str(log)]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(
            [*ORCH, *args], stdout=out, stderr=err,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell ignores it
        )
        progress.wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, proc, [tmp_path / "ckpt"])
        started = psutil.Process(proc.pid).children(recursive=True)
        assert len(started) >= 3  # Ray's own processes and the two workers
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    summary = json.loads((tmp_path / "out").read_text().strip().splitlines()[-1])
    assert summary["status"] == "stopped" and 3 <= summary["steps"] < 5000
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [p.pid for p in alive]


def test_ctrl_c_during_start_up_is_a_clean_stop(tmp_path: Path) -> None:
    """SIGINT while the embedded cluster is still starting (before any step): exit 130, status
    'stopped' in the job's record, and no process of the launch left."""
    import signal

    import psutil

    runs = tmp_path / "ckpt"
    args = [*COMMON, "--steps", "5000", "--checkpoint-dir", str(runs), "--name", "early"]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([*ORCH, *args], stdout=out, stderr=err,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        def ray_starting() -> bool:  # Ray's GCS is up, no worker yet: the cluster is still starting
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if "gcs_server" in " ".join(child.cmdline()):
                        return True
                except psutil.Error:
                    continue
            return False

        progress.wait_until(ray_starting, proc, [runs])
        started = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, (tmp_path / "err").read_text()[-3000:]
    summary = json.loads((tmp_path / "out").read_text().strip().splitlines()[-1])
    assert summary["status"] == "stopped" and summary["steps"] == 0
    record = json.loads((runs / "early" / "orch_job.json").read_text())
    assert record["state"] == "stopped"
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [p.pid for p in alive]
