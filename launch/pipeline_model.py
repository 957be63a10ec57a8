"""A Hugging Face decoder-only causal LM cut into pipeline layers (pure torch; no deepspeed).

DeepSpeed's ``PipelineModule`` runs its layers as a sequence, each taking the previous layer's
output, and sends only tensors (or tuples of tensors) between stages
(deepspeed/runtime/pipe/engine.py ``_send_tensor_meta``). A Llama-like decoder layer also needs the
rotary position embeddings and the causal mask, which ``LlamaModel.forward`` builds once
(transformers/models/llama/modeling_llama.py). So the layers here pass ``(hidden, position_ids)``:
each decoder layer rebuilds its rotary embeddings and mask from the position ids, exactly as
``LlamaModel.forward`` does. The position ids are integers, so the pipeline engine sends no
gradient for them (it sends a gradient back for floating-point tensors only, ``_exec_send_grads``).

The layers wrap the model's own modules (same parameters), so a pipeline built from a model
computes that model's loss; ``tests/launch/test_launch_tp_pp.py`` checks it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from launch.families import PIPELINE_FAMILIES

Activations = tuple[torch.Tensor, torch.Tensor]  # (hidden [batch, seq, hidden], position_ids [batch, seq])


class Embedding(nn.Module):
    """input_ids -> (embeddings, position ids 0..seq-1)."""

    def __init__(self, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor) -> Activations:
        hidden = self.embed_tokens(input_ids)
        # Contiguous: gloo sends contiguous tensors only (an expanded view is refused).
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).repeat(input_ids.shape[0], 1)
        return hidden, positions


class DecoderLayer(nn.Module):
    """One decoder layer; rotary embeddings and causal mask rebuilt from the position ids."""

    def __init__(self, layer: nn.Module, rotary_emb: nn.Module, config: Any) -> None:
        super().__init__()
        self.layer = layer
        self.rotary_emb = rotary_emb  # no parameters (a buffer of inverse frequencies)
        self.config = config

    def forward(self, inputs: Activations) -> Activations:
        from transformers.masking_utils import create_causal_mask

        hidden, positions = inputs
        # The mask LlamaModel.forward builds for a batch without padding or cache: None with SDPA
        # (which then runs causally), an explicit mask with eager attention.
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=positions)
        rotary = self.rotary_emb(hidden, position_ids=positions)
        hidden = self.layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
        return hidden, positions


class Head(nn.Module):
    """(hidden, position ids) -> logits: the final norm and the language-model head."""

    def __init__(self, norm: nn.Module, lm_head: nn.Linear) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, inputs: Activations) -> torch.Tensor:
        hidden, _ = inputs
        return self.lm_head(self.norm(hidden))


class CausalLMLoss:
    """The model's own loss on (logits, labels): transformers' ForCausalLMLoss (labels shifted
    by one, mean over tokens), as ``LlamaForCausalLM.forward`` computes it from ``labels``."""

    def __init__(self, model: nn.Module) -> None:
        self.loss_function = model.loss_function
        self.vocab_size = int(model.config.vocab_size)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size)


def pipeline_layers(model: nn.Module) -> list[nn.Module]:
    """The model as a sequence of layers: embedding, each decoder layer, norm + head. Raises
    ValueError for a model without the Llama layout or with tied input/output embeddings (a tied
    weight split across stages would need DeepSpeed's TiedLayerSpec)."""
    family = getattr(model.config, "model_type", None)
    if family not in PIPELINE_FAMILIES:
        raise ValueError(f"pipeline layers are defined for {sorted(PIPELINE_FAMILIES)} models, not {family!r}")
    if getattr(model.config, "tie_word_embeddings", False):
        raise ValueError("pipeline layers need untied input and output embeddings (tie_word_embeddings=False)")
    base = model.model
    return [
        Embedding(base.embed_tokens),
        *(DecoderLayer(layer, base.rotary_emb, model.config) for layer in base.layers),
        Head(base.norm, model.lm_head),
    ]


def sequential_loss(layers: list[nn.Module], loss_fn: CausalLMLoss, input_ids: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """The layers chained in one process, as a pipeline runs them across stages (for tests)."""
    x: Any = input_ids
    for layer in layers:
        x = layer(x)
    return loss_fn(x, labels)
