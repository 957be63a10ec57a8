"""The metrics of launch/metrics.py without a cluster: names follow Prometheus conventions, the
worker-side observer turns step records into values, a node's endpoint merges its local ranks,
and the file_sd file is what Prometheus reads."""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from launch import metrics as M
from launch.gpu import GpuProbe, GpuSample, gpu_inventory
from launch.job import JobSpec

UNITS = ("_seconds", "_bytes", "_ratio", "_watts", "_celsius", "_joules")
COUNTED = ("_tokens", "_samples", "_restarts", "_flops", "_errors")  # counters of things: the thing is the unit
UNITLESS = {"orch_loss", "orch_learning_rate", "orch_grad_norm", "orch_train_step", "orch_job_state"}
ALLOWED_LABELS = {"job", "rank", "node", "gpu", "component"}
# What issue 6 asks for, by name.
REQUIRED = {
    "orch_step_duration_seconds", "orch_tokens_total", "orch_samples_total", "orch_loss", "orch_learning_rate",
    "orch_grad_norm", "orch_model_flops_total", "orch_mfu_ratio", "orch_checkpoint_duration_seconds", "orch_job_state",
    "orch_job_restarts_total", "orch_gpu_memory_used_bytes", "orch_gpu_memory_total_bytes", "orch_gpu_utilization_ratio",
    "orch_gpu_power_watts", "orch_gpu_temperature_celsius", "orch_gpu_energy_joules_total", "orch_gpu_xid_errors_total",
    "orch_memory_planned_bytes", "orch_memory_allocated_bytes", "orch_memory_peak_bytes", "orch_memory_plan_ratio",
}
PLANNED = {"parameters": 100, "gradients": 200, "optimizer": 300, "activations": 400, "overhead": 0}


def _job(tmp_path: Path, **kw: object) -> JobSpec:
    fields = dict(name=f"test-{uuid.uuid4().hex[:8]}", run_dir=str(tmp_path / "runs" / "j"), hf_config={}, ds_config={},
                  steps=10, seq_len=64, planned_bytes=PLANNED, planned_mfu=0.4, planned_step_time_s=0.5,
                  flops_per_step=8e9, peak_flops_per_gpu=1e11)
    fields.update(kw)
    return JobSpec(**fields)


class FakeMemory:
    def __init__(self) -> None:
        self.now, self.peak = 500, 1100

    def read(self) -> tuple[int, int]:
        return self.now, self.peak


def test_every_declared_name_follows_the_conventions():
    declared = M.OrchMetrics().declared
    names = [d.name for d in declared]
    assert len(names) == len(set(names))
    assert REQUIRED <= set(names)
    for d in declared:
        assert re.fullmatch(r"orch_[a-z][a-z0-9_]*[a-z0-9]", d.name), d.name
        assert (d.kind == "counter") == d.name.endswith("_total"), d.name
        base = d.name.removesuffix("_total")
        assert base.endswith(UNITS) or d.name in UNITLESS or (d.kind == "counter" and base.endswith(COUNTED)), d.name
        assert not re.search(r"_(ms|milliseconds|kb|mb|gb|kib|mib|gib|percent|pct)(_|$)", d.name), d.name
        assert set(d.labels) <= ALLOWED_LABELS and {"job", "rank", "node"} <= set(d.labels), d
        assert ("gpu" in d.labels) == d.name.startswith("orch_gpu_"), d
        assert len(d.help) > 20 and d.help.endswith("."), d


def test_observer_turns_step_records_into_values(tmp_path: Path):
    m = M.OrchMetrics()
    job = _job(tmp_path)
    obs = M.StepObserver(m, job, rank=0, world_size=2, node="n1", restarts=1, memory=FakeMemory())
    ids = {"job": job.name, "rank": "0", "node": "n1"}
    value = lambda name, **extra: m.registry.get_sample_value(name, {**ids, **extra})  # noqa: E731
    assert value("orch_job_state", orch_job_state="restarting") == 1
    assert value("orch_job_restarts_total") == 1
    assert value("orch_memory_planned_bytes", component="optimizer") == 300
    assert value("orch_planned_mfu_ratio") == 0.4 and value("orch_planned_step_duration_seconds") == 0.5
    assert value("orch_memory_plan_ratio") == pytest.approx(1100 / 1000)

    obs.observe({"step": 1, "loss": 2.5, "tokens": 4096, "step_time_s": 0.2, "lr": 1e-4, "grad_norm": 3.0})
    obs.observe({"step": 2, "loss": 2.0, "tokens": 4096, "step_time_s": 0.4, "lr": 2e-4, "grad_norm": None,
                 "checkpoint_time_s": 1.5}, persist_s=0.5)
    assert value("orch_job_state", orch_job_state="running") == 1
    assert value("orch_tokens_total") == 8192 and value("orch_samples_total") == 128
    assert value("orch_loss") == 2.0 and value("orch_learning_rate") == 2e-4 and value("orch_train_step") == 2
    assert value("orch_grad_norm") == 3.0  # a missing norm leaves the last one
    assert value("orch_step_duration_seconds_count") == 2 and value("orch_step_duration_seconds_sum") == pytest.approx(0.6)
    assert value("orch_model_flops_total") == 2 * 4e9
    assert value("orch_mfu_ratio") == pytest.approx(4e9 / 0.4 / 1e11)
    assert value("orch_checkpoint_duration_seconds_count") == 1 and value("orch_checkpoint_duration_seconds_sum") == 2.0
    assert value("orch_memory_allocated_bytes") == 500 and value("orch_memory_peak_bytes") == 1100
    obs.finish("succeeded")
    assert value("orch_job_state", orch_job_state="succeeded") == 1
    assert value("orch_job_state", orch_job_state="running") == 0


def test_other_ranks_export_their_own_series_only(tmp_path: Path):
    m = M.OrchMetrics()
    obs = M.StepObserver(m, _job(tmp_path), rank=1, world_size=2, node="n1", memory=FakeMemory())
    obs.observe({"step": 1, "loss": 2.5, "tokens": 4096, "step_time_s": 0.2})
    names = {s.name for f in m.registry.collect() for s in f.samples}
    assert "orch_step_duration_seconds_count" in names and "orch_mfu_ratio" in names
    assert not names & {"orch_loss", "orch_tokens_total", "orch_job_state", "orch_job_restarts_total"}


def test_an_entrypoint_that_reports_only_a_step_still_gets_step_times(tmp_path: Path):
    m = M.OrchMetrics()
    job = _job(tmp_path, planned_bytes={}, flops_per_step=0.0)
    obs = M.StepObserver(m, job, rank=0, world_size=1, node="n1")
    obs.observe({"step": 1})
    labels = {"job": job.name, "rank": "0", "node": "n1"}
    assert m.registry.get_sample_value("orch_step_duration_seconds_count", labels) == 1
    assert m.registry.get_sample_value("orch_tokens_total", labels) == 0
    assert m.registry.get_sample_value("orch_memory_plan_ratio", labels) is None


class FakeGpu:
    index = 3

    def __init__(self) -> None:
        self.energy = 1000.0

    def sample(self) -> GpuSample:
        self.energy += 50.0
        return GpuSample(memory_used_bytes=7, memory_total_bytes=80, utilization_ratio=0.9, power_watts=None,
                         temperature_celsius=61.0, energy_joules=self.energy, xid_errors=1)


def test_gpu_series_per_gpu_and_unsupported_readings_omitted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(M, "GPU_SAMPLE_EVERY_S", 0.0)
    m = M.OrchMetrics()
    job = _job(tmp_path)
    obs = M.StepObserver(m, job, rank=0, world_size=1, node="n1", gpu=FakeGpu())  # type: ignore[arg-type]
    obs.observe({"step": 1})
    g = {"job": job.name, "rank": "0", "node": "n1", "gpu": "3"}
    assert m.registry.get_sample_value("orch_gpu_memory_used_bytes", g) == 7
    assert m.registry.get_sample_value("orch_gpu_utilization_ratio", g) == 0.9
    assert m.registry.get_sample_value("orch_gpu_power_watts", g) is None  # unsupported: not exported
    assert m.registry.get_sample_value("orch_gpu_energy_joules_total", g) == 50.0  # since the rank started
    assert m.registry.get_sample_value("orch_gpu_xid_errors_total", g) == 2


def test_no_nvidia_driver_means_no_gpu_and_no_error():
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception:
        assert gpu_inventory() == [] and GpuProbe.open("0") is None
    else:  # a machine with a driver
        gpus = gpu_inventory()
        assert gpus and all(g.memory_total_bytes >= g.memory_free_bytes > 0 for g in gpus)


def test_host_memory_is_real_rss_growth():
    probe = M.HostMemory()
    block = bytearray(64 * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1  # touch every page
    now, peak = probe.read()
    assert now >= 60 * 2**20 and peak >= now


def _fetch(address: str) -> dict[str, list]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_one_endpoint_per_node_merges_the_local_ranks_and_is_announced(tmp_path: Path):
    job = _job(tmp_path)
    common = dict(node_rank=0, world_size=2, restarts=0, cuda_device=None, node_ip="10.0.0.5")
    peer = M.start_worker_metrics(job, rank=1, local_rank=1, **common)
    node = M.start_worker_metrics(job, rank=0, local_rank=0, **common)
    try:
        peer.observe({"step": 1, "step_time_s": 0.3})
        node.observe({"step": 1, "step_time_s": 0.2, "tokens": 100, "loss": 1.0})
        assert node.address is not None and node.address.startswith("127.0.0.1:")
        families = _fetch(node.address)
        counts = {s.labels["rank"]: s.value for s in families["orch_step_duration_seconds"] if s.name.endswith("_count")}
        assert counts == {"0": 1.0, "1": 1.0}
        assert {s.labels["rank"] for s in families["orch_tokens"]} == {"0"}
        target = tmp_path / "runs" / M.TARGETS_DIR / f"{job.name}.node0.json"
        groups = json.loads(target.read_text())
        assert groups == [{"targets": [node.address], "labels": {"job": job.name, "node": groups[0]["labels"]["node"]}}]
    finally:
        peer.close("succeeded")
        node.close("succeeded")
    assert not target.exists() and not list(M.peers_dir(job, 0).glob("*.url"))


def test_a_peer_that_is_gone_is_left_out_of_the_scrape(tmp_path: Path):
    peers = tmp_path / "peers"
    peers.mkdir()
    (peers / "rank1.url").write_text("http://127.0.0.1:9/metrics\n")  # nothing listens on port 9
    own = M.OrchMetrics()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(M.NodeCollector(own.registry, peers, timeout_s=0.5))
    assert [f.name for f in registry.collect()] == [f.name for f in own.registry.collect()]


def test_advertised_address():
    assert M.advertised("127.0.0.1", "10.0.0.5") == "127.0.0.1"
    assert M.advertised("0.0.0.0", "10.0.0.5") == "10.0.0.5"
    assert M.advertised("::", "fe80::1") == "[fe80::1]"
