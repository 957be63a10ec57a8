"""The Ray Train worker function: builds the model, hands it to DeepSpeed with the plan's config,
trains on synthetic tokens, checkpoints through Ray Train and resumes from its latest checkpoint.

The one module that imports deepspeed, and only inside the worker function (the driver never loads
it). Rank 0 appends one JSON record per optimizer step to the run's step file, which the driver
tails for its progress line and summary.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from launch.job import ATTEMPTS_FILE, STEPS_FILE, JobSpec
from launch.synthetic import batch


def _append(path: str | Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _count_attempt(run_dir: Path) -> int:
    """Restarts so far: rank 0 adds one line per start of the worker group."""
    marker = run_dir / ATTEMPTS_FILE
    with open(marker, "a") as fh:
        fh.write(f"{time.time()}\n")
    return len(marker.read_text().splitlines()) - 1


def _build_model(hf_config: dict[str, Any]):  # type: ignore[no-untyped-def]
    """A randomly initialised causal LM in fp32; DeepSpeed casts it to bf16/fp16 per its config."""
    import torch
    import transformers

    cfg = {k: v for k, v in hf_config.items() if k not in ("dtype", "torch_dtype", "architectures")}
    config = transformers.AutoConfig.for_model(**cfg)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _resume(engine) -> int:  # type: ignore[no-untyped-def]
    """Load the latest Ray Train checkpoint into the engine; the step to continue from."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as path:
        _, client_state = engine.load_checkpoint(path)
    return int((client_state or {}).get("step", 0))


def _report(engine, metrics: dict[str, Any], save: bool) -> None:  # type: ignore[no-untyped-def]
    """Every rank reports each step; at checkpoint steps each rank saves its DeepSpeed shards
    into a local directory that Ray Train merges into one checkpoint in the storage path."""
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="orch-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=f"step{metrics['step']}", client_state={"step": metrics["step"]})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _quiet() -> None:
    """No INFO line per report from Ray Train's worker context (a module logger named by its
    file), and no torch deprecation warning per collective."""
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.")
    try:
        from ray.train.v2._internal.execution import context

        context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # a Ray without that module: keep its logging
        pass


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: torch.distributed (gloo or nccl) is already set up."""
    import ray.train
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

    job = JobSpec(**config)
    _quiet()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())

    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # reuses Ray's process group
    torch.manual_seed(job.seed)
    model = _build_model(job.hf_config)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=job.ds_config)
    start = _resume(engine)
    run_dir = Path(job.run_dir)
    restarts = _count_attempt(run_dir) if rank == 0 else 0

    ds = job.ds_config
    mb, ga = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    tokens_per_step = ds["train_batch_size"] * job.seq_len
    vocab = int(job.hf_config["vocab_size"])
    for step in range(start + 1, job.steps + 1):
        t0 = time.perf_counter()
        total = torch.zeros(())
        for micro in range(ga):
            x = batch(step * ga + micro, rank, mb, job.seq_len, vocab, seed=job.seed)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach().float()
        mean = total / ga
        dist.all_reduce(mean)
        metrics = {
            "step": step,
            "loss": float(mean) / world,
            "tokens": tokens_per_step,
            "step_time_s": time.perf_counter() - t0,
            "restarts": restarts,
        }
        if rank == 0:
            _append(run_dir / STEPS_FILE, metrics)
            if job.log_jsonl:
                _append(job.log_jsonl, metrics)
        save = job.checkpoint_every > 0 and (step % job.checkpoint_every == 0 or step == job.steps)
        _report(engine, metrics, save)
        if job.fail_at_step and step == job.fail_at_step and restarts == 0 and rank == 0:
            os._exit(1)  # test hook: a worker dies mid-run

