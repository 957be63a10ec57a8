"""The parameter layout of a causal LM, read from the model transformers builds on the meta device.

Nothing is allocated (meta tensors have shapes only); a 405B model builds in about 0.15 s after
imports. What planner.structure.layout.ModelLayout holds comes from the modules themselves:

* the input side is every parameter registered before the first decoder layer, the output side
  every one after the last (named_parameters order, which is registration order and the order
  DeepSpeed flattens parameters in); a tied lm_head is the embedding's own Parameter, listed once;
* the decoder layers are the ModuleList as long as the config's layer count (the shallowest);
  layers share a kind when their parameters (names and shapes), their classes and their per-layer
  config entries (``layer_types`` and every other list as long as the layer count) are equal;
* a parameter's role is its owning module's: ``nn.Linear`` / transformers' ``Conv1D`` (weight
  [in, out]) are linears, modules whose class name contains "Norm" are norms, 3-D parameters are
  fused routed experts ([E, out, in] as in MixtralExperts), a linear or a weight whose rows equal the
  expert count inside an MoE block is the router;
* tensor-parallel splits follow DeepSpeed AutoTP's ``tp_parser`` (planner.structure.layout): the
  last linear registered in each module that holds linears is row-parallel (q/k/v then o_proj; gate
  and up then down_proj; c_attn then c_proj; query_key_value then dense), and so is any linear
  named o_proj, out_proj, down_proj, dense_4h_to_h, fc2, fc_out, c_proj, wo or w2; the others are
  column-parallel; routers, norms and fused experts stay whole.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from planner.structure.layout import LayerKind, Linear, ModelLayout, ParamTensor, TpSplit
from planner.trace.model import _LOCK, _build_model, _layer_prefix, _make_config

# DeepSpeed 0.19 auto_tp.py: names it always replaces with LinearAllreduce (o_proj, out_proj,
# down_proj, dense_4h_to_h, w2) and the output projections of the other families it knows.
ROW_NAMES = {"o_proj", "out_proj", "down_proj", "dense_4h_to_h", "fc2", "fc_out", "c_proj", "wo", "w2"}
ROUTER_NAMES = {"gate", "router", "wg", "shared_expert_gate", "classifier"}
_DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout",
                 "dropout", "attention_probs_dropout_prob", "hidden_dropout_prob", "resid_dropout", "emb_pdrop",
                 "ffn_dropout")


def _per_layer_lists(cfg: Any, num_layers: int) -> list[str]:
    """Config attributes that hold one entry per layer (layer_types, no_rope_layers, ...)."""
    return sorted(k for k, v in vars(cfg).items() if isinstance(v, (list, tuple)) and len(v) == num_layers and num_layers > 1)


def _is_linear(mod: Any) -> bool:
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(mod, (torch.nn.Linear, Conv1D))


def _linear_dims(mod: Any) -> tuple[int, int]:
    """(in, out) of an nn.Linear (weight [out, in]) or a Conv1D (weight [in, out])."""
    import torch

    w = mod.weight
    return (int(w.shape[1]), int(w.shape[0])) if isinstance(mod, torch.nn.Linear) else (int(w.shape[0]), int(w.shape[1]))


def _num_experts(cfg: Any) -> int:
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 1:
            return value
    ffn = getattr(cfg, "ffn_config", None)  # dbrx
    value = getattr(ffn, "moe_num_experts", None) if ffn is not None else None
    return value if isinstance(value, int) and value > 1 else 0


def _experts_per_token(cfg: Any) -> int:
    for key in ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "top_k", "moe_k"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    ffn = getattr(cfg, "ffn_config", None)
    value = getattr(ffn, "moe_top_k", None) if ffn is not None else None
    return value if isinstance(value, int) and value > 0 else 0


def _attention_shape(layer: Any, cfg: Any, hidden: int) -> tuple[int, int, int, int]:
    """(query heads, kv heads, head dim, sliding window) of a layer's attention, read from the
    attention module's attributes where transformers keeps them, else from the config."""
    attn = next((m for n, m in layer.named_modules() if n and n.split(".")[-1] in
                 ("self_attn", "attn", "attention", "self_attention", "mixer")), None)
    heads = getattr(cfg, "num_attention_heads", None) or 0
    if attn is None or not heads:
        return 0, 0, 0, 0
    head_dim = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None) or hidden // heads
    kv = getattr(cfg, "num_key_value_heads", None)
    groups = getattr(attn, "num_key_value_groups", None)
    if isinstance(groups, int) and groups > 0 and heads % groups == 0:
        kv = heads // groups
    if not kv:
        kv = 1 if getattr(cfg, "multi_query", False) else heads
    window = getattr(attn, "sliding_window", None)
    return int(heads), int(kv), int(head_dim), int(window) if isinstance(window, int) and window > 0 else 0


def _layer_kind(layer: Any, cfg: Any, hidden: int, n_experts: int, top_k: int) -> LayerKind:
    modules = dict(layer.named_modules())
    tensors: list[ParamTensor] = []
    linears: list[Linear] = []
    # the linears each module holds directly, in registration order (for the "last one is row" rule)
    by_parent: dict[str, list[str]] = OrderedDict()
    for name, mod in layer.named_modules():
        if name and _is_linear(mod):
            by_parent.setdefault(name.rpartition(".")[0], []).append(name)
    moe = n_experts > 0 and any(p.dim() == 3 or ".experts." in f".{n}." for n, p in layer.named_parameters())
    routers = {n for n, mod in modules.items() if n and _is_linear(mod) and moe
               and (n.split(".")[-1] in ROUTER_NAMES or _linear_dims(mod)[1] in (n_experts, 1))}
    rows = {names[-1] for names in by_parent.values()} | {n for n in modules if n.split(".")[-1] in ROW_NAMES}
    norm = "rmsnorm"
    for pname, p in layer.named_parameters():
        owner_name = pname.rpartition(".")[0]
        owner = modules.get(owner_name)
        leaf = pname.rpartition(".")[2]
        shape = tuple(int(d) for d in p.shape)
        expert = p.dim() == 3 or ".experts." in f".{owner_name}."
        if owner is not None and _is_linear(owner):
            in_f, out_f = _linear_dims(owner)
            split: TpSplit = "replicated" if owner_name in routers else "row" if owner_name in rows else "column"
            if leaf == "bias" and split == "row":
                t_split: TpSplit = "replicated"  # a row-parallel layer adds its bias once, after the all-reduce
            else:
                t_split = split
            rows_, cols_ = (out_f, in_f) if leaf == "weight" else (shape[0], 1)
            tensors.append(ParamTensor(pname, rows_, cols_, t_split, expert))
            if leaf == "weight":
                has_bias = getattr(owner, "bias", None) is not None
                linears.append(Linear(owner_name, in_f, out_f, split, has_bias))
            continue
        if p.dim() == 3:  # fused experts [E, out, in]; AutoTP replaces nn.Linear modules only
            e, out_f, in_f = shape  # nn.Linear's convention per expert, as MixtralExperts stores them
            tensors.append(ParamTensor(pname, e * out_f, in_f, "replicated", True))
            linears.append(Linear(pname.removesuffix(".weight"), in_f, out_f, "replicated", False, experts=e))
            continue
        cls = type(owner).__name__ if owner is not None else ""
        if "norm" in cls.lower() or "norm" in owner_name.split(".")[-1].lower():
            if "LayerNorm" in cls and "RMS" not in cls:
                norm = "layernorm"
            tensors.append(ParamTensor(pname, shape[0] if shape else 1, _cols(shape), "replicated"))
            continue
        if moe and len(shape) == 2 and shape[0] == n_experts:  # a router holding its weight directly
            tensors.append(ParamTensor(pname, shape[0], shape[1], "replicated"))
            linears.append(Linear(owner_name or pname, shape[1], shape[0], "replicated"))
            continue
        tensors.append(ParamTensor(pname, shape[0] if shape else 1, _cols(shape), "replicated", expert))
    heads, kv, head_dim, window = _attention_shape(layer, cfg, hidden)
    return LayerKind(
        tensors=tuple(tensors), linears=tuple(linears), num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        num_experts=n_experts if moe else 0, experts_per_token=top_k if moe else 0, norm=norm,
        attention_window=window,
    )


def _cols(shape: tuple[int, ...]) -> int:
    cols = 1
    for d in shape[1:]:
        cols *= d
    return cols


def _outside(named: list[tuple[str, Any]], split_of: dict[str, TpSplit]) -> tuple[ParamTensor, ...]:
    return tuple(ParamTensor(n, int(p.shape[0]) if p.dim() else 1, _cols(tuple(int(d) for d in p.shape)), split_of.get(n, "replicated"))
                 for n, p in named)


def read_layout(hf_config: dict[str, Any]) -> ModelLayout:
    """The ModelLayout of the causal LM transformers builds from ``hf_config`` (meta device)."""
    import torch
    import transformers

    cfg = _make_config(hf_config)
    with _LOCK, torch.device("meta"):
        model = _build_model(cfg, "eager", torch.float32)
    num_layers = int(cfg.num_hidden_layers)
    prefix = _layer_prefix(model, num_layers)
    if prefix is None:
        raise ValueError(f"{cfg.model_type}: no list of {num_layers} decoder layers in the model")
    layers = model.get_submodule(prefix)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    hidden = int(inp.weight.shape[1])
    vocab = int(inp.weight.shape[0])
    tied = out is not None and out.weight is inp.weight
    n_experts, top_k = _num_experts(cfg), _experts_per_token(cfg)

    lists = _per_layer_lists(cfg, num_layers)
    kinds: list[LayerKind] = []
    signatures: dict[Any, int] = {}
    layer_kinds = []
    for i, layer in enumerate(layers):
        sig = (type(layer).__name__, tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()),
               tuple(repr(getattr(cfg, k)[i]) for k in lists),
               getattr(next((m for n, m in layer.named_modules() if n.endswith("attn") or n.endswith("attention")), None),
                       "sliding_window", None))
        if sig not in signatures:
            signatures[sig] = len(kinds)
            kinds.append(_layer_kind(layer, cfg, hidden, n_experts, top_k))
        layer_kinds.append(signatures[sig])

    names = [n for n, _ in model.named_parameters()]
    in_layers = [k for k, n in enumerate(names) if n.startswith(prefix + ".")]
    first, last = in_layers[0], in_layers[-1]
    params = list(model.named_parameters())
    inp_name = next(n for n, p in params if p is inp.weight)
    split_of: dict[str, TpSplit] = {inp_name: "vocab"}
    if out is not None and not tied:
        split_of[next(n for n, p in params if p is out.weight)] = "head"
    dropout = any(isinstance(getattr(cfg, k, None), float) and getattr(cfg, k) > 0 for k in _DROPOUT_KEYS)
    return ModelLayout(
        embedding=_outside(params[:first], split_of),
        kinds=tuple(kinds),
        layer_kinds=tuple(layer_kinds),
        head=_outside(params[last + 1:], split_of),
        tied_embeddings=tied,
        hidden_size=hidden,
        vocab_size=vocab,
        tied_head_rows=vocab if tied else 0,
        tied_head_cols=hidden if tied else 0,
        extra={"model_class": type(model).__name__, "layers": prefix, "transformers": transformers.__version__,
               "dropout": dropout, "max_position_embeddings": int(getattr(cfg, "max_position_embeddings", 0) or 0),
               "hidden_act": str(getattr(cfg, "hidden_act", None) or getattr(cfg, "activation_function", "") or "")},
    )
