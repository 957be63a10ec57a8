"""`orch launch --preflight` for real on CPU: the planner's first plan is measured, a cluster whose
worker memory is just below that measured peak is written, and preflight must move to another
ranked plan whose measured peak fits -- before any training job starts."""

from __future__ import annotations

import io

import pytest
import yaml

from orchestrator.inputs import CLUSTER_DIR, load_cluster, load_model, resolve_cluster
from orchestrator.launch_plan import choose_plan
from orchestrator.preflight import preflight
from orchestrator.profiling import profile_plan
from planner.pinned import Pinned
from planner.training import TrainingSpec


@pytest.mark.e2e
def test_preflight_moves_a_plan_that_would_run_out_of_memory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, training, pinned = load_model("debug"), TrainingSpec(seq_len=256), Pinned()
    first = choose_plan(model, resolve_cluster("cpu-2", None, None, None), training, pinned)
    peak = profile_plan(model, resolve_cluster("cpu-2", None, None, None), training, pinned, plan=first).measured["peak"]

    data = yaml.safe_load((CLUSTER_DIR / "cpu-2.yaml").read_text())
    data.update(name="cpu-2-tight", gpu={**data["gpu"], "memory_bytes": int(peak * 0.99)})
    path = tmp_path / "cpu-2-tight.yaml"
    path.write_text(yaml.safe_dump(data))
    tight = load_cluster(str(path))
    assert choose_plan(model, tight, training, pinned) == first, "the planner still takes the first plan: it predicts it fits"

    out = io.StringIO()
    chosen = preflight(model, tight, training, pinned, first, out=out)
    lines = out.getvalue().splitlines()
    assert chosen != first
    assert lines[0].startswith(f"preflight: dp2 z{first.zero_stage} mb{first.micro_batch} measured") and "; next: " in lines[0]
    assert lines[-1].endswith(": fits") and len(lines) >= 2
    assert tight.gpu.memory_bytes < peak
