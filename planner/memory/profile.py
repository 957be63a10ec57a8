"""Activation bytes of Hugging Face models from their activation profile (planner.trace.profile):
the default for every model orch launches, measured from the model's own modules rather than
written down per family.

A profile holds, for the job's sequence length, attention kernel, dtype and fine-tuning method, the
bytes each part of the model keeps at micro-batch 1, 2 and 3 (affine from 2 on), each split into
what tensor parallelism divides and what it does not. Parts: the input side (first pipeline
stage), the output side (last stage), what every stage holds (rotary tables, prefixes), and each
decoder layer (through a representative traced layer of its kind). Two kernel sets: ``cuda`` (the
trace's GPU pass: flash kernels, 1-byte dropout masks, fp32 LayerNorm statistics) and ``cpu``
(exactly what a CPU run keeps). Backward working sets and the loss's gradients are measured on CPU
kernels and used for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from planner.cache import cached, key_of
from planner.errors import PlanInputError, error_detail

Kernels = Literal["cuda", "cpu"]


@dataclass(frozen=True)
class PerBatch:
    """Bytes at micro-batch 1, 2 and 3: exact at 1, affine from 2 on."""

    b1: float
    b2: float
    b3: float

    def at(self, b: int) -> float:
        return self.b1 if b == 1 else self.b2 + (b - 2) * (self.b3 - self.b2)

    @staticmethod
    def of(values: list[float]) -> PerBatch:
        return PerBatch(*values)


ZERO = PerBatch(0, 0, 0)


@dataclass(frozen=True)
class Part:
    """Bytes of one part of the model for one micro-batch: what tensor parallelism leaves whole
    (sequence parallelism divides it too) and what it splits."""

    whole: PerBatch
    split: PerBatch

    def at(self, b: int, tp: int = 1, sp: bool = False) -> float:
        return self.whole.at(b) / (tp if sp else 1) + self.split.at(b) / tp

    def split_share(self, b: int) -> float:
        total = self.whole.at(b) + self.split.at(b)
        return self.split.at(b) / total if total else 0.0


class ActivationProfile:
    """One kernel set of a traced profile (see the module docstring)."""

    def __init__(self, data: dict[str, Any], kernels: Kernels) -> None:
        self.kernels = kernels
        self.traced_layers: int = data["traced_layers"]
        self.rep: tuple[int, ...] = tuple(data["rep"])
        self.adapter_dtype: str = data.get("adapter_dtype", "")
        # The attention implementations the model really ran, e.g. "cpu:sdpa gpu:flash"; a model class
        # without SDPA / flash support in transformers runs eager attention whatever --attention says.
        impls = dict(part.split(":", 1) for part in data.get("kernels", "").split() if ":" in part)
        self.attention_impl: str = impls.get("gpu" if kernels == "cuda" else "cpu", "")
        self.rng_bytes: int = data.get("checkpoint_rng_bytes", 0)
        saved, cpu = data["saved"][kernels], data["saved"]["cpu"]

        def part(name: str, source: list[dict[str, list[int]]] = saved) -> Part:
            whole = [float(per_b.get(name, [0, 0])[0]) for per_b in source]
            split = [float(per_b.get(name, [0, 0])[1]) for per_b in source]
            return Part(PerBatch.of(whole), PerBatch.of(split))

        self.input, self.shared, self.output = part("input"), part("shared"), part("output")
        self.layers = tuple(part(f"layer{j}") for j in range(self.traced_layers))
        # Full recompute: each layer keeps what its checkpoint holds (its input, whole); the model-level
        # parts are those of the saved pass (the same ops run outside the checkpointed layers), with the
        # layer-0 input that the checkpoint now holds, measured on CPU kernels and moved to these kernels.
        self.kept_error: str = data.get("kept_error", "")  # why full recompute cannot run, if it cannot
        kept = data["kept"] or [{} for _ in data["saved"]["cpu"]]
        self.kept_layers = tuple(PerBatch.of([float(k.get(f"layer{j}", 0)) for k in kept]) for j in range(self.traced_layers))
        kernel_delta = [sum(s.get(p, [0, 0])[0] + s.get(p, [0, 0])[1] - c.get(p, [0, 0])[0] - c.get(p, [0, 0])[1]
                            for p in ("input", "shared")) for s, c in zip(saved, cpu)]
        self.kept_input = PerBatch.of([float(k.get("input", 0)) + d for k, d in zip(kept, kernel_delta)])
        self.loss_grad = PerBatch.of([float(v) for v in data["loss_grad"]])
        working = data["working"]
        self.grid: tuple[float, ...] = tuple(data.get("grid", (0.0, 1 / 3, 2 / 3, 1.0)))

        def points(name: str) -> tuple[PerBatch, ...]:
            return tuple(PerBatch.of([float(w.get(name, [0] * len(self.grid))[k]) for w in working])
                         for k in range(len(self.grid)))

        self.working_output = points("output")
        self.working_input = points("input")
        self.working_layers = tuple(points(f"layer{j}") for j in range(self.traced_layers))
        # Under full recompute: measured with the rebuilt forward where the layer trains (else None).
        rc = data.get("working_recompute") or []
        self.working_layers_recompute = tuple(
            tuple(PerBatch.of([float(w[f"layer{j}"][k]) for w in rc]) for k in range(len(self.grid)))
            if rc and all(f"layer{j}" in w for w in rc) else None
            for j in range(self.traced_layers))

    def layer(self, index: int) -> Part:
        """The saved bytes of real decoder layer ``index``."""
        return self.layers[self.rep[index]]

    def kept(self, index: int) -> PerBatch:
        """What full recompute keeps of real layer ``index`` (its representative's)."""
        kept = self.kept_layers[self.rep[index]]
        if self.kernels == "cpu":  # the checkpoint's saved RNG state lives in host memory
            kept = PerBatch(*(v + self.rng_bytes for v in (kept.b1, kept.b2, kept.b3)))
        return kept

    def working(self, index: int, recompute: bool = False) -> tuple[PerBatch, ...]:
        """Real layer ``index``'s backward working set at each fraction of ``grid`` of its gradients
        (``recompute``: under full recompute, its rebuilt forward included, where measured)."""
        measured = self.working_layers_recompute[self.rep[index]] if recompute else None
        return measured or self.working_layers[self.rep[index]]


_PARSED: dict[tuple[str, str], ActivationProfile] = {}


def profile_key(hf_config: dict[str, Any], *, seq_len: int, attention: str, dtype: str, peft: dict[str, Any] | None,
                quant: dict[str, Any] | None) -> str:
    return key_of("activations", hf_config, seq_len, attention, dtype, peft, quant)


def load_profile(hf_config: dict[str, Any], layer_kinds: tuple[int, ...], *, seq_len: int, attention: str, dtype: str,
                 peft: dict[str, Any] | None, quant: dict[str, Any] | None, kernels: Kernels, name: str,
                 key: str = "") -> ActivationProfile:
    """The profile of one job, traced on first use (planner.trace.profile) and cached. ``key``:
    profile_key of the same inputs, where the caller has it memoized (it hashes the whole config)."""
    key = key or profile_key(hf_config, seq_len=seq_len, attention=attention, dtype=dtype, peft=peft, quant=quant)
    if (key, kernels) not in _PARSED:
        def trace() -> dict[str, Any]:
            from planner.trace.profile import profile_activations

            try:
                return profile_activations(hf_config, layer_kinds=layer_kinds, seq_len=seq_len, attention=attention,
                                           dtype=dtype, peft=peft, quant=quant)
            except (ValueError, TypeError, KeyError, RuntimeError, NotImplementedError, AttributeError) as exc:
                detail = error_detail(exc)
                raise PlanInputError(
                    f"{name}: the activation trace of this model failed ({type(exc).__name__}: {detail})",
                    "check the config and fine-tuning flags (e.g. --lora-targets must name modules of the model)",
                ) from None

        _PARSED[(key, kernels)] = cached("activations", key, trace, lambda data: ActivationProfile(data, kernels))
    return _PARSED[(key, kernels)]
