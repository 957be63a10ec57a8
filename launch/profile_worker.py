"""One rank of `orch profile` on CPU: trains the plan's model with DeepSpeed for a few steps and
accounts for every live tensor storage at each phase of a step.

Run as ``python -m launch.profile_worker JOB.json OUT.json`` with the usual torch.distributed
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; gloo). The driver is
``orchestrator.profiling``.

Method (exact accounting, no allocator statistics on CPU): at each snapshot ``gc.get_objects()``
gives every live tensor; unique storages (by ``data_ptr``) are summed and classified by walking the
DeepSpeed objects that own them:

- parameters: the module's parameters as they are now (stage 3: gathered ones too) and, stage 3,
  each parameter's partition ``ds_tensor``;
- optimizer: the tensors the inner (torch/DeepSpeed) optimizer steps -- the fp32 master partitions
  -- and its ``state`` (Adam's moments);
- activations: storages autograd saved during the forward (``saved_tensors_hooks``, as
  ``planner.trace`` counts them: parameters excluded, a storage counted once, only while the graph
  still holds it);
- gradients: the parameters' ``.grad`` and every other tensor the ZeRO optimizer object holds
  (reduce buckets, gradient partitions, the fp32 gradient copies of the step);
- other: the rest -- the input batch, the module's buffers, gradients of activations in flight
  during the backward, loss scalars -- which the planner has no component for (counted in the peak).

Snapshots: after ``deepspeed.initialize``; at the end of the forward (loss alive); at the entry of
each ZeRO gradient reduction and at the end of the backward (the backward's peak is the largest);
at the entry of the inner optimizer step and after the step.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import weakref
from pathlib import Path
from typing import Any, Callable

from launch.synthetic import batch
from launch.trainer import build_model as _build_model

# ZeRO methods entered with the gradients of a bucket (or, stage 1, all of them) still alive.
_REDUCE_METHODS = (
    "reduce_gradients",  # stage 1/2, engine.allreduce_gradients after the backward
    "reduce_ipg_grads",  # stage 1/2, a full bucket
    "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads",  # stage 3
)
# ZeRO optimizer attributes holding the fp32 master partitions (stage 1/2, stage 3, bf16 stage 0).
_MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")
COMPONENTS = ("parameters", "gradients", "optimizer", "activations", "other")


class _Box:
    """What the pack hook hands autograd: weak-referenceable, so a dropped graph node is seen."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t: Any) -> None:
        self.t = t


class Meter:
    """Snapshots of live storages by component; one per phase of each step."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.module = engine.module
        self.inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        self.saved: dict[int, tuple[int, list[weakref.ref]]] = {}  # ptr -> (nbytes, refs to boxes)
        self.inputs: set[int] = set()
        self.records: list[dict[str, Any]] = []
        self.step = 0

    # activations --------------------------------------------------------------------------
    def pack(self, t: Any) -> Any:
        import torch

        if isinstance(t, torch.nn.Parameter):
            return t
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr == 0 or ptr in {p.untyped_storage().data_ptr() for p in self.module.parameters()}:
            return t
        box = _Box(t)
        self.saved.setdefault(ptr, (st.nbytes(), []))[1].append(weakref.ref(box))
        return box

    @staticmethod
    def unpack(packed: Any) -> Any:
        return packed.t if isinstance(packed, _Box) else packed

    def _activations(self) -> dict[int, int]:
        return {ptr: n for ptr, (n, refs) in self.saved.items() if any(r() is not None for r in refs)}

    # accounting ---------------------------------------------------------------------------
    def _owned(self) -> tuple[set[int], set[int], set[int], list[Any]]:
        """Storages of parameters, of the optimizer, of the module's buffers, and tensors gc may
        not list (gradients are created on access)."""
        params, opt, bufs, extra = set(), set(), set(), []
        for p in self.module.parameters():
            params.add(_ptr(p))
            if getattr(p, "ds_tensor", None) is not None:
                params.add(_ptr(p.ds_tensor))
                extra.append(p.ds_tensor)
            extra += [p, p.grad]
        for b in self.module.buffers():
            bufs.add(_ptr(b))
        # fp32 master partitions: stage 3 hands them to the inner optimizer only during its step.
        for name in _MASTER_ATTRS:
            for t in getattr(self.engine.optimizer, name, None) or []:
                if _is_tensor(t):
                    opt.add(_ptr(t))
                    extra += [t, t.grad]
        for group in getattr(self.inner, "param_groups", []):
            for p in group["params"]:
                opt.add(_ptr(p))
                extra += [p, p.grad]
        for state in getattr(self.inner, "state", {}).values():
            for v in state.values() if isinstance(state, dict) else ():
                if _is_tensor(v):
                    opt.add(_ptr(v))
                    extra.append(v)
        return params, opt, bufs, extra

    def snapshot(self, phase: str) -> None:
        params, opt, bufs, extra = self._owned()
        live = _live_storages(extra)
        acts = self._activations()
        out = dict.fromkeys(COMPONENTS, 0)
        unowned = []
        grads = {_ptr(t) for t in _reachable_tensors(self.engine.optimizer)} | {_ptr(t) for t in extra if _is_tensor(t)}
        for ptr, n in live.items():
            if ptr in params:
                out["parameters"] += n
            elif ptr in opt:
                out["optimizer"] += n
            elif ptr in acts:
                out["activations"] += n
            elif ptr in grads and ptr not in self.inputs and ptr not in bufs:
                out["gradients"] += n
            else:
                out["other"] += n
                unowned.append(n)
        self.records.append({"step": self.step, "phase": phase, **out, "other_storages": sorted(unowned)[::-1][:8]})

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        """Snapshot at each entry of ``owner.name``."""
        fn: Callable[..., Any] = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.snapshot(phase)
            return fn(*args, **kwargs)

        setattr(owner, name, wrapped)


def _is_tensor(v: Any) -> bool:
    import torch

    return torch.is_tensor(v)


def _ptr(t: Any) -> int:
    return t.untyped_storage().data_ptr()


def _reachable_tensors(root: Any, depth: int = 4) -> list[Any]:
    """Tensors held by a DeepSpeed object: its attributes, through lists, tuples, dicts and other
    DeepSpeed objects (reduce buckets, gradient partitions, fp32 gradient copies)."""
    found: list[Any] = []
    seen: set[int] = set()

    def visit(obj: Any, left: int) -> None:
        if id(obj) in seen or left < 0:
            return
        seen.add(id(obj))
        if _is_tensor(obj):
            found.append(obj)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                visit(v, left - 1)
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v, left - 1)
        elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                visit(v, left - 1)

    visit(root, depth)
    return found


def _live_storages(extra: list[Any]) -> dict[int, int]:
    """Unique storages of every live (non-meta) tensor: data_ptr -> bytes."""
    import torch

    gc.collect()
    seen: dict[int, int] = {}
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for t in [*tensors, *(e for e in extra if e is not None)]:
        if t.device.type == "meta":
            continue
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        if st.data_ptr() and st.nbytes():
            seen.setdefault(st.data_ptr(), st.nbytes())
    return seen


def profile(job: dict[str, Any]) -> dict[str, Any]:
    import deepspeed
    import torch
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(job["seed"])
    model = _build_model(job["hf_config"])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=job["ds_config"])
    del model
    meter = Meter(engine)
    meter.snapshot("init")
    for name in _REDUCE_METHODS:
        if hasattr(engine.optimizer, name):
            meter.wrap(engine.optimizer, name, "backward")
    meter.wrap(meter.inner, "step", "step")
    mb, seq, vocab = job["micro_batch"], job["seq_len"], int(job["hf_config"]["vocab_size"])
    for step in range(job["steps"]):
        meter.step = step
        x = batch(step, rank, mb, seq, vocab, seed=job["seed"])
        meter.inputs, meter.saved = {_ptr(x)}, {}
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            loss = engine(input_ids=x, labels=x).loss
        meter.snapshot("forward")
        engine.backward(loss)
        del loss
        meter.snapshot("backward")
        engine.step()
        meter.snapshot("step")
    return {"rank": rank, "world": dist.get_world_size(), "optimizer_class": type(engine.optimizer).__name__,
            "records": meter.records}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(args[0]).read_text())
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    result = profile(job)
    Path(args[1]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
