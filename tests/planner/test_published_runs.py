"""The speed and memory models against published training runs (tests/data/published_runs.json;
assumptions for settings the sources leave out are in tests/planner/published.py ASSUMED)."""

from __future__ import annotations

import pytest

from planner.memory.evaluate import evaluate
from planner.search.pinned import Pinned
from planner.search.engine import search
from planner.speed.step import step_time
from tests.planner.published import load_runs

RUNS = load_runs()


def _ratio(run) -> float:
    return step_time(run.model, run.cluster, run.training, run.plan).tokens_per_s / run.tokens_per_s


def test_covers_the_papers():
    ids = " ".join(r.id for r in RUNS)
    for paper in ("narayanan2021_table1", "narayanan2021_table2", "korthikanti2022_table5", "llama3", "mtnlg", "bloom", "opt"):
        assert paper in ids


# DeepSpeed ZeRO-3 in Megatron-DeepSpeed, 2021 (Narayanan et al. Table 2): the published step times
# imply ~21 GB/s per rank, one HDR NIC, while the model gives a data-parallel group with 8 ranks per
# node the node's 8 NICs, as nccl-tests measure and as the held-out FSDP runs need
# (tests/planner/test_speed_validation.py). The model does not represent that DeepSpeed version's
# collectives; these rows are predicted too fast and checked for it separately.
ZERO3_2021 = "narayanan2021_table2_zero3"


def test_throughput_within_10_percent_on_average_30_at_worst():
    """Constants are now fitted on the held-out runs (speed_runs.json), not on these: mean within
    10%, the worst (MT-NLG's DeepSpeed 3D runs, ~+28%) within 30%."""
    errors = {r.id: abs(_ratio(r) - 1) for r in RUNS if not r.id.startswith(ZERO3_2021)}
    mean = sum(errors.values()) / len(errors)
    worst = max(errors, key=errors.get)
    assert mean <= 0.10, f"mean error {mean:.1%}"
    assert errors[worst] <= 0.30, f"worst {worst}: {errors[worst]:.1%}"


def test_deepspeed_zero3_2021_predicted_too_fast():
    """Known gap, recorded so it cannot silently change: the 2021 ZeRO-3 rows run 1.4-4.5x slower than
    the multi-NIC collective model predicts, worse with more ranks (ring latency and one NIC)."""
    ratios = {r.id: _ratio(r) for r in RUNS if r.id.startswith(ZERO3_2021)}
    assert len(ratios) == 6
    assert all(1.3 < v < 5.0 for v in ratios.values()), ratios


@pytest.mark.parametrize("run", RUNS, ids=lambda r: r.id)
def test_published_configuration_fits(run):
    """They ran, so the planner must judge them to fit."""
    assert evaluate(run.model, run.cluster, run.training, run.plan).fits


def why_faster(published, found) -> str:
    """What the search changed and which step-time components it saved (the recorded reason)."""
    a, b = published.plan, found.plan
    dims = [f"{k} {getattr(a, k)}->{getattr(b, k)}" for k in ("dp", "tp", "pp", "cp", "sp", "interleave", "zero_stage",
            "micro_batch", "recompute", "offload") if getattr(a, k) != getattr(b, k)]
    pub = step_time(published.model, published.cluster, published.training, a).components()
    saved = sorted(((pub[k] - v, k) for k, v in found.speed.components().items()), reverse=True)[:2]
    return f"{', '.join(dims) or 'same plan'}; saves " + ", ".join(f"{k} {d:.2f}s" for d, k in saved if d > 0)


@pytest.mark.parametrize("run", RUNS, ids=lambda r: r.id)
def test_free_search_at_least_as_fast(run):
    """The free search on the same cluster and batch finds a plan predicted at least as fast as the
    published one; bench/search_vs_published.py prints why_faster for each."""
    published = step_time(run.model, run.cluster, run.training, run.plan).step_time_s
    found = search(run.model, run.cluster, run.training, Pinned(), backend="megatron")
    assert found.ranked, "the search found nothing that fits"
    best = found.ranked[0]
    assert best.speed.step_time_s <= published * 1.0001, f"{run.id}: best {best.plan.describe()} {best.speed.step_time_s:.2f}s vs published {published:.2f}s"
    if best.speed.step_time_s < published * 0.999:
        assert why_faster(run, best)  # a faster plan always comes with a reason
