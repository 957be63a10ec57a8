"""Parameter-efficient methods (``peft=``): the spec, the peft-wrapped model, trainable counts.

The base model is built as for full training (planner.trace.model), then wrapped with
``peft.get_peft_model`` (LoRA, prefix tuning, prompt tuning, (IA)^3; ``task_type="CAUSAL_LM"``,
peft's defaults for every option not given) or frozen by hand (BitFit: only ``*.bias`` trains).
peft runs under torch's usual default dtype (fp32), as in a script that loads the model with
``dtype=bfloat16``; with its default ``autocast_adapter_dtype=True`` LoRA / (IA)^3 adapters of a
bf16 model are fp32, and prompt / prefix encoders (which peft does not cast) are created
fp32.  ``ActivationTrace.adapter_dtype`` reports it.  The forward is the PeftModel's, with the same
fake ``input_ids`` / ``labels``: prompt tuning prepends p virtual embeddings and p labels of -100
(the layers, logits and loss see s + p positions); prefix tuning passes a ``DynamicCache`` of p
key/value prefixes per layer (attention over p + s keys; the flash emulation keeps them
un-repeated, eager / CPU SDPA get a [b, 1, s, p + s] mask).  Parameters, frozen or trainable, are
never counted.  What changes, through autograd alone (an op saves an input only if the gradient of
another input needs it):

* a frozen linear no longer saves its input (only its weight), a frozen norm weight no longer
  saves the normalized input, a frozen embedding no longer saves the ids;
* nothing at all is saved before the first tensor that requires grad: with the embeddings frozen
  the first layer's input norm saves nothing (layer 0 differs from the others), and rotary
  cos/sin are saved only if some q or k requires grad;
* LoRA: each adapted linear saves the input of ``lora_A`` (peft casts it to the adapter dtype: a
  separate fp32 copy per adapter for a bf16 model; with fp32 adapters on an fp32 model, or
  ``autocast_adapter_dtype=False``, the storage is shared with the base input) and the rank-r
  output of ``lora_A`` for ``lora_B``; ``lora_dropout > 0`` saves its dropped output instead of
  the cast, plus a bool mask when its input requires grad;
* (IA)^3: an output-scaled linear saves its base output and the scaling vector, an input-scaled
  (feed-forward) one its input cast to fp32 and the vector;
* on a GPU run peft's ``prompt_tokens`` stay on the host and are copied per step: the prompt
  encoder saves an int64 [b, p] (emulated in the ``gpu`` pass, see ``_prompt_tokens_on_host``).
Checked byte for byte against real CPU runs (then a backward) for every method on llama, qwen2
and gpt2, bf16 and fp32, SDPA and eager (tests/planner/test_peft_trace.py).

MeZO (``{"method": "mezo"}``) wraps nothing: its peak of live bytes is measured by
planner.trace.live.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

from planner.trace.model import _LOCK, _build_model, _default_dtype, _make_config

if TYPE_CHECKING:  # pragma: no cover
    import torch


_PEFT_METHODS = ("full", "lora", "prefix", "prompt", "ia3", "bitfit", "mezo")
# peft config class per method (task_type is always CAUSAL_LM)
_PEFT_CONFIGS = {
    "lora": "LoraConfig", "prefix": "PrefixTuningConfig", "prompt": "PromptTuningConfig", "ia3": "IA3Config",
}


def _normalize_peft(peft: dict[str, Any] | None) -> dict[str, Any]:
    """Validated copy of a ``peft=`` spec; ``None`` -> ``{"method": "full"}``."""
    spec = dict(peft or {"method": "full"})
    method = spec.get("method", "full")
    if method not in _PEFT_METHODS:
        raise ValueError(f"peft method must be one of {_PEFT_METHODS}, got {method!r}")
    spec["method"] = method
    extra = set(spec) - {"method"}
    if method in ("full", "bitfit", "mezo") and extra:
        raise ValueError(f"peft method {method!r} takes no options, got {sorted(extra)}")
    return spec


def _apply_peft(model: Any, spec: dict[str, Any]) -> Any:
    """Freeze / wrap ``model`` (a transformers causal LM) for the method of ``spec``.

    lora / prefix / prompt / ia3: ``peft.get_peft_model(model, <Method>Config(task_type="CAUSAL_LM",
    **options))`` with peft's defaults, including ``autocast_adapter_dtype=True`` (LoRA / IA3
    adapters of a bf16/fp16 model are upcast to fp32; the option ``"autocast_adapter_dtype": False``
    in the spec is passed to ``get_peft_model``).  It runs under torch's *default* default dtype
    (fp32), as in a real script that loads the model with ``dtype=bfloat16``: prompt / prefix
    encoders, which peft does not autocast, are then created in fp32 too.
    bitfit: only parameters whose name ends in ``bias`` keep ``requires_grad``.
    full / mezo: unchanged (mezo's forward runs under ``torch.no_grad``)."""
    import torch

    method = spec["method"]
    if method in ("full", "mezo"):
        return model
    if method == "bitfit":
        for name, p in model.named_parameters():
            p.requires_grad_(name.rsplit(".", 1)[-1] == "bias")
        return model
    import warnings

    import peft as peft_lib

    options = {k: v for k, v in spec.items() if k != "method"}
    autocast = options.pop("autocast_adapter_dtype", True)
    if options.setdefault("task_type", "CAUSAL_LM") != "CAUSAL_LM":
        raise ValueError(f"peft task_type must be CAUSAL_LM (a causal LM is traced), got {options['task_type']!r}")
    config = getattr(peft_lib, _PEFT_CONFIGS[method])(**options)
    with _default_dtype(torch.float32), _fake_module_to(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "fan_in_fan_out is set to False" for GPT-2's Conv1D
        return peft_lib.get_peft_model(model, config, autocast_adapter_dtype=autocast)


@contextlib.contextmanager
def _fake_module_to() -> Iterator[None]:
    """Let ``Module.to()`` work on modules holding fake parameters (peft moves / casts adapters).

    ``Module._apply`` always replaces a FakeTensor parameter with ``torch.utils.swap_tensors``,
    which refuses tensors that have weak references; FakeTensorMode's meta converter keeps one to
    every fake ``Parameter`` (``Parameter.__new__`` detaches the data) in its ``tensor_memo``, a
    cache for converting *real* tensors, which this module never does.  Drop the swapped tensors'
    entries before swapping."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    original = torch.utils.swap_tensors

    def swap_tensors(t1: "torch.Tensor", t2: "torch.Tensor") -> None:
        for t in (t1, t2):
            if isinstance(t, FakeTensor):
                memo = t.fake_mode.fake_tensor_converter.meta_converter.tensor_memo
                for key in [k for k, v in memo.items() if v is t1 or v is t2]:
                    del memo[key]
        original(t1, t2)

    torch.utils.swap_tensors = swap_tensors
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


@contextlib.contextmanager
def _prompt_tokens_on_host(model: Any) -> Iterator[None]:
    """GPU pass of prompt / prefix tuning.  peft keeps ``prompt_tokens`` (``arange(p)``) in a plain
    dict, so ``model.to("cuda")`` leaves them on the host and every ``get_prompt`` copies
    ``prompt_tokens.unsqueeze(0).expand(b, -1)`` to the device: a contiguous int64 [b, p] that the
    prompt encoder's embedding saves (8*b*p bytes; the CPU run saves the [p] buffer itself, 8*p).
    Emulated by putting them on the meta device, so that ``.to(<embedding device>)`` copies."""
    import torch

    tokens = getattr(model, "prompt_tokens", None)
    if not isinstance(tokens, dict):
        yield
        return
    saved = dict(tokens)
    for name, t in saved.items():
        tokens[name] = torch.arange(t.numel(), dtype=t.dtype, device="meta")
    try:
        yield
    finally:
        tokens.update(saved)


def _trainable_dtype(model: Any) -> str:
    """dtype(s) of the parameters that train, e.g. "float32" (several joined by "/")."""
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.requires_grad})
    return "/".join(dtypes)


def count_trainable_parameters(hf_config: dict[str, Any], peft: dict[str, Any] | None = None) -> tuple[int, int]:
    """``(trainable, total)`` parameters of the causal LM of ``hf_config`` under the method ``peft``
    (same spec as :func:`trace_activations`), counted like peft's ``get_nb_trainable_parameters()``
    (``named_parameters()``: tied weights once; ``total`` includes the adapters).

    Built on the meta device.  full and mezo: every parameter is trainable (MeZO updates all of
    them with zeroth-order estimates); bitfit: the biases."""
    import torch

    spec = _normalize_peft(peft)
    cfg = _make_config(hf_config)
    with _LOCK, torch.device("meta"):  # _apply_peft switches torch's global default dtype
        model = _apply_peft(_build_model(cfg, "eager", torch.float32), spec)
    trainable = total = 0
    for _, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def apply_method(model: Any, peft: dict[str, Any] | None) -> Any:
    """Freeze / wrap a real (or fake) transformers causal LM for the method of ``peft`` exactly as
    the planner traces it; ``orch launch`` trains the model this returns (launch/models.py)."""
    return _apply_peft(model, _normalize_peft(peft))
