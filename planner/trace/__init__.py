"""Exact activation memory of a Hugging Face causal LM, measured without a GPU.

This is the only package of ``planner`` that imports torch / transformers, and it
does so lazily inside functions: ``import planner.trace`` (and each of its modules)
stays cheap.

Modules:

* ``passes``: :func:`trace_activations` (the method: a ``cpu`` and a ``gpu`` pass
  on one fake model; what is not counted) and :func:`extrapolate_layers`.
* ``results``: what a trace returns (:class:`ActivationTrace`, :class:`SavedTensor`).
* ``model``: config and model construction, the default dtype, :func:`count_parameters`.
* ``finetuning``: parameter-efficient methods (``peft=``), :func:`count_trainable_parameters`.
* ``gpu_kernels``: the CUDA kernels the ``gpu`` pass emulates (CPU vs CUDA differences).
* ``recorder``: the saved-tensors recorder, module scopes, the torch function mode.
* ``live``: MeZO's peak of live bytes (a ``TorchDispatchMode`` over a no_grad forward).
* ``layout``: every parameter tensor of the model and how tensor parallelism splits it (meta device).
* ``profile``: the activation profile the planner uses by default (saved, backward working sets,
  full recompute), per part of the model, at micro-batch 1, 2 and 3.
* ``quantized``: QLoRA's bitsandbytes 4-bit base and peft's prepare_model_for_kbit_training.
* ``stages``: ``--trace``: a whole pipeline stage traced at the plan's shape (a cross-check).
"""

import logging

# peft imports bitsandbytes, whose CPU backend warns at import that it could not download an
# accelerated 4-bit GEMM (no network): the trace runs bitsandbytes' fake kernels, never that GEMM.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from planner.trace.finetuning import count_trainable_parameters

# torch dtype name per DTypeName; private, but the tests read it through this package.
from planner.trace.model import _DTYPE_NAMES as _DTYPE_NAMES
from planner.trace.model import count_parameters
from planner.trace.passes import extrapolate_layers, trace_activations
from planner.trace.results import ActivationTrace, AttentionKind, DTypeName, SavedTensor

__all__ = [
    "ActivationTrace",
    "AttentionKind",
    "DTypeName",
    "SavedTensor",
    "count_parameters",
    "count_trainable_parameters",
    "extrapolate_layers",
    "trace_activations",
]
