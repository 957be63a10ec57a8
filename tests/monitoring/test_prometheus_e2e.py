"""A real Prometheus (started by `orch monitor` on loopback, 1 s scrapes) scrapes a real
`orch launch` (the debug model, 2 CPU workers): every declared metric is queried through the HTTP
API, and every PromQL expression of the Grafana dashboard and of the alert rules returns data.

This machine has no NVIDIA driver, so the ``orch_gpu_*`` series are legitimately absent: the test
asserts that their queries succeed and return nothing. Needs Debian's ``prometheus`` package on
PATH (.ci/run installs it); without it the test fails, unless ORCH_SKIP_PROMETHEUS=1."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from tests.launch import progress
import yaml

from launch.metrics import OrchMetrics
from orchestrator import monitoring
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

ORCH = [sys.executable, "-m", "orchestrator"]
# Waits are on the job's own progress (tests/launch/progress.py), not the wall clock: every query
# must answer before the job has trained STEP_BUDGET steps, and the job must not stall.
STEP_BUDGET = 1500
GRAFANA_VARIABLES = {"$__rate_interval": "15s"}  # what Grafana substitutes; $job is set to the job's name


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell starts children ignoring SIGINT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _query(base: str, expr: str) -> list[dict]:
    """The result of an instant query; a PromQL error fails the test with the expression."""
    try:
        body = _get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    except urllib.error.HTTPError as exc:
        pytest.fail(f"{expr}: {exc.read().decode()}")
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _is_gpu(expr: str) -> bool:
    return "orch_gpu_" in expr


def _queries(job: str) -> dict[str, str]:
    """Label -> PromQL: every declared metric, every dashboard expression, every alert's quantity."""
    queries = {}
    for d in OrchMetrics().declared:
        name = f"{d.name}_count" if d.kind == "histogram" else d.name
        queries[f"metric {d.name}"] = f'{name}{{job="{job}"}}'
    dashboard = json.loads(monitoring.DASHBOARD_FILE.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$job", job)  # [a-z0-9-]: nothing to escape
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"panel {panel['title']!r} uses an unknown Grafana variable: {expr}"
            queries[f"panel {panel['title']!r} {target['refId']}"] = expr
    for group in yaml.safe_load(monitoring.ALERTS_FILE.read_text())["groups"]:
        for rule in group["rules"]:
            # "<quantity> <op> <threshold>" -> "<quantity> <op> bool <threshold>": 0 or 1 for every
            # series the quantity has, whether or not the alert fires.
            expr, n = re.subn(r" (>|<|>=|<=|==|!=) ", r" \1 bool ", rule["expr"])
            assert n == 1, f"alert {rule['alert']}: expected one comparison in {rule['expr']!r}"
            queries[f"alert {rule['alert']}"] = expr
    return queries


def _prometheus() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("ORCH_SKIP_PROMETHEUS") == "1":
            pytest.skip("prometheus not on PATH and ORCH_SKIP_PROMETHEUS=1")
        pytest.fail("prometheus is not on PATH: install Debian's prometheus package (apt-get install -y prometheus), "
                    "as .ci/run does, or set ORCH_SKIP_PROMETHEUS=1 to skip")
    return path


def _wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"orch monitor exited {proc.returncode}: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"Prometheus not ready at {base} within {timeout_s} s: {log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen, timeout_s: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_prometheus_scrapes_a_launched_job(tmp_path: Path) -> None:
    _prometheus()
    runs, job = tmp_path / "runs", f"mon-e2e-{uuid.uuid4().hex[:6]}"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    mon_log, launch_log = tmp_path / "monitor.log", tmp_path / "launch.log"
    started: list[psutil.Process] = []
    with open(mon_log, "w") as mon_out, open(launch_log, "w") as launch_out:
        monitor = subprocess.Popen(
            [*ORCH, "monitor", "--checkpoint-dir", str(runs), "--out", str(tmp_path / "mon"),
             "--listen", f"127.0.0.1:{port}", "--scrape-interval", "1s"],
            cwd=ROOT, stdout=mon_out, stderr=subprocess.STDOUT, preexec_fn=_default_sigint)
        launch = None
        try:
            _wait_ready(base, monitor, mon_log)
            launch = subprocess.Popen(
                [*ORCH, "launch", "--model", "debug", "--cluster", "cpu-2", "--steps", "5000", "--seq-len", "64",
                 "--checkpoint-dir", str(runs), "--checkpoint-every", "10", "--name", job, "--json"],
                cwd=ROOT, stdout=launch_out, stderr=subprocess.STDOUT, preexec_fn=_default_sigint,
                env={**os.environ, "RAY_ADDRESS": "local"})  # an embedded cluster even if a `ray start` head is about
            queries = _queries(job)
            pending = {k: q for k, q in queries.items() if not _is_gpu(q)}
            steps_file = runs / job / "orch_steps.jsonl"

            def answered() -> bool:
                nonlocal pending
                pending = {k: q for k, q in pending.items() if not _query(base, q)}
                done = len(steps_file.read_text().splitlines()) if steps_file.exists() else 0
                return not pending or done >= STEP_BUDGET

            progress.wait_until(answered, launch, [runs / job], what="orch launch")
            started = [*psutil.Process(launch.pid).children(recursive=True), *psutil.Process(monitor.pid).children(recursive=True)]
            assert not pending, f"no data after {STEP_BUDGET} steps for: {json.dumps(pending, indent=1)}\n{launch_log.read_text()[-3000:]}"

            # Series carry the job's name and rank labels, from one endpoint per node.
            steps = _query(base, f'orch_step_duration_seconds_count{{job="{job}"}}')
            assert sorted(s["metric"]["rank"] for s in steps) == ["0", "1"]
            assert len({s["metric"]["instance"] for s in steps}) == 1
            up = _query(base, f'up{{job="{job}"}}')
            assert [s["value"][1] for s in up] == ["1"]
            # Planned against measured: the plan's five components are there.
            components = {s["metric"]["component"] for s in _query(base, f'orch_memory_planned_bytes{{job="{job}",rank="0"}}')}
            assert components == {"parameters", "gradients", "optimizer", "activations", "overhead"}
            # No NVIDIA driver here: every GPU series is absent, and asking for it is not an error.
            assert _query(base, '{__name__=~"orch_gpu_.+"}') == []
            for label, q in queries.items():
                if _is_gpu(q):
                    assert _query(base, q) == [], label
            # The alert rules evaluate without error.
            groups = _get(f"{base}/api/v1/rules")["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            declared = sum(len(g["rules"]) for g in yaml.safe_load(monitoring.ALERTS_FILE.read_text())["groups"])
            assert len(rules) == declared and all(r["health"] == "ok" for r in rules), rules
        finally:  # stop both (Ctrl-C) even when a check failed; their exit codes are checked below
            launch_code = _stop(launch, 120) if launch is not None else None
            monitor_code = _stop(monitor, 60)
    assert launch_code == 130, launch_log.read_text()[-3000:]  # stopped: Ctrl-C
    assert monitor_code == 0, mon_log.read_text()[-3000:]
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [(p.pid, p.name()) for p in alive]
