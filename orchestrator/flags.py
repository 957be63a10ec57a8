"""Option groups shared by every command that takes a model, a cluster and a plan
(``orch plan`` now; ``orch launch`` and ``orch profile`` reuse them). Each help text says what the
flag overrides."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

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
