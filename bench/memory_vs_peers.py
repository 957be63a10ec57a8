"""Per-GPU memory (and step time) of the same training job: orch's planner next to two peers.

Peers:
- DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` and
  ``estimate_zero3_model_states_mem_needs``, from the deepspeed installed in this venv): model
  states only, pure data parallelism, so they are shown for the ZeRO-2/3 cases without TP/PP.
- llm-analysis 0.2.2 (PyPI), installed once in its own virtual environment under
  bench/.cache/llm-analysis-venv (its pins, transformers<5 and huggingface-hub<0.15, would clash
  with ours; it imports neither at run time, so it goes in with --no-deps plus ``fire``, and no torch).
  It runs in a subprocess on model configs built from our presets' fields (no hub look-up).

Prints figures; never fails a build: a peer that cannot run is reported and skipped.
Set ORCH_LLM_ANALYSIS_VENV to use another folder for that venv.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from planner.memory.evaluate import evaluate, rank_states  # noqa: E402
from planner.specs.hardware import dgx_cluster, gpu_by_name  # noqa: E402
from planner.structure.model import ModelSpec  # noqa: E402
from planner.structure.params import stage_params, total_params  # noqa: E402
from planner.structure.presets import preset  # noqa: E402
from planner.speed.step import SpeedConstants, step_time  # noqa: E402
from planner.specs.training import ParallelPlan, TrainingSpec  # noqa: E402

GiB = 1024**3
LLM_ANALYSIS = "llm-analysis==0.2.2"
# llm-analysis imports only fire at run time (transformers and huggingface_hub are optional, for
# fetching configs from the hub, which we never do): install it --no-deps next to fire.
LLM_ANALYSIS_RUNTIME_DEPS = ["fire>=0.5.0,<0.6.0"]
VENV = Path(os.environ.get("ORCH_LLM_ANALYSIS_VENV", ROOT / "bench" / ".cache" / "llm-analysis-venv"))
# Our GPU catalog key -> llm-analysis's built-in gpu_configs name.
LLMA_GPU = {"a100-80gb": "a100-sxm-80gb", "a100-40gb": "a100-sxm-40gb", "h100-80gb": "h100-sxm-80gb",
            "v100-32gb": "v100-sxm-32gb", "a6000-48gb": "a6000-48gb"}
RECOMPUTE = {"none": 0, "selective": 1, "full": 2}  # llm-analysis ActivationRecomputation values


@dataclass(frozen=True)
class Case:
    label: str
    model: str
    gpu: str
    gpus: int
    plan: ParallelPlan
    seq_len: int
    implementation: str = "huggingface"  # "megatron": Megatron-LM kernels (Korthikanti et al. 2022)


def _llama7b(zero: int, mb: int, rc: str) -> Case:
    return Case(f"llama2-7b z{zero} mb{mb} rc-{rc}", "llama2-7b", "a100-80gb", 8,
                ParallelPlan(dp=8, zero_stage=zero, micro_batch=mb, recompute=rc), 4096)


CASES: list[Case] = [
    *[_llama7b(z, mb, rc) for z in (2, 3) for mb in (1, 4) for rc in ("none", "full")],
    # Llama 2 70B on 8 DGX H100: Megatron-style tp8 with sequence parallelism (llm-analysis's
    # default sp_size = tp_size), ZeRO-1 over dp8.
    Case("llama2-70b tp8 sp dp8 z1", "llama2-70b", "h100-80gb", 64,
         ParallelPlan(dp=8, tp=8, sp=True, zero_stage=1, micro_batch=1, recompute="none"), 4096),
    # GPT-3 175B as Narayanan et al. 2021 (Table 1) trained it: Megatron-LM, 1024 A100s, tp8 pp16
    # dp8, global batch 1536 (192 micro-batches of 1 per pipeline), full recompute, no ZeRO, no SP.
    Case("gpt3-175b tp8 pp16 dp8", "gpt3-175b", "a100-80gb", 1024,
         ParallelPlan(dp=8, tp=8, pp=16, zero_stage=0, micro_batch=1, grad_accum=192, recompute="full"), 2048,
         implementation="megatron"),
]


# ----------------------------------------------------------------------------------------------
# Ours


def model_of(case: Case) -> ModelSpec:
    m = preset(case.model)
    if case.implementation != m.implementation:
        m = m.model_copy(update={"implementation": case.implementation})
    return m


def training_of(case: Case) -> TrainingSpec:
    p = case.plan
    return TrainingSpec(seq_len=case.seq_len, global_batch=p.micro_batch * p.grad_accum * p.dp,
                        precision="bf16", attention="flash")


def ours(case: Case) -> dict:
    m, training = model_of(case), training_of(case)
    cluster = dgx_cluster(gpu_by_name(case.gpu), case.gpus)
    assert case.plan.world_size == cluster.num_gpus, (case.label, case.plan.world_size, cluster.num_gpus)
    ev = evaluate(m, cluster, training, case.plan)
    # The ZeRO paper's idealised model states for the same rank (no buckets, padding or step copies).
    ideal, _ = rank_states(m, training, case.plan, ev.stage, None)
    mem = ev.memory
    return {
        "params": total_params(m),
        "stage": ev.stage,
        "fits": ev.fits_gpu,
        "parameters": mem.parameters, "gradients": mem.gradients, "optimizer": mem.optimizer,
        "activations": mem.activations, "overhead": mem.overhead, "total": mem.total,
        "ideal": {"parameters": ideal.parameters, "gradients": ideal.gradients, "optimizer": ideal.optimizer},
        "step_s": step_time(m, cluster, training, case.plan).step_time_s,
    }


# ----------------------------------------------------------------------------------------------
# DeepSpeed's estimators


def deepspeed_estimates(cases: list[Case]) -> tuple[dict[str, dict], str | None]:
    """DeepSpeed's model-state estimate per GPU for the pure data-parallel ZeRO-2/3 cases."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # an estimate needs no accelerator
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            import deepspeed
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except Exception as e:  # noqa: BLE001 - a peer's failure is reported, not fatal
        return {}, f"cannot import deepspeed's estimators: {type(e).__name__}: {e}"
    out: dict[str, dict] = {}
    for case in cases:
        p = case.plan
        if p.zero_stage not in (2, 3) or p.tp > 1 or p.pp > 1 or p.offload != "none":
            out[case.label] = {"skip": f"DeepSpeed estimates ZeRO-2/3 without TP/PP only (case: zero{p.zero_stage} tp{p.tp} pp{p.pp})"}
            continue
        m = model_of(case)
        n_params = total_params(m)  # unique parameters, as deepspeed's model_to_params counts them
        # model_to_params: the largest module's own parameters; our largest tensor (embedding/lm_head).
        largest = stage_params(m, tp=1, pp=1, ep=1, stage=0).largest_tensor
        per_node = min(8, p.dp)
        nodes = p.dp // per_node
        try:
            if p.zero_stage == 2:
                _, gpu = estimate_zero2_model_states_mem_needs(
                    total_params=n_params, num_gpus_per_node=per_node, num_nodes=nodes,
                    cpu_offload=False, additional_buffer_factor=1.5)
                out[case.label] = {"model_states": gpu}
            else:
                _, gpu, largest_mem = estimate_zero3_model_states_mem_needs(
                    total_params=n_params, largest_layer_params=largest, num_gpus_per_node=per_node,
                    num_nodes=nodes, cpu_offload=False, cpu_offload_params=False, zero_init=True,
                    additional_buffer_factor=1.5)
                out[case.label] = {"model_states": gpu, "largest_layer": largest_mem}
        except Exception as e:  # noqa: BLE001
            out[case.label] = {"skip": f"{type(e).__name__}: {e}"}
    return out, f"deepspeed {deepspeed.__version__}"


# ----------------------------------------------------------------------------------------------
# llm-analysis, in its own venv

LLMA_PROGRAM = r"""
import json, logging, sys
from llm_analysis.logger import logger
logger.setLevel(logging.ERROR)
from llm_analysis.analysis import LLMAnalysis, ActivationRecomputation, DSZeRO
from llm_analysis.config import (ModelConfig, ParallelismConfig, get_gpu_config_by_name,
                                 get_dtype_config_by_name)
try:
    from importlib.metadata import version
    ver = version("llm-analysis")
except Exception:
    ver = "?"
KEYS = ["weight_memory_per_gpu", "gradient_memory_per_gpu", "optimizer_state_memory_per_gpu",
        "activation_memory_per_gpu", "activation_memory_attn_per_gpu", "activation_memory_mlp_per_gpu",
        "activation_memory_layernorm_per_gpu", "activation_memory_embedding_output_per_gpu",
        "(weight+op_state+grad+act)_memory_per_gpu", "latency_per_iter", "latency_per_micro_batch",
        "num_params_total", "max_batch_size_per_gpu", "gradient_accumulation_steps", "memory_left_per_gpu"]
out = {"version": ver, "results": {}}
for c in json.load(sys.stdin):
    try:
        model = ModelConfig(**c["model"])
        par = ParallelismConfig(tp_size=c["tp"], pp_size=c["pp"], dp_size=c["dp"], sp_size=c["sp"])
        a = LLMAnalysis(model, get_gpu_config_by_name(c["gpu"]), get_dtype_config_by_name("w16a16e16"),
                        par, flops_efficiency=c["flops_efficiency"])
        s = a.training(batch_size_per_gpu=c["mb"], gradient_accumulation_steps=c["ga"],
                       global_batch_size=c["mb"] * c["ga"] * c["dp"], seq_len=c["seq"],
                       activation_recomputation=ActivationRecomputation(c["recompute"]),
                       ds_zero=DSZeRO(c["zero"]), flash_attn=c["flash"],
                       mlp_gated_linear_units=c["gated"])
        out["results"][c["label"]] = {k: s.get(k) for k in KEYS}
    except Exception as e:
        out["results"][c["label"]] = {"error": f"{type(e).__name__}: {e}"}
print("@@JSON@@" + json.dumps(out))
"""


def _venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def ensure_llm_analysis() -> tuple[Path | None, str]:
    """Create the cached venv with llm-analysis once; return its python, or None and why."""
    py, stamp = _venv_python(), VENV / ".orch-installed"
    want = " ".join([LLM_ANALYSIS, *LLM_ANALYSIS_RUNTIME_DEPS])
    if py.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return py, f"cached venv {VENV}"
    t0 = time.time()
    print(f"[setup] installing {LLM_ANALYSIS} into {VENV} (once) ...", flush=True)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(VENV)],
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *LLM_ANALYSIS_RUNTIME_DEPS],
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", LLM_ANALYSIS],
        [str(py), "-c", "import importlib.util as u, llm_analysis.analysis; "
                        "assert u.find_spec('torch') is None, 'torch got into the llm-analysis venv'"],
    ]
    for cmd in steps:
        try:
            r = _run(cmd, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"setup step {' '.join(cmd[-3:])!r} failed: {e}"
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            return None, f"setup step {' '.join(cmd[-3:])!r} exited {r.returncode}: {' | '.join(tail)}"
    stamp.write_text(want + "\n")
    return py, f"installed in {time.time() - t0:.0f} s into {VENV}"


def llma_model_fields(m: ModelSpec) -> dict:
    """llm-analysis's ModelConfig from our spec. It counts 2 MLP matrices (2*h*f parameters, Korthikanti's
    activations with f/h expansion); a gated MLP (SwiGLU, 3*h*f) is given the iso-parameter width 3f/2,
    the convention llm-analysis itself uses for SwiGLU."""
    f = m.ffn_hidden_size * 3 // 2 if m.gated_mlp else m.ffn_hidden_size
    return {"name": f"orch-{m.name}", "num_layers": m.num_layers, "n_head": m.num_heads,
            "hidden_dim": m.hidden_size, "vocab_size": m.vocab_size, "max_seq_len": m.max_position_embeddings,
            "num_key_value_heads": m.num_kv_heads, "ffn_embed_dim": f, "expansion_ratio": f / m.hidden_size,
            "model_type": m.family}


def llm_analysis(cases: list[Case]) -> tuple[dict[str, dict], str]:
    py, how = ensure_llm_analysis()
    if py is None:
        return {}, f"llm-analysis unavailable ({how})"
    eff = SpeedConstants().gemm_efficiency
    payload = []
    for case in cases:
        m, p = model_of(case), case.plan
        payload.append({
            "label": case.label, "model": llma_model_fields(m), "gpu": LLMA_GPU.get(case.gpu, case.gpu),
            "tp": p.tp, "pp": p.pp, "dp": p.dp, "sp": p.tp if p.sp else 1, "zero": p.zero_stage,
            "mb": p.micro_batch, "ga": p.grad_accum, "seq": case.seq_len, "recompute": RECOMPUTE[p.recompute],
            "flash": True, "gated": m.gated_mlp, "flops_efficiency": eff,
        })
    try:
        r = _run([str(py), "-c", LLMA_PROGRAM], timeout=300, input=json.dumps(payload))
    except (OSError, subprocess.TimeoutExpired) as e:
        return {}, f"llm-analysis unavailable (subprocess failed: {e})"
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("@@JSON@@")), None)
    if r.returncode != 0 or line is None:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {}, f"llm-analysis unavailable (exited {r.returncode}: {' | '.join(tail)})"
    data = json.loads(line[len("@@JSON@@"):])
    return data["results"], f"llm-analysis {data['version']} ({how}; flops_efficiency={eff}, ours)"


# ----------------------------------------------------------------------------------------------
# Table


FOOTER = """Why they differ (details in the module docstring of planner/memory/model_states.py and planner/memory/activations.py):
- llm-analysis counts tied embeddings (no separate lm_head), 2 MLP matrices (SwiGLU given as width 3f/2),
  no biases; gradients in fp32 (4 B/param, sharded from ZeRO-2); no DeepSpeed buckets, padding, ZeRO-3
  gathered parameters or step-time fp32 copies; no CUDA context/NCCL/fragmentation overhead.
- llm-analysis activations: Korthikanti et al. 2022 per layer x all L layers (1F1B first stage), fp32
  layernorm inputs, a 1-byte attention-dropout mask, 16-bit logits; full recompute keeps 2sbh/t per layer
  (checkpoints split over tp) and nothing for the layer being recomputed.
- llm-analysis step time is FLOPs / (tp*pp*peak*efficiency): no pipeline bubble, no TP/DP communication,
  no optimizer step.
- DeepSpeed's estimator: 2 + 18/N bytes/param (ZeRO-2) or 18/N + 4 x largest layer (ZeRO-3); fixed, with no
  buckets, padding or gathered working set beyond one layer."""


def gib(x: float | None) -> str:
    return f"{'-':>8s}" if x is None else f"{x / GiB:8.2f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{'-':>7s}" if a is None or not b else f"{a / b:6.2f}x"


def main() -> None:
    t0 = time.time()
    our = {c.label: ours(c) for c in CASES}
    ds, ds_note = deepspeed_estimates(CASES)
    la, la_note = llm_analysis(CASES)
    print(f"peers: {ds_note}; {la_note}")
    print("GiB per GPU of the most loaded rank; ratio = ours / peer. 'ideal' = our model states with "
          "DeepSpeed's buckets, padding and step-time copies off (the ZeRO paper's count).")
    head = (f"{'case':28s} {'component':14s} {'ours':>8s} {'ideal':>8s} {'llm-anal':>8s} {'ratio':>7s} "
            f"{'DS est':>8s} {'ratio':>7s}")
    print(head)
    print("-" * len(head))
    for case in CASES:
        o, d, l = our[case.label], ds.get(case.label, {}), la.get(case.label, {})
        lerr = l.get("error")
        lv = (lambda k: None) if lerr or not l else (lambda k: l.get(k))
        la_states = None if lv("weight_memory_per_gpu") is None else (
            lv("weight_memory_per_gpu") + lv("gradient_memory_per_gpu") + lv("optimizer_state_memory_per_gpu"))
        states = o["parameters"] + o["gradients"] + o["optimizer"]
        ideal = o["ideal"]
        rows = [
            ("parameters", o["parameters"], ideal["parameters"], lv("weight_memory_per_gpu"), None),
            ("gradients", o["gradients"], ideal["gradients"], lv("gradient_memory_per_gpu"), None),
            ("optimizer", o["optimizer"], ideal["optimizer"], lv("optimizer_state_memory_per_gpu"), None),
            ("model states", states, sum(ideal.values()), la_states, d.get("model_states")),
            ("activations", o["activations"], None, lv("activation_memory_per_gpu"), None),
            ("overhead", o["overhead"], None, None, None),
            ("total", o["total"], None, lv("(weight+op_state+grad+act)_memory_per_gpu"), None),
        ]
        p = case.plan
        la_params = "-" if lv("num_params_total") is None else f"{lv('num_params_total') / 1e9:.3f}B"
        la_maxb = "-" if lv("max_batch_size_per_gpu") is None else lv("max_batch_size_per_gpu")
        print(f"{case.label} | {case.model} ({case.implementation}) on {case.gpus}x{case.gpu}, "
              f"{p.describe()}, seq {case.seq_len}, flash | params ours {o['params'] / 1e9:.3f}B, "
              f"llm-a {la_params} | ours: stage {o['stage']}, {'fits' if o['fits'] else 'does NOT fit'} | "
              f"llm-a max micro-batch {la_maxb}")
        for name, ov, iv, lval, dval in rows:
            print(f"{'':28s} {name:14s} {gib(ov)} {gib(iv)} {gib(lval)} {ratio(ov, lval):>7s} "
                  f"{gib(dval)} {ratio(ov, dval):>7s}")
        lat = lv("latency_per_iter")
        eff = SpeedConstants().gemm_efficiency
        print(f"{'':28s} {'step time s':14s} {o['step_s']:8.3f} {'':8s} "
              f"{'-' if lat is None else f'{lat:.3f}':>8s} {ratio(o['step_s'], lat):>7s}   "
              f"(llm-a at its default flops_efficiency=1: {'-' if lat is None else f'{lat * eff:.3f}'} s)")
        if lerr:
            print(f"{'':28s} llm-analysis failed on this case: {lerr}")
        if "skip" in d:
            print(f"{'':28s} DeepSpeed est: n/a, {d['skip']}")
        elif "largest_layer" in d:
            print(f"{'':28s} DeepSpeed est includes 4 x largest layer = {d['largest_layer'] / GiB:.2f} GiB "
                  f"(its fp32-sized gathered working set)")
    print(FOOTER)
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
