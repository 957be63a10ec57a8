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


def test_throughput_within_10_percent_on_average_20_at_worst():
    errors = {r.id: abs(_ratio(r) - 1) for r in RUNS}
    mean = sum(errors.values()) / len(errors)
    worst = max(errors, key=errors.get)
    assert mean <= 0.10, f"mean error {mean:.1%}"
    assert errors[worst] <= 0.20, f"worst {worst}: {errors[worst]:.1%}"


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
