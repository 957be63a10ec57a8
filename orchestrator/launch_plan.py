"""What `orch launch` runs, decided before Ray starts (pure apart from reading the dataset to check
it): the plan among those this launcher can run on the cluster, and the JobSpec every worker
receives. Everything here refuses bad input with a PlanInputError (exit 2)."""

from __future__ import annotations

import ipaddress
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch import data
from launch.deepspeed_config import deepspeed_config
from launch.job import JobSpec, job_ds_config
from orchestrator.planning import evaluate_plan, run_plan
from planner.errors import PlanInputError
from planner.finetune.methods import FinetuneSpec, trace_spec
from planner.memory.evaluate import buffers_for
from planner.specs.hardware import ClusterSpec
from launch.families import AUTOTP_FAMILIES, PIPELINE_FAMILIES
from planner.structure.model import ModelSpec
from planner.search.pinned import Pinned
from planner.search.engine import CAPABILITIES
from planner.specs.training import ParallelPlan, TrainingSpec

DEFAULT_STORAGE = Path.home() / ".orch" / "runs"
CPU_PRECISIONS = ("bf16", "fp32")  # DeepSpeed's CPU accelerator rejects fp16 ("not supported on your device")


@dataclass(frozen=True)
class LaunchOptions:
    """Run options that are not part of the plan."""

    steps: int
    lr: float = 3e-4
    name: str | None = None
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    max_failures: int = 0
    address: str | None = None
    log_jsonl: Path | None = None
    seed: int = 0
    fail_at_step: int = 0
    entrypoint: str | None = None  # 'package.module:function'; None = the built-in trainer
    detach: bool = False  # submit through the Ray Jobs API and return
    dataset: Path | None = None  # local .txt/.jsonl; None = synthetic tokens
    tokenizer: Path | None = None  # local tokenizer directory; None = the model directory's, else bytes
    model_source: str | None = None  # what --model named (a directory with weights is loaded, not initialised)
    pack: bool = False  # instruction datasets: pack examples into sequences (False: pad each)
    verbose: bool = False  # Ray's, DeepSpeed's and the workers' output live on the console too
    preflight: bool = False  # profile the plan on this machine first; move to a ranked plan that fits as measured
    metrics_host: str = "127.0.0.1"  # each node's metrics endpoint binds here (0.0.0.0: every interface)
    metrics_port: int = 0  # port of each node's metrics endpoint; 0 = ephemeral


# Model families the built-in trainer (launch/trainer.py) runs each model-parallel dimension for.
# AutoTP shards Llama, Mistral and Qwen2 models; DeepSpeed 0.19 refuses GPT-2 ("AutoTP not supported
# for model", deepspeed/module_inject/auto_tp.py tp_parser) and Mixtral (its Hugging Face tp_plan's
# MoE styles, deepspeed/runtime/engine.py _apply_autotp_partitioning). The pipeline layers cut
# the Llama layout with untied embeddings (launch/pipeline_model.py).


def choose_plan(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, pinned: Pinned,
                finetune: FinetuneSpec | None = None) -> ParallelPlan:
    """The planner's best plan among those the built-in trainer runs, on gloo (CPU) as on nccl:
    data parallelism with ZeRO 0-3, tensor parallelism through DeepSpeed AutoTP (ZeRO 0-3),
    pipeline parallelism through DeepSpeed's PipelineModule (ZeRO 0-1; 1 only in bf16, whose
    checkpoints without ZeRO do not load back), not tp and pp together (the search's "deepspeed"
    capabilities; each measured on gloo, tests/launch/test_launch_tp_pp.py). On gloo, offload is
    none unless pinned: a CPU worker's "device" memory is host memory already."""
    if cluster.backend == "gloo" and training.precision not in CPU_PRECISIONS:
        raise PlanInputError(
            f"--precision {training.precision}: DeepSpeed on CPU trains in bf16 or fp32 only",
            "use --precision bf16 or --precision fp32 on a CPU cluster",
        )
    pinned = _runnable_pins(model, training, pinned)
    if finetune is not None and finetune.method != "full":
        pinned = _finetune_pins(finetune, training, pinned)
    if cluster.backend == "gloo" and pinned.offload is None:
        pinned = pinned.model_copy(update={"offload": "none"})
    if finetune is not None and finetune.method == "qlora" and pinned.zero_stage is None:
        # ZeRO-3 is not run for QLoRA (_finetune_pins): the fastest of the stages that are.
        results = [run_plan(model, cluster, training, pinned.model_copy(update={"zero_stage": z}), top=1, finetune=finetune)
                   for z in QLORA_ZERO_STAGES]
        fits = [r for r in results if r.best is not None]
        result = max(fits, key=lambda r: r.best.speed.tokens_per_s) if fits else results[-1]
    else:
        result = run_plan(model, cluster, training, pinned, top=1, finetune=finetune)
    if result.best is None:
        closest = result.search.closest
        need = f" (the smallest plan, {closest.plan.describe()}, needs {closest.memory.total / 2**30:,.1f} GiB per worker" \
               f" of {cluster.gpu.memory_bytes / 2**30:,.1f})" if closest is not None else ""
        hint = result.suggestions[0] if result.suggestions else "a larger cluster or a smaller model ('orch plan' shows what fits)"
        raise PlanInputError(f"no plan of model '{model.name}' fits cluster '{cluster.name}'{need}", f"use {hint}")
    return result.best.plan


def _runnable_pins(model: ModelSpec, training: TrainingSpec, pinned: Pinned) -> Pinned:
    """The pins with each dimension the trainer cannot run for this model set to 1 (so the search
    never chooses it); a pinned one, or a pinned combination DeepSpeed cannot run, is refused."""
    tied = bool(model.hf_config and model.hf_config.get("tie_word_embeddings", False))
    cannot = {  # dimension -> why the trainer cannot run it for this model (None: it can)
        "tp": None if model.family in AUTOTP_FAMILIES else f"DeepSpeed AutoTP does not shard {model.family} models",
        "pp": None if model.family in PIPELINE_FAMILIES and not tied
        else f"orch's pipeline layers cut Llama-like models with untied embeddings, not this {model.family} model",
        "cp": "orch launch does not run context parallelism",
        "ep": "orch launch does not run expert parallelism",
        "interleave": "DeepSpeed's pipeline engine has no interleaved schedule",
    }
    for dim, why in cannot.items():
        value = getattr(pinned, dim)
        if why is not None and value is not None and value > 1:
            raise PlanInputError(f"--{dim} {value}: {why}", f"drop --{dim} (or pin it to 1)")
    if pinned.sp:
        raise PlanInputError("--sp: DeepSpeed AutoTP has no sequence parallelism", "drop --sp")
    if pinned.recompute == "selective":
        raise PlanInputError("--recompute selective: that is Megatron's attention-only recompute; transformers "
                             "models under DeepSpeed recompute whole decoder layers", "use --recompute full (or none)")
    tp, pp, zero, caps = pinned.tp or 1, pinned.pp or 1, pinned.zero_stage, CAPABILITIES["deepspeed"]
    if tp > 1 and pp > 1:
        raise PlanInputError(f"--tp {tp} with --pp {pp}: DeepSpeed AutoTP and PipelineModule do not combine",
                             "pin --tp or --pp, not both above 1")
    if pp > 1 and zero is not None and zero not in caps.zero_with_pipeline:
        raise PlanInputError(f"--pp {pp} with --zero {zero}: DeepSpeed's pipeline engine runs ZeRO "
                             f"{', '.join(map(str, caps.zero_with_pipeline))} only", "pin --zero 1 with --pp, or drop --pp")
    if pp > 1 and zero == 0 and training.precision not in caps.pipeline_without_zero:
        raise PlanInputError(f"--pp {pp} with --zero 0 in {training.precision}: DeepSpeed cannot load the checkpoints "
                             "of a bf16 pipeline without ZeRO", "pin --zero 1 with --pp (or --precision fp32)")
    defaults: dict[str, Any] = {dim: 1 for dim, why in cannot.items() if why is not None} | {"sp": False}
    return pinned.model_copy(update={k: v for k, v in defaults.items() if getattr(pinned, k) is None})


QLORA_ZERO_STAGES = (0, 1, 2)


def _finetune_pins(ft: FinetuneSpec, training: TrainingSpec, pinned: Pinned) -> Pinned:
    """What the built-in trainer runs for a parameter-efficient method (launch/models.py), the
    rest refused in one line: data parallelism with ZeRO 0-3 (QLoRA: 0-2), no tensor or pipeline
    parallelism, transformers' BitsAndBytesConfig quantisation."""
    for dim in ("tp", "pp"):
        value = getattr(pinned, dim)
        if value is not None and value > 1:
            raise PlanInputError(f"--{dim} {value} with --method {ft.method}: orch launch fine-tunes with data "
                                 "parallelism (ZeRO 0-3) only", f"drop --{dim}")
    if ft.method == "qlora":
        if pinned.zero_stage == 3:
            raise PlanInputError("--method qlora with --zero 3: ZeRO-3 would partition bitsandbytes' packed 4-bit "
                                 "weights, which their kernels cannot use", "use --zero 0, 1 or 2 with --method qlora")
        if ft.quant_block_size != 64:
            raise PlanInputError(f"--quant-block-size {ft.quant_block_size}: transformers' BitsAndBytesConfig quantises "
                                 "in blocks of 64", "drop --quant-block-size for orch launch")
    if ft.paged_optimizer and training.optimizer not in ("adamw", "adamw-8bit"):
        raise PlanInputError(f"--paged-optimizer with --optimizer {training.optimizer}: bitsandbytes pages AdamW only",
                             "use --optimizer adamw or adamw-8bit with --paged-optimizer")
    return pinned.model_copy(update={"tp": 1, "pp": 1})


def client_optimizer(training: TrainingSpec, ft: FinetuneSpec | None) -> str | None:
    """The bitsandbytes optimizer passed to DeepSpeed as a client optimizer, or None (DeepSpeed's own)."""
    paged = ft is not None and ft.paged_optimizer
    if training.optimizer == "adamw-8bit":
        return "paged-adamw-8bit" if paged else "adamw-8bit"
    return "paged-adamw" if paged else None


def finetune_job(model: ModelSpec, training: TrainingSpec, ft: FinetuneSpec | None) -> dict[str, Any] | None:
    """The method as launch/models.py builds it: peft's options and the 4-bit base from the
    planner's own recipe (planner.finetune.methods.trace_spec), so the run is what was planned."""
    if ft is None or ft.method == "full":
        return None
    peft, quant = trace_spec(model, ft)
    return {"method": ft.method, "dtype": training.precision, "peft": peft, "quant": quant,
            "adapter_size": ft.adapter_size, "adapter_dtype": ft.adapter_dtype}


def _job_name(model: ModelSpec) -> str:
    return f"orch-{model.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_job(model: ModelSpec, training: TrainingSpec, plan: ParallelPlan, opts: LaunchOptions,
              cluster: ClusterSpec | None = None, finetune: FinetuneSpec | None = None) -> tuple[JobSpec, Path]:
    """The job spec the workers receive and the storage path of its checkpoints; with the cluster,
    the plan's predicted memory, step time and FLOPs, which the workers' metrics are set against."""
    if model.hf_config is None:
        raise PlanInputError(f"model '{model.name}' has no Hugging Face config to build", "pass a preset or a config.json")
    storage = (opts.checkpoint_dir or DEFAULT_STORAGE).expanduser().resolve()
    name = opts.name or _job_name(model)
    ds = job_ds_config(deepspeed_config(plan, training, buffers=buffers_for(model, plan), finetune=finetune), opts.steps, opts.lr)
    job = JobSpec(
        name=name, run_dir=str(storage / name), hf_config=job_hf_config(model, training), ds_config=ds, steps=opts.steps,
        finetune=finetune_job(model, training, finetune), client_optimizer=client_optimizer(training, finetune), lr=opts.lr,
        pack=opts.pack,
        plan=plan.model_dump(), entrypoint=opts.entrypoint, code_dir=os.getcwd() if opts.entrypoint else None,
        **_data_fields(model, training, opts),
        seq_len=training.seq_len, seed=opts.seed, checkpoint_every=opts.checkpoint_every,
        log_jsonl=str(opts.log_jsonl.resolve()) if opts.log_jsonl else None, fail_at_step=opts.fail_at_step,
        metrics_host=_metrics_host(opts.metrics_host), metrics_port=opts.metrics_port,
        **(_planned_fields(model, cluster, training, plan, finetune) if cluster is not None else {}),
    )
    return job, storage


def job_hf_config(model: ModelSpec, training: TrainingSpec) -> dict[str, Any]:
    """The model's config as the workers build it: --attention eager asks transformers for its
    eager kernel; flash is transformers' default SDPA (fused where the device has it)."""
    cfg = dict(model.hf_config or {})
    if training.attention == "eager":
        cfg["attn_implementation"] = "eager"
    return cfg


def _metrics_host(host: str) -> str:
    """--metrics-host as an IP address every node can bind (a name would resolve differently per node)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise PlanInputError(f"--metrics-host {host!r} is not an IP address",
                             "pass 127.0.0.1 (this machine only) or 0.0.0.0 (every interface, for a Prometheus elsewhere)") from None


def _planned_fields(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, plan: ParallelPlan,
                    finetune: FinetuneSpec | None = None) -> dict[str, Any]:
    """What the planner predicts for the plan (planner.memory.evaluate, planner.speed.step), for the metrics."""
    predicted = evaluate_plan(model, cluster, training, plan, finetune)
    memory = predicted.memory.memory.as_dict()
    return {
        "planned_bytes": {k: v for k, v in memory.items() if k != "total"},
        "planned_step_time_s": predicted.speed.step_time_s,
        "planned_mfu": predicted.speed.mfu,
        "flops_per_step": predicted.speed.model_flops,
        "peak_flops_per_gpu": predicted.speed.peak_flops_per_gpu,
    }


def _data_fields(model: ModelSpec, training: TrainingSpec, opts: LaunchOptions) -> dict[str, str | None]:
    """Where the workers' weights and tokens come from: a --model directory with weights is
    loaded rather than initialised, and its tokenizer is the default for --dataset."""
    source = Path(opts.model_source) if opts.model_source else None
    pretrained = pretrained_dir(opts.model_source)
    if opts.tokenizer is not None and opts.dataset is None:
        raise PlanInputError("--tokenizer is only used with --dataset", "add --dataset FILE, or drop --tokenizer")
    tokenizer = opts.tokenizer
    if tokenizer is None and source is not None and source.is_dir() and data.has_tokenizer(source):
        tokenizer = source
    if opts.dataset is not None:
        data.check(opts.dataset, tokenizer, model.vocab_size, training.seq_len)
    return {
        "dataset": str(opts.dataset.resolve()) if opts.dataset else None,
        "tokenizer": str(tokenizer.resolve()) if tokenizer and opts.dataset else None,
        "pretrained_dir": pretrained,
    }


def pretrained_dir(model_source: str | None) -> str | None:
    """--model as a directory of saved weights (loaded, not initialised), or None."""
    source = Path(model_source) if model_source else None
    return str(source.resolve()) if source is not None and source.is_dir() and _has_weights(source) else None


def _has_weights(directory: Path) -> bool:
    """A save_pretrained directory (safetensors or PyTorch weights, sharded or not)."""
    return any(directory.glob("*.safetensors")) or any(directory.glob("pytorch_model*.bin"))


def check_storage(path: Path | None) -> None:
    """A filesystem path (local, or a mount every node shares). Ray Train could persist checkpoints
    to a bucket, but rank 0's step records, the job record and the metrics discovery files are
    plain files the driver and Prometheus read."""
    if path is not None and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", str(path)):
        raise PlanInputError(f"--checkpoint-dir {path}: cloud URIs are not supported",
                             "mount the bucket on every node (s3fs, gcsfuse, a CSI driver) and pass the mount path")


