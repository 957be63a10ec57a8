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
  With full recompute (the plan's ``recompute == "full"``: transformers' per-layer gradient
  checkpointing, non-reentrant) the checkpointed layers' inputs are held by torch.utils.checkpoint,
  not saved through autograd's hooks, so they count here too, and the layer rebuilt in the
  backward is seen in the true peak only.

Snapshots: after ``deepspeed.initialize``; at the end of the forward (loss alive); at the entry and
the exit of each ZeRO gradient reduction (ZeRO-1 allocates its partition buffer inside the first
one) and at the end of the backward (the backward's peak is the largest); at the entry of the inner
optimizer step and after the step.

Allocator figures beside the tensor accounting: on GPU (``job["device"] == "cuda"``) each snapshot
also records torch.cuda's allocated and reserved bytes, their peaks since the previous snapshot
(``torch.cuda.reset_peak_memory_stats``) and the device memory in use (``torch.cuda.mem_get_info``:
context, NCCL and cuBLAS buffers beside the allocator's pool); ``job["tensors"] = False`` skips the
tensor accounting (allocator figures only: fast enough for billion-parameter models). On CPU each
snapshot records the bytes glibc malloc holds free in its arenas (``mallinfo2().fordblks``): the CPU
counterpart of the CUDA allocator's reserved-but-unallocated bytes.

DeepSpeed is reached only through ``launch.trainer`` (the one module that imports it).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

from launch import trainer
from launch.job import JobSpec
from launch.synthetic import batch

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

    def __init__(self, engine: Any, *, cuda: bool = False, tensors: bool = True) -> None:
        self.cuda, self.tensors = cuda, tensors
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
        record = {"step": self.step, "phase": phase, **(_cuda_stats() if self.cuda else _malloc_stats())}
        if self.tensors:
            record.update(self._components())
        self.records.append(record)

    def _components(self) -> dict[str, Any]:
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
        return {**out, "other_storages": sorted(unowned)[::-1][:8]}

    def wrap(self, owner: Any, name: str, phase: str, *, on_exit: bool = False) -> None:
        """Snapshot at each entry (and, ``on_exit``, each exit) of ``owner.name``."""
        fn: Callable[..., Any] = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.snapshot(phase)
            result = fn(*args, **kwargs)
            if on_exit:
                self.snapshot(phase)
            return result

        setattr(owner, name, wrapped)


def _cuda_stats() -> dict[str, int]:
    """The CUDA allocator now and at its peak since the previous snapshot, and the device memory
    in use by every client (context, NCCL, cuBLAS and the allocator's pool)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    stats = {
        "allocated": torch.cuda.memory_allocated(),
        "reserved": torch.cuda.memory_reserved(),
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "device_used": total - free,
    }
    torch.cuda.reset_peak_memory_stats()
    return stats


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h, glibc >= 2.33)."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_stats() -> dict[str, int]:
    """Bytes glibc malloc holds free in its arenas (fordblks); empty where mallinfo2 is missing."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = _MallInfo2
    return {"malloc_free": int(fn().fordblks)}


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


def _engine(job: dict[str, Any], cuda: bool) -> Any:
    """torch.distributed from the environment, then the plan's model in a DeepSpeed engine, set up
    exactly as a launched worker sets it up (launch.trainer.setup_engine: model, method, optimizer)."""
    import torch
    import torch.distributed as dist

    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    trainer.init_distributed()
    engine, _ = trainer.setup_engine(JobSpec(**job["spec"]))
    return engine


def _train_step(engine: Any, meter: Meter, x: Any) -> None:
    """One forward, backward and optimizer step, with the snapshots between them."""
    import torch

    meter.inputs, meter.saved = {_ptr(x)}, {}
    hooks = torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack) if meter.tensors else nullcontext()
    with hooks:
        loss = engine(input_ids=x, labels=x).loss
    meter.snapshot("forward")
    engine.backward(loss)
    del loss
    meter.snapshot("backward")
    engine.step()
    meter.snapshot("step")


@contextmanager
def _cpu_peak(meter: Meter) -> Iterator[dict[str, int]]:
    """The true peak of tensor storages over a step on CPU, transients between snapshots included
    (the CPU counterpart of torch.cuda.max_memory_allocated): the exact live bytes of the last
    snapshot, plus the highest running sum of the CPU allocator's allocations and frees that
    torch.profiler reports (``profile_memory=True``; c10's ProfiledCPUMemoryReporter). A storage
    allocated before the step and freed during it is not reported, which can only raise the figure."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    last = next(r for r in reversed(meter.records) if "parameters" in r)  # a snapshot, not the last step's peak record
    base = sum(int(last.get(k, 0)) for k in COMPONENTS)
    out: dict[str, int] = {}
    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = highest = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        highest = max(highest, running)
    out["peak_allocated"] = base + highest


def _measure(job: dict[str, Any], cuda: bool, records: list[dict[str, Any]]) -> Any:
    """Build the engine and train ``job["steps"]`` steps, appending every snapshot to ``records``;
    the engine."""
    import torch.distributed as dist

    engine = _engine(job, cuda)
    meter = Meter(engine, cuda=cuda, tensors=job.get("tensors", True))
    meter.records = records
    meter.snapshot("init")
    for name in _REDUCE_METHODS:
        if hasattr(engine.optimizer, name):
            meter.wrap(engine.optimizer, name, "backward", on_exit=True)
    meter.wrap(meter.inner, "step", "step")
    mb, seq, vocab = job["micro_batch"], job["seq_len"], int(job["vocab_size"])
    for step in range(job["steps"]):
        meter.step = step
        dp_rank = dist.get_rank() // job.get("tp", 1)  # AutoTP groups are consecutive ranks; they share a batch
        x = batch(step, dp_rank, mb, seq, vocab, seed=job["seed"]).to(engine.device)
        if cuda or not meter.tensors:
            _train_step(engine, meter, x)
            continue
        with _cpu_peak(meter) as peak:
            _train_step(engine, meter, x)
        records.append({"step": step, "phase": "peak", **peak})
    return engine


def profile(job: dict[str, Any]) -> dict[str, Any]:
    """This rank's snapshots; on GPU a run out of memory ends with an 'oom' record (the allocator's
    peaks up to the failed allocation) instead of an error."""
    import torch
    import torch.distributed as dist

    cuda = job.get("device", "cpu") == "cuda"
    out_of_memory = (getattr(torch, "OutOfMemoryError", MemoryError),) if cuda else ()
    records: list[dict[str, Any]] = []
    try:
        engine = _measure(job, cuda, records)
        optimizer, oom = type(engine.optimizer).__name__, False
    except out_of_memory:
        records.append({"step": -1, "phase": "oom", **_cuda_stats()})
        optimizer, oom = "", True
    result = {"rank": dist.get_rank(), "world": dist.get_world_size(), "optimizer_class": optimizer, "oom": oom,
              "device_name": torch.cuda.get_device_name() if cuda else "cpu", "records": records}
    dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(args[0]).read_text())
    if job.get("device", "cpu") == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported
    result = profile(job)
    Path(args[1]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
