"""orch launch against DeepSpeed's own launcher, on the same work in the same run (issue 5's
targets: time to the first step <= 1.3x, steady step time <= 1.05x).

Both run launch.trainer.train on the same JobSpec (the debug model, the plan orch chooses for
cpu-2: dp2, ZeRO-2; ``--method lora``: its LoRA fine-tune, issue 14's target of a steady step time
<= 1.05x) with 2 CPU ranks on gloo:
- orch:      `orch launch ...` (plans, starts an embedded Ray cluster, Ray Train workers);
- deepspeed: `deepspeed --num_gpus 2 bench/support/ds_launch_script.py` (DeepSpeed's launcher, no Ray).
Time to first step: from starting the command to rank 0's first step record on disk (polled every
20 ms). Time to the training function: from starting the command to the first rank's entry into the
training function (its start record); what follows it is the same code on both sides, so the
difference between the two sides is the cost of starting the job. Steady step time: (arrival of record N - arrival of record 6) / (N - 6), as the records
reach the disk, so everything between two steps counts (reporting, metrics, logging). Each side runs REPEATS times,
alternating with DeepSpeed, and the medians are compared: first the cold runs, with nothing of Ray on
the machine; then the warm runs, beside a running local Ray head (DeepSpeed's runs then share the
machine with that idle head too).
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
METHOD = sys.argv[sys.argv.index("--method") + 1] if "--method" in sys.argv else "full"
FLAGS = ["--model", "debug", "--cluster", "cpu-2", "--zero", "2", "--seq-len", str(SEQ), "--steps", str(STEPS), "--lr", "1e-3",
         "--method", METHOD]


def job_file(tmp: Path) -> Path:
    """The JobSpec orch would run, written for the DeepSpeed-launched script."""
    from orchestrator.inputs import load_model, resolve_cluster
    from orchestrator.launch_plan import LaunchOptions, build_job, choose_plan
    from planner.finetune.methods import FinetuneSpec
    from planner.search.pinned import Pinned
    from planner.specs.training import TrainingSpec

    model, cluster = load_model("debug"), resolve_cluster("cpu-2", None, None, None)
    training = TrainingSpec(seq_len=SEQ, global_batch=0, precision="bf16")
    finetune = FinetuneSpec(method=METHOD)
    plan = choose_plan(model, cluster, training, Pinned(zero_stage=2), finetune)
    job, _ = build_job(model, training, plan, LaunchOptions(steps=STEPS, lr=1e-3, name="ds", checkpoint_dir=tmp),
                       finetune=finetune)
    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    path = tmp / "job.json"
    path.write_text(job.model_dump_json())
    return path


Run = tuple[float, list[float], float, float]


def timed(cmd: list[str], steps_file: Path, ranks_file: Path, env: dict[str, str]) -> Run:
    """(seconds to the first step record, arrival time of each step record, total seconds,
    seconds to the first rank's entry into the training function)."""
    t0, wall0 = time.perf_counter(), time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO, text=True)
    first, arrivals, seen = None, [], 0
    while proc.poll() is None:
        lines = steps_file.read_text().splitlines() if steps_file.exists() else []
        now = time.perf_counter() - t0
        arrivals.extend([now] * (len(lines) - seen))
        seen = len(lines)
        if first is None and lines:
            first = now
        time.sleep(0.02)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    if first is None:
        first = total
    started = [json.loads(line)["started_at"] for line in ranks_file.read_text().splitlines()]
    return first, arrivals, total, min(started) - wall0


def run_orch(tmp: Path, i: int, address: str | None = None) -> Run:
    runs = tmp / f"orch{i}{'w' if address else ''}"
    cmd = [str(Path(sys.executable).with_name("orch")), "launch", *FLAGS, "--checkpoint-dir", str(runs), "--name", "bench",
           *(["--address", address] if address else [])]
    return timed(cmd, runs / "bench" / "orch_steps.jsonl", runs / "bench" / "orch_ranks.jsonl", dict(os.environ))


def run_deepspeed(tmp: Path, job: Path, i: int) -> Run:
    steps, ranks = tmp / f"ds{i}.jsonl", tmp / f"ds{i}-ranks.jsonl"
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(29600 + i),
           str(REPO / "bench" / "support" / "ds_launch_script.py"), "--job", str(job), "--steps-file", str(steps), "--ranks-file", str(ranks)]
    # One thread per rank, as Ray gives each 1-CPU worker (OMP_NUM_THREADS=1); without it each
    # DeepSpeed-launched rank would use both cores and the two would contend.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return timed(cmd, steps, ranks, env)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    try:
        job = job_file(tmp)
        from launch.ray_runtime import LOCAL_HEAD_PORT, ensure_local_head

        orch, warm, ds = [], [], []
        for i in range(REPEATS):  # cold: nothing of Ray runs on the machine before the command
            ds.append(run_deepspeed(tmp, job, i))
            orch.append(run_orch(tmp, i))
        ensure_local_head(2)  # a running cluster for the "warm" runs (orch launch --address)
        for i in range(REPEATS):  # warm: that cluster idles beside every run, DeepSpeed's too
            ds.append(run_deepspeed(tmp, job, REPEATS + i))
            warm.append(run_orch(tmp, i, f"127.0.0.1:{LOCAL_HEAD_PORT}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        from launch.ray_runtime import stop_local_head

        stop_local_head()

    def summary(runs: list[Run]) -> tuple[float, float, float, float]:
        first = statistics.median(r[0] for r in runs)
        steady = statistics.median((r[1][-1] - r[1][5]) / (len(r[1]) - 6) for r in runs)
        return first, steady, statistics.median(r[2] for r in runs), statistics.median(r[3] for r in runs)

    d_cold, d_warm = summary(ds[:REPEATS]), summary(ds[REPEATS:])
    print(f"debug model, --method {METHOD}, dp2 ZeRO-2, seq {SEQ}, {STEPS} steps, 2 CPU ranks (gloo), median of {REPEATS} runs each")
    print("orch cold: an embedded Ray cluster started for the job; orch warm: --address of a running one")
    print(f"{'':24s}{'deepspeed':>11s}{'orch cold':>11s}{'ratio':>7s}{'deepspeed':>11s}{'orch warm':>11s}{'ratio':>7s}{'target':>8s}")
    rows = (("to the training fn (s)", 3, ""), ("time to first step (s)", 0, "<= 1.30"),
            ("steady step time (s)", 1, "<= 1.05"), ("whole run (s)", 2, ""))
    for label, k, target in rows:
        c, w = summary(orch)[k], summary(warm)[k]
        print(f"{label:24s}{d_cold[k]:11.3f}{c:11.3f}{c / d_cold[k]:7.2f}{d_warm[k]:11.3f}{w:11.3f}{w / d_warm[k]:7.2f}{target:>8s}")


if __name__ == "__main__":
    main()
