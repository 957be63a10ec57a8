"""What the metrics path (launch/metrics.py) adds to a training step, against the measured step
time of the debug model as one launched worker runs it (the plan's micro-batch, one thread).

Per step, on the training thread: observing one step record (histogram, counters, gauges, MFU)
and reading this rank's memory (RSS on CPU). Per scrape, on the exporter's thread: rendering the
rank's registry and, at a node's endpoint, fetching and merging the other local ranks' over
loopback. The headline charges one scrape of the registry to every step (Prometheus scrapes every
15 s by default, so this over-counts); the whole node scrape is also shown, amortised over a
scrape interval. Issue 6's bar: under 1% of the step time. Prints figures; never fails a build."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch import metrics as M  # noqa: E402
from launch.job import JobSpec  # noqa: E402
from orchestrator.inputs import load_model, resolve_cluster  # noqa: E402
from orchestrator.launch_plan import LaunchOptions, build_job, choose_plan  # noqa: E402
from planner.search.pinned import Pinned  # noqa: E402
from planner.specs.training import TrainingSpec  # noqa: E402

SEQ_LEN = 64


def debug_job(tmp: Path) -> tuple[JobSpec, int]:
    """The job `orch launch --model debug --cluster cpu-2 --seq-len 64` runs, with its plan's values."""
    model, cluster = load_model("debug"), resolve_cluster("cpu-2", None, None, None)
    training = TrainingSpec(seq_len=SEQ_LEN, global_batch=0)
    plan = choose_plan(model, cluster, training, Pinned())
    opts = LaunchOptions(steps=100, name=f"bench-{uuid.uuid4().hex[:6]}", checkpoint_dir=tmp)
    job, _ = build_job(model, training, plan, opts, cluster=cluster)
    return job, plan.micro_batch


def step_time_s(job: JobSpec, micro_batch: int, steps: int = 8) -> float:
    """Median wall time of a forward, backward and AdamW step of the debug model in bf16 (as the
    job's DeepSpeed config trains it) on one thread; a launched step adds ZeRO and the all-reduce."""
    import torch

    from launch.trainer import build_model

    torch.set_num_threads(1)  # a launched CPU worker has one core
    torch.manual_seed(0)
    model = build_model(job.hf_config).to(torch.bfloat16 if job.ds_config.get("bf16", {}).get("enabled") else torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, int(job.hf_config["vocab_size"]), (micro_batch, job.seq_len))
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def per_call_s(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        job, micro_batch = debug_job(Path(tmp))
        step = step_time_s(job, micro_batch)
        common = dict(node_rank=0, world_size=2, restarts=0, cuda_device=None, node_ip="127.0.0.1")
        peer = M.start_worker_metrics(job, rank=1, local_rank=1, **common)
        node = M.start_worker_metrics(job, rank=0, local_rank=0, **common)
        try:
            record = {"step": 1, "loss": 2.0, "tokens": 4096, "step_time_s": step, "lr": 1e-4, "grad_norm": 1.0}
            observe = per_call_s(lambda: node.observe(record), 5000)
            peer.observe(record)
            registry = node.observer.registry
            render = per_call_s(lambda: M.exposition(registry), 500)
            url = f"http://{node.address}/metrics"
            scrape_bytes = len(urllib.request.urlopen(url).read())
            node_scrape = per_call_s(lambda: urllib.request.urlopen(url).read(), 200)
        finally:
            peer.close()
            node.close()
    per_step = observe + render
    print(f"debug model step (mb {micro_batch} x {SEQ_LEN} tokens, bf16, 1 thread): {step * 1e3:.1f} ms")
    print(f"observe one step record + memory gauges:        {observe * 1e6:8.1f} us  {observe / step:8.4%} of a step")
    print(f"one scrape of a rank's registry (text):          {render * 1e6:8.1f} us  {render / step:8.4%}")
    print(f"metrics path per step (observe + one scrape):   {per_step * 1e6:8.1f} us  {per_step / step:8.4%}"
          f"  -> issue 6 bar (< 1%) {'met' if per_step / step < 0.01 else 'NOT met'}")
    print(f"node endpoint scrape over HTTP, merging a 2nd rank ({scrape_bytes} B): {node_scrape * 1e3:.1f} ms;"
          f" amortised: {node_scrape / 15:.4%} of the time at a 15 s scrape interval, {node_scrape / 1:.4%} at 1 s")

if __name__ == "__main__":
    main()
