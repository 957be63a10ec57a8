"""The built-in training function: build the model, hand it to DeepSpeed with the plan's config,
train, checkpoint, resume. The one module that imports deepspeed (inside functions: the driver
never loads it).

It has the signature of any ``--entrypoint``: ``train(plan, ds_config, ctx)`` (launch/context.py).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from launch.context import WorkerContext
from launch.synthetic import batch


def build_model(hf_config: dict[str, Any]):  # type: ignore[no-untyped-def]
    """A randomly initialised causal LM in fp32; DeepSpeed casts it to bf16/fp16 per its config."""
    import torch
    import transformers

    cfg = {k: v for k, v in hf_config.items() if k not in ("dtype", "torch_dtype", "architectures")}
    config = transformers.AutoConfig.for_model(**cfg)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def init_distributed() -> None:
    """DeepSpeed's view of the process group torch.distributed already has (Ray Train or a
    launcher set it up); DS_ACCELERATOR=cpu must be set before this first import on gloo."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=dist.get_backend())


def initialize(model, ds_config: dict[str, Any]):  # type: ignore[no-untyped-def]
    """``deepspeed.initialize`` with the plan's config; the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return engine


def _resume(engine, ctx: WorkerContext) -> int:  # type: ignore[no-untyped-def]
    """Load the latest checkpoint into the engine; the step to continue from (0 on a fresh start)."""
    with ctx.latest_checkpoint() as path:
        if path is None:
            return 0
        _, client_state = engine.load_checkpoint(path)
    return int((client_state or {}).get("step", 0))


def _report(engine, ctx: WorkerContext, metrics: dict[str, Any], save: bool) -> None:  # type: ignore[no-untyped-def]
    """Every rank reports each step; at checkpoint steps each rank first saves its DeepSpeed
    shards into a local directory, which the context persists into the job's storage."""
    if not save:
        ctx.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="orch-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=f"step{metrics['step']}", client_state={"step": metrics["step"]})
        ctx.report(metrics, tmp)


def train(plan: dict[str, Any], ds_config: dict[str, Any], ctx: WorkerContext) -> None:
    """Train ``ctx.job``'s model for ``ctx.job.steps`` optimizer steps in total (across restarts)."""
    import torch
    import torch.distributed as dist

    job = ctx.job
    init_distributed()
    torch.manual_seed(job.seed)
    engine = initialize(build_model(job.hf_config), ds_config)
    start = _resume(engine, ctx)
    mb, ga = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    tokens_per_step = ds_config["train_batch_size"] * job.seq_len
    vocab = int(job.hf_config["vocab_size"])
    for step in range(start + 1, job.steps + 1):
        t0 = time.perf_counter()
        total = torch.zeros(())
        for micro in range(ga):
            x = batch(step * ga + micro, ctx.rank, mb, job.seq_len, vocab, seed=job.seed)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach().float()
        mean = total / ga
        dist.all_reduce(mean)
        metrics = {
            "step": step,
            "loss": float(mean) / ctx.world_size,
            "tokens": tokens_per_step,
            "step_time_s": time.perf_counter() - t0,
            "lr": float(engine.get_lr()[0]),
        }
        save = job.checkpoint_every > 0 and (step % job.checkpoint_every == 0 or step == job.steps)
        _report(engine, ctx, metrics, save)
