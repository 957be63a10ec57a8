"""Calibration: fit the planner's overhead constants (planner.memory.overheads) to measured peaks.

A measured record (``MeasuredRecord``; written by ``orch profile --save`` and by
``bench/gpu_memory.py``, one JSON format) sets the planner's prediction for one rank against what
the device showed at that rank's peak:

- A, ``allocated_peak_bytes``: live tensor bytes (GPU: torch.cuda.max_memory_allocated; CPU: the
  tensor-storage peak of ``launch.profile_worker``);
- R, ``reserved_peak_bytes``: what the allocator held (GPU: torch.cuda.max_memory_reserved; CPU:
  A plus the bytes glibc malloc holds free in its arenas, mallinfo2().fordblks);
- D, ``device_peak_bytes``: what the rank held in all (GPU: R plus what the device holds outside
  the allocator -- CUDA context, cuBLAS workspaces, NCCL buffers -- from torch.cuda.mem_get_info;
  CPU: R).

The overhead model (planner.memory.overheads.overhead_bytes) says D = P + [GPU only] c + w + g G + f P,
with P the planner's allocated bytes (its components but overhead), c the CUDA context, w the
cuBLAS workspace (kept), G the NCCL communicators of the rank and g the bytes of each, f the
fragmentation ratio. Hence two separate fits:

- f: least squares through the origin of (R - P) on P. The planner applies f to its own tensor
  count, so f takes up the allocator's slack (R - A) and what that count misses (A - P:
  transients between the planner's components, such as the loss gradient at the start of the
  backward); on CPU, where R = A, only the latter;
- c and g (GPU records): least squares line of (D - R - w) on G; where every record has the same
  G (single-GPU measurements) g is not identifiable and keeps its current value, and only c is
  fitted (the mean).

Each fit is made robust by one pass that drops residuals beyond 3 scaled median absolute
deviations (1.4826 MAD estimates the standard deviation of normal errors; Rousseeuw & Croux 1993)
and refits. Records that ran out of memory are not fitted (their peaks are truncated).
Pure: stdlib and pydantic; files are read and written at the edges (orchestrator).
"""

from __future__ import annotations

from statistics import median
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from planner.errors import PlanInputError
from planner.specs.hardware import ClusterSpec
from planner.memory.overheads import Overheads, overhead_bytes

COMPONENTS = ("parameters", "gradients", "optimizer", "activations", "overhead")
MAD_SCALE = 1.4826  # MAD -> standard deviation of normal errors (Rousseeuw & Croux 1993)
OUTLIER_MADS = 3.0


class MeasuredRecord(BaseModel):
    """One measured configuration: what the planner predicted and what the device showed, bytes
    per rank (the most loaded rank)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="Model preset name (or config path) that was trained.")
    hf_config: dict[str, Any] | None = Field(default=None, description="The model's Hugging Face config when it is not a preset; None = the preset.")
    gpu: str | None = Field(default=None, description="GPU catalog key the planner planned for (planner.specs.hardware.GPU_CATALOG); None = CPU.")
    plan: dict[str, Any] = Field(description="The ParallelPlan's fields (ParallelPlan.model_dump()).")
    training: dict[str, Any] = Field(description="The TrainingSpec's fields (TrainingSpec.model_dump()).")
    buffers: dict[str, Any] = Field(default_factory=dict, description="ZeroBuffers written to the DeepSpeed config; {} = the plan's default.")
    device: str = Field(description="'cpu', or the GPU's name as torch.cuda.get_device_name reports it.")
    is_gpu: bool = Field(description="Measured on a GPU (CUDA allocator statistics) rather than a CPU.")
    num_groups: int = Field(ge=1, description="NCCL/gloo communicators the rank joined (planner.memory.overheads.process_groups).")
    predicted: dict[str, int] = Field(description="The planner's components, bytes: parameters, gradients, optimizer, activations, overhead.")
    allocated_peak_bytes: int = Field(ge=0, description="A: peak live tensor bytes.")
    reserved_peak_bytes: int = Field(ge=0, description="R: peak bytes the allocator held (CPU: A + malloc's free bytes).")
    device_peak_bytes: int = Field(ge=0, description="D: peak bytes the rank held in all (GPU: R + context, NCCL, cuBLAS).")
    capacity_bytes: int = Field(gt=0, description="Device memory the rank could use, bytes.")
    oom: bool = Field(default=False, description="The run ran out of memory (its peaks are then lower bounds).")
    phases: list[dict[str, Any]] = Field(default_factory=list, description="Per-phase figures as measured (informative).")

    @property
    def predicted_allocated(self) -> int:
        return sum(self.predicted.get(c, 0) for c in COMPONENTS if c != "overhead")

    @property
    def predicted_peak(self) -> int:
        return self.predicted_allocated + self.predicted.get("overhead", 0)


class Calibration(BaseModel):
    """Overhead constants fitted to measurements of one device; None = not fitted (the cluster's
    own value is kept)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = Field(description="Device the records were measured on ('cpu' or a GPU name).")
    is_gpu: bool = Field(description="GPU records (context and NCCL fitted) or CPU records (fragmentation only).")
    records: int = Field(ge=1, description="Records fitted (after outlier rejection, out-of-memory runs excluded).")
    cuda_context_bytes: int | None = Field(default=None, ge=0, description="Fitted CUDA context bytes; None = not fitted.")
    nccl_bytes_per_group: int | None = Field(default=None, ge=0, description="Fitted NCCL bytes per communicator; None = not fitted.")
    fragmentation_ratio: float | None = Field(default=None, ge=0, lt=1, description="Fitted allocator slack / allocated; None = not fitted.")
    peak_error_pct_before: float = Field(description="Mean |predicted - measured device peak| / measured over the records, current constants, %.")
    peak_error_pct_after: float = Field(description="The same with the fitted constants, %.")
    sources: tuple[str, ...] = Field(default=(), description="Files the records came from.")

    def overheads(self, base: Overheads) -> Overheads:
        fitted = {k: getattr(self, k) for k in ("cuda_context_bytes", "nccl_bytes_per_group", "fragmentation_ratio")}
        return base.model_copy(update={k: v for k, v in fitted.items() if v is not None})


def calibrated_cluster(cluster: ClusterSpec, cal: Calibration) -> ClusterSpec:
    """The cluster with the calibration's constants in its overheads. A CPU calibration (glibc
    malloc) does not describe a GPU (CUDA caching allocator), nor the reverse."""
    cluster_is_gpu = cluster.gpu.name != "cpu"
    if cluster_is_gpu != cal.is_gpu:
        kind = "a GPU" if cal.is_gpu else "CPU"
        raise PlanInputError(
            f"the calibration was measured on {kind} ({cal.device}) but cluster '{cluster.name}' is {cluster.gpu.name}",
            "calibrate from measurements on the cluster's kind of device (orch calibrate FILES --out calib.json)",
        )
    return cluster.model_copy(update={"overheads": cal.overheads(cluster.overheads)})


def parse_records(data: Any, where: str) -> list[MeasuredRecord]:
    """The records of one measurement file: ``{"records": [...], ...}``."""
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise PlanInputError(f"{where}: not a measurement file (no 'records' list)", "pass files written by orch profile --save or bench/gpu_memory.py")
    out = []
    for i, item in enumerate(data["records"]):
        try:
            out.append(MeasuredRecord.model_validate(item))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "value"
            raise PlanInputError(f"{where}: record {i} field '{field}' {first['msg'].lower()}", f"correct or remove record {i}") from None
    return out


def predicted_device_peak(record: MeasuredRecord, o: Overheads) -> int:
    """The planner's peak of a record with overhead constants ``o``."""
    a = record.predicted_allocated
    return a + overhead_bytes(o, allocated_bytes=a, num_groups=record.num_groups, is_gpu=record.is_gpu)


def fit(records: Sequence[MeasuredRecord], base: Overheads, sources: Sequence[str] = ()) -> Calibration:
    """Fit the overhead constants to ``records`` (one device), starting from ``base``."""
    usable = [r for r in records if not r.oom]
    if not usable:
        raise PlanInputError("no measured record to fit (none given, or every run ran out of memory)", "pass measurement files with completed runs")
    devices = sorted({r.device for r in usable})
    if len(devices) > 1:
        raise PlanInputError(f"records from several devices ({', '.join(devices)})", "calibrate each device's files separately")
    is_gpu = usable[0].is_gpu
    frag, n_frag = _ratio_fit([r.predicted_allocated for r in usable], [r.reserved_peak_bytes - r.predicted_allocated for r in usable])
    fitted: dict[str, Any] = {"fragmentation_ratio": min(max(frag, 0.0), 0.99)}
    n = n_frag
    if is_gpu:
        groups = [float(r.num_groups) for r in usable]
        outside = [float(r.device_peak_bytes - r.reserved_peak_bytes - base.cublas_workspace_bytes) for r in usable]
        if len(set(groups)) > 1:
            (c, g), n_ctx = _line_fit(groups, outside)
            fitted["nccl_bytes_per_group"] = max(0, round(g))
        else:
            g = float(base.nccl_bytes_per_group)
            c, n_ctx = _mean_fit([y - g * x for x, y in zip(groups, outside)])
        fitted["cuda_context_bytes"] = max(0, round(c))
        n = min(n, n_ctx)
    after = base.model_copy(update=fitted)
    return Calibration(
        device=devices[0], is_gpu=is_gpu, records=n, **fitted,
        peak_error_pct_before=_mean_error_pct(usable, base), peak_error_pct_after=_mean_error_pct(usable, after),
        sources=tuple(sources),
    )


def _mean_error_pct(records: Sequence[MeasuredRecord], o: Overheads) -> float:
    errors = [abs(predicted_device_peak(r, o) - r.device_peak_bytes) / r.device_peak_bytes for r in records if r.device_peak_bytes]
    return 100.0 * sum(errors) / len(errors) if errors else 0.0


def _inliers(residuals: Sequence[float]) -> list[bool]:
    """Points within OUTLIER_MADS scaled MADs of the median residual (all, with under 4 points or
    a zero MAD)."""
    if len(residuals) < 4:
        return [True] * len(residuals)
    mid = median(residuals)
    mad = MAD_SCALE * median(abs(r - mid) for r in residuals)
    if mad == 0:
        return [True] * len(residuals)
    return [abs(r - mid) <= OUTLIER_MADS * mad for r in residuals]


def _robust(fit_once, xs: Sequence[float], ys: Sequence[float]):  # type: ignore[no-untyped-def]
    """Fit, drop the outliers of that fit, refit; (parameters, points kept)."""
    params, predict = fit_once(xs, ys)
    keep = _inliers([y - predict(x) for x, y in zip(xs, ys)])
    if all(keep):
        return params, len(xs)
    xs2 = [x for x, k in zip(xs, keep) if k]
    ys2 = [y for y, k in zip(ys, keep) if k]
    return fit_once(xs2, ys2)[0], len(xs2)


def _ratio_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, int]:
    """y = k x by least squares: k = sum(xy) / sum(x^2)."""

    def once(xs, ys):  # type: ignore[no-untyped-def]
        den = sum(x * x for x in xs)
        k = sum(x * y for x, y in zip(xs, ys)) / den if den else 0.0
        return k, (lambda x: k * x)

    return _robust(once, xs, ys)


def _line_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[tuple[float, float], int]:
    """y = a + b x by ordinary least squares."""

    def once(xs, ys):  # type: ignore[no-untyped-def]
        n = len(xs)
        mx, my = sum(xs) / n, sum(ys) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
        a = my - b * mx
        return (a, b), (lambda x: a + b * x)

    return _robust(once, xs, ys)


def _mean_fit(ys: Sequence[float]) -> tuple[float, int]:
    """y = a: the least-squares constant is the mean."""

    def once(xs, ys):  # type: ignore[no-untyped-def]
        a = sum(ys) / len(ys)
        return a, (lambda x: a)

    return _robust(once, list(range(len(ys))), ys)
