"""Read a Hugging Face ``config.json`` (a dict) into a ModelSpec, offline and without transformers.

Attribute names follow each family's ``configuration_*.py`` in transformers.
"""

from __future__ import annotations

from typing import Any, Callable

from planner.errors import PlanInputError
from planner.model import ModelSpec

# Llama-like families share attribute names (LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config).
LLAMA_LIKE = {"llama", "mistral", "mixtral", "qwen2"}
SUPPORTED_FAMILIES = sorted(LLAMA_LIKE | {"gpt2"})


def _require(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise PlanInputError(f"{where}: config.json has no '{key}'", f"add '{key}' to the config")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PlanInputError(
            f"{where}: '{key}' must be a positive integer, got {value!r}", f"set '{key}' to a positive integer"
        )
    return value


def _activation(name: str, where: str) -> str:
    name = name.lower()
    if name.startswith("gelu"):
        return "gelu"
    if name in {"silu", "swish"}:
        return "silu"
    if name == "relu":
        return "relu"
    raise PlanInputError(f"{where}: unsupported activation '{name}'", "use gelu, silu or relu")


def _llama_like(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    h = _require(cfg, "hidden_size", name)
    a = _require(cfg, "num_attention_heads", name)
    kv = cfg.get("num_key_value_heads") or a
    head_dim = cfg.get("head_dim") or h // a
    if not cfg.get("head_dim") and h % a:
        raise PlanInputError(
            f"{name}: num_attention_heads={a} does not divide hidden_size={h}",
            "make hidden_size a multiple of num_attention_heads or set head_dim",
        )
    family = cfg["model_type"]
    return dict(
        num_layers=_require(cfg, "num_hidden_layers", name),
        hidden_size=h,
        num_heads=a,
        num_kv_heads=kv,
        head_dim=head_dim,
        ffn_hidden_size=_require(cfg, "intermediate_size", name),
        vocab_size=_require(cfg, "vocab_size", name),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        activation=_activation(cfg.get("hidden_act", "silu"), name),
        gated_mlp=True,
        norm="rmsnorm",
        positions="rope",
        # Qwen2 always has q/k/v biases; Llama makes them optional through attention_bias.
        qkv_bias=True if family == "qwen2" else bool(cfg.get("attention_bias", False)),
        out_proj_bias=False if family == "qwen2" else bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dropout=cfg.get("attention_dropout", 0.0) > 0,
        num_experts=cfg.get("num_local_experts", 0) if family == "mixtral" else 0,
        experts_per_token=cfg.get("num_experts_per_tok", 0) if family == "mixtral" else 0,
    )


def _gpt2(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    h = _require(cfg, "n_embd", name)
    a = _require(cfg, "n_head", name)
    if h % a:
        raise PlanInputError(
            f"{name}: n_head={a} does not divide n_embd={h}", "make n_embd a multiple of n_head"
        )
    return dict(
        num_layers=_require(cfg, "n_layer", name),
        hidden_size=h,
        num_heads=a,
        num_kv_heads=a,
        head_dim=h // a,
        ffn_hidden_size=cfg.get("n_inner") or 4 * h,
        vocab_size=_require(cfg, "vocab_size", name),
        max_position_embeddings=_require(cfg, "n_positions", name),
        activation=_activation(cfg.get("activation_function", "gelu_new"), name),
        gated_mlp=False,
        norm="layernorm",
        positions="learned",
        qkv_bias=True,
        out_proj_bias=True,
        mlp_bias=True,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        dropout=max(cfg.get("resid_pdrop", 0.1), cfg.get("attn_pdrop", 0.1), cfg.get("embd_pdrop", 0.1)) > 0,
    )


_READERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    **{family: _llama_like for family in LLAMA_LIKE},
    "gpt2": _gpt2,
}


def spec_from_hf_config(cfg: dict[str, Any], *, name: str) -> ModelSpec:
    """Build the ModelSpec of a Hugging Face config dict (as loaded from config.json)."""
    if not isinstance(cfg, dict):
        raise PlanInputError(f"{name}: config.json must hold a JSON object", "pass a Hugging Face config.json")
    family = cfg.get("model_type")
    if family not in _READERS:
        raise PlanInputError(
            f"{name}: model_type {family!r} is not modelled by the planner",
            f"use a config whose model_type is one of {', '.join(SUPPORTED_FAMILIES)}",
        )
    return ModelSpec(name=name, family=family, hf_config=dict(cfg), **_READERS[family](cfg, name))


# Attribute names other families use for the same quantities (transformers' configuration_*.py).
_GENERIC_KEYS = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "num_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv"),
    "ffn_hidden_size": ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "hidden_dim"),
    "vocab_size": ("vocab_size", "padded_vocab_size"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "seq_length", "max_seq_len"),
}


def _first(cfg: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((cfg[k] for k in keys if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool) and cfg[k] > 0), None)


def generic_spec(cfg: dict[str, Any], *, name: str, exact_params: int) -> ModelSpec:
    """A family the planner has no reader for, approximated by the Llama-like or GPT-like block
    whose parameter count is closest to the exact count (built by transformers on the meta device,
    planner.trace.count_parameters). The structure is approximate; the trace is exact."""
    fields = {k: _first(cfg, keys) for k, keys in _GENERIC_KEYS.items()}
    for required in ("num_layers", "hidden_size", "num_heads", "vocab_size"):
        if fields[required] is None:
            raise PlanInputError(
                f"{name}: cannot find '{required}' in config.json (model_type {cfg.get('model_type')!r})",
                f"add one of {', '.join(_GENERIC_KEYS[required])}",
            )
    h, a = fields["hidden_size"], fields["num_heads"]
    head_dim = cfg.get("head_dim") or h // a
    base = dict(
        num_layers=fields["num_layers"], hidden_size=h, num_heads=a,
        num_kv_heads=fields["num_kv_heads"] if fields["num_kv_heads"] and a % fields["num_kv_heads"] == 0 else a,
        head_dim=head_dim, vocab_size=fields["vocab_size"],
        max_position_embeddings=fields["max_position_embeddings"] or 2048,
        activation="gelu", positions="rope", tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    candidates = []
    for gated in (True, False):
        ffn = fields["ffn_hidden_size"] or (int(8 * h / 3) if gated else 4 * h)
        for biases, norm in ((False, "rmsnorm"), (True, "layernorm")):
            spec = ModelSpec(
                name=name, family=str(cfg.get("model_type")), hf_config=dict(cfg), ffn_hidden_size=ffn, gated_mlp=gated,
                num_params_exact=exact_params,
                norm=norm, qkv_bias=biases, out_proj_bias=biases, mlp_bias=biases, **base,
            )
            candidates.append(spec)
    from planner.params import total_params

    return min(candidates, key=lambda m: abs(total_params(m) - exact_params))
