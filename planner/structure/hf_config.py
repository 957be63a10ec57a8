"""Read a Hugging Face ``config.json`` (a dict) into a ModelSpec for any causal LM transformers knows.

The structure is the model's own: transformers builds it on the meta device
(planner.trace.layout, cached per config by planner.cache) and every scalar of the spec is read
off that layout (the MLP width from the projection that ends the MLP, the heads from the attention
module, the vocabulary from the embedding table), so a config's fields are never guessed at:
BLOOM-176B's MLP is its real 4h = 57344, an MPT-style GPT-2 config keeps its own activation and
dropout.
"""

from __future__ import annotations

from typing import Any

from planner.cache import cached, key_of
from planner.errors import PlanInputError, error_detail
from planner.structure.layout import LayerKind, ModelLayout
from planner.structure.model import ModelSpec

_LAYOUTS: dict[str, ModelLayout] = {}


def model_layout(cfg: dict[str, Any], *, name: str) -> ModelLayout:
    """The layout of the model ``cfg`` describes (built once per config and library versions)."""
    key = key_of("layout", cfg)
    if key not in _LAYOUTS:
        def build() -> dict[str, Any]:
            from planner.trace.layout import read_layout

            try:
                return read_layout(cfg).to_json()
            except Exception as exc:  # transformers rejects the config: unknown model_type, bad fields
                detail = error_detail(exc)
                raise PlanInputError(
                    f"{name}: transformers cannot build a causal LM from this config (model_type "
                    f"{cfg.get('model_type')!r}: {detail})",
                    "pass the config.json of a causal LM your transformers version knows, with valid fields",
                ) from None

        _LAYOUTS[key] = cached("layout", key, build, ModelLayout.from_json)
    return _LAYOUTS[key]


def _attention_kind(layout: ModelLayout) -> LayerKind:
    with_attention = [k for k in layout.kinds if k.num_heads]
    if not with_attention:
        raise PlanInputError("the model has no attention layer the planner can read", "use a transformer causal LM")
    return max(with_attention, key=lambda k: k.numel)


def _attention_prefix(kind: LayerKind) -> str:
    """Module path of the attention block: the parent of the first linear (q_proj, c_attn, ...)."""
    return kind.linears[0].name.rpartition(".")[0] if kind.linears else ""


def _mlp_width(kind: LayerKind, hidden: int) -> int:
    """The MLP's inner width f: the input of the projection that ends it (per routed expert)."""
    attn = _attention_prefix(kind)
    experts = [x for x in kind.linears if x.experts and x.out_features == hidden]
    if experts:
        return experts[-1].in_features  # the expert projection registered last ends the MLP (down_proj, w2)
    rows = [x for x in kind.linears if x.split == "row" and x.name.rpartition(".")[0] != attn and x.out_features == hidden]
    if rows:
        return max(x.in_features for x in rows)
    cols = [x.out_features for x in kind.linears if x.split == "column" and x.name.rpartition(".")[0] != attn]
    return max(cols, default=4 * hidden)


def _gated(kind: LayerKind, f: int) -> bool:
    attn = _attention_prefix(kind)
    ins = [x for x in kind.linears if x.name.rpartition(".")[0] != attn and x.split in ("column", "replicated")
           and x.out_features in (f, 2 * f)]
    return any(x.out_features == 2 * f for x in ins) or sum(1 for x in ins if x.out_features == f) >= 2


def _spec_fields(cfg: dict[str, Any], layout: ModelLayout) -> dict[str, Any]:
    kind = _attention_kind(layout)
    moe = max(layout.kinds, key=lambda k: k.num_experts)
    h = layout.hidden_size
    f = _mlp_width(moe if moe.num_experts else kind, h)
    attn = _attention_prefix(kind)
    in_attn = [x for x in kind.linears if x.name.rpartition(".")[0] == attn]
    others = [x for x in kind.linears if x.name.rpartition(".")[0] != attn and not x.experts]
    max_pos = int(layout.extra.get("max_position_embeddings") or 0)
    tables = [t for t in layout.embedding[1:] if t.cols == h and t.rows > 1]
    learned = bool(tables)
    if not max_pos:
        max_pos = tables[0].rows if tables else 4096
    return dict(
        family=str(cfg.get("model_type")),
        num_layers=layout.num_layers,
        hidden_size=h,
        num_heads=kind.num_heads,
        num_kv_heads=kind.num_kv_heads,
        head_dim=kind.head_dim,
        ffn_hidden_size=f,
        vocab_size=layout.vocab_size,
        max_position_embeddings=max_pos,
        activation=str(layout.extra.get("hidden_act") or "gelu"),
        gated_mlp=_gated(moe if moe.num_experts else kind, f),
        norm=kind.norm,
        positions="learned" if learned else "rope",
        qkv_bias=any(x.bias for x in in_attn if x.split == "column"),
        out_proj_bias=any(x.bias for x in in_attn if x.split == "row"),
        mlp_bias=any(x.bias for x in others),
        tied_embeddings=layout.tied_embeddings,
        dropout=bool(layout.extra.get("dropout")),
        num_experts=moe.num_experts,
        experts_per_token=moe.experts_per_token,
    )


def spec_from_hf_config(cfg: dict[str, Any], *, name: str) -> ModelSpec:
    """Build the ModelSpec of a Hugging Face config dict (as loaded from config.json)."""
    if not isinstance(cfg, dict):
        raise PlanInputError(f"{name}: config.json must hold a JSON object", "pass a Hugging Face config.json")
    if not isinstance(cfg.get("model_type"), str):
        raise PlanInputError(f"{name}: config.json has no 'model_type'", "pass a Hugging Face config.json (it names its model_type)")
    layout = model_layout(cfg, name=name)
    return ModelSpec(name=name, hf_config=dict(cfg), layout=layout, **_spec_fields(cfg, layout))
