"""MeZO (``peft={"method": "mezo"}``): peak of live bytes, not saved bytes.

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

The forward itself is run by ``_run_inference_pass`` (planner.trace.passes).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from planner.trace.recorder import _Recorder


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
