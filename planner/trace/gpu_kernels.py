"""CUDA kernels emulated by the ``gpu`` pass, where CPU kernels save something else.

The emulations are ``torch.autograd.Function``s on fake tensors that save what the CUDA kernel
saves; the ``gpu`` pass swaps them in through the torch function mode of planner.trace.recorder
(``_make_function_mode``, which also holds the small dropout / softmax swaps) and, for attention,
through a transformers ``AttentionInterface`` function registered here.  ``_grouped_mm_emulated``
is no CUDA difference: both passes use it, since torch's meta kernel for ``_grouped_mm`` accepts
only bf16.

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
      assumes a possibly-packed batch; ``_assume_unpacked`` (planner.trace.passes)
      restores the real decision (no mask) so that the ``cpu`` pass equals a real run.
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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from planner.trace.recorder import _Recorder

# Name under which the GPU flash emulator is registered in transformers' AttentionInterface.
_GPU_FLASH_IMPL = "orch_gpu_fused_attention"  # must not contain "flash": transformers treats those names as FA kernels
# Recorder of the running trace (under planner.trace.model._LOCK), so the registered attention
# function can label saves.
_ACTIVE: list["_Recorder"] = []


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
        def backward(ctx: Any, grad: Any) -> Any:
            # GroupedMmBackward0: grad_a = grouped_mm(grad, b^T) [S, k], grad_b = grouped_mm(a^T, grad) [E, k, n].
            b, o, a = ctx.saved_tensors
            grad_a = a.new_empty(a.shape) if ctx.needs_input_grad[0] else None
            grad_b = b.new_empty(b.shape) if ctx.needs_input_grad[1] else None
            return grad_a, grad_b, None

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


def _register_gpu_flash() -> None:
    from transformers import AttentionInterface

    if _GPU_FLASH_IMPL not in AttentionInterface._global_mapping:
        # No mask function is registered for it on purpose: transformers then skips mask creation.
        AttentionInterface.register(_GPU_FLASH_IMPL, _gpu_flash_attention_forward)
