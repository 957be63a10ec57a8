"""Exact activation memory of a Hugging Face causal LM, measured without a GPU: the passes.

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
  else (planner.trace.gpu_kernels).  -> ``total_bytes``.  ``gpu_correction_bytes
  = cpu_trace_bytes - total_bytes`` (signed: CUDA keeps *more* for LayerNorm).

Mixed precision is "parameters in ``dtype``" (DeepSpeed bf16, FSDP
param_dtype): torch autocast with fp32 master weights would additionally save
the low-precision copies of the weights.  Not counted: parameters, gradients,
optimizer state, transient workspaces (e.g. the fp32 logits before
log_softmax), the CUDA caching allocator's rounding (blocks of 512 B), hub
kernels (``use_kernels``/Liger) and activation checkpointing.

Parameter-efficient methods (``peft=``) wrap or freeze the model first
(planner.trace.finetuning); MeZO measures the peak of live bytes of a no_grad
forward instead of saved bytes (planner.trace.live).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from planner.trace.finetuning import (
    _apply_peft,
    _normalize_peft,
    _prompt_tokens_on_host,
    _trainable_dtype,
)
from planner.trace.gpu_kernels import _ACTIVE, _GPU_FLASH_IMPL, _register_gpu_flash
from planner.trace.live import _make_live_tracker
from planner.trace.model import (
    _LOCK,
    _build_for_attention,
    _default_dtype,
    _layer_prefix,
    _make_config,
    _torch_dtype,
)
from planner.trace.recorder import _make_function_mode, _module_scopes, _Recorder
from planner.trace.results import ActivationTrace, AttentionKind, DTypeName, SavedTensor


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

    ``peft``: fine-tuning method, ``None`` = ``{"method": "full"}``; see the docstring of
    planner.trace.finetuning: ``{"method": "lora", "r": 8, "target_modules": [...]}``
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
    if attention == "flash":
        _register_gpu_flash()

    from torch._subclasses.fake_tensor import DynamicOutputShapeException

    with _LOCK, _default_dtype(tdtype), _assume_unpacked(), FakeTensorMode():
        model, cpu_impl = _build_for_attention(cfg, attention, tdtype)
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
