"""Held-out speed runs (tests/data/speed_runs.json, 13 sources) as planner inputs, for the
leave-one-source-out validation (bench/speed_validation.py, tests/planner/test_speed_validation.py).

A run the planner cannot score carries the reason instead of inputs. The reasons are modelling
reasons applied to every run alike, never how well a run is predicted:

- the GPU is not in planner.specs.hardware's catalog (torchtitan's 500 W H100 96 GB HBM2e);
- a fact the speed model needs is not printed (parallel degrees, precision, a model dimension).

Unknown settings take the assumption named in ASSUMED, applied uniformly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from planner.finetune.methods import FinetuneSpec
from planner.specs.hardware import ClusterSpec, dgx_cluster, gpu_by_name, GPU_CATALOG
from planner.specs.training import ParallelPlan, TrainingSpec
from planner.structure.hf_config import spec_from_hf_config
from planner.structure.model import ModelSpec
from tests.conftest import DATA

# Frameworks built on Megatron-Core's fused kernels (Transformer Engine, fused softmax/norms);
# the rest run plain PyTorch modules with SDPA/flash attention (planned as "huggingface").
MEGATRON_FRAMEWORKS = ("megatron", "nemo-megatron", "meta-4d")

ASSUMED = {
    "gpu": "'a100' (fms-fsdp, memory size not printed) is planned as a100-80gb; only the HBM bandwidth differs",
    "gpus_per_node": "8 where not printed (DGX/HGX nodes)",
    "micro_batch": "1 where not printed (the NeMo / Megatron-Bridge / Llama 3 recipes' micro-batch)",
    "global_batch": "micro_batch x dp (one micro-batch per step) where not printed",
    "precision": "fp16 for the 2021-2022 Megatron-LM papers on A100 (both state mixed precision fp16)",
    "recompute": "none where not printed",
    "sequence_parallel": "on for Megatron-family frameworks with tp > 1 (NeMo's default with TP); off otherwise",
    "interleave": "1 where not printed",
    "zero_stage": "1 (distributed optimizer) for Megatron-family data parallelism where not printed; 0 for dp 1",
    "implementation": "megatron for Megatron-LM, NeMo, Megatron-Bridge and Meta's 4D stack; huggingface "
    "(plain PyTorch modules, unfused norms and activations) for composer, torchtitan, fms-fsdp, "
    "lit-gpt, kempnerforge and NeMo AutoModel",
    "fused_ops": "off (one kernel per op, eager PyTorch) where the source does not say its norms, activations and rotary ran fused (torch.compile or hand-fused kernels)",
    "lora": "rank 8 on peft's default targets (no source prints the rank)",
}


@dataclass(frozen=True)
class SpeedRun:
    id: str
    source_id: str
    category: str
    task: str
    precision: str
    model: ModelSpec | None
    cluster: ClusterSpec | None
    training: TrainingSpec | None
    plan: ParallelPlan | None
    finetune: FinetuneSpec | None
    tokens_per_s_per_gpu: float | None  # measured, or derived from a printed step time / MFU / TFLOP/s
    skip: str | None  # why the run cannot be scored; None when it can
    raw: dict


def _hf_config(m: dict, seq_len: int) -> dict | None:
    arch = m["arch"]
    if arch == "llama":
        return {
            "model_type": "llama", "num_hidden_layers": m["num_layers"], "hidden_size": m["hidden_size"],
            "num_attention_heads": m["num_heads"], "num_key_value_heads": m["num_kv_heads"],
            "intermediate_size": m["ffn_hidden_size"], "vocab_size": m["vocab_size"],
            "max_position_embeddings": seq_len, "tie_word_embeddings": False,
        }
    if arch == "nemotron":
        return {
            "model_type": "nemotron", "num_hidden_layers": m["num_layers"], "hidden_size": m["hidden_size"],
            "num_attention_heads": m["num_heads"], "num_key_value_heads": m["num_kv_heads"],
            "intermediate_size": m["ffn_hidden_size"], "vocab_size": m["vocab_size"],
            "max_position_embeddings": seq_len, "tie_word_embeddings": False,
        }
    # GPT and llm-foundry's MPT benchmark models are GPT-2 blocks (tests/orchestrator/published_fits.py).
    return {
        "model_type": "gpt2", "n_layer": m["num_layers"], "n_embd": m["hidden_size"], "n_head": m["num_heads"],
        "n_inner": m["ffn_hidden_size"], "n_positions": seq_len, "vocab_size": m["vocab_size"],
        "activation_function": "gelu_new",
    }


def _skip_reason(raw: dict) -> str | None:
    gpu = raw["hardware"]["gpu"]
    if gpu != "a100" and gpu not in GPU_CATALOG:
        return f"GPU '{gpu}' is not in the catalog (planner.specs.hardware)"
    p, m, t = raw["parallelism"], raw["model"], raw["training"]
    if any(p[k] is None for k in ("dp", "tp", "pp")):
        return "parallel degrees not printed"
    missing = [k for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size")
               if m[k] is None]
    if missing:
        return f"model dimension not printed: {', '.join(missing)}"
    if t["precision"] is None and raw["source_id"] not in ("narayanan2021", "korthikanti2022"):
        return "precision not printed"
    return None


def _measured_tokens(raw: dict, model: ModelSpec, training: TrainingSpec, plan: ParallelPlan, n_gpus: int) -> float | None:
    """Tokens per second per GPU: printed, else from the printed step time, MFU or TFLOP/s with
    the planner's exact FLOP count (recompute counted where the source says so)."""
    from planner.speed.flops import hardware_flops_per_token, model_flops_per_token

    meas = raw["measured"]
    if meas.get("tokens_per_s_per_gpu"):
        return meas["tokens_per_s_per_gpu"]
    tokens_step = training.global_batch * training.seq_len
    if meas.get("iteration_time_s"):
        return tokens_step / meas["iteration_time_s"] / n_gpus
    per_token = (hardware_flops_per_token(model, training.seq_len, plan.recompute) if meas.get("tflops_counts_recompute")
                 else model_flops_per_token(model, training.seq_len))
    if meas.get("tflops_per_gpu"):
        return meas["tflops_per_gpu"] * 1e12 / per_token
    if meas.get("mfu"):
        peak = meas.get("mfu_peak_tflops") or gpu_by_name(_gpu_name(raw)).peak_tflops(training.precision)
        return meas["mfu"] * peak * 1e12 / per_token
    return None


def _gpu_name(raw: dict) -> str:
    return "a100-80gb" if raw["hardware"]["gpu"] == "a100" else raw["hardware"]["gpu"]


def _run(raw: dict) -> SpeedRun:
    base = dict(id=raw["id"], source_id=raw["source_id"], category=raw["category"], task=raw["task"], raw=raw)
    precision = raw["training"]["precision"] or "fp16"
    skip = _skip_reason(raw)
    if skip:
        return SpeedRun(**base, precision=precision, model=None, cluster=None, training=None, plan=None,
                        finetune=None, tokens_per_s_per_gpu=None, skip=skip)
    m, t, p, hw = raw["model"], raw["training"], raw["parallelism"], raw["hardware"]
    megatron = p["framework"].startswith(MEGATRON_FRAMEWORKS)
    model = spec_from_hf_config(_hf_config(m, t["seq_len"]), name=raw["id"]).model_copy(
        update={"implementation": "megatron" if megatron else "huggingface"}
    )
    n = hw["num_gpus"]
    cluster = dgx_cluster(gpu_by_name(_gpu_name(raw)), n, gpus_per_node=hw["gpus_per_node"] or 8)
    mb = t["micro_batch"] or 1
    dp = p["dp"]
    global_batch = t["global_batch"] or mb * dp
    zero = p["zero_stage"]
    if zero is None:
        zero = 1 if megatron and dp > 1 else 0
    sp = p["sequence_parallel"]
    if sp is None:
        sp = megatron and p["tp"] > 1
    training = TrainingSpec(seq_len=t["seq_len"], global_batch=global_batch, precision=precision,
                            fused_ops=bool(t.get("fused_ops")),
                            attention="eager" if raw["source_id"] in ("narayanan2021", "korthikanti2022") else "flash")
    plan = ParallelPlan.model_construct(
        dp=dp, tp=p["tp"], pp=p["pp"], cp=p["cp"] or 1, ep=p["ep"] or 1, sp=bool(sp) and p["tp"] > 1,
        interleave=(p["interleave"] or 1) if p["pp"] > 1 else 1, zero_stage=zero, offload="none", micro_batch=mb,
        grad_accum=max(1, global_batch // (mb * dp)), recompute=t["recompute"] or "none",
    )
    finetune = FinetuneSpec(method="lora") if raw["task"] == "lora" else None
    tokens = _measured_tokens(raw, model, training, plan, n)
    return SpeedRun(**base, precision=precision, model=model, cluster=cluster, training=training, plan=plan,
                    finetune=finetune, tokens_per_s_per_gpu=tokens,
                    skip=None if tokens else "no throughput, step time, MFU or TFLOP/s printed")


def load_speed_runs() -> list[SpeedRun]:
    return [_run(raw) for raw in json.loads((DATA / "speed_runs.json").read_text())["runs"]]


def held_out_sources() -> list[str]:
    """Sources not already in tests/data/published_runs.json (the file the defaults were fitted on)."""
    data = json.loads((DATA / "speed_runs.json").read_text())
    return [s for s, info in data["sources"].items() if not info["overlaps_published_runs"]]


# --- Leave-one-source-out validation -------------------------------------------------------------

# The constants fitted, with the grid each is searched over (coordinate descent). Nothing per run.
FITTED = {
    "gemm_efficiency": [0.60 + 0.01 * i for i in range(41)],
    "fp8_gemm_efficiency": [0.40 + 0.01 * i for i in range(61)],
    "attention_efficiency": [0.40 + 0.025 * i for i in range(25)],
    "megatron_attention_efficiency": [0.40 + 0.025 * i for i in range(25)],
    "elementwise_bytes_per_token_per_hidden": [10.0 * i for i in range(0, 21)],
    "dp_overlap": [0.5 + 0.05 * i for i in range(11)],
}


def predicted_tokens_per_s_per_gpu(run: SpeedRun, c=None) -> float:  # type: ignore[no-untyped-def]
    from planner.speed.step import step_time

    st = step_time(run.model, run.cluster, run.training, run.plan, c, finetune=run.finetune)
    return st.tokens_per_s / run.cluster.num_gpus


def signed_errors(runs: list[SpeedRun], c=None) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Predicted / measured tokens per second per GPU, minus one, per run id."""
    return {r.id: predicted_tokens_per_s_per_gpu(r, c) / r.tokens_per_s_per_gpu - 1 for r in runs}


def _objective(runs: list[SpeedRun], c) -> float:  # type: ignore[no-untyped-def]
    """Mean |error| over the runs (every run weighs the same)."""
    errs = signed_errors(runs, c)
    return sum(abs(e) for e in errs.values()) / len(errs)


# Every fit starts here, not from the defaults (which are the fit on all held-out sources, so
# starting from them would leak the held-out source into its own fold): the pre-validation
# constants, gemm_efficiency re-expressed as a fraction of the achievable matmul rate (0.64 / 0.83).
START = {"gemm_efficiency": 0.77, "fp8_gemm_efficiency": 0.60, "attention_efficiency": 0.65,
         "megatron_attention_efficiency": 0.65, "elementwise_bytes_per_token_per_hidden": 40.0,
         "dp_overlap": 0.85}


def fit_constants(runs: list[SpeedRun], sweeps: int = 6):  # type: ignore[no-untyped-def]
    """Coordinate descent over FITTED's grids from START, on ``runs`` only."""
    from planner.speed.step import SpeedConstants

    c = SpeedConstants(**START)
    best = _objective(runs, c)
    for _ in range(sweeps):
        improved = False
        for name, grid in FITTED.items():
            for value in grid:
                trial = c.model_copy(update={name: value})
                score = _objective(runs, trial)
                if score < best - 1e-9:
                    best, c, improved = score, trial, True
        if not improved:
            break
    return c


def scoreable(runs: list[SpeedRun]) -> list[SpeedRun]:
    return [r for r in runs if r.skip is None]


def leave_one_source_out(runs: list[SpeedRun]) -> tuple[dict[str, float], dict[str, object]]:
    """Signed error of every scoreable run of the held-out sources, each predicted with constants
    fitted on the other held-out sources only (the overlapping sources never enter a fit), and
    the constants of each fold."""
    pool = [r for r in scoreable(runs) if r.source_id in held_out_sources()]
    errors: dict[str, float] = {}
    folds: dict[str, object] = {}
    for source in sorted({r.source_id for r in pool}):
        train = [r for r in pool if r.source_id != source]
        c = fit_constants(train)
        folds[source] = c
        errors.update(signed_errors([r for r in pool if r.source_id == source], c))
    return errors, folds


def summary(errors: dict[str, float]) -> dict[str, float]:
    import statistics

    a = [abs(e) for e in errors.values()]
    return {"count": len(a), "mean": statistics.mean(a), "median": statistics.median(a), "max": max(a),
            "within_25": sum(x <= 0.25 for x in a) / len(a)}
