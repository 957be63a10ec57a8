"""`orch launch --preflight` for real on CPU: the planner's first plan is measured by real DeepSpeed
ranks before any job starts, and kept when its measured peak fits the worker memory.

Since the planner's peak equals the measured one on CPU (planner/memory/phases.py, within 0.01% for the
debug model), no CPU cluster makes the planner pick a plan that then measures too big; the moving
path of the policy (next_plan) is tested on recorded measurements in
tests/orchestrator/test_preflight.py, and on a GPU it is what preflight is for (allocator and
kernel workspaces the planner does not count)."""

from __future__ import annotations

import io

import pytest
import yaml

from orchestrator.inputs import CLUSTER_DIR, load_cluster, load_model, resolve_cluster
from orchestrator.launch_plan import choose_plan
from orchestrator.preflight import preflight
from orchestrator.profiling import profile_plan
from planner.search.pinned import Pinned
from planner.specs.training import TrainingSpec


@pytest.mark.e2e
def test_preflight_measures_the_plan_and_keeps_it_when_it_fits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, training, pinned = load_model("debug"), TrainingSpec(seq_len=256), Pinned()
    first = choose_plan(model, resolve_cluster("cpu-2", None, None, None), training, pinned)
    peak = profile_plan(model, resolve_cluster("cpu-2", None, None, None), training, pinned, plan=first).measured["peak"]

    data = yaml.safe_load((CLUSTER_DIR / "cpu-2.yaml").read_text())
    # 10% above the measured peak: room for the planner's fragmentation margin (5% on cpu-2).
    data.update(name="cpu-2-snug", gpu={**data["gpu"], "memory_bytes": int(peak * 1.10)})
    path = tmp_path / "cpu-2-snug.yaml"
    path.write_text(yaml.safe_dump(data))
    snug = load_cluster(str(path))
    assert choose_plan(model, snug, training, pinned) == first

    out = io.StringIO()
    assert preflight(model, snug, training, pinned, first, out=out) == first
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"preflight: dp2 z{first.zero_stage} mb{first.micro_batch} measured")
    assert lines[0].endswith(": fits")

    # 2% less memory than the measured peak: the planner itself no longer takes that plan.
    data.update(name="cpu-2-tight", gpu={**data["gpu"], "memory_bytes": int(peak * 0.98)})
    path.write_text(yaml.safe_dump(data))
    assert choose_plan(model, load_cluster(str(path)), training, pinned) != first
