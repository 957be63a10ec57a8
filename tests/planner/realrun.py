"""A real (not fake) CPU training forward, measured the way the trace measures: the bytes of the
unique storages autograd saves for backward (keyed by data_ptr, parameters excluded), counted while
only the loss is alive. The reference the FakeTensor trace is checked against."""

from __future__ import annotations

import weakref

import torch


class _Box:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def saved_bytes_of_forward(model: torch.nn.Module, *, vocab_size: int, seq_len: int, micro_batch: int,
                           backward: bool = False) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: dict[int, int] = {}
    refs: dict[int, list] = {}

    def pack(t: torch.Tensor):  # type: ignore[no-untyped-def]
        st = t.untyped_storage()
        if st.data_ptr() in params:
            return t
        box = _Box(t)
        sizes.setdefault(st.data_ptr(), st.nbytes())
        refs.setdefault(st.data_ptr(), []).append(weakref.ref(box))
        return box

    ids = torch.randint(0, vocab_size, (micro_batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda p: p.t if isinstance(p, _Box) else p):
        loss = model(input_ids=ids, labels=ids.clone()).loss
    alive = sum(n for key, n in sizes.items() if any(r() is not None for r in refs[key]))
    if backward:
        loss.backward()  # the saved tensors were enough to differentiate
    return alive


def live_bytes_after_forward(model: torch.nn.Module, *, vocab_size: int, seq_len: int, micro_batch: int) -> int:
    """Bytes a real CPU training forward leaves allocated while only its loss is kept, from the CPU
    allocator's own events (torch.profiler, ``profile_memory=True``): what full recompute keeps,
    which saved-tensor hooks cannot see (non-reentrant checkpoints hold each layer's input in their
    closures)."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, vocab_size, (micro_batch, seq_len))
    labels = ids.clone()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model(input_ids=ids, labels=labels).loss
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    alive = sum(e.nbytes() for e in events)
    loss.backward()  # the kept tensors were enough to differentiate
    return alive


def build_real(cfg: dict, *, dtype: torch.dtype = torch.bfloat16, attention: str = "sdpa", recompute: bool = False,
               seed: int = 0) -> torch.nn.Module:
    """The real model of a config dict (random weights), in training mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = AutoConfig.for_model(**cfg)
    hf.use_cache = False
    try:
        model = AutoModelForCausalLM.from_config(hf, attn_implementation=attention, dtype=dtype)
    except ValueError:
        model = AutoModelForCausalLM.from_config(hf, attn_implementation="eager", dtype=dtype)
    if recompute:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    return model.train()


def unique_params(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.untyped_storage().data_ptr() not in seen:
            seen.add(p.untyped_storage().data_ptr())
            total += p.numel()
    return total


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the unique storages a training step starts from: parameters, buffers, bitsandbytes'
    quantisation constants and the optimizer's states (gradients set to None)."""
    storages: dict[int, int] = {}

    def add(t: object) -> None:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            storages.setdefault(st.data_ptr(), st.nbytes())

    for t in (*model.parameters(), *model.buffers()):
        add(t)
        state = getattr(t, "quant_state", None)
        while state is not None:
            for field in ("absmax", "code", "offset"):
                add(getattr(state, field, None))
            state = getattr(state, "state2", None)
    for per_param in optimizer.state.values():
        for v in per_param.values():
            add(v)
    return sum(storages.values())


def peak_of_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, vocab_size: int, seq_len: int,
                 micro_batch: int) -> int:
    """The true peak of tensor bytes over one training step (forward, backward, optimizer step) on
    CPU: the live bytes the step starts from plus the highest running sum of the CPU allocator's
    allocations and frees during it (torch.profiler's memory events), measured on the second step
    (the optimizer's states exist by then)."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab_size, (micro_batch, seq_len), generator=gen) for _ in range(2)]
    labels = [b.clone() for b in batches]
    model.train()
    model(input_ids=batches[0], labels=labels[0]).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    base = _state_bytes(model, optimizer)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model(input_ids=batches[1], labels=labels[1]).loss
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    running = highest = 0
    for e in events:
        running += e.nbytes()
        highest = max(highest, running)
    return base + highest
