"""The parameter layout of a causal LM as its Hugging Face module tree builds it.

Read by planner.trace.layout from the model transformers builds on the meta device, so nothing
about the structure is guessed from config field names: every parameter tensor with its real
shape, in registration order (the order DeepSpeed flattens them in), which decoder layers share a
structure, which linear layers tensor parallelism splits and how, and the attention and MoE
shapes the speed and validity models need. Pure data; JSON round-trips for the cache.

Tensor-parallel splits follow what orch launches, DeepSpeed 0.19 AutoTP in training mode
(deepspeed/module_inject/auto_tp.py, ``AutoTP.tp_parser`` and ``_replace``): inside a layer the
linear that ends a block (the attention output and the MLP down projection) is row-parallel
(``LinearAllreduce``: input features split, output all-reduced), every other linear is
column-parallel (``LinearLayer``: output features split); routers stay whole; embeddings are not
replaced (whole on every rank); the output head is column-parallel with ``gather_output=True``
(weights split by vocabulary, logits gathered whole). Megatron-LM (``--backend megatron``) splits
the same way inside layers and splits both embedding tables by vocabulary
(``VocabParallelEmbedding``; Shoeybi et al. 2019, section 3), which ``vocab`` records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# column: output features divided by tp; row: input features divided by tp (its bias whole);
# vocab: embedding rows divided by tp under Megatron, whole under DeepSpeed AutoTP; head: the output
# projection, rows divided by tp on both; replicated: norms, routers, position tables, experts' fused
# tensors (AutoTP replaces nn.Linear modules only).
TpSplit = Literal["column", "row", "vocab", "head", "replicated"]
Role = Literal["linear", "norm", "embedding", "router", "expert", "other"]


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor: ``rows x cols`` elements (cols=1 for vectors; a 3-D expert tensor
    [E, r, c] is rows = E*r)."""

    name: str  # path inside its part ("self_attn.q_proj.weight"; "model.embed_tokens.weight")
    rows: int
    cols: int
    split: TpSplit
    expert: bool = False  # a routed expert's parameter (ep splits it, top-k of E are active per token)

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def numel_per_rank(self, tp: int, vocab_parallel: bool = True) -> int:
        """Elements one rank holds under tensor degree tp; ``vocab_parallel``: the embedding table
        is split by vocabulary (Megatron) rather than whole (DeepSpeed AutoTP)."""
        if self.split == "replicated" or (self.split == "vocab" and not vocab_parallel):
            return self.numel
        return -(-self.numel // tp)


@dataclass(frozen=True)
class Linear:
    """A matmul with weights: a linear module of a layer, or a routed expert's projection."""

    name: str  # module path inside the layer ("mlp.down_proj"; "mlp.experts.down_proj" for fused experts)
    in_features: int
    out_features: int
    split: TpSplit
    bias: bool = False
    experts: int = 0  # routed experts this matmul has one copy of (0: a dense linear)


@dataclass(frozen=True)
class LayerKind:
    """The structure one or more decoder layers share."""

    tensors: tuple[ParamTensor, ...]  # registration order
    linears: tuple[Linear, ...]
    num_heads: int  # query heads of its attention (0: a layer without attention)
    num_kv_heads: int
    head_dim: int
    num_experts: int = 0  # routed experts (0: dense MLP)
    experts_per_token: int = 0
    norm: str = "rmsnorm"  # "layernorm" when a norm has a bias (LayerNorm), else "rmsnorm"
    attention_window: int = 0  # sliding window in tokens (0: full attention)

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)


@dataclass(frozen=True)
class ModelLayout:
    """Every parameter of a causal LM, grouped as the planner splits models: the input side
    (embeddings and anything registered before the first layer), the decoder layers, and the output
    side (final norm, lm_head and anything after the last layer)."""

    embedding: tuple[ParamTensor, ...]
    kinds: tuple[LayerKind, ...]
    layer_kinds: tuple[int, ...]  # kind index of each decoder layer, in order
    head: tuple[ParamTensor, ...]  # without the tied lm_head copy
    tied_embeddings: bool
    hidden_size: int
    vocab_size: int
    tied_head_rows: int = 0  # rows x cols of the tied table (a pipeline's last stage keeps a copy)
    tied_head_cols: int = 0
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # provenance, config facts
    _memo: dict[Any, Any] = field(default_factory=dict, hash=False, compare=False, repr=False)  # per-layout caches

    def memo(self, key: Any, compute: Any) -> Any:
        """``compute()`` once per layout and key (searches ask for the same per-rank counts often)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    def kind(self, layer: int) -> LayerKind:
        return self.kinds[self.layer_kinds[layer]]

    @property
    def widest(self) -> LayerKind:
        """The kind with the most parameters (what a stage's largest layer holds)."""
        return max(self.kinds, key=lambda k: k.numel)

    def tied_copy(self) -> ParamTensor | None:
        """The lm_head a pipeline's last stage keeps when the embedding is tied (Megatron-LM,
        ``setup_embeddings_and_output_layer``; DeepSpeed's TiedLayerSpec)."""
        if not self.tied_embeddings:
            return None
        return ParamTensor("lm_head.weight", self.tied_head_rows, self.tied_head_cols, "head")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_memo")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelLayout:
        def tensors(items: list[dict[str, Any]]) -> tuple[ParamTensor, ...]:
            return tuple(ParamTensor(**t) for t in items)

        kinds = tuple(
            LayerKind(**{**k, "tensors": tensors(k["tensors"]), "linears": tuple(Linear(**x) for x in k["linears"])})
            for k in data["kinds"]
        )
        return cls(**{**data, "embedding": tensors(data["embedding"]), "head": tensors(data["head"]), "kinds": kinds,
                      "layer_kinds": tuple(data["layer_kinds"])})
