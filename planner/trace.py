"""Exact activation memory of a Hugging Face causal LM, measured without a GPU.

This is the only module of ``planner`` that imports torch / transformers, and it
does so lazily inside functions: ``import planner.trace`` stays cheap.

Method (see /work/shared/ENVIRONMENT.md, "Exact activation memory without a GPU")
---------------------------------------------------------------------------------
1. ``torch.set_default_dtype(dtype)`` and build the model from its config dict
   inside ``FakeTensorMode``: every tensor is a fake CPU tensor (shape, dtype,
   strides, a fake storage, no data), so a 405B model costs no memory.
2. Run one *training* forward (``model.train()``, so dropout as configured;
   ``use_cache=False``; fake int64 ``input_ids`` and ``labels`` [b, s]; no
   ``attention_mask``, i.e. an unpadded, unpacked batch) inside
   ``torch.autograd.graph.saved_tensors_hooks``: the pack hook sees every tensor
   autograd keeps for backward.  Only ``.loss`` is kept, as in a training step.
3. Count unique storages (key ``untyped_storage()._cdata``, size
   ``untyped_storage().nbytes()``): views of one buffer count once, and a saved
   view keeps its *whole* storage alive (e.g. a V slice of a fused QKV output
   keeps all of it), exactly as on a device.  A storage counts only if the graph
   still holds it when the forward ends: branches that do not reach the loss
   (a MoE router's ``masked_fill`` that only feeds ``topk`` indices) are freed
   during the forward together with what they saved.
4. Parameter storages are excluded (model state).  Buffers (rotary
   ``inv_freq``) are never saved: neither they nor ``position_ids`` require
   grad, so the rotary ``cos``/``sin`` [1, s, d] have no graph; ``cos``/``sin``
   themselves ARE saved (by ``q*cos``, ``rotate_half(q)*sin``), once per model
   since every layer uses the same two storages (they are reported as
   model-level).

Two passes run on the same fake model:

* ``cpu``: exactly what a real CPU run saves, byte for byte (checked against
  real runs keyed by ``data_ptr()`` for 19 architectures, bf16 and fp32, SDPA
  and eager; see tests/planner/test_trace.py).  -> ``cpu_trace_bytes``.
* ``gpu``: the same forward with CUDA semantics where CPU kernels save something
  else.  -> ``total_bytes``.  ``gpu_correction_bytes = cpu_trace_bytes -
  total_bytes`` (signed: CUDA keeps *more* for LayerNorm, see below).

CPU vs CUDA differences emulated by the ``gpu`` pass
----------------------------------------------------
* Attention, ``attention="flash"``.  A CUDA flash kernel (torch SDPA flash, or
  FlashAttention-2 through transformers) saves: q [b, a, s, d]; k, v with their
  own kv heads [b, k, s, d] (GQA is native: never repeated); the output o; and
  logsumexp fp32 [b, a, s].  o is ``empty_like(q.transpose(1, 2))`` (flash
  ``mha_fwd``), so it follows q's memory layout: for q = RoPE(q_proj(x).view
  (b, s, a, d).transpose(1, 2)) that is [b, s, a, d] and o IS the storage
  ``o_proj`` saves as its input (no copy); for q a slice of a fused QKV output
  (GPT-2) it is a fresh contiguous [b, s, a, d], again shared with ``c_proj``.
  Causal / sliding-window masking and dropout are in-kernel: no mask, no
  probabilities, no dropout mask are saved.  The dropout philox seed/offset
  are CPU scalars in torch SDPA outside CUDA-graph capture (0 GPU bytes); the
  flash-attn package keeps a 16-byte CUDA ``rng_state`` per layer (not
  counted).  fp32 has no flash kernel: torch picks the memory-efficient kernel,
  whose logsumexp is [b, a, ceil(s/32)*32] fp32.  A head_dim that is not a
  multiple of 8 is padded by both kernels and the padded copies are saved.
  The emulation is a transformers ``AttentionInterface`` function, so it gets
  the un-repeated K/V and no mask is built; models that call
  ``F.scaled_dot_product_attention`` directly are intercepted there instead.
  What the CPU SDPA path saves (torch 2.13 + transformers 5):
    - no mask, no dropout (a normal unpadded training batch; transformers then
      calls SDPA with ``is_causal=True`` and ``enable_gqa=True``):
      ``_scaled_dot_product_flash_attention_for_cpu`` saves the same q, k, v,
      o, lse: correction 0.
    - with a mask (padding, packing, sliding window shorter than s):
      transformers builds a bool [b, 1, s, s] mask; SDPA converts it to a float
      mask of the query dtype in every layer and saves it (elt*b*s*s bytes per
      layer), and since GQA + mask is not used, transformers repeats K/V
      (``repeat_kv``): k, v saved as [b, a, s, d] (+2*elt*b*s*(a-k)*d per layer).
      Under FakeTensorMode transformers cannot read ``position_ids`` and always
      assumes a possibly-packed batch; ``_assume_unpacked`` restores the real
      decision (no mask) so that the ``cpu`` pass equals a real run.
    - with dropout > 0 (GPT-2 defaults): no CPU fused kernel supports it; the
      math fallback computes in fp32 even for bf16 and saves fp32 q*scale,
      k^T, v [b*a, s, d], the softmax [b, a, s, s], the dropout noise
      [b, a, s, s] and the dropped probabilities [b*a, s, s] (12*b*a*s*s bytes
      per layer), while the attention output is a separate contiguous copy.
* Dropout (``F.dropout``, not in place): CUDA's ``at::dropout`` calls
  ``native_dropout`` which saves a bool mask (1 byte/element); the CPU saves the
  scaled noise in the input dtype (2 or 4 bytes/element).
* LayerNorm (``F.layer_norm``): CUDA keeps mean/rstd [.., 1] in fp32 (accumulate
  type); the CPU keeps them in the input dtype: +4*b*s bytes per LayerNorm on
  CUDA for bf16/fp16.  (transformers' RMSNorms are Python ops: identical.)
Everything else (matmuls, activations, softmax, log_softmax/nll_loss,
embedding, MoE ``grouped_mm``) saves the same tensors on both devices.

Mixed precision is "parameters in ``dtype``" (DeepSpeed bf16, FSDP
param_dtype): torch autocast with fp32 master weights would additionally save
the low-precision copies of the weights.  Not counted: parameters, gradients,
optimizer state, transient workspaces (e.g. the fp32 logits before
log_softmax), the CUDA caching allocator's rounding (blocks of 512 B), hub
kernels (``use_kernels``/Liger) and activation checkpointing.

Parameter-efficient methods (``peft=``)
---------------------------------------
The base model is built as above, then wrapped with ``peft.get_peft_model`` (LoRA, prefix tuning,
prompt tuning, (IA)^3; ``task_type="CAUSAL_LM"``, peft's defaults for every option not given) or
frozen by hand (BitFit: only ``*.bias`` trains).  peft runs under torch's usual default dtype
(fp32), as in a script that loads the model with ``dtype=bfloat16``; with its default
``autocast_adapter_dtype=True`` LoRA / (IA)^3 adapters of a bf16 model are fp32, and prompt /
prefix encoders (which peft does not cast) are created fp32.  ``ActivationTrace.adapter_dtype``
reports it.  The forward is the PeftModel's, with the same fake ``input_ids`` / ``labels``:
prompt tuning prepends p virtual embeddings and p labels of -100 (the layers, logits and loss see
s + p positions); prefix tuning passes a ``DynamicCache`` of p key/value prefixes per layer
(attention over p + s keys; the flash emulation keeps them un-repeated, eager / CPU SDPA get a
[b, 1, s, p + s] mask).  Parameters, frozen or trainable, are never counted.  What changes,
through autograd alone (an op saves an input only if the gradient of another input needs it):

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

MeZO (``peft={"method": "mezo"}``): peak of live bytes, not saved bytes
---------------------------------------------------------------------
MeZO (Malladi et al. 2023) estimates gradients from two forward passes and never runs a
backward: what bounds its activation memory is the *peak of live tensors* during one forward with
labels, in ``model.eval()`` (no dropout, as MeZO's ``zo_forward``) under ``torch.no_grad``.  It is
measured with a ``TorchDispatchMode`` under FakeTensorMode (``_make_live_tracker``): every aten op
is seen (composite functions are decomposed before the Python dispatch key, so their temporaries
are seen too); an output whose storage is none of the op's inputs' storages is an allocation; a
``weakref.finalize`` on its ``UntypedStorage`` -- whose Python object torch preserves exactly as
long as the C++ StorageImpl lives, whoever holds it -- frees its bytes.  So frees happen when the
model's Python code drops the last reference, as on a device.  Parameters and buffers are
excluded, the inputs and labels included.  The ``gpu`` pass adds the CUDA allocations that
differ (flash kernel's out + logsumexp, LayerNorm's fp32 mean/rstd, fp16 softmax to fp32 fused,
no fp32 copy).  ``total_bytes`` is the peak, ``tensors`` are the storages alive at the peak and
``peak_at`` the allocation that reached it.  Checked against the allocator events of
``torch.profiler`` in real CPU runs: equal for llama / qwen2; the only differences seen are CPU
kernels' internal buffers (a bf16 GEMM's packing buffer), which the profiler also records.
Not counted: the temporaries of MeZO's parameter perturbation (``z`` regenerated from a seed,
one parameter at a time), the cuBLAS workspace, allocator rounding / fragmentation.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Literal

if TYPE_CHECKING:  # pragma: no cover
    import torch

AttentionKind = Literal["flash", "eager"]
DTypeName = Literal["bf16", "fp16", "fp32"]

_DTYPE_NAMES: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Name under which the GPU flash emulator is registered in transformers' AttentionInterface.
_GPU_FLASH_IMPL = "orch_gpu_fused_attention"  # must not contain "flash": transformers treats those names as FA kernels
# torch.set_default_dtype is process-global: serialise traces.
_LOCK = threading.Lock()
# Recorder of the running trace (under _LOCK), so the registered attention function can label saves.
_ACTIVE: list["_Recorder"] = []


@dataclass(frozen=True)
class SavedTensor:
    """One unique storage kept for backward."""

    layer: int | None  # decoder layer that produced it; None: produced outside the layers
    scope: str  # module that saved it first, layer index as '*' ("layers.*.self_attn.q_proj")
    op: str  # top-level torch function during which autograd saved it ("linear", "mul", ...)
    producer: str  # module that produced it ("model.rotary_emb", "layers.*.input_layernorm", "<input>")
    shape: tuple[int, ...]  # shape of the first saved view
    dtype: str
    nbytes: int  # size of the whole storage


@dataclass(frozen=True)
class ActivationTrace:
    """Bytes kept for backward by one training forward of one micro batch."""

    total_bytes: int  # GPU figure (CUDA semantics, see module docstring)
    cpu_trace_bytes: int  # raw count of the CPU fake trace (== a real CPU run)
    gpu_correction_bytes: int  # cpu_trace_bytes - total_bytes (negative if CUDA keeps more)
    num_layers: int  # decoder layers actually traced
    seq_len: int
    micro_batch: int
    attention: str
    dtype: str
    kernels: str = ""  # attention actually traced, e.g. "cpu:sdpa gpu:flash"
    layer_bytes: tuple[int, ...] = ()  # GPU figure per decoder layer (producer attribution)
    model_bytes: int = 0  # GPU figure outside the decoder layers (embedding, norm, logits, loss, rotary)
    breakdown: tuple[tuple[str, int], ...] = ()  # ("layer|layers.*.mlp.act_fn:silu", bytes), GPU figure
    tensors: tuple[SavedTensor, ...] = field(default=(), repr=False)  # GPU figure
    cpu_tensors: tuple[SavedTensor, ...] = field(default=(), repr=False)
    # Fine-tuning method (``peft=``).  For "mezo" every byte figure above is the *peak of live bytes*
    # of a no_grad forward, ``tensors`` are the storages alive at that peak, and layer_bytes /
    # model_bytes split that peak by producer (not additive over depth: see extrapolate_layers).
    method: str = "full"
    adapter_dtype: str = ""  # dtype of the trainable parameters (LoRA/IA3 adapters: fp32 by peft's autocast)
    virtual_tokens: int = 0  # prefix / prompt tuning: p (prompt tuning runs the layers on seq_len + p)
    peak_at: str = ""  # mezo: "module:function/aten op" whose allocation reached the peak (GPU pass)


# --------------------------------------------------------------------------- config / model


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


# --------------------------------------------------------------------------- parameter-efficient methods

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


# --------------------------------------------------------------------------- CUDA emulation


def _gpu_flash_attention(
    query: "torch.Tensor",
    key: "torch.Tensor",
    value: "torch.Tensor",
    dropout_p: float,
) -> "torch.Tensor":
    """What a CUDA flash kernel saves and returns.  q: [b, a, s, d]; k, v: [b, k, s, d]
    (un-repeated).  Returns the output viewed as [b, s, a, dv] (flash-attn's convention)."""
    import torch

    class _FlashEmulator(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor") -> "torch.Tensor":
            b, a, s, d = q.shape
            dv = v.shape[-1]
            pad = (-d) % 8  # both kernels pad head_dim to a multiple of 8 and save the padded copies
            if pad:
                q = q.new_empty(b, a, s, d + pad)
                k = k.new_empty(*k.shape[:-1], d + pad)
                v = v.new_empty(*v.shape[:-1], dv + pad)
            # flash mha_fwd: out = empty_like(q.transpose(1, 2)): the output keeps q's memory layout
            # when q is dense ([b, s, a, d] after a q_proj view + RoPE, so o_proj reuses the storage),
            # and is a contiguous [b, s, a, d] otherwise (q a slice of a fused qkv projection).
            if dv + ((-dv) % 8) == q.shape[-1]:
                out = torch.empty_like(q.transpose(1, 2))
            else:
                out = q.new_empty(b, s, a, dv + ((-dv) % 8))
            if q.dtype == torch.float32:
                # no fp32 flash kernel: memory-efficient kernel, logsumexp padded to a multiple of 32
                lse = q.new_empty(b, a, -(-s // 32) * 32, dtype=torch.float32)
            else:
                lse = q.new_empty(b, a, s, dtype=torch.float32)  # flash: fp32 [b, a, s]
            # Dropout happens in-kernel; its philox seed/offset are CPU scalars (0 GPU bytes).
            ctx.save_for_backward(q, k, v, out, lse)
            return out[..., :dv] if out.shape[-1] != dv else out

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:  # pragma: no cover - trace only
            raise NotImplementedError("flash emulator is for memory tracing only")

    del dropout_p  # in-kernel: no saved tensor depends on it
    return _FlashEmulator.apply(query, key, value)


def _gpu_flash_attention_forward(
    module: Any,
    query: "torch.Tensor",
    key: "torch.Tensor",
    value: "torch.Tensor",
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple["torch.Tensor", None]:
    """transformers AttentionInterface function: receives un-repeated K/V, returns [b, s, a, d]."""
    del module, attention_mask, scaling, kwargs  # masks / windows / scaling are in-kernel
    for rec in _ACTIVE:
        rec.op.append("flash_attention")
    try:
        return _gpu_flash_attention(query, key, value, dropout), None
    finally:
        for rec in _ACTIVE:
            rec.op.pop()


def _grouped_mm_emulated(mat_a: "torch.Tensor", mat_b: "torch.Tensor", offs: Any, out_dtype: Any) -> "torch.Tensor":
    """2D x 3D grouped matmul ([S, k] x [E, k, n] -> [S, n]) for fake tensors of any dtype."""
    import torch

    class _GroupedMm(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, a: "torch.Tensor", b: "torch.Tensor", o: Any) -> "torch.Tensor":
            ctx.save_for_backward(b, o, a)
            return a.new_empty(a.shape[0], b.shape[-1], dtype=out_dtype or a.dtype)

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:  # pragma: no cover - trace only
            raise NotImplementedError("grouped_mm emulator is for memory tracing only")

    if mat_a.dim() != 2 or mat_b.dim() != 3:
        raise NotImplementedError("only the MoE form [S, k] x [E, k, n] of grouped_mm is emulated")
    return _GroupedMm.apply(mat_a, mat_b, offs)


def _gpu_layer_norm(
    x: "torch.Tensor",
    normalized_shape: Any,
    weight: "torch.Tensor | None",
    bias: "torch.Tensor | None",
) -> "torch.Tensor":
    """CUDA native_layer_norm: saves input, weight, bias, mean and rstd in fp32 ([..., 1])."""
    import torch

    n = len(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) else 1

    class _CudaLayerNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, inp: "torch.Tensor", w: Any, b: Any) -> "torch.Tensor":
            acc = torch.float32 if inp.dtype in (torch.float16, torch.bfloat16) else inp.dtype
            stat_shape = tuple(inp.shape[: inp.dim() - n]) + (1,) * n
            mean = inp.new_empty(stat_shape, dtype=acc)
            rstd = inp.new_empty(stat_shape, dtype=acc)
            ctx.save_for_backward(inp, w, b, mean, rstd)
            return inp.new_empty(inp.shape)

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:  # pragma: no cover - trace only
            raise NotImplementedError("layer norm emulator is for memory tracing only")

    return _CudaLayerNorm.apply(x, weight, bias)


# --------------------------------------------------------------------------- recorder


def _fn_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    return name.strip("_") or name


class _Packed:
    """What the pack hook hands to autograd (weak-referenceable, unlike a plain tuple)."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t: "torch.Tensor") -> None:
        self.t = t


class _Recorder:
    """Collects saved storages with the op and module that saved / produced them."""

    def __init__(self, layer_prefix: str | None, param_keys: set[int]) -> None:
        self.layer_prefix = layer_prefix
        self.param_keys = param_keys
        self.stack: list[str] = [""]  # current module path
        self.op: list[str] = ["?"]  # current top-level torch function
        self.producer: dict[int, str] = {}  # storage key -> producing module path
        self.keep: list[Any] = []  # keeps produced storages alive so their keys are never reused
        # storage key -> (producer path, saver path, op, shape, dtype, nbytes)
        self.saved: dict[int, tuple[str, str, str, tuple[int, ...], Any, int]] = {}
        self.refs: dict[int, list[Any]] = {}  # storage key -> weak refs to the packed wrappers

    # saved_tensors_hooks -------------------------------------------------
    def pack(self, t: "torch.Tensor") -> Any:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.param_keys:
            return t
        if key not in self.saved:
            # Unknown producer: created inside the op that is saving it (an output, or an internal
            # copy such as matmul's reshape of a non-contiguous operand) -> current module.
            producer = self.producer.get(key, self.stack[-1])
            self.saved[key] = (producer, self.stack[-1], self.op[-1], tuple(t.shape), t.dtype, st.nbytes())
            self.refs[key] = []
        # The graph owns the returned wrapper; a weak reference tells whether the node that saved it
        # is still alive when the forward ends.  Branches that do not reach the loss (e.g. a
        # masked_fill whose output only feeds topk *indices* in a MoE router) are freed during the
        # forward, and so are their saved tensors: they must not be counted (a real run reuses
        # their memory).
        packed = _Packed(t)
        self.refs[key].append(weakref.ref(packed))
        return packed

    @staticmethod
    def unpack(packed: Any) -> "torch.Tensor":
        return packed.t if isinstance(packed, _Packed) else packed

    def freeze_alive(self) -> None:
        """Keep only storages still referenced by the autograd graph (call while the loss lives)."""
        self.saved = {k: v for k, v in self.saved.items() if any(r() is not None for r in self.refs[k])}
        self.refs = {}

    # results ---------------------------------------------------------------
    def split_scope(self, path: str) -> tuple[int | None, str]:
        """("model.layers.3.mlp.up_proj") -> (3, "layers.*.mlp.up_proj")."""
        if self.layer_prefix and path.startswith(self.layer_prefix + "."):
            idx, _, rel = path[len(self.layer_prefix) + 1 :].partition(".")
            if idx.isdigit():
                return int(idx), "layers.*" + ("." + rel if rel else "")
        return None, path or "<model>"

    def tensors(self) -> tuple[SavedTensor, ...]:
        out = []
        for producer, saver, op, shape, dtype, nbytes in self.saved.values():
            layer, prod = self.split_scope(producer)
            _, scope = self.split_scope(saver)
            dt = str(dtype).replace("torch.", "")
            out.append(SavedTensor(layer, scope, op, prod, shape, dt, nbytes))
        return tuple(out)


def _make_function_mode(rec: _Recorder, emulate_cuda: bool, attention: str, record_producers: bool = True) -> Any:
    """``record_producers=False`` (inference pass): keep no reference to any output storage, so
    that storages die when the model's code drops them (the live-bytes tracker needs that)."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class _Mode(TorchFunctionMode):
        """Labels saves with the top-level torch function, records producers, and (``gpu``
        pass) swaps CPU-specific ops for CUDA-equivalent ones."""

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            rec.op.append(_fn_name(func))
            try:
                out = self._call(func, args, kwargs)
            finally:
                rec.op.pop()
            if not record_producers:
                return out
            scope = rec.stack[-1]
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    if st._cdata not in rec.producer:
                        rec.producer[st._cdata] = scope
                        rec.keep.append(st)
            return out

        def _call(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
            if func in grouped_mm_fns:
                return _grouped_mm_any(*args, **kwargs)
            if emulate_cuda:
                if func is F.dropout:
                    return _cuda_dropout(*args, **kwargs)
                if func is F.layer_norm:
                    return _cuda_layer_norm(*args, **kwargs)
                if func is F.scaled_dot_product_attention and attention == "flash":
                    return _cuda_sdpa(*args, **kwargs)
                if func is F.softmax:
                    return _cuda_softmax(*args, **kwargs)
            return func(*args, **kwargs)

    grouped_mm_fns = {f for f in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if f}

    def _grouped_mm_any(mat_a: Any, mat_b: Any, offs: Any = None, bias: Any = None, out_dtype: Any = None) -> Any:
        # torch's meta kernel for _grouped_mm accepts only bf16 with 16-byte aligned strides, while
        # the real CPU kernel also runs fp32/fp16 (transformers' default MoE "grouped_mm" path).
        # Same saves as the real GroupedMmBackward0: mat_b (expert weights, a parameter), offs
        # (int32 [E]) and mat_a; same output shape.
        if bias is not None:
            raise NotImplementedError("grouped_mm with bias is not emulated")
        return _grouped_mm_emulated(mat_a, mat_b, offs, out_dtype)

    def _cuda_dropout(input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
        # at::dropout on CUDA: native_dropout -> saves a bool mask (CPU: noise in input dtype).
        # In-place dropout_ uses the noise path on CUDA too: left as is.
        if training and 0.0 < p < 1.0 and not inplace:
            return torch.native_dropout(input, p, True)[0]
        return F.dropout(input, p, training, inplace)

    def _cuda_softmax(input: Any, dim: Any = None, _stacklevel: int = 3, dtype: Any = None) -> Any:
        # at::softmax(fp16 input, dtype=float32) on CUDA runs the fused half_to_float kernel; the CPU
        # (and bf16 on CUDA) first materialises an fp32 copy of the input.  That copy is never saved
        # for backward (same saved output), but it is live memory: it matters for the no_grad peak.
        if dtype == torch.float32 and isinstance(input, torch.Tensor) and input.dtype == torch.float16:
            return torch._softmax(input, dim if dim is not None else -1, True)
        return F.softmax(input, dim, _stacklevel, dtype)

    def _cuda_layer_norm(
        input: Any, normalized_shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5
    ) -> Any:
        return _gpu_layer_norm(input, normalized_shape, weight, bias)

    def _cuda_sdpa(
        query: Any,
        key: Any,
        value: Any,
        attn_mask: Any = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: Any = None,
        enable_gqa: bool = False,
    ) -> Any:
        # Fallback for models that call SDPA directly: the mask is assumed causal/sliding (in-kernel).
        out = _gpu_flash_attention(query, key, value, dropout_p)  # [b, s, a, d]
        return out.transpose(1, 2)  # SDPA returns [b, a, s, d] (a transposed view, as on CUDA)

    return _Mode()


@contextlib.contextmanager
def _default_dtype(dtype: "torch.dtype") -> Iterator[None]:
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _assume_unpacked() -> Iterator[None]:
    """Under FakeTensorMode transformers cannot look at ``position_ids`` values, so
    ``find_packed_sequence_indices`` returns a tensor ("maybe packed") and a full
    [b, 1, s, s] mask is built, which also disables GQA in SDPA (``repeat_kv``).  A
    real run on an unpacked, unpadded batch gets ``None`` there, then ``is_causal``
    SDPA without a mask.  Restore that decision for the trace."""
    import transformers.masking_utils as mu

    if not hasattr(mu, "find_packed_sequence_indices"):  # older transformers: nothing to undo
        yield
        return
    original = mu.find_packed_sequence_indices
    mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        mu.find_packed_sequence_indices = original


def _register_gpu_flash() -> None:
    from transformers import AttentionInterface

    if _GPU_FLASH_IMPL not in AttentionInterface._global_mapping:
        # No mask function is registered for it on purpose: transformers then skips mask creation.
        AttentionInterface.register(_GPU_FLASH_IMPL, _gpu_flash_attention_forward)


def _layer_prefix(model: Any, num_layers: int) -> str | None:
    """Path of the ModuleList holding the decoder layers (``model.layers``, ``transformer.h``, ...)."""
    import torch

    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == num_layers:
            if best is None or name.count(".") < best.count("."):
                best = name
    return best


@contextlib.contextmanager
def _module_scopes(model: Any, rec: _Recorder, hf_model: Any = None) -> Iterator[None]:
    """Keep ``rec.stack`` = path of the running module.  Paths are relative to the transformers
    model ``hf_model`` (``model.layers.0.mlp``) even when ``model`` is a peft wrapper; the
    wrapper's own modules keep their path (``prompt_encoder.default``)."""
    hf_prefix = ""
    if hf_model is not None and hf_model is not model:
        hf_prefix = next(name for name, mod in model.named_modules() if mod is hf_model)

    def rel(name: str) -> str:
        if not hf_prefix:
            return name
        if name == hf_prefix or name == "" or hf_prefix.startswith(name + "."):
            return ""  # the transformers model and the wrappers around it
        if name.startswith(hf_prefix + "."):
            return name[len(hf_prefix) + 1 :]
        return name

    def enter(name: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            rec.stack.append(name)

        return hook

    def leave(module: Any, args: Any, output: Any) -> None:
        rec.stack.pop()

    handles = []
    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(enter(rel(name))))
        handles.append(mod.register_forward_hook(leave))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run_pass(
    model: Any,
    rec: _Recorder,
    *,
    seq_len: int,
    micro_batch: int,
    emulate_cuda: bool,
    attention: str,
    hf_model: Any = None,
) -> None:
    import torch

    try:
        with _module_scopes(model, rec, hf_model):
            # input_ids/labels are fake int64 [b, s]; values are irrelevant (all zeros).
            input_ids = torch.zeros(micro_batch, seq_len, dtype=torch.long)
            labels = torch.zeros(micro_batch, seq_len, dtype=torch.long)
            for t in (input_ids, labels):
                rec.producer[t.untyped_storage()._cdata] = "<input>"
            _ACTIVE.append(rec)
            with _make_function_mode(rec, emulate_cuda, attention):
                with torch.autograd.graph.saved_tensors_hooks(rec.pack, rec.unpack):
                    # Keep only the loss, as a training step does (logits etc. are dropped here).
                    loss = model(input_ids=input_ids, labels=labels).loss
            rec.freeze_alive()
            del loss
    finally:
        _ACTIVE.clear()


def _make_live_tracker(rec: _Recorder, exclude: set[int]) -> Any:
    """A TorchDispatchMode that follows the live (allocated, not yet freed) storages.

    Every aten op is seen (composite functions such as ``F.linear`` or ``F.cross_entropy`` are
    decomposed before the Python dispatch key, so their temporaries are seen too).  An output whose
    storage is not one of the op's inputs' storages is a fresh allocation: its ``nbytes()`` are
    added and a ``weakref.finalize`` on its ``UntypedStorage`` subtracts them when the storage dies.
    Storage PyObjects are preserved while the C++ StorageImpl lives, so the finalizer fires exactly
    when the last tensor / view / C++ reference goes, i.e. when a device allocator would get the
    block back.  The peak is checked after each op (maxima are only reached right after an
    allocation) and the live set is snapshotted there (cheap: under no_grad only a handful of
    storages are alive at a time).  ``exclude``: parameter and buffer storages (model state)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class _LiveTracker(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            # storage key -> (producer path, producer path, op, shape, dtype, nbytes) (_Recorder.saved format)
            self.live: dict[int, tuple[str, str, str, tuple[int, ...], Any, int]] = {}
            self.current = 0
            self.peak = 0
            self.peak_live: dict[int, tuple[str, str, str, tuple[int, ...], Any, int]] = {}
            self.peak_at = ""

        def register(self, t: "torch.Tensor", producer: str, op: str) -> None:
            st = t.untyped_storage()
            key = st._cdata
            if key in self.live or key in exclude:
                return
            nbytes = st.nbytes()
            self.live[key] = (producer, producer, op, tuple(t.shape), t.dtype, nbytes)
            self.current += nbytes
            weakref.finalize(st, self._free, key)
            if self.current > self.peak:
                self.peak = self.current
                self.peak_live = dict(self.live)
                self.peak_at = f"{producer}:{op}"

        def _free(self, key: int) -> None:
            entry = self.live.pop(key, None)
            if entry is not None:
                self.current -= entry[-1]

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            inputs = {
                t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
            }
            op = f"{rec.op[-1]}/{func.overloadpacket.__name__}"
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                    self.register(t, rec.stack[-1], op)
            return out

    return _LiveTracker()


def _run_inference_pass(
    model: Any,
    rec: _Recorder,
    *,
    seq_len: int,
    micro_batch: int,
    emulate_cuda: bool,
    attention: str,
    hf_model: Any = None,
) -> str:
    """MeZO: one forward with labels under ``torch.no_grad``; ``rec.saved`` <- the storages alive at
    the peak of live bytes (inputs included).  Returns where the peak was reached."""
    import torch

    exclude = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    tracker = _make_live_tracker(rec, exclude)
    try:
        with _module_scopes(model, rec, hf_model):
            input_ids = torch.zeros(micro_batch, seq_len, dtype=torch.long)
            labels = torch.zeros(micro_batch, seq_len, dtype=torch.long)
            for t in (input_ids, labels):
                tracker.register(t, "<input>", "zeros")
            _ACTIVE.append(rec)
            with _make_function_mode(rec, emulate_cuda, attention, record_producers=False):
                with torch.no_grad(), tracker:
                    loss = model(input_ids=input_ids, labels=labels).loss
            del loss
    finally:
        _ACTIVE.clear()
    rec.saved = tracker.peak_live
    return tracker.peak_at


def _breakdown(tensors: tuple[SavedTensor, ...]) -> tuple[tuple[str, int], ...]:
    agg: dict[str, int] = {}
    for t in tensors:
        key = f"{'layer' if t.layer is not None else 'model'}|{t.scope}:{t.op}"
        agg[key] = agg.get(key, 0) + t.nbytes
    return tuple(sorted(agg.items(), key=lambda kv: -kv[1]))


def trace_activations(
    hf_config: dict[str, Any],
    *,
    seq_len: int,
    micro_batch: int,
    attention: AttentionKind = "flash",
    dtype: DTypeName = "bf16",
    num_layers_override: int | None = None,
    peft: dict[str, Any] | None = None,
) -> ActivationTrace:
    """Trace the bytes one training forward keeps for backward (see module docstring).

    ``peft``: fine-tuning method, ``None`` = ``{"method": "full"}``; see "Parameter-efficient
    methods" in the module docstring: ``{"method": "lora", "r": 8, "target_modules": [...]}``
    (any ``LoraConfig`` option), ``{"method": "prefix", "num_virtual_tokens": 30}``,
    ``{"method": "prompt", "num_virtual_tokens": 20}``, ``{"method": "ia3"}`` (any ``IA3Config``
    option), ``{"method": "bitfit"}``, ``{"method": "mezo"}`` (peak of live bytes of a no_grad
    forward instead of saved bytes).  ``seq_len`` is the real tokens per sample; prompt tuning
    runs the layers on ``seq_len + num_virtual_tokens`` (``ActivationTrace.virtual_tokens``).

    ``attention``: "flash" (model built with SDPA on the CPU pass, CUDA flash kernel on the GPU
    pass) or "eager" (transformers' eager attention on both).
    ``num_layers_override``: trace only that many decoder layers (per-layer config lists such as
    ``layer_types`` are truncated).  ``extrapolate_layers(trace(1), trace(2), L)`` is then exact
    whenever layers 2..L save the same as layer 2, i.e. all layers have the same shapes and
    kinds (llama, mistral with s <= window or no window, mixtral, qwen2, gpt2, ...): every saved
    storage is either produced inside one layer or shared by all of them (rotary cos/sin, input
    ids, final norm, logits, loss), and the residual stream a layer hands to the next one is
    counted once per layer.  Not exact when layers differ: alternating sliding/full attention
    with a CPU mask, ``first_k_dense_replace`` > 1, ``mlp_only_layers``, ``decoder_sparse_step`` > 1,
    per-layer widths.  Trace all layers then (~10 ms per layer and pass on a 2-core CPU).

    ``layer_bytes`` attributes each storage to the layer that produced it (so a post-norm
    model's layer output, saved by the next layer, counts in the producing layer).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if attention not in ("flash", "eager"):
        raise ValueError(f"attention must be 'flash' or 'eager', got {attention!r}")
    if seq_len < 1 or micro_batch < 1:
        raise ValueError("seq_len and micro_batch must be >= 1")
    tdtype = _torch_dtype(dtype)
    spec = _normalize_peft(peft)
    method = spec["method"]
    cfg = _make_config(hf_config, num_layers_override)
    num_layers = int(cfg.num_hidden_layers)
    cpu_impl = "sdpa" if attention == "flash" else "eager"
    if attention == "flash":
        _register_gpu_flash()

    from torch._subclasses.fake_tensor import DynamicOutputShapeException

    with _LOCK, _default_dtype(tdtype), _assume_unpacked(), FakeTensorMode():
        try:
            model = _build_model(cfg, cpu_impl, tdtype)
        except ValueError:
            if cpu_impl != "sdpa":
                raise
            # No SDPA support in transformers (gemma2 soft-capping, bloom/alibi, ...): the CPU pass
            # runs eager attention; the GPU pass still uses the flash kernel when the model uses the
            # AttentionInterface (gemma2), else eager with CUDA semantics (bloom).
            cpu_impl = "eager"
            model = _build_model(cfg, cpu_impl, tdtype)
        hf_model = model
        model = _apply_peft(hf_model, spec)
        if method == "mezo":
            model.eval()  # MeZO's zo_forward: eval mode (no dropout), no autograd graph
        else:
            model.train()  # dropout as configured in the config (and lora_dropout)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if method != "mezo" and not trainable:
            raise ValueError(f"{cfg.model_type}: no trainable parameter for peft method {method!r} (no biases?)")
        adapter_dtype = str(tdtype).replace("torch.", "") if method == "mezo" else _trainable_dtype(model)
        virtual_tokens = 0
        if method in ("prefix", "prompt"):
            virtual_tokens = int(model.active_peft_config.num_virtual_tokens)
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        prefix = _layer_prefix(hf_model, num_layers)
        run = _run_inference_pass if method == "mezo" else _run_pass
        passes = {}

        try:
            cpu = _Recorder(prefix, params)
            passes["cpu"] = run(model, cpu, seq_len=seq_len, micro_batch=micro_batch, emulate_cuda=False,
                                attention=attention, hf_model=hf_model)

            gpu_impl = cpu_impl
            if attention == "flash" and getattr(hf_model, "_can_set_attn_implementation", lambda: False)():
                hf_model.set_attn_implementation(_GPU_FLASH_IMPL)  # K/V un-repeated, no mask built
                gpu_impl = "flash"
            gpu = _Recorder(prefix, params)
            with _prompt_tokens_on_host(model):
                passes["gpu"] = run(model, gpu, seq_len=seq_len, micro_batch=micro_batch, emulate_cuda=True,
                                    attention=attention, hf_model=hf_model)
        except DynamicOutputShapeException as exc:
            # e.g. experts_implementation="eager" MoE: per-expert token lists come from nonzero().
            raise ValueError(
                f"{cfg.model_type}: the forward has data-dependent shapes ({exc}); fake tensors cannot "
                "trace it. For MoE models use experts_implementation='grouped_mm' (the default)."
            ) from exc

    cpu_tensors, gpu_tensors = cpu.tensors(), gpu.tensors()
    cpu_bytes = sum(t.nbytes for t in cpu_tensors)
    gpu_bytes = sum(t.nbytes for t in gpu_tensors)
    layer_bytes = [0] * num_layers
    model_bytes = 0
    for t in gpu_tensors:
        if t.layer is None:
            model_bytes += t.nbytes
        else:
            layer_bytes[t.layer] += t.nbytes
    return ActivationTrace(
        total_bytes=gpu_bytes,
        cpu_trace_bytes=cpu_bytes,
        gpu_correction_bytes=cpu_bytes - gpu_bytes,
        num_layers=num_layers,
        seq_len=seq_len,
        micro_batch=micro_batch,
        attention=attention,
        dtype=dtype,
        kernels=f"cpu:{cpu_impl} gpu:{gpu_impl}",
        layer_bytes=tuple(layer_bytes),
        model_bytes=model_bytes,
        breakdown=_breakdown(gpu_tensors),
        tensors=gpu_tensors,
        cpu_tensors=cpu_tensors,
        method=method,
        adapter_dtype=adapter_dtype,
        virtual_tokens=virtual_tokens,
        peak_at=passes["gpu"] or "",
    )


def extrapolate_layers(one_layer: ActivationTrace, two_layers: ActivationTrace, num_layers: int) -> int:
    """``total(L)`` from traces of 1 and 2 layers (exact for identical layers, see trace_activations):
    ``model + layer_0 + (L - 1) * layer_1``, all three read from the 2-layer trace.

    That also covers the peft methods, whose layer 0 saves less than the others (its input does
    not require grad), and model-level tensors that only layers >= 1 save: with prefix tuning on a
    rotary model neither q nor k of layer 0 requires grad, so a 1-layer model never saves the
    shared cos/sin (``one_layer.total_bytes + (L - 1) * (two - one)`` would count them L - 1
    times).  MeZO: the peak of live bytes does not grow with depth (a layer's temporaries are freed
    before the next one runs; layers >= 1 all peak alike), so it is the 2-layer figure."""
    if (one_layer.num_layers, two_layers.num_layers) != (1, 2):
        raise ValueError("expected traces of exactly 1 and 2 layers")
    if one_layer.method != two_layers.method:
        raise ValueError(f"traces of different methods: {one_layer.method!r} vs {two_layers.method!r}")
    if num_layers == 1:
        return one_layer.total_bytes
    if two_layers.method == "mezo":
        return two_layers.total_bytes
    return two_layers.model_bytes + two_layers.layer_bytes[0] + (num_layers - 1) * two_layers.layer_bytes[1]
