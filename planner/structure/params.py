"""Exact parameter counts, whole-model and per rank, from the model's own layout.

Every tensor the model registers is in planner.structure.layout.ModelLayout with its real shape
and how tensor parallelism splits it (DeepSpeed AutoTP, or Megatron-LM's column/row/vocab-parallel
layers for ``implementation="megatron"``: Shoeybi et al. 2019, section 3).
``tests/planner/test_params.py`` checks the totals against transformers' own count on the meta
device, for every preset and architecture under test.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from planner.structure.layout import ParamTensor
from planner.structure.model import ModelSpec


def _megatron(m: ModelSpec) -> bool:
    """Megatron-LM splits the embedding by vocabulary and the experts by tensor degree; AutoTP neither."""
    return m.implementation == "megatron"


def numel_per_rank(t: ParamTensor, m: ModelSpec, tp: int) -> int:
    """Elements of ``t`` on one tensor-parallel rank."""
    if t.expert and t.split == "replicated":
        return -(-t.numel // tp) if _megatron(m) else t.numel
    return t.numel_per_rank(tp, vocab_parallel=_megatron(m))


def layer_tensors(m: ModelSpec, layer: int | None = None) -> tuple[ParamTensor, ...]:
    """The parameters of decoder layer ``layer`` (default: the layer kind with the most), in
    registration order (DeepSpeed flattens them in that order, which decides where ZeRO cuts)."""
    kind = m.layout.widest if layer is None else m.layout.kind(layer)
    return kind.tensors


def embedding_tensors(m: ModelSpec) -> tuple[ParamTensor, ...]:
    """Everything registered before the first layer: token (and position) tables, embedding norms."""
    return m.layout.embedding


def head_tensors(m: ModelSpec, *, with_tied_copy: bool = False) -> tuple[ParamTensor, ...]:
    """Everything registered after the last layer (final norm, lm_head unless tied), and the tied
    table's copy a pipeline's last stage keeps."""
    copy = m.layout.tied_copy() if with_tied_copy else None
    return m.layout.head + ((copy,) if copy is not None else ())


def total_params(m: ModelSpec) -> int:
    """Unique parameters of the whole model (tied weights once)."""
    layout = m.layout
    return layout.memo("total", lambda: sum(t.numel for t in layout.embedding + layout.head)
                       + sum(layout.kinds[k].numel for k in layout.layer_kinds))


def active_params(m: ModelSpec) -> int:
    """Parameters one token touches: for MoE, only experts_per_token of the experts (FLOP counting)."""
    layout = m.layout

    def compute() -> int:
        inactive = 0
        for k in layout.layer_kinds:
            kind = layout.kinds[k]
            if kind.num_experts:
                expert = sum(t.numel for t in kind.tensors if t.expert)
                inactive += expert * (kind.num_experts - kind.experts_per_token) // kind.num_experts
        return total_params(m) - inactive

    return layout.memo("active", compute)


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


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """The decoder layers of pipeline stage ``stage``."""
    counts = layers_per_stage(num_layers, pp)
    first = sum(counts[:stage])
    return range(first, first + counts[stage])


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


def _stage_tensors(m: ModelSpec, pp: int, stage: int) -> list[ParamTensor]:
    """The stage's tensors in model order: embedding (first stage), its layers, head (last stage);
    with pp > 1 and tied embeddings the last stage keeps its own copy of the embedding matrix
    (Megatron-LM ``setup_embeddings_and_output_layer``)."""
    tensors: list[ParamTensor] = list(embedding_tensors(m)) if stage == 0 else []
    for layer in stage_layers(m.num_layers, pp, stage):
        tensors += layer_tensors(m, layer)
    if stage == pp - 1:
        tensors += head_tensors(m, with_tied_copy=pp > 1)
    return tensors


def stage_params(m: ModelSpec, *, tp: int, pp: int, ep: int, stage: int) -> StageParams:
    """Parameters on one rank of pipeline stage ``stage`` under tensor degree tp and expert degree
    ep (ep ranks each own num_experts/ep whole experts); cached per layout."""

    def compute() -> StageParams:
        tensors = _stage_tensors(m, pp, stage)
        dense = sum(numel_per_rank(t, m, tp) for t in tensors if not t.expert)
        expert = sum(numel_per_rank(t, m, tp) for t in tensors if t.expert) // ep
        largest = max((numel_per_rank(t, m, tp) for t in tensors), default=0)
        n_layers = len(stage_layers(m.num_layers, pp, stage))
        return StageParams(stage=stage, num_layers=n_layers, dense=dense, expert=expert, largest_tensor=largest)

    return m.layout.memo(("stage", m.implementation, tp, pp, ep, stage), compute)


def experts_apart(m: ModelSpec, ep: int) -> bool:
    """Whether expert parameters keep states of their own: under expert parallelism, and in
    Megatron-LM (its expert gradient buffers). DeepSpeed sees a Hugging Face model's experts as
    plain parameters (its MoE groups exist only for deepspeed.moe layers: ``is_moe_param``), so
    without ep they shard, bucket and reduce with the rest, in model order."""
    return ep > 1 or _megatron(m)


def stage_tensor_sizes(m: ModelSpec, *, tp: int, pp: int, stage: int, expert: bool | None, ep: int = 1) -> tuple[int, ...]:
    """Per-rank sizes of the stage's dense (``expert=False``), expert (True) or all (None) tensors
    in model order, as DeepSpeed flattens them; a rank holds 1/ep of each expert tensor's experts."""

    def compute() -> tuple[int, ...]:
        return tuple(numel_per_rank(t, m, tp) // (ep if t.expert else 1) for t in _stage_tensors(m, pp, stage)
                     if expert is None or t.expert == expert)

    return m.layout.memo(("sizes", m.implementation, tp, pp, stage, expert, ep), compute)
