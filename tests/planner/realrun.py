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
