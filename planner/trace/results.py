"""What a trace returns: one record per saved storage, and the totals of one micro batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

AttentionKind = Literal["flash", "eager"]
DTypeName = Literal["bf16", "fp16", "fp32"]


@dataclass(frozen=True)
class SavedTensor:
    """One unique storage kept for backward."""

    layer: int | None  # decoder layer that produced it; None: produced outside the layers
    scope: str  # module that saved it first, layer index as '*' ("layers.*.self_attn.q_proj")
    op: str  # top-level torch function during which autograd saved it ("linear", "mul", ...)
    producer: str  # module that produced it ("model.rotary_emb", "layers.*.input_layernorm", "<input>")
    shape: tuple[int, ...]  # shape of the first saved view
    dtype: str
    nbytes: int  # size of the whole storage


@dataclass(frozen=True)
class ActivationTrace:
    """Bytes kept for backward by one training forward of one micro batch."""

    total_bytes: int  # GPU figure (CUDA semantics, see planner.trace.gpu_kernels)
    cpu_trace_bytes: int  # raw count of the CPU fake trace (== a real CPU run)
    gpu_correction_bytes: int  # cpu_trace_bytes - total_bytes (negative if CUDA keeps more)
    num_layers: int  # decoder layers actually traced
    seq_len: int
    micro_batch: int
    attention: str
    dtype: str
    kernels: str = ""  # attention actually traced, e.g. "cpu:sdpa gpu:flash"
    layer_bytes: tuple[int, ...] = ()  # GPU figure per decoder layer (producer attribution)
    model_bytes: int = 0  # GPU figure outside the decoder layers (embedding, norm, logits, loss, rotary)
    breakdown: tuple[tuple[str, int], ...] = ()  # ("layer|layers.*.mlp.act_fn:silu", bytes), GPU figure
    tensors: tuple[SavedTensor, ...] = field(default=(), repr=False)  # GPU figure
    cpu_tensors: tuple[SavedTensor, ...] = field(default=(), repr=False)
    # Fine-tuning method (``peft=``).  For "mezo" every byte figure above is the *peak of live bytes*
    # of a no_grad forward, ``tensors`` are the storages alive at that peak, and layer_bytes /
    # model_bytes split that peak by producer (not additive over depth: see extrapolate_layers).
    method: str = "full"
    adapter_dtype: str = ""  # dtype of the trainable parameters (LoRA/IA3 adapters: fp32 by peft's autocast)
    virtual_tokens: int = 0  # prefix / prompt tuning: p (prompt tuning runs the layers on seq_len + p)
    peak_at: str = ""  # mezo: "module:function/aten op" whose allocation reached the peak (GPU pass)
