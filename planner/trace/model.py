"""The model a trace runs: an ``AutoConfig`` from a plain dict (optionally with fewer layers), the
causal LM built from it, the default dtype it is built under, and the parameter count.

torch / transformers are imported inside the functions: importing this module stays cheap."""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # pragma: no cover
    import torch

_DTYPE_NAMES: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# torch.set_default_dtype is process-global: serialise traces.
_LOCK = threading.Lock()


def _torch_dtype(name: str) -> "torch.dtype":
    import torch

    if name not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, _DTYPE_NAMES[name])


def _make_config(hf_config: dict[str, Any], num_layers_override: int | None = None) -> Any:
    """AutoConfig from a plain dict (must contain ``model_type``); optionally fewer layers."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**dict(hf_config))
    cfg.use_cache = False
    if num_layers_override is not None:
        if num_layers_override < 1:
            raise ValueError("num_layers_override must be >= 1")
        old = int(cfg.num_hidden_layers)  # attribute_map covers n_layer (gpt2), num_layers, ...
        cfg.num_hidden_layers = num_layers_override
        # Per-layer lists (layer_types, no_rope_layers, ...) must shrink with the layer count.
        for key, value in list(vars(cfg).items()):
            if isinstance(value, list) and len(value) == old and old != num_layers_override:
                setattr(cfg, key, value[:num_layers_override])
    return cfg


def _build_model(cfg: Any, attn_implementation: str, dtype: "torch.dtype") -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)


def _build_for_attention(cfg: Any, attention: str, dtype: "torch.dtype") -> tuple[Any, str]:
    """The model with the CPU attention implementation for ``attention`` ("flash": SDPA), and that
    implementation's name. A class without SDPA support in transformers (gemma2 soft-capping,
    bloom/alibi, mpt, ...) runs eager attention; its GPU pass still uses the flash kernel when the
    model uses the AttentionInterface (gemma2), else eager with CUDA semantics (bloom)."""
    impl = "sdpa" if attention == "flash" else "eager"
    try:
        return _build_model(cfg, impl, dtype), impl
    except ValueError:
        if impl != "sdpa":
            raise
        return _build_model(cfg, "eager", dtype), "eager"


def count_parameters(hf_config: dict[str, Any]) -> int:
    """Unique parameters of the causal LM built from ``hf_config`` (tied weights counted once).

    Built on the meta device: no memory, no init cost beyond module construction.
    """
    import torch

    cfg = _make_config(hf_config)
    with torch.device("meta"):
        model = _build_model(cfg, "eager", torch.float32)
    # Tied weights are the same Parameter object (parameters() de-duplicates them); de-duplicating on
    # storage identity as well also catches two Parameters that view one buffer.
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        key = p.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


@contextlib.contextmanager
def _default_dtype(dtype: "torch.dtype") -> Iterator[None]:
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _layer_prefix(model: Any, num_layers: int) -> str | None:
    """Path of the ModuleList holding the decoder layers (``model.layers``, ``transformer.h``, ...)."""
    import torch

    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == num_layers:
            if best is None or name.count(".") < best.count("."):
                best = name
    return best
