"""The planner against every committed GPU measurement (tests/data/measured/*.json, written by
bench/gpu_memory.py): for each configuration, the planner's allocated peak (its components but
overhead) within 5% of the measured torch.cuda.max_memory_allocated, and its verdict (fits or not)
right -- a run that ran out of memory, or held more than the device, does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.memory.calibration import MeasuredRecord, parse_records
from planner.memory.evaluate import COMPONENTS, evaluate
from planner.specs.hardware import dgx_cluster, gpu_by_name
from planner.structure.hf_config import spec_from_hf_config
from planner.structure.presets import preset
from planner.specs.training import ParallelPlan, TrainingSpec
from planner.memory.zero_buffers import ZeroBuffers
from tests.conftest import DATA

MEASURED = DATA / "measured"
FILES = sorted(MEASURED.glob("*.json"))
PEAK_TOLERANCE = 0.05  # issue 7


def problems(record: MeasuredRecord) -> list[str]:
    """What the current planner gets wrong about one measured configuration."""
    model = spec_from_hf_config(record.hf_config, name=record.model) if record.hf_config else preset(record.model)
    plan = ParallelPlan(**record.plan)
    gpu = gpu_by_name(record.gpu or "cpu").model_copy(update={"memory_bytes": record.capacity_bytes})
    cluster = dgx_cluster(gpu, plan.world_size, min(plan.world_size, 8))
    buffers = ZeroBuffers(**record.buffers) if record.buffers else None
    mem = evaluate(model, cluster, TrainingSpec(**record.training), plan, buffers=buffers)
    allocated = mem.memory.total - mem.memory.overhead
    where = f"{record.model} {plan.describe()} {record.training.get('attention')} s{record.training.get('seq_len')}"
    out = []
    measured_fits = not record.oom and record.device_peak_bytes <= record.capacity_bytes
    if mem.fits_gpu != measured_fits:
        out.append(f"{where}: planner says {'fits' if mem.fits_gpu else 'does not fit'} ({mem.memory.total:,} B), "
                   f"measured {'fits' if measured_fits else 'does not'} (peak {record.device_peak_bytes:,} B, oom {record.oom})")
    if not record.oom and record.allocated_peak_bytes:
        err = (allocated - record.allocated_peak_bytes) / record.allocated_peak_bytes
        if abs(err) > PEAK_TOLERANCE:
            out.append(f"{where}: allocated peak {allocated:,} B predicted, {record.allocated_peak_bytes:,} B measured ({100 * err:+.1f}%)")
    return out


def check_file(path: Path) -> list[str]:
    records = parse_records(json.loads(path.read_text()), str(path))
    assert records, f"{path} holds no record"
    return [p for r in records for p in problems(r)]


if FILES:

    @pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
    def test_planner_against_gpu_measurement(path: Path) -> None:
        found = check_file(path)
        assert not found, "\n".join(found)

else:

    def test_planner_against_gpu_measurement() -> None:
        pytest.skip("no GPU measurement committed yet; run bench/gpu_memory.py on a GPU")


def test_the_check_catches_a_wrong_prediction_and_a_wrong_verdict(tmp_path: Path) -> None:
    """The machinery itself, on a made-up file: a record measured as the planner predicts passes;
    20% more memory, or an out-of-memory run the planner said fits, is reported."""
    model, plan, training = preset("debug"), ParallelPlan(dp=1, zero_stage=2, micro_batch=2), TrainingSpec(seq_len=256)
    gpu = gpu_by_name("h100-80gb")
    mem = evaluate(model, dgx_cluster(gpu, 1, 1), training, plan)
    allocated = mem.memory.total - mem.memory.overhead
    base = MeasuredRecord(
        model="debug", gpu="h100-80gb", plan=plan.model_dump(), training=training.model_dump(), device="NVIDIA H100 80GB HBM3",
        is_gpu=True, num_groups=1, predicted={c: getattr(mem.memory, c) for c in COMPONENTS}, allocated_peak_bytes=allocated,
        reserved_peak_bytes=allocated, device_peak_bytes=mem.memory.total, capacity_bytes=gpu.memory_bytes,
    )
    records = [base, base.model_copy(update={"allocated_peak_bytes": int(allocated * 1.2)}), base.model_copy(update={"oom": True})]
    path = tmp_path / "h100-80gb-made-up.json"
    path.write_text(json.dumps({"records": [r.model_dump() for r in records]}))
    found = check_file(path)
    assert len(found) == 2 and "(-16.7%)" in found[0] and "planner says fits" in found[1]
