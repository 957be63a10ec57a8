"""Fine-tuning methods: full and parameter-efficient, as one spec the memory and speed models read.

Trainable-parameter counts follow the ``peft`` library's modules (LoRA, prefix and prompt tuning,
(IA)^3; tests/planner/test_finetune.py compares them with peft on the meta device), Houlsby et al.
2019 for bottleneck adapters, Ben Zaken et al. 2022 for BitFit, Malladi et al. 2023 for MeZO.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from planner.errors import PlanInputError
from planner.model import ModelSpec
from planner.params import ParamTensor, embedding_tensors, head_tensors, layer_tensors, total_params

Method = Literal["full", "lora", "qlora", "adapter", "prefix", "prompt", "ia3", "bitfit", "mezo"]
METHODS: tuple[str, ...] = ("full", "lora", "qlora", "adapter", "prefix", "prompt", "ia3", "bitfit", "mezo")

# peft module names of our tensors (transformers' LlamaForCausalLM and GPT2LMHeadModel).
LLAMA_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "mlp.gate": "gate_proj",
               "mlp.up": "up_proj", "mlp.down": "down_proj"}
GPT2_NAMES = {"q": "c_attn", "k": "c_attn", "v": "c_attn", "o": "attn.c_proj", "mlp.up": "c_fc", "mlp.down": "mlp.c_proj"}
# peft's default targets (peft/utils/constants.py TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING).
DEFAULT_LORA_TARGETS = {"gpt2": ("c_attn",), "llama": ("q_proj", "v_proj")}
DEFAULT_IA3_TARGETS = {
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
}


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

    @field_validator("lora_targets", "ia3_targets", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @property
    def is_peft(self) -> bool:
        return self.method not in ("full", "mezo")

    @property
    def adapter_bytes(self) -> int:
        return 4 if self.adapter_dtype == "fp32" else 2


def _names(m: ModelSpec) -> dict[str, str]:
    return GPT2_NAMES if m.family == "gpt2" else LLAMA_NAMES


def _family_key(m: ModelSpec) -> str:
    return "gpt2" if m.family == "gpt2" else "llama"


def lora_targets(m: ModelSpec, ft: FinetuneSpec) -> set[str]:
    """Our tensor names ('q', 'mlp.down', ...) that get a LoRA adapter."""
    names = _names(m)
    wanted = ft.lora_targets or DEFAULT_LORA_TARGETS[_family_key(m)]
    if wanted == ("all-linear",):
        return set(names)
    known = set(names.values())
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise PlanInputError(
            f"--lora-targets {','.join(unknown)} are not linear modules of {m.name}",
            f"use some of {', '.join(sorted(known))} or all-linear",
        )
    return {ours for ours, theirs in names.items() if theirs in wanted}


def _linear_shapes(m: ModelSpec) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear module, fusing GPT-2's q/k/v into c_attn as transformers does."""
    shapes: dict[str, tuple[int, int]] = {}
    for t in layer_tensors(m):
        if t.name.endswith(".weight") and not t.expert and not t.name.startswith(("router", "attn_norm", "mlp_norm")):
            ours = t.name.removesuffix(".weight")
            shapes[ours] = (t.cols, t.rows)
    if m.family == "gpt2":
        shapes = {"qkv": (m.hidden_size, m.q_width + 2 * m.kv_width), "o": shapes["o"], "mlp.up": shapes["mlp.up"], "mlp.down": shapes["mlp.down"]}
    return shapes


def _lora_per_layer(m: ModelSpec, ft: FinetuneSpec) -> int:
    """LoRA adds A (r x in) and B (out x r) to each targeted linear (Hu et al. 2021, section 4)."""
    targets = lora_targets(m, ft)
    shapes = _linear_shapes(m)
    if m.family == "gpt2" and targets & {"q", "k", "v"}:
        targets = (targets - {"q", "k", "v"}) | {"qkv"}
    return sum(ft.lora_rank * (shapes[n][0] + shapes[n][1]) for n in targets if n in shapes)


def _ia3_per_layer(m: ModelSpec, ft: FinetuneSpec) -> int:
    """(IA)^3 learns one vector per target (Liu et al. 2022): the output width of attention targets,
    the input width of feed-forward targets (peft IA3Layer, is_feedforward)."""
    targets, feedforward = DEFAULT_IA3_TARGETS.get(m.family, DEFAULT_IA3_TARGETS[_family_key(m)])
    targets = ft.ia3_targets or targets
    names = {v: k for k, v in _names(m).items()}
    shapes = _linear_shapes(m)
    total = 0
    for target in targets:
        ours = names.get(target)
        if ours is None:
            raise PlanInputError(f"--ia3-targets {target} is not a linear module of {m.name}", "use peft module names")
        key = "qkv" if m.family == "gpt2" and ours in ("q", "k", "v") else ours
        in_f, out_f = shapes[key]
        total += in_f if target in feedforward else out_f
    return total


def trainable_params(m: ModelSpec, ft: FinetuneSpec) -> int:
    """Parameters that receive gradients (MeZO: all of them, updated without gradients)."""
    if ft.method in ("full", "mezo"):
        return total_params(m)
    if ft.method in ("lora", "qlora"):
        return m.num_layers * _lora_per_layer(m, ft)
    if ft.method == "adapter":
        # Two bottleneck adapters per layer (after attention and after the MLP), each h->m->h with biases.
        h, a = m.hidden_size, ft.adapter_size
        return m.num_layers * 2 * (2 * h * a + a + h)
    if ft.method == "prefix":
        # peft PrefixEncoder without projection: an embedding of num_virtual_tokens x (2 L kv_width).
        return ft.prefix_length * m.num_layers * 2 * m.kv_width
    if ft.method == "prompt":
        return ft.num_virtual_tokens * m.hidden_size
    if ft.method == "ia3":
        return m.num_layers * _ia3_per_layer(m, ft)
    # bitfit: every bias term, norms' included (Ben Zaken et al. 2022 train "the bias-terms").
    tensors: list[ParamTensor] = embedding_tensors(m) + head_tensors(m)
    per_layer = sum(t.numel for t in layer_tensors(m) if t.name.endswith(".bias"))
    return per_layer * m.num_layers + sum(t.numel for t in tensors if t.name.endswith(".bias"))


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


def peft_trace_config(m: ModelSpec, ft: FinetuneSpec) -> dict[str, object] | None:
    """The method as planner.trace builds it with peft (None for full fine-tuning)."""
    if ft.method == "full":
        return None
    if ft.method in ("lora", "qlora"):
        targets: object = "all-linear" if ft.lora_targets == ("all-linear",) else list(ft.lora_targets or DEFAULT_LORA_TARGETS[_family_key(m)])
        return {"method": "lora", "r": ft.lora_rank, "lora_alpha": ft.lora_alpha, "target_modules": targets,
                "lora_dropout": ft.lora_dropout}
    if ft.method == "prefix":
        return {"method": "prefix", "num_virtual_tokens": ft.prefix_length}
    if ft.method == "prompt":
        return {"method": "prompt", "num_virtual_tokens": ft.num_virtual_tokens}
    if ft.method == "ia3":
        return {"method": "ia3", **({"target_modules": list(ft.ia3_targets)} if ft.ia3_targets else {})}
    if ft.method in ("bitfit", "mezo"):
        return {"method": ft.method}
    raise PlanInputError(
        f"--trace cannot build method '{ft.method}': peft has no Houlsby bottleneck adapter",
        "drop --trace for --method adapter (the analytical model covers it)",
    )
