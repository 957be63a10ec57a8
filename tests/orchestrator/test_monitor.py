"""`orch monitor`'s files without a running job: promtool accepts the generated prometheus.yml and
the alert rules, the alerts fire at the issue's thresholds (promtool's rule unit tests), stale
announcements are pruned, and the Grafana dashboard is provisioning-ready and names only declared
metrics. promtool comes with Debian's `prometheus` package (.ci/run installs it); without it these
tests fail unless ORCH_SKIP_PROMETHEUS=1."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.metrics import TARGETS_DIR, OrchMetrics
from orchestrator import monitoring
from planner.errors import PlanInputError
from tests.conftest import ROOT


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("ORCH_SKIP_PROMETHEUS") == "1":
            pytest.skip("promtool not on PATH and ORCH_SKIP_PROMETHEUS=1")
        pytest.fail("promtool is not on PATH: install Debian's prometheus package (apt-get install -y prometheus), "
                    "as .ci/run does, or set ORCH_SKIP_PROMETHEUS=1 to skip")
    return path


def test_generated_config_and_rules_pass_promtool(tmp_path: Path):
    setup = monitoring.write_setup(tmp_path / "mon", [tmp_path / "runs", tmp_path / "more"], "127.0.0.1:9999", "5s")
    promtool = _promtool()
    for check in (["check", "config", str(setup.config)], ["check", "rules", str(setup.rules)]):
        out = subprocess.run([promtool, *check], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    config = yaml.safe_load(setup.config.read_text())
    assert config["global"] == {"scrape_interval": "5s", "evaluation_interval": "5s"}
    assert config["rule_files"] == [str(setup.rules)]
    (job,) = config["scrape_configs"]
    assert job["honor_labels"] is True
    assert job["file_sd_configs"][0]["files"] == [str(tmp_path / d / TARGETS_DIR / "*.json") for d in ("runs", "more")]
    assert (tmp_path / "runs" / TARGETS_DIR).is_dir()  # watched from the start
    assert monitoring.prometheus_command(setup)[1:] == [
        f"--config.file={setup.config}", f"--storage.tsdb.path={tmp_path / 'mon' / 'data'}", "--web.listen-address=127.0.0.1:9999"]


# Each alert once firing, once not (promtool's rule unit tests; time starts at the Unix epoch).
ALERT_TESTS = {
    "rule_files": [str(monitoring.ALERTS_FILE)],
    "evaluation_interval": "1m",
    "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": 'orch_memory_plan_ratio{job="mem-over",rank="0",node="n"}', "values": "1.2x40"},
            {"series": 'orch_memory_plan_ratio{job="mem-ok",rank="0",node="n"}', "values": "1.09x40"},
            {"series": 'orch_last_step_timestamp_seconds{job="stuck",rank="1",node="n"}', "values": "0x40"},
            {"series": 'orch_last_step_timestamp_seconds{job="moving",rank="1",node="n"}', "values": "0+60x40"},
            {"series": 'orch_mfu_ratio{job="slow",rank="0",node="n"}', "values": "0.1x40"},
            {"series": 'orch_planned_mfu_ratio{job="slow",rank="0",node="n"}', "values": "0.4x40"},
            {"series": 'orch_mfu_ratio{job="fast",rank="0",node="n"}', "values": "0.25x40"},
            {"series": 'orch_planned_mfu_ratio{job="fast",rank="0",node="n"}', "values": "0.4x40"},
            {"series": 'orch_job_restarts_total{job="flaky",rank="0",node="n"}', "values": "0 1 2 3 4x36"},
            {"series": 'orch_job_restarts_total{job="steady",rank="0",node="n"}', "values": "0 1 2 3x37"},
        ],
        "promql_expr_test": [{
            "expr": 'count by (alertname, job) (ALERTS{alertstate="firing"})',
            "eval_time": "30m",
            "exp_samples": [{"labels": f'{{alertname="{a}", job="{j}"}}', "value": 1} for a, j in (
                ("OrchMemoryAbovePlan", "mem-over"), ("OrchNoStepProgress", "stuck"),
                ("OrchMfuBelowHalfOfPlan", "slow"), ("OrchTooManyRestarts", "flaky"))],
        }],
    }],
}


def test_alerts_fire_at_the_thresholds(tmp_path: Path):
    promtool = _promtool()
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(yaml.safe_dump(ALERT_TESTS))
    out = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_have_durations_and_the_issues_thresholds():
    (group,) = yaml.safe_load(monitoring.ALERTS_FILE.read_text())["groups"]
    rules = {r["alert"]: r for r in group["rules"]}
    assert rules["OrchMemoryAbovePlan"]["expr"] == "orch_memory_plan_ratio > 1.1"
    assert "0.5 * orch_planned_mfu_ratio" in rules["OrchMfuBelowHalfOfPlan"]["expr"]
    assert "> 600" in rules["OrchNoStepProgress"]["expr"] and "> 3" in rules["OrchTooManyRestarts"]["expr"]
    assert all("for" in r and r["annotations"]["summary"] for r in rules.values())


def test_orch_monitor_writes_the_files_and_refuses_bad_input_in_one_line(tmp_path: Path):
    def orch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator", "monitor", *args], cwd=ROOT, capture_output=True, text=True)

    out = orch("--no-start", "--out", str(tmp_path / "mon"), "--checkpoint-dir", str(tmp_path / "runs"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "mon" / "prometheus.yml").is_file() and (tmp_path / "mon" / "orch-alerts.yml").is_file()
    for bad in (["--listen", "localhost"], ["--scrape-interval", "fast"]):
        out = orch("--no-start", "--out", str(tmp_path / "mon"), *bad)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "To fix" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_announcements_of_ended_jobs_are_pruned(tmp_path: Path):
    setup = monitoring.write_setup(tmp_path / "mon", [tmp_path / "runs"], "127.0.0.1:9999")
    targets = tmp_path / "runs" / TARGETS_DIR
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
        closed.close()
        for name, port in (("alive.node0", live.getsockname()[1]), ("dead.node0", dead_port)):
            (targets / f"{name}.json").write_text(json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": {"job": name}}]))
        groups = monitoring.current_targets(setup)
    assert [g["labels"]["job"] for g in groups] == ["alive.node0"]
    assert sorted(p.name for p in targets.glob("*.json")) == ["alive.node0.json"]


def dashboard_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_is_provisioning_ready_and_names_declared_metrics():
    dashboard = json.loads(monitoring.DASHBOARD_FILE.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["job"]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert "__inputs" not in dashboard  # import-only: provisioning does not resolve it
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]) and p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in ("loss", "throughput", "mfu against plan", "p50 / p99", "memory per rank against plan",
                   "gpu utilisation", "gpu power", "restarts", "job state"):
        assert wanted in titles, wanted
    declared = {d.name for d in OrchMetrics().declared}
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for e in dashboard_exprs(dashboard) for n in re.findall(r"\borch_[a-z_]+", e)}
    assert used <= declared, used - declared
    assert {"orch_tokens_total", "orch_mfu_ratio", "orch_planned_mfu_ratio", "orch_memory_peak_bytes",
            "orch_memory_planned_bytes", "orch_gpu_memory_used_bytes"} <= used


def test_the_job_spec_carries_the_plan_the_metrics_are_set_against(tmp_path: Path):
    from orchestrator.inputs import load_model, resolve_cluster
    from orchestrator.launch_plan import LaunchOptions, build_job, choose_plan
    from orchestrator.planning import evaluate_plan
    from planner.search.pinned import Pinned
    from planner.specs.training import TrainingSpec

    model, cluster = load_model("debug"), resolve_cluster("cpu-2", None, None, None)
    training = TrainingSpec(seq_len=64, global_batch=0)
    plan = choose_plan(model, cluster, training, Pinned())
    opts = LaunchOptions(steps=10, name="j", checkpoint_dir=tmp_path, metrics_host="0.0.0.0", metrics_port=9400)
    job, _ = build_job(model, training, plan, opts, cluster=cluster)
    predicted = evaluate_plan(model, cluster, training, plan)
    assert job.planned_bytes == {k: v for k, v in predicted.memory.memory.as_dict().items() if k != "total"}
    assert set(job.planned_bytes) == {"parameters", "gradients", "optimizer", "activations", "overhead"}
    assert job.planned_mfu == predicted.speed.mfu > 0 and job.planned_step_time_s == predicted.speed.step_time_s > 0
    assert job.flops_per_step == predicted.speed.model_flops > 0
    assert job.peak_flops_per_gpu == cluster.gpu.peak_tflops(training.precision) * 1e12  # the cluster's GPU spec
    assert (job.metrics_host, job.metrics_port) == ("0.0.0.0", 9400)
    with pytest.raises(PlanInputError, match="--metrics-host"):
        build_job(model, training, plan, LaunchOptions(steps=10, checkpoint_dir=tmp_path, metrics_host="my-host"), cluster=cluster)
