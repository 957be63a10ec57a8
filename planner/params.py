"""Exact parameter counts, whole-model and per rank.

Every tensor a Hugging Face causal LM of the supported families creates is listed with its
shape and how tensor parallelism splits it (Megatron-LM's column/row/vocab-parallel layers,
Shoeybi et al. 2019, section 3). ``tests/planner/test_params.py`` checks the totals against
transformers' own count on the meta device for every preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Union

from planner.model import ModelShape, ModelSpec

Model = Union[ModelSpec, ModelShape]  # the functions below read structural fields only

# How tensor parallelism splits a tensor (Shoeybi et al. 2019, Megatron-LM, section 3):
# column: output features divided by tp (q/k/v, MLP up/gate, and their biases);
# row: input features divided by tp (attention out, MLP down), its bias replicated;
# vocab: embedding rows divided by tp (VocabParallelEmbedding); replicated: norms, routers.
TpSplit = Literal["column", "row", "vocab", "replicated"]
Place = Literal["embedding", "layer", "head"]


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor: ``rows x cols`` elements (cols=1 for vectors)."""

    name: str
    rows: int
    cols: int
    split: TpSplit
    expert: bool = False

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def numel_per_rank(self, tp: int, ep: int = 1) -> int:
        """Elements one rank holds under tensor degree tp and expert degree ep (experts are whole per rank)."""
        n = self.numel
        if self.split != "replicated":
            n = -(-n // tp)
        return n


def _norm(m: Model, name: str) -> list[ParamTensor]:
    tensors = [ParamTensor(f"{name}.weight", m.hidden_size, 1, "replicated")]
    if m.norm == "layernorm":
        tensors.append(ParamTensor(f"{name}.bias", m.hidden_size, 1, "replicated"))
    return tensors


def _linear(name: str, in_f: int, out_f: int, split: TpSplit, bias: bool, expert: bool = False) -> list[ParamTensor]:
    tensors = [ParamTensor(f"{name}.weight", out_f, in_f, split, expert)]
    if bias:
        # A row-parallel layer adds its bias once after the all-reduce: replicated.
        tensors.append(ParamTensor(f"{name}.bias", out_f, 1, "replicated" if split == "row" else split, expert))
    return tensors


def _mlp(m: Model, prefix: str, expert: bool = False) -> list[ParamTensor]:
    h, f = m.hidden_size, m.ffn_hidden_size
    tensors: list[ParamTensor] = []
    if m.gated_mlp:  # SwiGLU/GeGLU: a gate projection beside the up projection (Shazeer 2020).
        tensors += _linear(f"{prefix}.gate", h, f, "column", m.mlp_bias, expert)
    tensors += _linear(f"{prefix}.up", h, f, "column", m.mlp_bias, expert)
    tensors += _linear(f"{prefix}.down", f, h, "row", m.mlp_bias, expert)
    return tensors


def layer_tensors(m: Model) -> list[ParamTensor]:
    """The parameters of one transformer block, in the order the module registers them (DeepSpeed
    flattens them in that order, which decides where ZeRO partitions cut): GPT-2's ln_1, attention,
    ln_2, MLP; Llama-like blocks register attention, MLP, then both norms."""
    h = m.hidden_size
    attention = _linear("q", h, m.q_width, "column", m.qkv_bias)
    attention += _linear("k", h, m.kv_width, "column", m.qkv_bias)
    attention += _linear("v", h, m.kv_width, "column", m.qkv_bias)
    attention += _linear("o", m.q_width, h, "row", m.out_proj_bias)
    if m.is_moe:
        # Router: one logit per expert (Mixtral: block_sparse_moe.gate, no bias).
        mlp = [ParamTensor("router.weight", m.num_experts, h, "replicated")]
        for e in range(m.num_experts):
            mlp += _mlp(m, f"expert{e}", expert=True)
    else:
        mlp = _mlp(m, "mlp")
    if m.norm == "layernorm" and not m.gated_mlp:  # GPT-2 block
        return _norm(m, "attn_norm") + attention + _norm(m, "mlp_norm") + mlp
    return attention + mlp + _norm(m, "attn_norm") + _norm(m, "mlp_norm")


def embedding_tensors(m: Model) -> list[ParamTensor]:
    """Input embeddings: token table and, for GPT-2-style models, the learned position table."""
    tensors = [ParamTensor("embed_tokens", m.vocab_size, m.hidden_size, "vocab")]
    if m.positions == "learned":
        tensors.append(ParamTensor("embed_positions", m.max_position_embeddings, m.hidden_size, "replicated"))
    return tensors


def head_tensors(m: Model, *, with_tied_copy: bool = False) -> list[ParamTensor]:
    """Final norm and the output projection (absent when tied, unless the last pipeline stage keeps a copy)."""
    tensors = _norm(m, "final_norm")
    if not m.tied_embeddings or with_tied_copy:
        tensors.append(ParamTensor("lm_head", m.vocab_size, m.hidden_size, "vocab"))
    return tensors


def total_params(m: Model) -> int:
    """Unique parameters of the whole model (tied weights once)."""
    per_layer = sum(t.numel for t in layer_tensors(m))
    return sum(t.numel for t in embedding_tensors(m) + head_tensors(m)) + m.num_layers * per_layer


def active_params(m: Model) -> int:
    """Parameters one token touches: for MoE, only experts_per_token of the experts (FLOP counting)."""
    if not m.is_moe:
        return total_params(m)
    expert_numel = sum(t.numel for t in layer_tensors(m) if t.expert)
    inactive = expert_numel * (m.num_experts - m.experts_per_token) // m.num_experts
    return total_params(m) - m.num_layers * inactive


@lru_cache(maxsize=4096)
def layers_per_stage(num_layers: int, pp: int) -> tuple[int, ...]:
    """Split L layers over pp stages. Even when pp divides L; otherwise the extra layers go to
    the middle stages first, because the first stage holds the embedding and the most activations
    and the last stage the output layer (the Llama 3 paper, section 3.3.2, balances 126 layers
    over 16 stages by giving the first and last stage fewer)."""
    base, extra = divmod(num_layers, pp)
    counts = [base] * pp
    order = list(range(1, pp - 1)) + [0, pp - 1] if pp > 2 else list(range(pp))
    for stage in order[:extra]:
        counts[stage] += 1
    return tuple(counts)


@dataclass(frozen=True)
class StageParams:
    """Parameters one rank of a pipeline stage holds, split into dense and expert parts."""

    stage: int
    num_layers: int
    dense: int
    expert: int
    largest_tensor: int

    @property
    def total(self) -> int:
        return self.dense + self.expert


def stage_params(m: Model, *, tp: int, pp: int, ep: int, stage: int) -> StageParams:
    """Parameters on one rank of pipeline stage ``stage`` (cached per model shape)."""
    return _stage_params(m if isinstance(m, ModelShape) else m.shape(), tp, pp, ep, stage)


@lru_cache(maxsize=65536)
def _stage_params(m: ModelShape, tp: int, pp: int, ep: int, stage: int) -> StageParams:
    """Parameters on one rank of pipeline stage ``stage`` under tensor degree tp and expert degree ep.

    The first stage holds the embeddings, the last the final norm and lm_head; with pp > 1 and
    tied embeddings the last stage keeps its own copy of the embedding matrix (Megatron-LM,
    ``setup_embeddings_and_output_layer``)."""
    n_layers = layers_per_stage(m.num_layers, pp)[stage]
    tensors = [(t, n_layers) for t in layer_tensors(m)]
    if stage == 0:
        tensors += [(t, 1) for t in embedding_tensors(m)]
    if stage == pp - 1:
        tensors += [(t, 1) for t in head_tensors(m, with_tied_copy=pp > 1)]
    dense = sum(t.numel_per_rank(tp) * k for t, k in tensors if not t.expert)
    expert_total = sum(t.numel_per_rank(tp) * k for t, k in tensors if t.expert)
    expert = expert_total // ep  # ep ranks each own num_experts/ep whole experts.
    largest = max(t.numel_per_rank(tp) for t, _ in tensors)
    return StageParams(stage=stage, num_layers=n_layers, dense=dense, expert=expert, largest_tensor=largest)


def _expert_index(t: ParamTensor) -> int:
    return int(t.name.split(".")[0].removeprefix("expert"))


def stage_tensor_sizes(m: Model, *, tp: int, pp: int, stage: int, expert: bool, ep: int = 1) -> tuple[int, ...]:
    return _stage_tensor_sizes(m if isinstance(m, ModelShape) else m.shape(), tp, pp, stage, expert, ep)


@lru_cache(maxsize=65536)
def _stage_tensor_sizes(m: ModelShape, tp: int, pp: int, stage: int, expert: bool, ep: int) -> tuple[int, ...]:
    """Per-rank sizes of the stage's dense (or expert) tensors in model order (embedding, layers,
    head), as DeepSpeed flattens them; a rank holds num_experts/ep of the experts."""
    n_layers = layers_per_stage(m.num_layers, pp)[stage]
    sizes: list[int] = []
    if stage == 0:
        sizes += [t.numel_per_rank(tp) for t in embedding_tensors(m) if t.expert == expert]
    local = m.num_experts // ep if m.num_experts else 0
    layer = [
        t.numel_per_rank(tp)
        for t in layer_tensors(m)
        if t.expert == expert and (not expert or _expert_index(t) < local)
    ]
    sizes += layer * n_layers
    if stage == pp - 1:
        sizes += [t.numel_per_rank(tp) for t in head_tensors(m, with_tied_copy=pp > 1) if t.expert == expert]
    return tuple(sizes)
