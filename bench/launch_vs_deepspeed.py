"""orch launch against DeepSpeed's own launcher, on the same work in the same run (issue 5's
targets: time to the first step <= 1.3x, steady step time <= 1.05x).

Both run launch.trainer.train on the same JobSpec (the debug model, the plan orch chooses for
cpu-2: dp2, ZeRO-2) with 2 CPU ranks on gloo:
- orch:      `orch launch ...` (plans, starts an embedded Ray cluster, Ray Train workers);
- deepspeed: `deepspeed --num_gpus 2 bench/support/ds_launch_script.py` (DeepSpeed's launcher, no Ray).
Time to first step: from starting the command to rank 0's first step record on disk (polled every
20 ms). Steady step time: median step_time_s over steps 6..N. Each side runs REPEATS times,
alternating, and the medians are compared.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS, SEQ, REPEATS = 30, 128, 3
FLAGS = ["--model", "debug", "--cluster", "cpu-2", "--zero", "2", "--seq-len", str(SEQ), "--steps", str(STEPS), "--lr", "1e-3"]


def job_file(tmp: Path) -> Path:
    """The JobSpec orch would run, written for the DeepSpeed-launched script."""
    from orchestrator.inputs import load_model, resolve_cluster
    from orchestrator.launch_plan import LaunchOptions, build_job, choose_plan
    from planner.pinned import Pinned
    from planner.training import TrainingSpec

    model, cluster = load_model("debug"), resolve_cluster("cpu-2", None, None, None)
    training = TrainingSpec(seq_len=SEQ, global_batch=0, precision="bf16")
    plan = choose_plan(model, cluster, training, Pinned(zero_stage=2))
    job, _ = build_job(model, training, plan, LaunchOptions(steps=STEPS, lr=1e-3, name="ds", checkpoint_dir=tmp))
    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    path = tmp / "job.json"
    path.write_text(job.model_dump_json())
    return path


def timed(cmd: list[str], steps_file: Path, env: dict[str, str]) -> tuple[float, list[float], float]:
    """(seconds to the first step record, step times, total seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO, text=True)
    first = None
    while proc.poll() is None:
        if first is None and steps_file.exists() and steps_file.read_text().strip():
            first = time.perf_counter() - t0
        time.sleep(0.02)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    records = [json.loads(line) for line in steps_file.read_text().splitlines()]
    if first is None:
        first = total
    return first, [r["step_time_s"] for r in records], total


def run_orch(tmp: Path, i: int) -> tuple[float, list[float], float]:
    runs = tmp / f"orch{i}"
    cmd = [str(Path(sys.executable).with_name("orch")), "launch", *FLAGS, "--checkpoint-dir", str(runs), "--name", "bench"]
    return timed(cmd, runs / "bench" / "orch_steps.jsonl", dict(os.environ))


def run_deepspeed(tmp: Path, job: Path, i: int) -> tuple[float, list[float], float]:
    steps = tmp / f"ds{i}.jsonl"
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(29600 + i),
           str(REPO / "bench" / "support" / "ds_launch_script.py"), "--job", str(job), "--steps-file", str(steps)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    return timed(cmd, steps, env)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    try:
        job = job_file(tmp)
        orch, ds = [], []
        for i in range(REPEATS):
            ds.append(run_deepspeed(tmp, job, i))
            orch.append(run_orch(tmp, i))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def summary(runs: list[tuple[float, list[float], float]]) -> tuple[float, float, float]:
        first = statistics.median(r[0] for r in runs)
        steady = statistics.median(t for r in runs for t in r[1][5:])
        return first, steady, statistics.median(r[2] for r in runs)

    (of, os_, ot), (df, ds_, dt) = summary(orch), summary(ds)
    print(f"debug model, dp2 ZeRO-2, seq {SEQ}, {STEPS} steps, 2 CPU ranks (gloo), median of {REPEATS} runs each")
    print(f"{'':28s}{'orch launch':>14s}{'deepspeed':>14s}{'ratio':>9s}{'target':>9s}")
    print(f"{'time to first step (s)':28s}{of:14.2f}{df:14.2f}{of / df:9.2f}{'<= 1.30':>9s}")
    print(f"{'steady step time (s)':28s}{os_:14.4f}{ds_:14.4f}{os_ / ds_:9.3f}{'<= 1.05':>9s}")
    print(f"{'whole run (s)':28s}{ot:14.2f}{dt:14.2f}{ot / dt:9.2f}")


if __name__ == "__main__":
    main()
