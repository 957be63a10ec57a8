"""What one pass records: the storages autograd saves, with the op that saved them and the module
that produced them.

``_Recorder`` is the pair of ``saved_tensors_hooks``: it keys storages by
``untyped_storage()._cdata`` (views of one buffer count once; a saved view keeps its whole storage),
skips parameter storages, and keeps only those the graph still holds when the forward ends.
``_module_scopes`` keeps the path of the running module; ``_make_function_mode`` is the torch
function mode that names the running top-level torch function, records producers and, in the
``gpu`` pass, swaps CPU-specific ops for the CUDA emulations of planner.trace.gpu_kernels.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any, Iterator

from planner.trace.gpu_kernels import (
    _gpu_flash_attention,
    _gpu_layer_norm,
    _grouped_mm_emulated,
)
from planner.trace.results import SavedTensor

if TYPE_CHECKING:  # pragma: no cover
    import torch


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
