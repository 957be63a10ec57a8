"""The built-in training function: build the model, hand it to DeepSpeed with the plan's config,
train, checkpoint, resume. The one module that imports deepspeed (inside functions: the driver
never loads it).

Data parallelism (ZeRO 0-3) and tensor parallelism (DeepSpeed AutoTP, ``tp > 1``) train the
Hugging Face model through the plain engine; pipeline parallelism (``pp > 1``) trains it cut into
layers (launch/pipeline_model.py) through DeepSpeed's PipelineModule and PipelineEngine (ZeRO 0-1).
AutoTP and the pipeline do not combine: AutoTP builds its (data, tensor) groups over the whole
world, across pipeline stages (deepspeed/runtime/engine.py ``_configure_tensor_parallel_states``),
so the launcher refuses ``tp > 1`` with ``pp > 1`` (orchestrator/launching.py ``choose_plan``).

It has the signature of any ``--entrypoint``: ``train(plan, ds_config, ctx)`` (launch/context.py).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from launch import data, synthetic
from launch.context import WorkerContext
from launch.job import JobSpec


def batch_source(job: JobSpec):  # type: ignore[no-untyped-def]
    """``fn(index, dp_rank, micro_batch) -> (input_ids, labels)``, each [micro_batch, seq_len]:
    windows of a text dataset or synthetic tokens (labels = the tokens), or padded / packed
    instruction examples (labels -100 outside the completions); deterministic in (seed, index, dp_rank)."""
    if job.dataset is None:
        vocab = int(job.hf_config["vocab_size"])
        return _same_labels(lambda i, r, mb: synthetic.batch(i, r, mb, job.seq_len, vocab, seed=job.seed))
    kind, rows = data.read_records(Path(job.dataset))
    tok = data.load_tokenizer(job.tokenizer)
    if kind == "text":
        tokens = data.load_tokens(rows, tok)
        return _same_labels(lambda i, r, mb: data.window_batch(tokens, i, r, mb, job.seq_len, seed=job.seed))
    sequences = data.load_sequences(kind, rows, tok, job.seq_len, job.pack)
    return lambda i, r, mb: data.sequence_batch(sequences, i, r, mb, seed=job.seed)


def _same_labels(fn):  # type: ignore[no-untyped-def]
    def batch(i: int, r: int, mb: int):  # type: ignore[no-untyped-def]
        x = fn(i, r, mb)
        return x, x

    return batch


def build_model(hf_config: dict[str, Any], pretrained_dir: str | None = None, finetune: dict[str, Any] | None = None,
                recompute: str = "none"):  # type: ignore[no-untyped-def]
    """The job's causal LM (launch/models.py): fp32 for full training (DeepSpeed casts it per its
    config), the fine-tuning method's model otherwise."""
    from launch import models

    return models.build(hf_config, pretrained_dir, finetune, recompute)


def init_distributed() -> None:
    """DeepSpeed's view of the process group torch.distributed already has (Ray Train or a
    launcher set it up); DS_ACCELERATOR=cpu must be set before this first import on gloo."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=dist.get_backend())
    _unlink_shm_buffers()


def _unlink_shm_buffers() -> None:
    """DeepSpeed's CPU shared-memory all-reduce (used when LOCAL_SIZE equals the world size, as
    DeepSpeed's launcher and ``orch profile`` set it) creates one /dev/shm segment per rank and
    never unlinks it (deepspeed/ops/csrc/cpu/comm/shm.cpp ``shm_initialize``): each run would leak
    tens of MB of RAM until reboot. Every rank has mapped every segment when initialisation
    returns, so after a barrier each rank unlinks its own name; the mappings live on until the
    processes exit, however they exit."""
    import torch.distributed as dist

    name = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    if not name.exists():
        return
    dist.barrier()
    name.unlink(missing_ok=True)


def initialize(model, ds_config: dict[str, Any], tp: int = 1, optimizer: str | None = None, lr: float = 3e-4):  # type: ignore[no-untyped-def]
    """``deepspeed.initialize`` with the plan's config over the parameters that train (a frozen
    fine-tuning base gets no gradients and no optimizer states); the engine. With ``tp > 1``
    DeepSpeed's AutoTP shards the model's linear layers over groups of ``tp`` consecutive ranks at
    initialisation (``tensor_parallel.autotp_size`` in the config). ``optimizer``: a bitsandbytes
    optimizer DeepSpeed has no name for, passed as a client optimizer."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    mpu = _tensor_parallel_groups(tp) if tp > 1 else None
    client = _client_optimizer(optimizer, params, lr) if "optimizer" not in ds_config else None
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config, mpu=mpu, optimizer=client)
    return engine


def _client_optimizer(name: str | None, params: list[Any], lr: float):  # type: ignore[no-untyped-def]
    """bitsandbytes' 8-bit AdamW (Dettmers et al. 2022) or paged AdamW (Dettmers et al. 2023), by
    orch's optimizer name (adamw-8bit; ``paged-adamw``, ``paged-adamw-8bit`` with --paged-optimizer)."""
    import bitsandbytes as bnb

    classes = {"adamw-8bit": bnb.optim.AdamW8bit, "paged-adamw": bnb.optim.PagedAdamW,
               "paged-adamw-8bit": bnb.optim.PagedAdamW8bit}
    if name not in classes:
        raise ValueError(f"no DeepSpeed optimizer in the config and no client optimizer named {name!r}")
    return classes[name](params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def _tensor_parallel_groups(tp: int):  # type: ignore[no-untyped-def]
    """DeepSpeed's own (data, tensor) process groups, made before ``deepspeed.initialize``.

    The engine makes the same groups itself when AutoTP is on (deepspeed/runtime/engine.py
    ``_configure_tensor_parallel_states`` calls ``groups._init_tp_mesh_device``, which returns at
    once if they exist), but only after ``DeepSpeedConfig`` has checked ``train_batch_size``
    against the world size (deepspeed/__init__.py ``initialize``; deepspeed/runtime/config.py
    ``_batch_assertion``): without an mpu it counts every rank, tensor-parallel ones included.
    Handing the groups in as the mpu makes it count the data-parallel ranks only, as our
    config's ``train_batch_size`` (launch/deepspeed_config.py) does."""
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=tp)
    return groups


def initialize_pipeline(model, stages: int, ds_config: dict[str, Any]):  # type: ignore[no-untyped-def]
    """The model cut into ``launch.pipeline_model`` layers, split over ``stages`` pipeline stages
    by DeepSpeed's PipelineModule (balanced by parameter count), and its PipelineEngine."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    from launch import pipeline_model

    module = PipelineModule(
        layers=pipeline_model.pipeline_layers(model),
        num_stages=stages,
        loss_fn=pipeline_model.CausalLMLoss(model),
        partition_method=ds_config.get("pipeline", {}).get("partition", "parameters"),
        # With activation checkpointing (the config's pipeline.activation_checkpoint_interval,
        # applied by deepspeed/runtime/pipe/engine.py) checkpoint decoder layers only: reentrant
        # checkpointing of the embedding, whose input (token ids) needs no gradient, would cut
        # the graph (deepspeed/runtime/pipe/module.py ``_is_checkpointable``).
        checkpointable_layers=[pipeline_model.DecoderLayer.__name__],
    )
    # Gradient clipping without ZeRO (fp32) sums each parameter's norm over the model-parallel
    # group only where that rank is 0 or the parameter is marked model-parallel
    # (deepspeed/runtime/utils.py ``clip_grad_norm_``); a pipeline's model-parallel rank is its
    # stage, so later stages' gradients would be left out of the global norm. Each stage holds
    # its own parameters, so every one of them counts. The mark changes nothing else here: the
    # other norms test the tensor-parallel rank, which is 0 in these pipelines
    # (deepspeed/runtime/bf16_optimizer.py, zero/stage_1_and_2.py).
    for param in module.parameters():
        param.model_parallel = True
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=list(module.parameters()), config=ds_config)
    return engine


def _resume(engine, ctx: WorkerContext, frozen_excluded: bool) -> int:  # type: ignore[no-untyped-def]
    """Load the latest checkpoint into the engine; the step to continue from (0 on a fresh start).
    A fine-tuning checkpoint holds the trainable parameters only: the frozen base comes from the
    model as built, so the module's state is loaded non-strictly."""
    with ctx.latest_checkpoint() as path:
        if path is None:
            return 0
        _, client_state = engine.load_checkpoint(path, load_module_strict=not frozen_excluded)
    return int((client_state or {}).get("step", 0))


def _report(engine, ctx: WorkerContext, metrics: dict[str, Any], save: bool, method: str) -> None:  # type: ignore[no-untyped-def]
    """Every rank reports each step; at checkpoint steps each rank first saves its DeepSpeed
    shards into a local directory, which the context persists into the job's storage. A
    fine-tuning checkpoint leaves the frozen base out (``exclude_frozen_parameters``: the trainable
    parameters and their optimizer states only) and carries the trained weights in the form a user
    loads (launch/models.py ``save_trained``), written by rank 0."""
    if not save:
        ctx.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="orch-ckpt-") as tmp:
        started = time.perf_counter()
        engine.save_checkpoint(tmp, tag=f"step{metrics['step']}", client_state={"step": metrics["step"]},
                               exclude_frozen_parameters=method != "full")
        if method != "full":
            _save_trained(engine, tmp, method, ctx.rank)
        ctx.report({**metrics, "checkpoint_time_s": time.perf_counter() - started}, tmp)


def _save_trained(engine, directory: str, method: str, rank: int) -> None:  # type: ignore[no-untyped-def]
    """Rank 0 writes the trained weights; under ZeRO-3 every rank first gathers them
    (deepspeed.zero.GatheredParameters is collective)."""
    import contextlib

    import deepspeed

    from launch import models

    model = engine.module
    gather = (deepspeed.zero.GatheredParameters(models.trainable(model), modifier_rank=None)
              if engine.zero_optimization_stage() == 3 else contextlib.nullcontext())
    with gather:
        if rank == 0:
            models.save_trained(model, directory, method)


def _grad_norm(engine) -> float | None:  # type: ignore[no-untyped-def]
    """DeepSpeed's global gradient norm of the last step (a float or a tensor; None before one)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def _data_parallel_rank(engine) -> int:  # type: ignore[no-untyped-def]
    """This rank's index in its data-parallel group, which selects its batches: tensor-parallel
    ranks of one group, and the stages of one pipeline, see the same data (AutoTP checks this on
    its first forward, deepspeed/runtime/engine.py ``check_dataloader_inputs_same_across_ranks``)."""
    import torch.distributed as dist

    return dist.get_rank(group=engine.data_parallel_group)


def _train_step(engine, micro_batches) -> float:  # type: ignore[no-untyped-def]
    """One optimizer step of the plain (data- and tensor-parallel) engine over (input_ids, labels)
    micro-batches; the loss averaged over the micro-batches and the data-parallel group.
    ``engine.step()`` after each micro-batch steps the optimizer at the accumulation boundary only."""
    import torch
    import torch.distributed as dist

    total = torch.zeros(())
    for x, labels in micro_batches:
        loss = engine(input_ids=x.to(engine.device), labels=labels.to(engine.device)).loss
        engine.backward(loss)
        engine.step()
        total += loss.detach().float().cpu()
    mean = total / len(micro_batches)
    dist.all_reduce(mean, group=engine.data_parallel_group)
    return float(mean) / engine.dp_world_size


def _pipeline_step(engine, micro_batches) -> float:  # type: ignore[no-untyped-def]
    """One optimizer step of the pipeline engine: it feeds inputs to the first stage and labels to
    the last (other stages ignore the iterator) and returns the loss averaged over the
    micro-batches and the data-parallel group, on every stage (deepspeed/runtime/pipe/engine.py
    ``train_batch``, ``_aggregate_total_loss``)."""
    return float(engine.train_batch(iter(micro_batches)))


def setup_engine(job: JobSpec):  # type: ignore[no-untyped-def]
    """The job's model in the engine of its plan, and the step function: what every launched
    worker (launch/worker.py) and every ``orch profile`` rank (launch/profile_worker.py) trains."""
    import torch

    plan, ft = job.plan, job.finetune
    torch.manual_seed(job.seed)
    model = build_model(job.hf_config, job.pretrained_dir, ft, "none" if int(plan.get("pp", 1)) > 1 else plan.get("recompute", "none"))
    if int(plan.get("pp", 1)) > 1:
        return initialize_pipeline(model, int(plan["pp"]), job.ds_config), _pipeline_step
    return initialize(model, job.ds_config, tp=int(plan.get("tp", 1)), optimizer=job.client_optimizer, lr=job.lr), _train_step


def train(plan: dict[str, Any], ds_config: dict[str, Any], ctx: WorkerContext) -> None:
    """Train ``ctx.job``'s model for ``ctx.job.steps`` optimizer steps in total (across restarts)."""
    job = ctx.job
    init_distributed()
    engine, step_fn = setup_engine(job)
    method = (job.finetune or {}).get("method", "full")
    batch, data_rank = batch_source(job), _data_parallel_rank(engine)
    start = _resume(engine, ctx, frozen_excluded=method != "full")
    mb, ga = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    tokens_per_step = ds_config["train_batch_size"] * job.seq_len
    for step in range(start + 1, job.steps + 1):
        t0 = time.perf_counter()
        loss = step_fn(engine, [batch(step * ga + micro, data_rank, mb) for micro in range(ga)])
        metrics = {
            "step": step,
            "loss": loss,
            "tokens": tokens_per_step,
            "step_time_s": time.perf_counter() - t0,
            "lr": float(engine.get_lr()[0]),
            "grad_norm": _grad_norm(engine),
        }
        save = job.checkpoint_every > 0 and (step % job.checkpoint_every == 0 or step == job.steps)
        _report(engine, ctx, metrics, save, method)
