"""End-to-end job lifecycle on real Ray: a two-node cluster (ray.cluster_utils.Cluster) with one
worker per node training on a local dataset; a driver killed with SIGKILL and the job resumed with
`orch launch --resume`; a detached job running a user's --entrypoint, watched with `orch status`,
`orch list` and `orch logs`, and ended by `orch stop` with nothing of it left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ORCH = [sys.executable, "-m", "orchestrator"]
TINY = ["--model", "debug", "--cluster", "cpu-2", "--seq-len", "64", "--lr", "1e-3"]


def orch(*args: str, timeout: float = 540) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ORCH, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def last_json(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode in (0, 130), proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def steps_of(run_dir: Path) -> list[dict]:
    path = run_dir / "orch_steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def alive(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {' '.join(proc.cmdline())[:80]}")
        except psutil.NoSuchProcess:
            continue
    return out


def gone(pids: list[int], timeout_s: float = 120) -> bool:
    """Every process ended (Ray's processes notice a dead parent or raylet within about a minute)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pids):
            return True
        time.sleep(0.5)
    print("still running:", alive(pids))
    return False


def placement_groups_left(address: str, timeout_s: float = 60) -> tuple[int, dict[str, str]]:
    """(how many placement groups ``address`` has known, those not yet removed by id with their
    state), waiting up to ``timeout_s`` for Ray to remove those of ended jobs."""
    import ray

    ray.init(address=address, logging_level="WARNING")
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            table = ray.util.placement_group_table()
            held = {pg: info["state"] for pg, info in table.items() if info["state"] != "REMOVED"}
            if not held or time.monotonic() > deadline:
                return len(table), held
            time.sleep(0.5)
    finally:
        ray.shutdown()


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    with open(path, "w") as fh:
        for i in range(300):
            fh.write(json.dumps({"text": f"Pack my box with five dozen liquor jugs, number {i % 7}. "}) + "\n")
    return path


def test_two_nodes_one_worker_each_trains_on_a_dataset(tmp_path: Path, dataset: Path) -> None:
    """dp2 with ZeRO-2 and full recompute across two Ray nodes, on the bytes of a local corpus."""
    from ray.cluster_utils import Cluster

    log = tmp_path / "steps.jsonl"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        proc = orch("launch", *TINY, "--zero", "2", "--recompute", "full", "--steps", "20", "--address", cluster.address,
                    "--dataset", str(dataset), "--checkpoint-dir", str(tmp_path / "runs"), "--name", "two-node",
                    "--log-jsonl", str(log), "--json")
        summary = last_json(proc)
        known, held = placement_groups_left(cluster.address)
    finally:
        cluster.shutdown()
    # orch drops Ray Train's placement-group cleaner: the job's end must release the workers' group
    assert known >= 1 and held == {}, (known, held)
    assert summary["status"] == "succeeded" and summary["steps"] == 20 and summary["restarts"] == 0
    assert summary["plan"]["dp"] == 2 and summary["plan"]["zero_stage"] == 2 and summary["plan"]["recompute"] == "full"
    assert summary["final_loss"] < summary["initial_loss"] - 0.5  # bytes of a repetitive corpus are learnable
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    assert set(records[0]) == {"step", "loss", "tokens", "step_time_s", "restarts"}
    ranks = [json.loads(line) for line in (tmp_path / "runs" / "two-node" / "orch_ranks.jsonl").read_text().splitlines()]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert len({r["node_id"] for r in ranks}) == 2, ranks  # one worker on each node


def test_killed_driver_is_resumed_from_its_last_checkpoint(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run_dir = runs / "resumable"
    args = [*ORCH, "launch", *TINY, "--zero", "1", "--steps", "20", "--checkpoint-every", "5",
            "--checkpoint-dir", str(runs), "--name", "resumable", "--json"]
    with open(tmp_path / "err", "w") as err:
        driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        wait_for(lambda: len(steps_of(run_dir)) >= 7 or driver.poll() is not None, 300, "7 steps")
        assert driver.poll() is None, (tmp_path / "err").read_text()[-3000:]
        started = [p.pid for p in psutil.Process(driver.pid).children(recursive=True)]
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    assert gone(started), "processes of the killed driver's embedded cluster are still running"
    killed_at = steps_of(run_dir)[-1]["step"]
    assert killed_at < 20
    status = last_json(orch("status", "resumable", "--checkpoint-dir", str(runs), "--json"))
    assert status["state"] == "lost" and status["steps"] == killed_at

    summary = last_json(orch("launch", "--resume", "resumable", "--checkpoint-dir", str(runs), "--json"))
    assert summary["status"] == "succeeded" and summary["steps"] == 20 and summary["restarts"] == 1
    steps = [r["step"] for r in steps_of(run_dir)]
    first_resumed = steps[killed_at]
    assert (first_resumed - 1) % 5 == 0 and first_resumed <= killed_at + 1  # from the last checkpoint
    assert steps[killed_at:] == list(range(first_resumed, 21))
    assert summary["final_loss"] < summary["initial_loss"] - 0.5
    assert last_json(orch("status", "resumable", "--checkpoint-dir", str(runs), "--json"))["state"] == "succeeded"


def test_detached_entrypoint_status_logs_and_stop(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run_dir = runs / "detached"
    try:
        submitted = last_json(orch("launch", *TINY, "--steps", "100000", "--entrypoint", "tests.launch.user_entry:main",
                                   "--checkpoint-dir", str(runs), "--name", "detached", "--detach", "--json"))
        assert submitted["status"] == "submitted"
        wait_for(lambda: len(steps_of(run_dir)) >= 5, 300, "5 steps of the detached job")
        status = last_json(orch("status", "detached", "--checkpoint-dir", str(runs), "--json"))
        assert status["state"] == "running" and status["mode"] == "detached" and status["steps"] >= 5
        record = steps_of(run_dir)[-1]
        assert record["plan_dp"] == 2 and record["ds_batch"] > 0  # the entrypoint got the plan and config
        listed = [json.loads(line) for line in orch("list", "--checkpoint-dir", str(runs), "--json").stdout.splitlines()]
        assert [j["name"] for j in listed] == ["detached"]
        assert "step " in orch("logs", "detached", "--checkpoint-dir", str(runs)).stdout

        worker_pids = [json.loads(line)["pid"] for line in (run_dir / "orch_ranks.jsonl").read_text().splitlines()]
        stopped = orch("stop", "detached", "--checkpoint-dir", str(runs))
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr[-3000:]
        assert gone(worker_pids), "training workers still running after orch stop"
        drivers = [p for p in psutil.process_iter(["cmdline"]) if "--resume" in (p.info["cmdline"] or [])
                   and "detached" in (p.info["cmdline"] or [])]
        assert not drivers, "the detached driver is still running"
        assert last_json(orch("status", "detached", "--checkpoint-dir", str(runs), "--json"))["state"] == "stopped"
    finally:
        from launch.ray_runtime import stop_local_head

        stop_local_head()


def test_refusals_before_any_worker_starts(tmp_path: Path, dataset: Path) -> None:
    """Bad --entrypoint, --dataset, --tokenizer and --resume: one line, exit 2, in well under a
    second of Ray (none is started)."""
    runs = ["--checkpoint-dir", str(tmp_path)]
    cases = {
        ("--entrypoint", "nosuch_module_xyz:main"): "cannot import nosuch_module_xyz",
        ("--entrypoint", "no-colon"): "is not 'package.module:function'",
        ("--entrypoint", "tests.launch.user_entry:nothing"): "has no function nothing",
        ("--dataset", str(tmp_path / "missing.txt")): "no such file",
        ("--dataset", str(dataset.with_suffix(".csv"))): "unsupported file type",
        ("--dataset", str(dataset), "--tokenizer", str(tmp_path)): "not a directory with a Hugging Face tokenizer",
        ("--tokenizer", str(tmp_path)): "only used with --dataset",
        ("--checkpoint-dir", "s3://bucket/runs"): "cloud URIs are not supported",
    }
    for extra, message in cases.items():
        proc = orch("launch", *TINY, *runs, *extra, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
    proc = orch("launch", "--resume", "never-launched", *runs, timeout=60)
    assert proc.returncode == 2 and "no job named 'never-launched'" in proc.stderr
    for cmd in (("status", "never-launched"), ("logs", "never-launched"), ("stop", "never-launched")):
        proc = orch(*cmd, *runs, timeout=60)
        assert proc.returncode == 2 and "no job named" in proc.stderr, (cmd, proc.stderr)
    assert not os.listdir(tmp_path) or all(not (tmp_path / d / "orch_ranks.jsonl").exists() for d in os.listdir(tmp_path))
