"""The flags that shape a job, declared once: ``orch plan``, ``orch launch`` and ``orch profile``
take every one of them (``@job_flags``), so a plan's command line runs unchanged as a launch or a
profile. A command that cannot honour a value refuses it in one line (orchestrator/cli.py). Each
help text says what the flag overrides."""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer


class PrecisionChoice(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"
    fp8 = "fp8"


class OptimizerChoice(str, Enum):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"
    sgd_momentum = "sgd-momentum"
    adafactor = "adafactor"
    lion = "lion"
    adamw_8bit = "adamw-8bit"


class AttentionChoice(str, Enum):
    flash = "flash"
    eager = "eager"


class RecomputeChoice(str, Enum):
    none = "none"
    selective = "selective"
    full = "full"


class OffloadChoice(str, Enum):
    none = "none"
    optimizer = "optimizer"
    optimizer_params = "optimizer+params"


MODEL = "Model"
CLUSTER = "Cluster"
TRAINING = "Training"
PARALLEL = "Parallel plan (each flag pins that dimension)"

ModelOpt = Annotated[
    Optional[str], typer.Option("--model", "-m", help="Preset name ('orch models') or path to a Hugging Face config.json.", rich_help_panel=MODEL)
]
ClusterOpt = Annotated[
    Optional[str], typer.Option("--cluster", "-c", help="Cluster preset ('orch clusters') or YAML file.", rich_help_panel=CLUSTER)
]
GpuOpt = Annotated[
    Optional[str], typer.Option("--gpu", help="GPU type for an inline DGX-class cluster, e.g. h100-80gb.", rich_help_panel=CLUSTER)
]
GpusOpt = Annotated[Optional[int], typer.Option("--gpus", help="Total GPUs of the inline cluster.", rich_help_panel=CLUSTER)]
GpusPerNodeOpt = Annotated[
    Optional[int], typer.Option("--gpus-per-node", help="GPUs per node of the inline cluster (default 8).", rich_help_panel=CLUSTER)
]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.", rich_help_panel=TRAINING)]
MicroBatchOpt = Annotated[
    Optional[int], typer.Option("--micro-batch", help="Sequences per micro-batch per rank (pins it).", rich_help_panel=PARALLEL)
]
GlobalBatchOpt = Annotated[
    Optional[int], typer.Option("--global-batch", help="Sequences per optimizer step (default: micro-batch x dp).", rich_help_panel=TRAINING)
]
PrecisionOpt = Annotated[PrecisionChoice, typer.Option("--precision", help="Training precision.", rich_help_panel=TRAINING)]
OptimizerOpt = Annotated[OptimizerChoice, typer.Option("--optimizer", help="Optimizer (sets state bytes).", rich_help_panel=TRAINING)]
AttentionOpt = Annotated[AttentionChoice, typer.Option("--attention", help="flash keeps no s x s scores; eager does.", rich_help_panel=TRAINING)]
RecomputeOpt = Annotated[
    Optional[RecomputeChoice], typer.Option("--recompute", help="Activation recomputation (pins it).", rich_help_panel=PARALLEL)
]
DpOpt = Annotated[Optional[int], typer.Option("--dp", help="Data-parallel degree.", rich_help_panel=PARALLEL)]
TpOpt = Annotated[Optional[int], typer.Option("--tp", help="Tensor-parallel degree (within a node).", rich_help_panel=PARALLEL)]
PpOpt = Annotated[Optional[int], typer.Option("--pp", help="Pipeline-parallel stages.", rich_help_panel=PARALLEL)]
ZeroOpt = Annotated[Optional[int], typer.Option("--zero", help="DeepSpeed ZeRO stage 0-3.", rich_help_panel=PARALLEL)]
OffloadOpt = Annotated[
    Optional[OffloadChoice], typer.Option("--offload", help="What ZeRO moves to host memory.", rich_help_panel=PARALLEL)
]
SpOpt = Annotated[Optional[bool], typer.Option("--sp/--no-sp", help="Megatron sequence parallelism (needs tp > 1).", rich_help_panel=PARALLEL)]
CpOpt = Annotated[Optional[int], typer.Option("--cp", help="Context-parallel degree.", rich_help_panel=PARALLEL)]
EpOpt = Annotated[Optional[int], typer.Option("--ep", help="Expert-parallel degree (MoE).", rich_help_panel=PARALLEL)]
InterleaveOpt = Annotated[
    Optional[int], typer.Option("--interleave", help="Virtual pipeline stages per rank.", rich_help_panel=PARALLEL)
]


FINETUNE = "Fine-tuning (--method)"


class MethodChoice(str, Enum):
    full = "full"
    lora = "lora"
    qlora = "qlora"
    adapter = "adapter"
    prefix = "prefix"
    prompt = "prompt"
    ia3 = "ia3"
    bitfit = "bitfit"
    mezo = "mezo"
    all = "all"


MethodOpt = Annotated[MethodChoice, typer.Option("--method", help="Fine-tuning method; 'all' compares every method.", rich_help_panel=FINETUNE)]
LoraRankOpt = Annotated[int, typer.Option("--lora-rank", help="LoRA rank r.", rich_help_panel=FINETUNE)]
LoraAlphaOpt = Annotated[float, typer.Option("--lora-alpha", help="LoRA alpha (scale alpha/r).", rich_help_panel=FINETUNE)]
LoraTargetsOpt = Annotated[
    Optional[str], typer.Option("--lora-targets", help="peft module names, comma-separated, or all-linear (default: q,v).", rich_help_panel=FINETUNE)
]
LoraDropoutOpt = Annotated[float, typer.Option("--lora-dropout", help="Dropout on LoRA inputs.", rich_help_panel=FINETUNE)]
QuantOpt = Annotated[str, typer.Option("--quant", help="QLoRA base type: nf4 or fp4.", rich_help_panel=FINETUNE)]
DoubleQuantOpt = Annotated[bool, typer.Option("--double-quant/--no-double-quant", help="QLoRA double quantisation.", rich_help_panel=FINETUNE)]
QuantBlockOpt = Annotated[int, typer.Option("--quant-block-size", help="QLoRA weights per quantisation constant.", rich_help_panel=FINETUNE)]
UpcastOpt = Annotated[bool, typer.Option(
    "--upcast-fp32/--no-upcast-fp32",
    help="QLoRA: fp32 copies of the non-4-bit parameters (peft's prepare_model_for_kbit_training, the TRL/peft recipe); --no-upcast-fp32 keeps them 16-bit.",
    rich_help_panel=FINETUNE)]
PagedOpt = Annotated[bool, typer.Option("--paged-optimizer", help="Optimizer states in pageable memory (QLoRA).", rich_help_panel=FINETUNE)]
AdapterDtypeOpt = Annotated[str, typer.Option("--adapter-dtype", help="Trainable adapter dtype: fp32 (peft default) or bf16.", rich_help_panel=FINETUNE)]
AdapterSizeOpt = Annotated[int, typer.Option("--adapter-size", help="Bottleneck adapter width (Houlsby).", rich_help_panel=FINETUNE)]
PrefixOpt = Annotated[int, typer.Option("--prefix-length", help="Prefix tuning virtual tokens.", rich_help_panel=FINETUNE)]
VirtualTokensOpt = Annotated[int, typer.Option("--num-virtual-tokens", help="Prompt tuning virtual tokens.", rich_help_panel=FINETUNE)]
Ia3TargetsOpt = Annotated[Optional[str], typer.Option("--ia3-targets", help="(IA)^3 peft module names (default: peft's).", rich_help_panel=FINETUNE)]

CalibrationOpt = Annotated[
    Optional[Path],
    typer.Option("--calibration", help="Overhead constants fitted by 'orch calibrate' (override the cluster's overheads).", rich_help_panel=CLUSTER),
]


class BackendChoice(str, Enum):
    deepspeed = "deepspeed"
    megatron = "megatron"


BackendOpt = Annotated[BackendChoice, typer.Option(
    "--backend", help="deepspeed: what orch launches; megatron: also SP, interleaving, CP (plan only, for comparison).",
    rich_help_panel=PARALLEL)]


@dataclass(frozen=True)
class JobFlags:
    """Every flag that shapes a job, as parsed: the one declaration (name, type, default) that
    plan, launch and profile share. The annotations are the typer options above."""

    model: ModelOpt = None
    cluster: ClusterOpt = None
    gpu: GpuOpt = None
    gpus: GpusOpt = None
    gpus_per_node: GpusPerNodeOpt = None
    calibration: CalibrationOpt = None
    seq_len: SeqLenOpt = 2048
    micro_batch: MicroBatchOpt = None
    global_batch: GlobalBatchOpt = None
    precision: PrecisionOpt = PrecisionChoice.bf16
    optimizer: OptimizerOpt = OptimizerChoice.adamw
    attention: AttentionOpt = AttentionChoice.flash
    recompute: RecomputeOpt = None
    dp: DpOpt = None
    tp: TpOpt = None
    pp: PpOpt = None
    zero: ZeroOpt = None
    offload: OffloadOpt = None
    sp: SpOpt = None
    cp: CpOpt = None
    ep: EpOpt = None
    interleave: InterleaveOpt = None
    backend: BackendOpt = BackendChoice.deepspeed
    method: MethodOpt = MethodChoice.full
    lora_rank: LoraRankOpt = 8
    lora_alpha: LoraAlphaOpt = 16.0
    lora_targets: LoraTargetsOpt = None
    lora_dropout: LoraDropoutOpt = 0.0
    quant: QuantOpt = "nf4"
    double_quant: DoubleQuantOpt = True
    quant_block_size: QuantBlockOpt = 64
    upcast_fp32: UpcastOpt = True
    paged_optimizer: PagedOpt = False
    adapter_dtype: AdapterDtypeOpt = "fp32"
    adapter_size: AdapterSizeOpt = 64
    prefix_length: PrefixOpt = 30
    num_virtual_tokens: VirtualTokensOpt = 20
    ia3_targets: Ia3TargetsOpt = None


def job_flags(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A typer command taking every JobFlags flag besides its own parameters; ``fn`` receives them
    as one ``job: JobFlags`` keyword. typer reads the command's parameters from its signature and
    annotations, so both are extended here (the wrapped function's own come after)."""
    own = inspect.signature(fn)
    names = [f.name for f in fields(JobFlags)]
    hints = typing.get_type_hints(JobFlags, include_extras=True)
    shared = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
              for f in fields(JobFlags)]
    own_hints = typing.get_type_hints(fn, include_extras=True)
    rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=own_hints.get(p.name, p.annotation))
            for p in own.parameters.values() if p.name != "job"]

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        job = JobFlags(**{n: kwargs.pop(n) for n in names})
        return fn(job=job, **kwargs)

    wrapper.__signature__ = own.replace(parameters=[*shared, *rest])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}  # type: ignore[attr-defined]
    return wrapper
