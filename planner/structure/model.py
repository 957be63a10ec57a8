"""ModelSpec: a decoder-only causal LM as the planner needs it.

``layout`` is the model's own parameter structure, read from the modules transformers builds
(planner.structure.layout; planner.structure.hf_config builds every spec through it), and the
scalar fields are derived from it: nothing is guessed from config names. ``hf_config`` keeps the
Hugging Face ``config.json`` the spec came from, so the trace can build the very same model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from planner.errors import PlanInputError
from planner.structure.layout import ModelLayout

Norm = Literal["layernorm", "rmsnorm"]
Positions = Literal["learned", "rope"]
# "huggingface": what transformers' PyTorch modules save for backward (what orch launches).
# "megatron": Megatron-LM's fused kernels, the implementation Korthikanti et al. 2022 analyse.
Implementation = Literal["huggingface", "megatron"]


def _is_moe(m: "ModelSpec") -> bool:
    return m.num_experts > 0


def _q_width(m: "ModelSpec") -> int:
    """Width of the query projection, a*d."""
    return m.num_heads * m.head_dim


def _kv_width(m: "ModelSpec") -> int:
    """Width of each of the key and value projections, k*d."""
    return m.num_kv_heads * m.head_dim


class ModelSpec(BaseModel):
    """A decoder-only transformer. Counts are exact numbers of elements, not bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    name: str = Field(description="Display name, e.g. 'llama3.1-70b'.")
    family: str = Field(description="Hugging Face model_type, e.g. 'llama', 'gpt2', 'mixtral'.")
    num_layers: int = Field(gt=0, description="Transformer blocks, L.")
    hidden_size: int = Field(gt=0, description="Model width h.")
    num_heads: int = Field(gt=0, description="Query heads a.")
    num_kv_heads: int = Field(gt=0, description="Key/value heads (a for MHA, 1 for MQA, between for GQA).")
    head_dim: int = Field(gt=0, description="Per-head width d; h/a unless the config sets it.")
    ffn_hidden_size: int = Field(gt=0, description="MLP inner width f (per expert for MoE).")
    vocab_size: int = Field(gt=0, description="Vocabulary V (embedding rows, as padded in the config).")
    max_position_embeddings: int = Field(gt=0, description="Longest sequence, tokens; sizes learned position tables.")
    activation: str = Field(description="MLP non-linearity (the config's hidden_act), e.g. silu, gelu_new.")
    gated_mlp: bool = Field(description="True for SwiGLU/GeGLU (three matrices), False for a two-matrix MLP.")
    norm: Norm = Field(description="LayerNorm has weight and bias, RMSNorm a weight only.")
    positions: Positions = Field(description="Learned absolute position table or rotary (no parameters).")
    qkv_bias: bool = Field(default=False, description="Bias on the q, k, v projections.")
    out_proj_bias: bool = Field(default=False, description="Bias on the attention output projection.")
    mlp_bias: bool = Field(default=False, description="Bias on the MLP matrices.")
    tied_embeddings: bool = Field(default=False, description="lm_head shares the input embedding matrix.")
    dropout: bool = Field(default=False, description="Hidden/attention dropout active in training (saves 1-byte masks).")
    num_experts: int = Field(default=0, ge=0, description="Routed experts per MoE layer; 0 for a dense model.")
    experts_per_token: int = Field(default=0, ge=0, description="Top-k experts each token is routed to.")
    implementation: Implementation = Field(
        default="huggingface", description="Whose kernels define the saved activations."
    )
    layout: ModelLayout = Field(description="Every parameter tensor, as the model's modules register them.")
    hf_config: dict[str, Any] = Field(description="The Hugging Face config.json this spec was read from; used by the trace.")

    @model_validator(mode="after")
    def _check_shape(self) -> ModelSpec:
        if self.num_heads % self.num_kv_heads:
            raise PlanInputError(
                f"model '{self.name}': num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}",
                "use a key/value head count that divides the query head count",
            )
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise PlanInputError(
                f"model '{self.name}': experts_per_token={self.experts_per_token} with num_experts={self.num_experts}",
                "set experts_per_token between 1 and num_experts",
            )
        return self

    is_moe = property(_is_moe)
    q_width = property(_q_width)
    kv_width = property(_kv_width)
