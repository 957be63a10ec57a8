"""`orch launch --preflight`: the policy, without a cluster (pure decisions on made-up figures)."""

from __future__ import annotations

import io

import pytest

from orchestrator.preflight import Ranked, changes, next_plan, preflight, short
from planner.errors import PlanInputError
from planner.specs.training import ParallelPlan
from planner.units import GiB

Z1_MB8 = ParallelPlan(dp=2, zero_stage=1, micro_batch=8)
Z2_MB8 = ParallelPlan(dp=2, zero_stage=2, micro_batch=8)
Z1_MB4 = ParallelPlan(dp=2, zero_stage=1, micro_batch=4)
Z3_MB8_FULL = ParallelPlan(dp=2, zero_stage=3, micro_batch=8, recompute="full")
RANKED = [Ranked(Z1_MB8, int(9.5 * GiB)), Ranked(Z2_MB8, int(9.2 * GiB)), Ranked(Z1_MB4, int(6 * GiB)), Ranked(Z3_MB8_FULL, 3 * GiB)]


def test_a_plan_that_fits_as_measured_is_kept() -> None:
    d = next_plan(RANKED, int(9.9 * GiB), 10 * GiB)
    assert d.keep and d.plan == Z1_MB8
    assert d.line == "preflight: dp2 z1 mb8 measured 9.9 GiB <= 10.0 GiB: fits"


def test_moves_to_the_first_ranked_plan_that_fits_after_the_correction() -> None:
    """Measured 12.35 GiB against 9.5 predicted: x1.30, so z2 mb8 (9.2 -> 12.0 GiB) does not fit
    10 GiB but z1 mb4 (6 -> 7.8 GiB) does, although it ranks below."""
    d = next_plan(RANKED, int(12.35 * GiB), 10 * GiB)
    assert not d.keep and d.plan == Z1_MB4
    assert d.line.startswith("preflight: dp2 z1 mb8 measured 12.3 GiB > 10.0 GiB; next: dp2 z1 mb4 (mb 8->4; predicted 6.0 GiB x 1.30")


def test_a_small_miss_takes_the_next_ranked_plan() -> None:
    d = next_plan(RANKED, int(10.2 * GiB), 10 * GiB)
    assert d.plan == Z2_MB8 and "zero 1->2" in d.line


def test_only_plans_needing_less_memory_are_candidates_and_none_left_gives_up() -> None:
    ranked = [Ranked(Z1_MB4, 6 * GiB), Ranked(Z1_MB8, int(9.5 * GiB))]  # the next ranked one needs more
    d = next_plan(ranked, 11 * GiB, 10 * GiB)
    assert not d.keep and d.plan is None and "no later plan fits" in d.line


def test_describes_what_changed() -> None:
    assert short(Z3_MB8_FULL) == "dp2 z3 mb8 recompute-full"
    assert changes(Z1_MB8, Z3_MB8_FULL) == "zero 1->3, recompute none->full"


class FakeProfile:
    def __init__(self, peak: int) -> None:
        self.measured = {"peak": peak}


def test_controller_walks_until_a_plan_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller measures each plan the policy names and launches the first that fits."""
    import orchestrator.preflight as pf
    from planner.specs.hardware import dgx_cluster, gpu_by_name
    from planner.search.pinned import Pinned
    from planner.structure.presets import preset
    from planner.specs.training import TrainingSpec

    cluster = dgx_cluster(gpu_by_name("cpu"), 2).model_copy(update={"gpu": gpu_by_name("cpu").model_copy(update={"memory_bytes": 10 * GiB})})
    monkeypatch.setattr(pf, "ranked_plans", lambda *a: list(RANKED))
    peaks = {Z1_MB8: int(12.35 * GiB), Z1_MB4: int(8 * GiB)}
    measured: list[ParallelPlan] = []

    def measure(model, cluster, training, pinned, *, plan, steps, finetune=None):  # type: ignore[no-untyped-def]
        measured.append(plan)
        return FakeProfile(peaks[plan])

    out = io.StringIO()
    args = (preset("debug"), cluster, TrainingSpec(seq_len=256), Pinned(), Z1_MB8)
    assert preflight(*args, out=out, measure=measure) == Z1_MB4
    assert measured == [Z1_MB8, Z1_MB4] and len(out.getvalue().splitlines()) == 2
    peaks[Z1_MB4] = peaks[Z3_MB8_FULL] = 11 * GiB  # z1 mb4 misses, then z3 mb8 recompute-full, then nothing is left
    with pytest.raises(PlanInputError, match="fits cluster .* as measured"):
        preflight(*args, out=io.StringIO(), measure=measure)
    assert measured[2:] == [Z1_MB8, Z1_MB4, Z3_MB8_FULL]
