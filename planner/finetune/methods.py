"""Fine-tuning methods: full and parameter-efficient, as one spec the memory and speed models read.

Trainable-parameter counts follow the ``peft`` library's modules (LoRA, prefix and prompt tuning,
(IA)^3; tests/planner/test_finetune.py compares them with peft on the meta device), Houlsby et al.
2019 for bottleneck adapters, Ben Zaken et al. 2022 for BitFit, Malladi et al. 2023 for MeZO.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from planner.errors import PlanInputError, error_detail
from planner.structure.model import ModelSpec
from planner.cache import cached, key_of
from planner.structure.params import total_params

Method = Literal["full", "lora", "qlora", "adapter", "prefix", "prompt", "ia3", "bitfit", "mezo"]
METHODS: tuple[str, ...] = ("full", "lora", "qlora", "adapter", "prefix", "prompt", "ia3", "bitfit", "mezo")

class FinetuneSpec(BaseModel):
    """A fine-tuning method and its options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Method = Field(default="full", description="Which parameters train and how.")
    lora_rank: int = Field(default=8, gt=0, description="LoRA rank r.")
    lora_alpha: float = Field(default=16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_targets: tuple[str, ...] = Field(default=(), description="peft module names; () = peft's default; ('all-linear',).")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    quant: Literal["nf4", "fp4"] = Field(default="nf4", description="QLoRA 4-bit base data type.")
    double_quant: bool = Field(default=True, description="QLoRA: quantise the quantisation constants too.")
    quant_block_size: int = Field(default=64, gt=0, description="QLoRA: weights per absmax constant.")
    double_quant_block_size: int = Field(default=256, gt=0, description="QLoRA: constants per second-level constant.")
    paged_optimizer: bool = Field(default=False, description="Optimizer states in pageable unified memory (QLoRA).")
    adapter_dtype: Literal["fp32", "bf16"] = Field(
        default="fp32", description="Adapter weights' dtype: peft casts them to fp32 (autocast_adapter_dtype); QLoRA's script to bf16."
    )
    adapter_size: int = Field(default=64, gt=0, description="Bottleneck adapter width m (Houlsby et al. 2019).")
    prefix_length: int = Field(default=30, gt=0, description="Prefix tuning: virtual tokens per layer.")
    num_virtual_tokens: int = Field(default=20, gt=0, description="Prompt tuning: virtual tokens prepended.")
    ia3_targets: tuple[str, ...] = Field(default=(), description="(IA)^3 peft module names; () = peft's default.")
    upcast_fp32: bool = Field(
        default=True, description="QLoRA: peft's prepare_model_for_kbit_training casts every non-4-bit parameter "
        "(norms, embeddings, lm_head, biases) to fp32, as the standard recipe does; False keeps them 16-bit.",
    )

    @field_validator("lora_targets", "ia3_targets", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @model_validator(mode="after")
    def _check(self) -> FinetuneSpec:
        if self.paged_optimizer and not self.is_peft:
            raise PlanInputError(
                f"--paged-optimizer pages the optimizer states of a parameter-efficient method, not --method {self.method}",
                "use --offload optimizer for full training, or a method such as --method lora",
            )
        return self

    @property
    def is_peft(self) -> bool:
        return self.method not in ("full", "mezo")

    @property
    def adapter_bytes(self) -> int:
        return 4 if self.adapter_dtype == "fp32" else 2


def _peft_options(ft: FinetuneSpec) -> dict[str, object]:
    """The method's options as peft's config classes name them (peft's defaults otherwise)."""
    if ft.method in ("lora", "qlora"):
        spec: dict[str, object] = {"method": "lora", "r": ft.lora_rank, "lora_alpha": ft.lora_alpha,
                                   "lora_dropout": ft.lora_dropout}
        if ft.lora_targets:
            spec["target_modules"] = "all-linear" if ft.lora_targets == ("all-linear",) else list(ft.lora_targets)
        if ft.adapter_dtype == "bf16":
            spec["autocast_adapter_dtype"] = False
        return spec
    if ft.method == "prefix":
        return {"method": "prefix", "num_virtual_tokens": ft.prefix_length}
    if ft.method == "prompt":
        return {"method": "prompt", "num_virtual_tokens": ft.num_virtual_tokens}
    if ft.method == "ia3":
        return {"method": "ia3", **({"target_modules": list(ft.ia3_targets)} if ft.ia3_targets else {})}
    return {"method": ft.method}


def trace_spec(m: ModelSpec, ft: FinetuneSpec | None) -> tuple[dict[str, object] | None, dict[str, object] | None]:
    """(peft spec, 4-bit base) with which planner.trace builds the method's model: peft's own
    classes for LoRA, prefix, prompt and (IA)^3; the frozen base with gradients flowing through for
    Houlsby adapters (which peft does not build); bitsandbytes' NF4/FP4 base and
    prepare_model_for_kbit_training for QLoRA (planner.trace.quantized)."""
    if ft is None or ft.method == "full":
        return None, None
    quant = None
    if ft.method == "qlora":
        quant = {"quant_type": ft.quant, "double_quant": ft.double_quant, "block_size": ft.quant_block_size,
                 "upcast": ft.upcast_fp32}
    return _peft_options(ft), quant


def trainable_params(m: ModelSpec, ft: FinetuneSpec) -> int:
    """Parameters that receive gradients (MeZO: all of them, updated without gradients): peft's own
    count of the wrapped model on the meta device (planner.trace.count_trainable_parameters, cached);
    Houlsby adapters, which peft does not build: two per layer, each h -> m -> h with biases."""
    if ft.method in ("full", "mezo"):
        return total_params(m)
    if ft.method == "adapter":
        h, a = m.hidden_size, ft.adapter_size
        return m.num_layers * 2 * (2 * h * a + a + h)
    spec = _peft_options(ft)
    key = key_of("trainable", m.hf_config, spec)

    def count() -> dict[str, int]:
        from planner.trace import count_trainable_parameters

        try:
            trainable, _ = count_trainable_parameters(m.hf_config, spec)
        except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
            detail = error_detail(exc)
            raise PlanInputError(
                f"--method {ft.method} on {m.name}: peft cannot build it ({detail})",
                "name modules the model has in --lora-targets / --ia3-targets (or all-linear), or choose another --method",
            ) from None
        return {"trainable": trainable}

    return int(cached("trainable", key, count)["trainable"])


def extra_sequence_tokens(ft: FinetuneSpec) -> int:
    """Prompt tuning prepends virtual tokens to every sequence."""
    return ft.num_virtual_tokens if ft.method == "prompt" else 0


def quantized_bytes_per_param(ft: FinetuneSpec) -> float:
    """4-bit storage plus quantisation constants (Dettmers et al. 2023, section 3): one fp32 absmax per
    block of 64 is 32/64 = 0.5 bits per parameter; double quantisation stores them in 8 bits with an
    fp32 constant per 256 blocks: 8/64 + 32/(64 x 256) = 0.127 bits."""
    if ft.double_quant:
        constants_bits = 8 / ft.quant_block_size + 32 / (ft.quant_block_size * ft.double_quant_block_size)
    else:
        constants_bits = 32 / ft.quant_block_size
    return (4 + constants_bits) / 8
