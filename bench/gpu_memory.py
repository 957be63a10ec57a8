"""GPU memory measured against the planner (issue 7): a matrix of configurations -- debug to 1.35B
parameters, ZeRO 0-3, micro-batch 1-8, recompute on and off, flash and eager attention -- each
trained for a few steps with DeepSpeed on one GPU, in a fresh process with a timeout
(``launch.profile_worker``: torch.cuda allocated and reserved bytes per phase, the device memory
in use from torch.cuda.mem_get_info). World size 1: ZeRO 1-3 still run their own code paths
(buckets, partition buffers, gathered parameters) with one partition.

Each configuration is written as a calibration record (planner.memory.calibration.MeasuredRecord, the
format ``orch profile --save`` writes) with the planner's prediction for it, to
tests/data/measured/<gpu>-<date>.json with the hardware and software versions, which
tests/planner/test_measured_gpu.py then checks the planner against (peak within 5%, fits verdict)
and ``orch calibrate`` fits the overhead constants to.

    python bench/gpu_memory.py --dry-run   # the matrix, predicted peaks and time estimate (any machine)
    python bench/gpu_memory.py             # measure (one GPU, about 8 minutes on an H100)

The time estimate per configuration is a start-up cost (interpreter, torch, DeepSpeed and
transformers imports, CUDA and NCCL initialisation: START_S; building and randomly initialising
the fp32 model on the CPU: INIT_S_PER_BPARAM per billion parameters -- both assumptions, to be
replaced by what a run prints) plus the planner's step time for each measured step. A run whose
estimate exceeds the budget is refused before anything starts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.profiling import _free_port, measured_components, profile_job, versions  # noqa: E402
from planner.memory.calibration import COMPONENTS, MeasuredRecord  # noqa: E402
from planner.memory.evaluate import PlanMemory, buffers_for, evaluate  # noqa: E402
from planner.specs.hardware import ClusterSpec, dgx_cluster, gpu_by_name  # noqa: E402
from planner.structure.hf_config import spec_from_hf_config  # noqa: E402
from planner.structure.model import ModelSpec  # noqa: E402
from planner.memory.overheads import process_groups  # noqa: E402
from planner.structure.presets import preset  # noqa: E402
from planner.speed.step import step_time  # noqa: E402
from planner.specs.training import ParallelPlan, TrainingSpec  # noqa: E402

OUT_DIR = ROOT / "tests" / "data" / "measured"
BUDGET_S = 600.0  # issue 7: the whole matrix within ten minutes on one H100
START_S = 25.0  # assumed: python + torch/deepspeed/transformers imports + CUDA/NCCL init, per process
INIT_S_PER_BPARAM = 15.0  # assumed: fp32 random initialisation on the CPU and the copy to the GPU, per 1e9 params
STEPS = 3  # the first step allocates the optimizer states; the peak is reached by the second
DEFAULT_GPU = "h100-80gb"


def _llama(layers: int, hidden: int, heads: int, ffn: int) -> dict[str, Any]:
    """A Llama-architecture config with Llama 2's 32,000-token vocabulary."""
    return {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": heads, "intermediate_size": ffn, "vocab_size": 32000, "max_position_embeddings": 4096,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}


# The models of the matrix: the debug preset and Llama-shaped 134M, 374M and 1.35B models.
MODELS: dict[str, dict[str, Any] | None] = {
    "debug": None,  # the preset (planner.structure.presets)
    "bench-134m": _llama(12, 768, 12, 2048),
    "bench-374m": _llama(24, 1024, 16, 2816),
    "bench-1.35b": _llama(24, 2048, 16, 5504),
}


@dataclass(frozen=True)
class Config:
    """One measured configuration (one GPU, data parallelism 1)."""

    model: str
    zero: int
    micro_batch: int
    seq_len: int = 2048
    recompute: str = "none"
    attention: str = "flash"

    @property
    def name(self) -> str:
        extra = ("-recompute" if self.recompute != "none" else "") + ("-eager" if self.attention == "eager" else "")
        return f"{self.model}-z{self.zero}-mb{self.micro_batch}-s{self.seq_len}{extra}"


def matrix() -> list[Config]:
    """Every ZeRO stage on each size; micro-batch 1 to 8; recompute on and off; flash and eager;
    a few that the planner says do not fit, so that both verdicts are checked."""
    small = [Config("debug", z, 1, seq_len=1024) for z in (0, 3)]  # constant overheads: context, cuBLAS
    m134 = [Config("bench-134m", z, 4) for z in (0, 1, 3)] + [Config("bench-134m", 1, 8, attention="eager")]
    m374 = [Config("bench-374m", 1, mb) for mb in (2, 4, 8)] + [
        Config("bench-374m", 2, 8, recompute="full"), Config("bench-374m", 3, 4, attention="eager"),
    ]
    m135 = [
        Config("bench-1.35b", 0, 1), Config("bench-1.35b", 1, 4), Config("bench-1.35b", 2, 8),
        Config("bench-1.35b", 3, 8, recompute="full"), Config("bench-1.35b", 2, 8, recompute="full", attention="eager"),
        Config("bench-1.35b", 1, 8, attention="eager"),  # eager scores of 8 x 2048^2 per head: over 80 GB
    ]
    return small + m134 + m374 + m135


def model_spec(name: str) -> ModelSpec:
    cfg = MODELS[name]
    return preset(name) if cfg is None else spec_from_hf_config(cfg, name=name)


def plan_of(cfg: Config) -> tuple[ParallelPlan, TrainingSpec]:
    plan = ParallelPlan(dp=1, zero_stage=cfg.zero, micro_batch=cfg.micro_batch, recompute=cfg.recompute)  # type: ignore[arg-type]
    return plan, TrainingSpec(seq_len=cfg.seq_len, attention=cfg.attention)  # type: ignore[arg-type]


def gpu_cluster(gpu: str, memory_bytes: int | None = None) -> ClusterSpec:
    """One GPU of the catalog, its memory as the driver reports it when measured."""
    spec = gpu_by_name(gpu)
    if memory_bytes:
        spec = spec.model_copy(update={"memory_bytes": memory_bytes})
    return dgx_cluster(spec, 1, 1, name=f"1x{gpu}")


def predict(cfg: Config, cluster: ClusterSpec) -> PlanMemory:
    plan, training = plan_of(cfg)
    return evaluate(model_spec(cfg.model), cluster, training, plan)


def estimate_s(cfg: Config, cluster: ClusterSpec) -> float:
    """Start-up, model initialisation and STEPS steps at the planner's step time."""
    model = model_spec(cfg.model)
    plan, training = plan_of(cfg)
    params_b = predict(cfg, cluster).params_on_rank / 1e9
    return START_S + INIT_S_PER_BPARAM * params_b + STEPS * step_time(model, cluster, training, plan).step_time_s


def catalog_key(device_name: str) -> str:
    """torch.cuda.get_device_name -> the GPU catalog key ('NVIDIA H100 80GB HBM3' -> 'h100-80gb')."""
    name = device_name.lower()
    for key, pattern in (("h200-141gb", r"h200"), ("h100-80gb", r"h100"), ("a100-80gb", r"a100.*80"),
                         ("a100-40gb", r"a100"), ("l40s-48gb", r"l40s"), ("rtx4090-24gb", r"4090"), ("v100-32gb", r"v100")):
        if re.search(pattern, name):
            return key
    raise SystemExit(f"gpu_memory: no catalog GPU matches '{device_name}'; add it to planner.specs.hardware.GPU_CATALOG")


def gpu_info() -> dict[str, Any]:
    """Name, memory and driver of GPU 0 through NVML (no CUDA context in this process: it would
    take device memory that the measured process then sees)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        return {
            "name": name.decode() if isinstance(name, bytes) else name,
            "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
            "driver": str(pynvml.nvmlSystemGetDriverVersion()),
            "cuda_driver_version": int(pynvml.nvmlSystemGetCudaDriverVersion()),
        }
    finally:
        pynvml.nvmlShutdown()


def run_one(cfg: Config, cluster: ClusterSpec, gpu: str, workdir: Path, timeout_s: float) -> MeasuredRecord:
    """One configuration in a fresh process; out of memory is a result, a crash or timeout is not."""
    model = model_spec(cfg.model)
    plan, training = plan_of(cfg)
    buffers = buffers_for(model, plan)
    predicted = evaluate(model, cluster, training, plan, buffers=buffers)
    job = profile_job(model, training, plan, buffers, steps=STEPS, seed=0, device="cuda", tensors=False)
    (workdir / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
    env.pop("DS_ACCELERATOR", None)
    cmd = [sys.executable, "-m", "launch.profile_worker", str(workdir / "job.json"), str(workdir / "out.json")]
    with open(workdir / f"{cfg.name}.log", "w") as log:
        subprocess.run(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=True)
    result = json.loads((workdir / "out.json").read_text())
    m = measured_components(result["records"])
    return MeasuredRecord(
        model=cfg.model, hf_config=MODELS[cfg.model], gpu=gpu, plan=plan.model_dump(), training=training.model_dump(),
        buffers=buffers.model_dump(), device=result["device_name"], is_gpu=True,
        num_groups=process_groups(dp=1, tp=1, pp=1, cp=1, ep=1),
        predicted={c: getattr(predicted.memory, c) for c in COMPONENTS},
        allocated_peak_bytes=m["allocated_peak"], reserved_peak_bytes=m["reserved_peak"], device_peak_bytes=m["device_peak"],
        capacity_bytes=cluster.gpu.memory_bytes, oom=bool(result.get("oom")), phases=result["records"],
    )


def dry_run(configs: list[Config], cluster: ClusterSpec) -> float:
    """Print the matrix with the planner's peaks and the time estimate; the total seconds."""
    print(f"{'configuration':40s} {'plan':36s} {'predicted GiB':>13s} {'fits':>5s} {'est s':>6s}")
    total = 0.0
    for cfg in configs:
        mem, est = predict(cfg, cluster), estimate_s(cfg, cluster)
        total += est
        print(f"{cfg.name:40s} {mem.plan.describe():36s} {mem.memory.total / 2**30:13.2f} {'yes' if mem.fits else 'NO':>5s} {est:6.0f}")
    print(f"{len(configs)} configurations, estimated {total:.0f} s on {cluster.gpu.name} (budget {BUDGET_S:.0f} s)")
    return total


def measure(configs: list[Config], out_dir: Path) -> Path:
    info = gpu_info()
    gpu = catalog_key(info["name"])
    cluster = gpu_cluster(gpu, info["memory_bytes"])
    records, t_start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="orch-gpu-memory-") as tmp:
        for cfg in configs:
            t0 = time.perf_counter()
            try:
                rec = run_one(cfg, cluster, gpu, Path(tmp), timeout_s=max(120.0, 4 * estimate_s(cfg, cluster)))
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                log = (Path(tmp) / f"{cfg.name}.log").read_text()[-1500:]
                print(f"{cfg.name}: FAILED ({type(exc).__name__}); not recorded\n{log}", file=sys.stderr)
                continue
            records.append(rec.model_dump())
            pred = rec.predicted_allocated
            print(f"{cfg.name:40s} allocated {rec.allocated_peak_bytes / 2**30:7.2f} GiB, predicted {pred / 2**30:7.2f} "
                  f"({100 * (pred - rec.allocated_peak_bytes) / max(1, rec.allocated_peak_bytes):+.1f}%), "
                  f"device {rec.device_peak_bytes / 2**30:7.2f} GiB{' OOM' if rec.oom else ''}  {time.perf_counter() - t0:.0f} s",
                  flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{gpu}-{datetime.date.today().isoformat()}.json"
    data = {
        "source": "bench/gpu_memory.py: each configuration in a fresh process on GPU 0, DeepSpeed, world size 1, "
                  f"{STEPS} steps of synthetic tokens; torch.cuda allocator statistics per phase.",
        "hardware": info, "software": versions(), "elapsed_s": round(time.perf_counter() - t_start, 1), "records": records,
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{len(records)} records written to {path} in {data['elapsed_s']:.0f} s")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="Print the matrix, predicted peaks and the time estimate; measure nothing.")
    ap.add_argument("--gpu", default=DEFAULT_GPU, help="Catalog GPU of the dry run (a real run uses the GPU it finds).")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="Directory of the measurement file.")
    ap.add_argument("--only", default="", help="Measure only configurations whose name contains this text.")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="Refuse a matrix estimated to take longer.")
    args = ap.parse_args(argv)
    configs = [c for c in matrix() if args.only in c.name]
    total = dry_run(configs, gpu_cluster(args.gpu))
    if args.dry_run:
        return 0
    if total > args.budget_s:
        print(f"gpu_memory: estimated {total:.0f} s exceeds --budget-s {args.budget_s:.0f}; narrow it with --only", file=sys.stderr)
        return 2
    measure(configs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
