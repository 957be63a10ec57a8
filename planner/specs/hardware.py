"""GPUs and clusters: the GPU catalog and the ClusterSpec that the planner plans for.

Peak figures are dense (no 2:4 sparsity) tensor-core rates from each vendor's datasheet;
``memory_bytes`` is what the CUDA/ROCm driver reports as total device memory
(``torch.cuda.get_device_properties(0).total_memory``), which is less than the marketing size.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from planner.errors import PlanInputError
from planner.memory.overheads import Overheads
from planner.units import GB, GiB

Precision = Literal["bf16", "fp16", "fp32", "fp8"]


class GPUSpec(BaseModel):
    """One accelerator model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Catalog key, e.g. 'h100-80gb'.")
    memory_bytes: int = Field(gt=0, description="Device memory the driver reports, bytes.")
    peak_tflops_fp32: float = Field(gt=0, description="Dense FP32 (non-tensor-core) peak, TFLOP/s.")
    peak_tflops_tf32: float = Field(gt=0, description="Dense TF32 tensor peak, TFLOP/s (fp32 rate where no TF32).")
    peak_tflops_bf16: float | None = Field(gt=0, description="Dense BF16 tensor peak, TFLOP/s; None: unsupported.")
    peak_tflops_fp16: float = Field(gt=0, description="Dense FP16 tensor peak (fp32 accumulate), TFLOP/s.")
    peak_tflops_fp8: float | None = Field(gt=0, description="Dense FP8 tensor peak, TFLOP/s; None: unsupported.")
    hbm_bandwidth_GB_per_s: float = Field(gt=0, description="Device memory bandwidth, GB/s (10^9 bytes).")
    tdp_watts: float = Field(gt=0, description="Board power limit, W.")
    nvlink_GB_per_s: float = Field(ge=0, description="Per-GPU intra-node link bandwidth, one direction, GB/s; 0 = PCIe only.")
    pcie_GB_per_s: float = Field(gt=0, description="Host link bandwidth, one direction, GB/s.")
    matmul_achievable_fraction: float = Field(
        default=0.80, gt=0, le=1,
        description="Maximum achievable 16-bit matmul FLOP/s as a fraction of the dense peak (best "
        "large aligned shape; power and clocks, not the kernel, set it). Measured values from Bekman, "
        "ml-engineering compute/accelerator/README.md 'Maximum Achievable Matmul FLOPS comparison "
        "table' (mamf-finder.py): A100 SXM 267.9/312 = 85.9%, H100 SXM 792.1/989 = 80.1%, H100/H200 "
        "SXM 794.5/989 = 80.3%, MI300X 781.9/1300 = 60.1%; 0.80 where not measured.",
    )
    source: str = Field(description="Where the figures come from.")

    def peak_tflops(self, precision: Precision) -> float:
        """Peak dense tensor throughput for a training precision (fp32 trains in TF32 where supported)."""
        peak = {
            "bf16": self.peak_tflops_bf16,
            "fp16": self.peak_tflops_fp16,
            "fp32": self.peak_tflops_tf32,
            "fp8": self.peak_tflops_fp8,
        }[precision]
        if peak is None:
            raise PlanInputError(
                f"GPU '{self.name}' does not support {precision}", "choose --precision fp16 or fp32 for this GPU"
            )
        return peak


def _gpu(**fields: object) -> GPUSpec:
    return GPUSpec(**fields)  # type: ignore[arg-type]


GPU_CATALOG: dict[str, GPUSpec] = {
    g.name: g
    for g in [
        _gpu(name="v100-32gb", memory_bytes=34_089_730_048, peak_tflops_fp32=15.7, peak_tflops_tf32=15.7,
             peak_tflops_bf16=None, peak_tflops_fp16=125.0, peak_tflops_fp8=None, hbm_bandwidth_GB_per_s=900,
             tdp_watts=300, nvlink_GB_per_s=150, pcie_GB_per_s=16,
             source="NVIDIA Tesla V100 datasheet (SXM2), NVLink 2.0 6 links x 25 GB/s"),
        _gpu(name="a100-40gb", memory_bytes=42_505_273_344, peak_tflops_fp32=19.5, peak_tflops_tf32=156.0,
             peak_tflops_bf16=312.0, peak_tflops_fp16=312.0, peak_tflops_fp8=None, hbm_bandwidth_GB_per_s=1555,
             tdp_watts=400, nvlink_GB_per_s=300, pcie_GB_per_s=32, matmul_achievable_fraction=0.859,
             source="NVIDIA A100 datasheet (SXM4 40GB), NVLink 3.0 600 GB/s bidirectional"),
        _gpu(name="a100-80gb", memory_bytes=85_198_045_184, peak_tflops_fp32=19.5, peak_tflops_tf32=156.0,
             peak_tflops_bf16=312.0, peak_tflops_fp16=312.0, peak_tflops_fp8=None, hbm_bandwidth_GB_per_s=2039,
             tdp_watts=400, nvlink_GB_per_s=300, pcie_GB_per_s=32, matmul_achievable_fraction=0.859,
             source="NVIDIA A100 datasheet (SXM4 80GB), NVLink 3.0 600 GB/s bidirectional"),
        _gpu(name="h100-80gb", memory_bytes=85_520_809_984, peak_tflops_fp32=67.0, peak_tflops_tf32=494.7,
             peak_tflops_bf16=989.4, peak_tflops_fp16=989.4, peak_tflops_fp8=1978.9, hbm_bandwidth_GB_per_s=3350,
             tdp_watts=700, nvlink_GB_per_s=450, pcie_GB_per_s=64, matmul_achievable_fraction=0.801,
             source="NVIDIA H100 datasheet (SXM5), NVLink 4.0 900 GB/s bidirectional"),
        _gpu(name="h200-141gb", memory_bytes=150_754_820_096, peak_tflops_fp32=67.0, peak_tflops_tf32=494.7,
             peak_tflops_bf16=989.4, peak_tflops_fp16=989.4, peak_tflops_fp8=1978.9, hbm_bandwidth_GB_per_s=4800,
             tdp_watts=700, nvlink_GB_per_s=450, pcie_GB_per_s=64, matmul_achievable_fraction=0.803,
             source="NVIDIA H200 datasheet (SXM), NVLink 4.0 900 GB/s bidirectional"),
        _gpu(name="l40s-48gb", memory_bytes=47_697_362_944, peak_tflops_fp32=91.6, peak_tflops_tf32=183.0,
             peak_tflops_bf16=362.05, peak_tflops_fp16=362.05, peak_tflops_fp8=733.0, hbm_bandwidth_GB_per_s=864,
             tdp_watts=350, nvlink_GB_per_s=0, pcie_GB_per_s=32,
             source="NVIDIA L40S datasheet; no NVLink, PCIe 4.0 x16"),
        _gpu(name="a6000-48gb", memory_bytes=51_041_271_808, peak_tflops_fp32=38.7, peak_tflops_tf32=77.4,
             peak_tflops_bf16=154.8, peak_tflops_fp16=154.8, peak_tflops_fp8=None, hbm_bandwidth_GB_per_s=768,
             tdp_watts=300, nvlink_GB_per_s=56.25, pcie_GB_per_s=32,
             source="NVIDIA RTX A6000 datasheet; NVLink bridge 112.5 GB/s bidirectional"),
        _gpu(name="rtx4090-24gb", memory_bytes=25_393_692_672, peak_tflops_fp32=82.6, peak_tflops_tf32=82.6,
             peak_tflops_bf16=165.2, peak_tflops_fp16=165.2, peak_tflops_fp8=330.3, hbm_bandwidth_GB_per_s=1008,
             tdp_watts=450, nvlink_GB_per_s=0, pcie_GB_per_s=32,
             source="NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090 (FP16/BF16 with FP32 accumulate)"),
        _gpu(name="mi300x-192gb", memory_bytes=205_822_885_888, peak_tflops_fp32=163.4, peak_tflops_tf32=653.7,
             peak_tflops_bf16=1307.4, peak_tflops_fp16=1307.4, peak_tflops_fp8=2614.9, hbm_bandwidth_GB_per_s=5300,
             tdp_watts=750, nvlink_GB_per_s=448, pcie_GB_per_s=64, matmul_achievable_fraction=0.601,
             source="AMD Instinct MI300X datasheet; Infinity Fabric 7 links x 64 GB/s"),
        # A nominal CPU "device" for local runs on the CPU backend: the memory is a worker's share of
        # host RAM and the peak a modest AVX2 core pair; override both in a cluster YAML.
        _gpu(name="cpu", memory_bytes=8 * GiB, peak_tflops_fp32=0.1, peak_tflops_tf32=0.1,
             peak_tflops_bf16=0.1, peak_tflops_fp16=0.1, peak_tflops_fp8=None, hbm_bandwidth_GB_per_s=20,
             tdp_watts=65, nvlink_GB_per_s=10, pcie_GB_per_s=10,
             source="nominal figures for a CPU worker; override memory_bytes in the cluster YAML"),
    ]
}


def gpu_by_name(name: str) -> GPUSpec:
    key = name.lower()
    if key not in GPU_CATALOG:
        raise PlanInputError(f"unknown GPU '{name}'", f"use one of {', '.join(GPU_CATALOG)}")
    return GPU_CATALOG[key]


class ClusterSpec(BaseModel):
    """A set of identical nodes. Bandwidths are per GPU, one direction."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Display name.")
    gpu: GPUSpec = Field(description="The accelerator every node carries.")
    num_nodes: int = Field(gt=0, description="Nodes.")
    gpus_per_node: int = Field(gt=0, description="Accelerators per node.")
    intra_node_GB_per_s: float = Field(gt=0, description="Per-GPU bandwidth inside a node (NVLink/PCIe), one direction, GB/s.")
    inter_node_GB_per_s: float = Field(gt=0, description="Per-GPU network bandwidth between nodes, one direction, GB/s.")
    intra_node_latency_us: float = Field(ge=0, description="Per-message latency inside a node (alpha), microseconds.")
    inter_node_latency_us: float = Field(ge=0, description="Per-message latency between nodes (alpha), microseconds.")
    host_memory_bytes: int = Field(gt=0, description="CPU RAM per node, bytes (offload targets).")
    cost_per_gpu_hour_usd: float = Field(default=0.0, ge=0, description="Price of one GPU-hour, USD; 0 = unknown.")
    pue: float = Field(default=1.2, ge=1.0, description="Datacenter power usage effectiveness (energy multiplier).")
    backend: Literal["nccl", "gloo"] = Field(default="nccl", description="torch.distributed backend the GPUs use.")
    ray_address: str | None = Field(default=None, description="Address of an existing Ray cluster; None = embedded.")
    overheads: Overheads = Field(
        default_factory=Overheads, description="Runtime overhead constants (CUDA context, NCCL, fragmentation); calibratable."
    )

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node


def dgx_cluster(gpu: GPUSpec, num_gpus: int, gpus_per_node: int = 8, name: str | None = None) -> ClusterSpec:
    """A cluster of DGX-class nodes: NVLink inside a node, one InfiniBand NIC per GPU between nodes
    (DGX A100: 8 x 200 Gb/s HDR = 25 GB/s per GPU; DGX H100: 8 x 400 Gb/s NDR = 50 GB/s per GPU).
    Latencies are typical NCCL small-message figures (NCCL tests: a few us on NVLink, ~10 us on IB)."""
    if num_gpus <= 0 or gpus_per_node <= 0:
        raise PlanInputError(
            f"--gpus={num_gpus} and --gpus-per-node={gpus_per_node} must be positive", "pass positive counts"
        )
    per_node = min(gpus_per_node, num_gpus)
    if num_gpus % per_node:
        raise PlanInputError(
            f"--gpus={num_gpus} is not a multiple of --gpus-per-node={per_node}",
            "use a GPU count that fills whole nodes",
        )
    ib_GB_per_s = 50.0 if gpu.name.startswith(("h100", "h200", "mi300")) else 25.0
    intra = gpu.nvlink_GB_per_s or gpu.pcie_GB_per_s
    return ClusterSpec(
        name=name or f"{num_gpus}x{gpu.name}",
        gpu=gpu,
        num_nodes=num_gpus // per_node,
        gpus_per_node=per_node,
        intra_node_GB_per_s=intra,
        inter_node_GB_per_s=ib_GB_per_s,
        intra_node_latency_us=3.0 if gpu.nvlink_GB_per_s else 8.0,
        inter_node_latency_us=10.0,
        host_memory_bytes=2048 * GB if per_node == 8 else 256 * GB,
        backend="gloo" if gpu.name == "cpu" else "nccl",
    )
