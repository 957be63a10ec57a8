"""The activation profile of a causal LM: what every part of the model keeps for backward, at the
sequence length of the job, for any micro-batch and tensor degree, from the model's own modules.

The default path of the planner (planner.memory.profile reads it); traced once per (config,
sequence, attention, dtype, method) and cached (planner.cache). A few fake forwards (and one fake
backward) per micro-batch b = 1, 2, 3 of a model cut to the layers that differ (two for
homogeneous models) measure, per part of the model:

* ``saved``: the storages autograd keeps (the method of planner.trace.passes, a ``cpu`` and a ``gpu``
  pass), attributed to the layer that produced them; model-level storages are the input side
  (saved before the first layer, or by layer 0 alone: ids, the embedding output), the output side
  (saved after the last layer: final norm, logits, loss, labels) or shared (saved by several
  layers: rotary cos/sin, prefixes), which every pipeline stage holds;
* the tensor-parallel share: a storage is split by tensor parallelism when it is derived from the
  output of a column-parallel linear and not yet reduced by a row-parallel one (the layout's
  AutoTP classification, planner.trace.layout), tracked through every torch function; so
  ``bytes(tp) = whole + split / tp`` (and ``whole / tp`` too under sequence parallelism);
* ``kept`` (full recompute, transformers' non-reentrant gradient checkpointing as orch launches
  it): the storages alive when the forward ends, whoever holds them (the checkpoints keep each
  layer's input through their closures, where saved-tensor hooks cannot see it);
* the backward (``cpu`` semantics, one fake backward with a live-storage timeline): the loss's
  gradients before the first parameter gradient (``loss_grad``), and per part the working set of
  activation gradients beyond the saved storages still alive when its backward ends (``working``).

Bytes are affine in the micro-batch from b = 2 on (every term is per token or per sample) and b = 1
is kept apart (a slice that is a view at b = 1 is a copy at b > 1: the shifted labels); b = 4 is
checked in the tests. The sequence length is the job's own, so nothing is extrapolated in s.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

from planner.errors import error_detail
from planner.trace.finetuning import _apply_peft, _normalize_peft, _prompt_tokens_on_host, _trainable_dtype
from planner.trace.gpu_kernels import _ACTIVE, _GPU_FLASH_IMPL, _register_gpu_flash
from planner.trace.layout import _layer_kind, _num_experts, _experts_per_token
from planner.trace.model import _LOCK, _build_for_attention, _default_dtype, _layer_prefix, _make_config, _torch_dtype
from planner.trace.passes import _assume_unpacked
from planner.trace.recorder import _make_function_mode, _module_scopes, _Recorder

BATCHES = (1, 2, 3)
_INPUT, _SHARED, _OUTPUT = "input", "shared", "output"


def traced_layer_count(layer_kinds: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """(layers to trace, representative traced layer of every real layer). Layer 0 stands for
    itself (its input comes from the embedding: frozen in fine-tuning, so it keeps less); the last
    layer too (its output goes to the final norm rather than to another layer, so a post-norm
    layer keeps less there and a checkpointed one keeps no output); every other layer is
    represented by the first traced layer >= 1 of its kind. The traced model ends with a layer of
    the last layer's kind."""
    n_real = len(layer_kinds)
    first: dict[int, int] = {}
    for i, k in enumerate(layer_kinds[:-1]):
        if i >= 1 and k not in first:
            first[k] = i
    m = max(first.values(), default=0) + 2
    while m < n_real and layer_kinds[m - 1] != layer_kinds[-1]:
        m += 1
    m = min(m, n_real)
    rep = tuple(0 if i == 0 else m - 1 if i == n_real - 1 else first[k] for i, k in enumerate(layer_kinds))
    return m, rep


class _PartRecorder(_Recorder):
    """The saved-tensors recorder, also noting for each storage whether tensor parallelism splits
    it, which layers saved it, and whether it was saved before, inside or after the layers."""

    def __init__(self, layer_prefix: str | None, param_keys: set[int]) -> None:
        super().__init__(layer_prefix, param_keys)
        self.split: set[int] = set()  # storages derived from a column-parallel output, not yet reduced
        self.ctx: list[bool] = [False]  # does the running top-level function read a split storage?
        self.savers: dict[int, set[int]] = {}
        self.when: dict[int, str] = {}
        self.split_saved: dict[int, bool] = {}
        self.entered = False

    def current_layer(self) -> int | None:
        layer, _ = self.split_scope(self.stack[-1])
        if layer is not None:
            self.entered = True
        return layer

    def pack(self, t: Any) -> Any:
        key = t.untyped_storage()._cdata
        if key in self.param_keys:
            return t
        known = key in self.producer
        out = super().pack(t)
        layer = self.current_layer()
        self.savers.setdefault(key, set())
        if layer is not None:
            self.savers[key].add(layer)
        self.when.setdefault(key, "inside" if layer is not None else ("after" if self.entered else "before"))
        split = key in self.split or (not known and self.ctx[-1])
        self.split_saved[key] = self.split_saved.get(key, False) or split
        return out


def _split_mode(rec: _PartRecorder) -> Any:
    """Outermost torch function mode: a function's outputs are split when one of its tensor inputs
    is (the data flow between a column- and a row-parallel linear)."""
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    class _SplitMode(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            reads = any(isinstance(x, torch.Tensor) and x.untyped_storage()._cdata in rec.split
                        for x in tree_leaves((args, kwargs)))
            rec.ctx.append(reads)
            try:
                out = func(*args, **kwargs)
            finally:
                rec.ctx.pop()
            if reads:
                for x in tree_leaves(out):
                    if isinstance(x, torch.Tensor) and x.untyped_storage()._cdata not in rec.param_keys:
                        rec.split.add(x.untyped_storage()._cdata)
            return out

    return _SplitMode()


@contextlib.contextmanager
def _tp_hooks(hf_model: Any, rec: _PartRecorder, prefix: str, kinds: list[Any]) -> Iterator[None]:
    """Column-parallel linears split their output; row-parallel ones (all-reduced) make it whole."""
    import torch
    from torch.utils._pytree import tree_leaves

    def hook(split: bool) -> Any:
        def on_output(module: Any, args: Any, output: Any) -> None:
            for x in tree_leaves(output):
                if isinstance(x, torch.Tensor):
                    key = x.untyped_storage()._cdata
                    (rec.split.add if split else rec.split.discard)(key)
        return on_output

    handles = []
    for j, kind in enumerate(kinds):
        for lin in kind.linears:
            if lin.split not in ("column", "row") or lin.experts:
                continue
            try:
                module = hf_model.get_submodule(f"{prefix}.{j}.{lin.name}")
            except AttributeError:
                continue
            handles.append(module.register_forward_hook(hook(lin.split == "column")))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _inputs(micro_batch: int, seq_len: int) -> tuple[Any, Any]:
    import torch

    return torch.zeros(micro_batch, seq_len, dtype=torch.long), torch.zeros(micro_batch, seq_len, dtype=torch.long)


def _saved_pass(model: Any, hf_model: Any, prefix: str, kinds: list[Any], params: set[int], *, seq_len: int, b: int,
                emulate_cuda: bool, attention: str) -> dict[str, Any]:
    """Saved bytes per part, whole and split."""
    import torch

    rec = _PartRecorder(prefix, params)
    ids, labels = _inputs(b, seq_len)
    for t in (ids, labels):
        rec.producer[t.untyped_storage()._cdata] = "<input>"
    try:
        with _module_scopes(model, rec, hf_model), _tp_hooks(hf_model, rec, prefix, kinds):
            _ACTIVE.append(rec)
            with _split_mode(rec), _make_function_mode(rec, emulate_cuda, attention):
                with torch.autograd.graph.saved_tensors_hooks(rec.pack, rec.unpack):
                    loss = model(input_ids=ids, labels=labels).loss
            rec.freeze_alive()
            del loss
    finally:
        _ACTIVE.clear()
    parts: dict[str, list[int]] = {}
    for key, (producer, _saver, _op, _shape, _dtype, nbytes) in rec.saved.items():
        layer, _ = rec.split_scope(producer)
        if layer is not None:
            part = f"layer{layer}"
        else:
            when, savers = rec.when.get(key, "before"), rec.savers.get(key, set())
            if when == "before" or (when == "inside" and savers == {0} and len(kinds) > 1):
                part = _INPUT
            elif when == "after":
                part = _OUTPUT
            else:
                part = _SHARED
        whole_split = parts.setdefault(part, [0, 0])
        whole_split[1 if rec.split_saved.get(key) else 0] += nbytes
    return parts


class _Timeline:
    """A TorchDispatchMode's bookkeeping of live storages: one serial per allocation, its bytes and
    producing module, and the order of allocations and frees."""

    def __init__(self, rec: _Recorder, exclude: set[int]) -> None:
        self.rec = rec
        self.exclude = exclude
        self.live: dict[int, int] = {}  # storage key -> serial
        self.nbytes: list[int] = []
        self.producer: list[str] = []
        self.events: list[tuple[int, int]] = []  # (serial, +1 alloc / -1 free)

    def register(self, t: Any, producer: str) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live or key in self.exclude:
            return
        serial = len(self.nbytes)
        self.nbytes.append(st.nbytes())
        self.producer.append(producer)
        self.live[key] = serial
        self.events.append((serial, 1))
        weakref.finalize(st, self._free, key, serial)

    def _free(self, key: int, serial: int) -> None:
        if self.live.get(key) == serial:
            del self.live[key]
        self.events.append((serial, -1))

    def mode(self) -> Any:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        timeline = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                        timeline.register(t, timeline.rec.stack[-1])
                return out

        return _Mode()


def _part_of(rec: _Recorder, producer: str, after_layers: bool) -> str:
    layer, _ = rec.split_scope(producer)
    if layer is not None:
        return f"layer{layer}"
    return _OUTPUT if after_layers else _INPUT


def _live_pass(model: Any, hf_model: Any, prefix: str, n_layers: int, *, seq_len: int, b: int, attention: str,
               backward: bool, recompute: bool = False) -> dict[str, Any]:
    """``backward=False``: bytes per part alive when the forward ends (with the loss alive).
    ``backward=True``: also one backward on a live-storage timeline: the loss's gradients and each
    part's working set (see the module docstring); ``recompute``: the model is checkpointed, and
    each layer's working set includes its rebuilt forward (_recompute_windows)."""
    import torch

    rec = _Recorder(prefix, set())
    exclude = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    tl = _Timeline(rec, exclude)
    ids, labels = _inputs(b, seq_len)
    for t in (ids, labels):
        tl.register(t, "<input>")
    with _module_scopes(model, rec, hf_model):
        with _make_function_mode(rec, False, attention, record_producers=False), tl.mode():
            loss = model(input_ids=ids, labels=labels).loss
            fwd_end = len(tl.events)
            alive_at_end = dict(tl.live)
            if backward:
                loss.backward()
    del loss
    # Which side of the layers each model-level storage was produced on.
    seen_layer, after = False, []
    for serial, producer in enumerate(tl.producer):
        if rec.split_scope(producer)[0] is not None:
            seen_layer = True
        after.append(seen_layer and rec.split_scope(producer)[0] is None)
    saved = set(alive_at_end.values())
    part = {s: _part_of(rec, tl.producer[s], after[s]) for s in saved}
    kept: dict[str, int] = {}
    for s in saved:
        if tl.producer[s] not in ("<input>",):
            kept[part[s]] = kept.get(part[s], 0) + tl.nbytes[s]
    if not backward:
        return {"kept": kept}
    grads: dict[int, str] = {}  # gradient serial -> part of its parameter
    names = [n for n, _ in hf_model.named_parameters()]
    in_layers = [k for k, n in enumerate(names) if n.startswith(prefix + ".")]
    first_layer_param = in_layers[0] if in_layers else 0
    position = {id(p): k for k, (_, p) in enumerate(hf_model.named_parameters())}
    for pname, p in model.named_parameters():
        if p.grad is None:
            continue
        serial = tl.live.get(p.grad.untyped_storage()._cdata)
        if serial is None:
            continue
        layer, _ = rec.split_scope(pname.split("base_model.model.", 1)[-1])
        if layer is not None:
            grads[serial] = f"layer{layer}"
        else:
            grads[serial] = _INPUT if position.get(id(p), -1) < first_layer_param else _OUTPUT
    windows = _recompute_windows if recompute else _windows
    return {"kept": kept, **windows(tl, fwd_end, saved, part, grads, n_layers)}


def _recompute_windows(tl: _Timeline, fwd_end: int, saved: set[int], part: dict[int, str], grads: dict[int, str],
                       n_layers: int) -> dict[str, Any]:
    """Under full recompute (non-reentrant torch.utils.checkpoint), each layer's backward first
    re-runs its forward: the rebuilt saved tensors, the forward's own transients and the incoming
    gradient are alive together. Measured, not composed: layer j's window runs from the end of the
    previous one to the event where its last parameter gradient appears; its working set at each
    point is every non-gradient byte alive less what the parts after it keep (the checkpointed
    inputs of the layers before it and the input side, attributed by producer as in ``kept``). A
    layer without trainable parameters has no window (the composition of working and kept stands)."""
    events = tl.events[fwd_end:]
    kept_by_part: dict[str, int] = {}
    for s_ in saved:
        kept_by_part[part[s_]] = kept_by_part.get(part[s_], 0) + tl.nbytes[s_]
    grad_totals: dict[str, int] = {}
    for serial, name in grads.items():
        grad_totals[name] = grad_totals.get(name, 0) + tl.nbytes[serial]
    live = sum(tl.nbytes[s_] for s_ in saved)  # absolute non-gradient bytes alive, from the forward's end
    made: dict[str, int] = {}
    done_at: dict[str, int] = {}
    series, produced = [], []
    for i, (serial, sign) in enumerate(events):
        if serial in grads:
            if sign > 0:
                name = grads[serial]
                made[name] = made.get(name, 0) + tl.nbytes[serial]
                if name not in done_at and made[name] >= grad_totals[name]:
                    done_at[name] = i
        else:
            live += sign * tl.nbytes[serial]
        series.append(live)
        produced.append(dict(made))
    working: dict[str, list[int]] = {}
    start = done_at.get(_OUTPUT, 0)
    for j in reversed(range(n_layers)):
        name = f"layer{j}"
        if name not in done_at:
            continue
        end = done_at[name] + 1
        baseline = kept_by_part.get(_INPUT, 0) + kept_by_part.get(_SHARED, 0) + sum(
            kept_by_part.get(f"layer{k}", 0) for k in range(j))
        points = [0] * len(GRID)
        for i in range(start, end):
            fraction = produced[i].get(name, 0) / grad_totals[name]
            k = next(k for k, g in enumerate(GRID) if fraction <= g + 1e-12)
            points[k] = max(points[k], series[i] - baseline)
        working[name] = points
        start = end
    return {"working": working}


# Fractions of a part's parameter gradients produced, at which its backward's working set is given:
# the gradients a rank holds grow through a layer's backward while its activations shrink, so the
# peak inside a part is where their sum is largest.
GRID = (0.0, 1 / 3, 2 / 3, 1.0)


def _windows(tl: _Timeline, fwd_end: int, saved: set[int], part: dict[int, str], grads: dict[int, str],
             n_layers: int) -> dict[str, Any]:
    """Loss gradient and per-part working sets from the backward's events (see module docstring)."""
    events = tl.events[fwd_end:]
    order = [_OUTPUT] + [f"layer{j}" for j in reversed(range(n_layers))] + [_INPUT]
    # A part's backward is done when 99% of its saved bytes are freed (its tiny leftovers, such as
    # the loss scalar or the labels, can live to the end of the backward).
    totals: dict[str, int] = {}
    for s in saved:
        totals[part[s]] = totals.get(part[s], 0) + tl.nbytes[s]
    grad_totals: dict[str, int] = {}
    for serial, name in grads.items():
        grad_totals[name] = grad_totals.get(name, 0) + tl.nbytes[serial]
    freed: dict[str, int] = {}
    last_free: dict[str, int] = {}
    for i, (serial, sign) in enumerate(events):
        if sign < 0 and serial in saved:
            name = part[serial]
            freed[name] = freed.get(name, 0) + tl.nbytes[serial]
            if name not in last_free and freed[name] >= 0.99 * totals[name]:
                last_free[name] = i
    live = 0  # non-gradient bytes alive, relative to the forward's end
    saved_alive = sum(tl.nbytes[s] for s in saved)
    series, saved_series, produced, first_grad = [], [], [], None
    made: dict[str, int] = {}
    for i, (serial, sign) in enumerate(events):
        if serial in grads:
            if sign > 0:
                first_grad = i if first_grad is None else first_grad
                made[grads[serial]] = made.get(grads[serial], 0) + tl.nbytes[serial]
        else:
            live += sign * tl.nbytes[serial]
            if serial in saved and sign < 0:
                saved_alive -= tl.nbytes[serial]
        series.append(live)
        saved_series.append(saved_alive)
        produced.append(dict(made))
    total_saved = sum(tl.nbytes[s] for s in saved)
    end_loss = first_grad if first_grad is not None else len(events)
    loss_grad = max([0] + series[:end_loss])
    working: dict[str, list[int]] = {}
    start = 0
    for name in order:
        end = max(start, last_free.get(name, start - 1) + 1)
        points = [0] * len(GRID)
        if end > start:
            after_bytes = saved_series[end - 1]  # saved bytes still alive when the part is done
            total = grad_totals.get(name, 0)
            for i in range(start, end):
                fraction = produced[i].get(name, 0) / total if total else 1.0
                k = next(k for k, g in enumerate(GRID) if fraction <= g + 1e-12)
                points[k] = max(points[k], series[i] + total_saved - after_bytes)
        working[name] = points
        start = end
    return {"loss_grad": loss_grad, "working": working}


def _prepare(hf_config: dict[str, Any], n_layers: int, attention: str, tdtype: Any, spec: dict[str, Any],
             quant: dict[str, Any] | None, recompute: bool) -> tuple[Any, Any, str, list[Any], str]:
    """(model to run, transformers model, layer prefix, layer kinds, cpu attention impl) under fake mode."""
    cfg = _make_config(hf_config, n_layers)
    model, cpu_impl = _build_for_attention(cfg, attention, tdtype)
    hf_model = model
    prefix = _layer_prefix(hf_model, n_layers)
    hidden = int(hf_model.get_input_embeddings().weight.shape[1])
    kinds = [_layer_kind(layer, cfg, hidden, _num_experts(cfg), _experts_per_token(cfg))
             for layer in hf_model.get_submodule(prefix)]
    if quant is not None:
        from planner.trace.quantized import quantize_4bit

        quantize_4bit(hf_model, quant, tdtype)
    if recompute:  # before peft wraps the model, as a script does: peft refuses what it cannot checkpoint
        enable = getattr(hf_model, "activation_checkpointing_enable", None) or hf_model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if spec["method"] == "adapter":
        # Houlsby adapters (not in peft): a frozen base whose every layer passes gradients back.
        for p in hf_model.parameters():
            p.requires_grad_(False)
        hf_model.enable_input_require_grads()
        model = hf_model
    else:
        model = _apply_peft(hf_model, spec)
    model.train()
    return model, hf_model, prefix, kinds, cpu_impl


def profile_activations(
    hf_config: dict[str, Any],
    *,
    layer_kinds: tuple[int, ...],
    seq_len: int,
    attention: str = "flash",
    dtype: str = "bf16",
    peft: dict[str, Any] | None = None,
    quant: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The profile (a JSON-able dict, read by planner.memory.profile.ActivationProfile).

    ``layer_kinds``: the real model's layer kinds (planner.structure.layout.ModelLayout.layer_kinds).
    ``peft``: as planner.trace.trace_activations' (``{"method": "adapter"}`` too: a frozen base
    whose layers pass gradients back); ``quant``: QLoRA's 4-bit base (planner.trace.quantized:
    ``quant_type``, ``double_quant``, ``block_size``, ``upcast``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = dict(peft or {"method": "full"})
    if spec.get("method") != "adapter":
        spec = _normalize_peft(spec)
    if spec["method"] == "mezo":
        raise ValueError("MeZO has no backward: trace its peak with planner.trace.trace_activations")
    tdtype = _torch_dtype(dtype)
    n_layers, rep = traced_layer_count(tuple(layer_kinds))
    if attention == "flash":
        _register_gpu_flash()
    out: dict[str, Any] = {"traced_layers": n_layers, "rep": list(rep), "batches": list(BATCHES),
                           "saved": {"cpu": [], "cuda": []}, "kept": [], "loss_grad": [], "working": [],
                           "working_recompute": []}
    with _LOCK, _default_dtype(tdtype), _assume_unpacked():
        for b in BATCHES:
            with FakeTensorMode():
                model, hf_model, prefix, kinds, cpu_impl = _prepare(hf_config, n_layers, attention, tdtype, spec, quant, False)
                params = {p.untyped_storage()._cdata for p in model.parameters()}
                out["saved"]["cpu"].append(_saved_pass(model, hf_model, prefix, kinds, params, seq_len=seq_len, b=b,
                                                       emulate_cuda=False, attention=attention))
                gpu_impl = cpu_impl
                if attention == "flash" and getattr(hf_model, "_can_set_attn_implementation", lambda: False)():
                    hf_model.set_attn_implementation(_GPU_FLASH_IMPL)
                    gpu_impl = "flash"
                with _prompt_tokens_on_host(model):
                    out["saved"]["cuda"].append(_saved_pass(model, hf_model, prefix, kinds, params, seq_len=seq_len, b=b,
                                                            emulate_cuda=True, attention=attention))
                out["kernels"] = f"cpu:{cpu_impl} gpu:{gpu_impl}"
                out["adapter_dtype"] = _trainable_dtype(model)
                out["virtual_tokens"] = int(model.active_peft_config.num_virtual_tokens) if spec["method"] in ("prefix", "prompt") else 0
            with FakeTensorMode():
                model, hf_model, prefix, _, _ = _prepare(hf_config, n_layers, attention, tdtype, spec, quant, False)
                timeline = _live_pass(model, hf_model, prefix, n_layers, seq_len=seq_len, b=b, attention=attention, backward=True)
                out["loss_grad"].append(timeline["loss_grad"])
                out["working"].append(timeline["working"])
            if out.get("kept_error"):
                continue
            with FakeTensorMode():
                try:
                    model, hf_model, prefix, _, _ = _prepare(hf_config, n_layers, attention, tdtype, spec, quant, True)
                except ValueError as exc:  # e.g. peft: "PREFIX_TUNING does not work with gradient checkpointing"
                    out["kept_error"] = error_detail(exc, 200)
                    continue
                kept = _live_pass(model, hf_model, prefix, n_layers, seq_len=seq_len, b=b, attention=attention,
                                  backward=True, recompute=True)
                out["kept"].append(kept["kept"])
                out["working_recompute"].append(kept["working"])
    # torch.utils.checkpoint (preserve_rng_state=True) keeps the CPU generator's state per
    # checkpointed layer, a tensor made outside the dispatcher: host memory, device memory only on CPU.
    import torch

    out["checkpoint_rng_bytes"] = int(torch.get_rng_state().nbytes)
    out["grid"] = list(GRID)
    return out
