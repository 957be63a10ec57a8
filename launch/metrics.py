"""Every Prometheus metric orch exports, and the worker-side exporter: the one module that imports
prometheus_client.

Names follow Prometheus conventions: an ``orch_`` prefix, base units in the name (``_seconds``,
``_bytes``, ``_ratio``, ``_watts``, ``_celsius``, ``_joules``), ``_total`` on counters. Labels:
``job`` (the job name), ``rank``, ``node`` (host name), ``gpu`` (NVML index) and, for the plan,
``component`` -- nothing that grows with the run. ``OrchMetrics.declared`` lists every name;
tests/launch/test_metrics.py checks each against these rules.

Design (why it is built this way)
---------------------------------
- Observed where every report passes: ``launch.worker`` calls ``WorkerMetrics.observe`` with each
  step record every rank reports (``WorkerContext.report``), so a user's ``--entrypoint`` gets the
  same metrics as the built-in trainer. Per-rank series (step time, MFU, memory, GPU) come from
  every rank; the job's series (loss, tokens, samples, learning rate, gradient norm, step, state,
  restarts) only from rank 0, whose record is the job's, so ``sum by (job)`` of a job counter is
  the job's value and not world-size times it.
- One scrape endpoint per node: each worker process keeps its own registry; local rank 0 of each
  node serves the node's endpoint on ``--metrics-host:--metrics-port`` (127.0.0.1 and an ephemeral
  port unless told otherwise) and, at each scrape, merges in the other local ranks' metrics, which
  they serve on private loopback ports and announce in ``<run dir>/orch_metrics_peers/node<k>/``.
  Rejected: per-rank endpoints (eight targets per node), prometheus_client's multiprocess mode (it
  needs an environment variable before the first import of prometheus_client in every process,
  and has no Enum), gathering to rank 0 through torch.distributed (a collective inside the step).
- Discovery: the node's server writes a Prometheus file-based service-discovery file
  ``<storage>/orch_metrics_targets/<job>.node<k>.json`` (atomically; removed when the workers
  end). ``orch monitor`` points Prometheus at ``<storage>/orch_metrics_targets/*.json``, which
  Prometheus watches, so jobs launched later are scraped without running it again.
- Cost: a step costs a few float updates, one /proc read for memory and, at most once a second, an
  NVML sample; text is produced only when Prometheus scrapes. bench/metrics_overhead.py measures it.
- The job state is what the workers see: starting (or restarting, after a restart), running from
  the first step, succeeded or failed when the training function returns or raises -- scraped only
  if a scrape lands before the workers exit. ``stopped`` is the driver's to export (Ctrl-C, ``orch
  stop`` end the workers without a word).
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import (CollectorRegistry, Counter, Enum, Gauge, Histogram, disable_created_metrics, generate_latest,
                               start_http_server)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from launch.gpu import GpuProbe, visible_device
from launch.job import JobSpec

disable_created_metrics()  # no `_created` series beside every counter and histogram: half the text, nothing lost

TARGETS_DIR = "orch_metrics_targets"  # under the storage path: the file_sd files of running jobs
JOB_STATES = ("starting", "running", "restarting", "succeeded", "failed", "stopped")
COMPONENTS = ("parameters", "gradients", "optimizer", "activations", "overhead")  # planner.memory.evaluate.MemoryBreakdown
RANK_LABELS = ("job", "rank", "node")
GPU_LABELS = (*RANK_LABELS, "gpu")
# Seconds; a debug step on CPU takes ~0.1 s, a large model's step tens of seconds.
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)
CHECKPOINT_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 1800.0)  # seconds; few: every bucket is a series per rank
GPU_SAMPLE_EVERY_S = 1.0  # NVML readings at most this often (each is ~6 driver calls)


@dataclass(frozen=True)
class Declared:
    """One declared metric, by the name Prometheus stores (counters with ``_total``)."""

    name: str
    kind: str  # counter, gauge, histogram, enum
    labels: tuple[str, ...]
    help: str


class OrchMetrics:
    """Every orch metric, declared once, in one registry (one per process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.declared: list[Declared] = []
        d = self._declare
        # The job (rank 0 only).
        self.job_state = d(Enum, "orch_job_state", "Lifecycle state of the job as its workers see it (1 = current).",
                           RANK_LABELS, states=JOB_STATES)
        self.restarts = d(Counter, "orch_job_restarts_total", "Restarts of the job's worker group from its last checkpoint.", RANK_LABELS)
        self.tokens = d(Counter, "orch_tokens_total", "Tokens trained by the whole job (every data-parallel rank).", RANK_LABELS)
        self.samples = d(Counter, "orch_samples_total", "Sequences trained by the whole job.", RANK_LABELS)
        self.loss = d(Gauge, "orch_loss", "Training loss of the last optimizer step, averaged over ranks.", RANK_LABELS)
        self.learning_rate = d(Gauge, "orch_learning_rate", "Learning rate of the last optimizer step.", RANK_LABELS)
        self.grad_norm = d(Gauge, "orch_grad_norm", "Global L2 norm of the gradients at the last optimizer step.", RANK_LABELS)
        self.train_step = d(Gauge, "orch_train_step", "Last optimizer step completed (1-based; it goes back on a restart from a checkpoint).", RANK_LABELS)
        # Each rank.
        self.step_duration = d(Histogram, "orch_step_duration_seconds", "Wall time of one optimizer step on this rank.",
                               RANK_LABELS, buckets=STEP_BUCKETS)
        self.last_step = d(Gauge, "orch_last_step_timestamp_seconds", "Unix time of this rank's last step (of its start before the first).", RANK_LABELS)
        self.model_flops = d(Counter, "orch_model_flops_total", "Model FLOPs done by this rank (the plan's FLOPs per step / world size, "
                             "recomputation not counted); its rate is the achieved FLOP/s.", RANK_LABELS)
        self.mfu = d(Gauge, "orch_mfu_ratio", "Model FLOPs utilisation of this rank's last step: model FLOP/s over the peak FLOP/s "
                     "of the cluster's GPU spec (PaLM, Chowdhery et al. 2022, App. B).", RANK_LABELS)
        self.planned_mfu = d(Gauge, "orch_planned_mfu_ratio", "MFU the planner predicted for the plan.", RANK_LABELS)
        self.planned_step = d(Gauge, "orch_planned_step_duration_seconds", "Step time the planner predicted for the plan.", RANK_LABELS)
        self.checkpoint_duration = d(Histogram, "orch_checkpoint_duration_seconds", "Wall time of one checkpoint on this rank "
                                     "(saving its shards plus persisting them to the storage path).", RANK_LABELS, buckets=CHECKPOINT_BUCKETS)
        self.memory_planned = d(Gauge, "orch_memory_planned_bytes", "Bytes the plan predicts per rank, by component "
                                "(planner.memory.evaluate, the most loaded rank).", (*RANK_LABELS, "component"))
        self.memory_allocated = d(Gauge, "orch_memory_allocated_bytes", "Bytes this rank holds now: torch.cuda.memory_allocated "
                                  "on a GPU; on CPU, the growth of the worker's resident set size (RSS) since before the model was built "
                                  "(libraries imported since included).", RANK_LABELS)
        self.memory_peak = d(Gauge, "orch_memory_peak_bytes", "Most bytes this rank has held: torch.cuda.max_memory_allocated on a "
                             "GPU; on CPU, peak RSS (getrusage ru_maxrss) minus the RSS before the model was built.", RANK_LABELS)
        self.memory_ratio = d(Gauge, "orch_memory_plan_ratio", "orch_memory_peak_bytes over the plan's total bytes per rank.", RANK_LABELS)
        # Each rank's GPU (NVML; absent where there is no NVIDIA driver).
        self.gpu_memory_used = d(Gauge, "orch_gpu_memory_used_bytes", "GPU memory in use by every process (NVML).", GPU_LABELS)
        self.gpu_memory_total = d(Gauge, "orch_gpu_memory_total_bytes", "GPU memory in total (NVML).", GPU_LABELS)
        self.gpu_utilization = d(Gauge, "orch_gpu_utilization_ratio", "Fraction of the last sample period a kernel ran on the GPU (NVML).", GPU_LABELS)
        self.gpu_power = d(Gauge, "orch_gpu_power_watts", "GPU board power draw (NVML).", GPU_LABELS)
        self.gpu_temperature = d(Gauge, "orch_gpu_temperature_celsius", "GPU core temperature (NVML).", GPU_LABELS)
        self.gpu_energy = d(Counter, "orch_gpu_energy_joules_total", "Energy the GPU used since this rank started (NVML).", GPU_LABELS)
        self.gpu_xid_errors = d(Counter, "orch_gpu_xid_errors_total", "XID critical errors the driver reported for the GPU (NVML events).", GPU_LABELS)

    def _declare(self, cls: type, name: str, doc: str, labels: tuple[str, ...], **kw: Any) -> Any:
        kind = {Counter: "counter", Gauge: "gauge", Histogram: "histogram", Enum: "enum"}[cls]
        self.declared.append(Declared(name=name, kind=kind, labels=tuple(labels), help=doc))
        return cls(name, doc, labels, registry=self.registry, **kw)


# ---------------------------------------------------------------------------------------------
# Measured memory


class MemoryProbe(Protocol):
    def read(self) -> tuple[int, int]:
        """(bytes held now, most bytes held so far)."""


class HostMemory:
    """A CPU rank, which has no allocator statistics: the growth of the process's resident set
    since its metrics started, before the model was built (RSS now, and peak RSS from getrusage,
    each minus the RSS then). It holds the model, optimizer states, gradients and activations, and
    also what the training function imports afterwards (DeepSpeed, the model's code: ~0.2 GB),
    which dominates for a tiny model such as ``debug``."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.baseline = self._process.memory_info().rss
        self._peak = self.baseline

    def read(self) -> tuple[int, int]:
        rss = self._process.memory_info().rss
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is in bytes on macOS, KiB on Linux, where it lags RSS by a few cached pages.
        self._peak = max(self._peak, rss, maxrss if sys.platform == "darwin" else maxrss * 1024)
        return max(0, rss - self.baseline), self._peak - self.baseline


class CudaMemory:
    """A GPU rank: what PyTorch's caching allocator has handed out (torch.cuda memory stats)."""

    def __init__(self) -> None:
        import torch

        self._cuda = torch.cuda

    def read(self) -> tuple[int, int]:
        return int(self._cuda.memory_allocated()), int(self._cuda.max_memory_allocated())


# ---------------------------------------------------------------------------------------------
# The observer: step records in, metric values out


def _number(record: dict[str, Any], key: str) -> float | None:
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class StepObserver:
    """Turns one rank's step records into metric values (no I/O but a memory read and, at most once
    a second, a GPU sample)."""

    def __init__(self, metrics: OrchMetrics, job: JobSpec, *, rank: int, world_size: int, node: str, restarts: int = 0,
                 memory: MemoryProbe | None = None, gpu: GpuProbe | None = None) -> None:
        m, ids = metrics, (job.name, str(rank), node)
        self._m, self._ids, self._children = m, ids, {}
        self.job_level = rank == 0
        self._memory, self._gpu, self._seq_len = memory, gpu, job.seq_len
        self._flops_per_rank = job.flops_per_step / world_size
        self._peak = job.peak_flops_per_gpu
        self._planned_total = sum(job.planned_bytes.values())
        # Series that always exist (a job without checkpoints shows a count of 0); the others are
        # created when first set, so an unknown value is absent rather than 0.
        self._step, self._last_ts = m.step_duration.labels(*ids), m.last_step.labels(*ids)
        self._checkpoint = m.checkpoint_duration.labels(*ids)
        for component in COMPONENTS if job.planned_bytes else ():
            m.memory_planned.labels(*ids, component).set(job.planned_bytes.get(component, 0))
        if job.planned_mfu:
            m.planned_mfu.labels(*ids).set(job.planned_mfu)
        if job.planned_step_time_s:
            m.planned_step.labels(*ids).set(job.planned_step_time_s)
        if self.job_level:
            self._state = m.job_state.labels(*ids)
            self._state.state("restarting" if restarts else "starting")
            m.restarts.labels(*ids).inc(restarts)
            self._tokens, self._samples = m.tokens.labels(*ids), m.samples.labels(*ids)
        self._energy_seen: float | None = None
        self._last_report = time.perf_counter()
        self._last_gpu = float("-inf")
        self._last_ts.set(time.time())
        self._read_memory()
        self._sample_gpu()

    def observe(self, record: dict[str, Any], persist_s: float | None = None) -> None:
        """One step record (``step``, ``loss``, ``tokens``, ``step_time_s``, ``lr``, ``grad_norm``,
        ``checkpoint_time_s``: any may be missing). ``persist_s``: seconds the reporter spent
        persisting this step's checkpoint, None when there was none."""
        now = time.perf_counter()
        dt = _number(record, "step_time_s") or now - self._last_report
        self._last_report = now
        self._step.observe(dt)
        self._last_ts.set(time.time())
        if self._flops_per_rank:
            self._child("model_flops").inc(self._flops_per_rank)
            if dt > 0 and self._peak:
                self._child("mfu").set(self._flops_per_rank / dt / self._peak)
        if persist_s is not None:
            self._checkpoint.observe(persist_s + (_number(record, "checkpoint_time_s") or 0.0))
        if self.job_level:
            self._observe_job(record)
        self._read_memory()
        if now - self._last_gpu >= GPU_SAMPLE_EVERY_S:
            self._sample_gpu()

    def _observe_job(self, record: dict[str, Any]) -> None:
        self._state.state("running")
        tokens, samples = _number(record, "tokens"), _number(record, "samples")
        if tokens is not None:
            self._tokens.inc(tokens)
            samples = samples if samples is not None else tokens / self._seq_len
        if samples is not None:
            self._samples.inc(samples)
        for key, attr in (("loss", "loss"), ("lr", "learning_rate"), ("grad_norm", "grad_norm"), ("step", "train_step")):
            value = _number(record, key)
            if value is not None:
                self._child(attr).set(value)

    def _child(self, attr: str) -> Any:
        """This rank's series of metric ``attr`` of OrchMetrics (its GPU's, for a gpu_ one),
        created on first use."""
        child = self._children.get(attr)
        if child is None:
            ids = (*self._ids, str(self._gpu.index)) if attr.startswith("gpu_") and self._gpu is not None else self._ids
            child = self._children[attr] = getattr(self._m, attr).labels(*ids)
        return child

    def _read_memory(self) -> None:
        if self._memory is None:
            return
        allocated, peak = self._memory.read()
        self._child("memory_allocated").set(allocated)
        self._child("memory_peak").set(peak)
        if self._planned_total:
            self._child("memory_ratio").set(peak / self._planned_total)

    def _sample_gpu(self) -> None:
        self._last_gpu = time.perf_counter()
        if self._gpu is None:
            return
        s = self._gpu.sample()
        for value, attr in ((s.memory_used_bytes, "gpu_memory_used"), (s.memory_total_bytes, "gpu_memory_total"),
                            (s.utilization_ratio, "gpu_utilization"), (s.power_watts, "gpu_power"),
                            (s.temperature_celsius, "gpu_temperature")):
            if value is not None:  # None: this GPU or driver does not report it
                self._child(attr).set(value)
        if s.energy_joules is not None:
            energy = self._child("gpu_energy")  # since this rank started: 0 at the first sample
            if self._energy_seen is not None and s.energy_joules >= self._energy_seen:
                energy.inc(s.energy_joules - self._energy_seen)
            self._energy_seen = s.energy_joules
        if s.xid_errors is not None:
            self._child("gpu_xid_errors").inc(s.xid_errors)

    def finish(self, state: str) -> None:
        """The training function returned ('succeeded') or raised ('failed')."""
        if self.job_level:
            self._state.state(state)

    @property
    def registry(self) -> CollectorRegistry:
        return self._m.registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format, as a scrape gets it."""
    return generate_latest(registry)


# ---------------------------------------------------------------------------------------------
# Serving: one endpoint per node


class NodeCollector:
    """A node's endpoint: this process's metrics merged, family by family, with those of the other
    local ranks (fetched from the private URLs announced in ``peers_dir`` at each scrape)."""

    def __init__(self, own: CollectorRegistry, peers_dir: Path, timeout_s: float = 2.0) -> None:
        self.own, self.peers_dir, self.timeout_s = own, peers_dir, timeout_s

    def peer_urls(self) -> list[str]:
        try:
            return sorted(p.read_text().strip() for p in self.peers_dir.glob("rank*.url"))
        except OSError:
            return []

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for family in self.own.collect():
            families[family.name] = family
        for url in self.peer_urls():
            try:
                with urllib.request.urlopen(url, timeout=self.timeout_s) as response:  # noqa: S310 (a loopback URL we wrote)
                    text = response.read().decode()
                parsed = list(text_string_to_metric_families(text))
            except (OSError, ValueError):  # a rank that has just ended or not yet started: missing from this scrape
                continue
            for family in parsed:
                if family.name in families:
                    families[family.name].samples.extend(family.samples)
                else:
                    families[family.name] = family
        yield from families.values()


PEERS_DIR = "orch_metrics_peers"  # in the run directory: <node>/rank<r>.url, loopback URLs of the local ranks


def peers_dir(job: JobSpec, node_rank: int) -> Path:
    """Where the local ranks of one node announce their private URLs to the node's endpoint."""
    return Path(job.run_dir) / PEERS_DIR / f"node{node_rank}"


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def target_path(storage: Path, job_name: str, node_rank: int) -> Path:
    return storage / TARGETS_DIR / f"{job_name}.node{node_rank}.json"


def write_target(path: Path, address: str, labels: dict[str, str]) -> None:
    """A Prometheus file_sd file (a list of target groups) with one target."""
    _write_atomically(path, json.dumps([{"targets": [address], "labels": labels}], indent=1) + "\n")


def advertised(host: str, node_ip: str) -> str:
    """The address Prometheus reaches a server bound to ``host`` at: the node's IP for a wildcard."""
    host = node_ip if host in ("", "0.0.0.0", "::") else host
    return f"[{host}]" if ":" in host else host


def _serve(registry: CollectorRegistry, host: str, port: int):  # type: ignore[no-untyped-def]
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server


@dataclass
class WorkerMetrics:
    """One rank's metrics: the observer, its HTTP server and the file announcing it."""

    observer: StepObserver
    _servers: list[Any] = field(default_factory=list)
    _files: list[Path] = field(default_factory=list)
    _gpu: GpuProbe | None = None
    address: str | None = None  # the node endpoint (local rank 0), host:port

    def observe(self, record: dict[str, Any], persist_s: float | None = None) -> None:
        self.observer.observe(record, persist_s)

    def close(self, state: str | None = None) -> None:
        """Record the final state, stop serving and withdraw the announcement files."""
        if state is not None:
            self.observer.finish(state)
        for path in self._files:
            path.unlink(missing_ok=True)
            if path.suffix == ".url":  # a peer's announcement: its node and job directories go when empty
                for directory in (path.parent, path.parent.parent):
                    try:
                        directory.rmdir()
                    except OSError:
                        break
        for server in self._servers:
            server.shutdown()
            server.server_close()
        if self._gpu is not None:
            self._gpu.close()


def start_worker_metrics(job: JobSpec, *, rank: int, local_rank: int, node_rank: int, world_size: int, restarts: int,
                         cuda_device: int | None, node_ip: str) -> WorkerMetrics:
    """Observer and server of one rank. ``cuda_device``: the rank's CUDA device index, None on CPU."""
    metrics = OrchMetrics()
    gpu = GpuProbe.open(visible_device(cuda_device)) if cuda_device is not None else None
    memory: MemoryProbe = CudaMemory() if cuda_device is not None else HostMemory()
    observer = StepObserver(metrics, job, rank=rank, world_size=world_size, node=socket.gethostname(),
                            restarts=restarts, memory=memory, gpu=gpu)
    peers = peers_dir(job, node_rank)
    if local_rank != 0:  # a private loopback server, announced to the node's endpoint
        server = _serve(metrics.registry, "127.0.0.1", 0)
        announcement = peers / f"rank{rank}.url"
        _write_atomically(announcement, f"http://127.0.0.1:{server.server_port}/metrics\n")
        return WorkerMetrics(observer, [server], [announcement], gpu)
    node_registry = CollectorRegistry(auto_describe=False)
    node_registry.register(NodeCollector(metrics.registry, peers))
    server = None
    for port in dict.fromkeys((job.metrics_port, 0)):  # the port asked for, else an ephemeral one
        try:
            server = _serve(node_registry, job.metrics_host, port)
            break
        except OSError as exc:  # monitoring must not stop training
            warnings.warn(f"orch metrics: cannot listen on {job.metrics_host}:{port} ({exc})")
    if server is None:
        return WorkerMetrics(observer, [], [], gpu)
    address = f"{advertised(job.metrics_host, node_ip)}:{server.server_port}"
    target = target_path(Path(job.run_dir).parent, job.name, node_rank)
    write_target(target, address, {"job": job.name, "node": socket.gethostname()})
    return WorkerMetrics(observer, [server], [target], gpu, address=address)
