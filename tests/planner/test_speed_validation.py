"""Held-out validation of the step-time model: leave-one-source-out over tests/data/speed_runs.json
(bench/speed_validation.py prints the tables). The tolerances are what the model achieves today,
not the issue's targets (mean <= 8%, every run within 25%), which it does not yet meet; tighten
them as the model improves."""

from __future__ import annotations

import pytest

from tests.planner.speed_runs import held_out_sources, leave_one_source_out, load_speed_runs, scoreable, summary

RUNS = load_speed_runs()


@pytest.fixture(scope="module")
def loso():
    return leave_one_source_out(RUNS)


def test_every_unscored_run_says_why():
    skipped = [r for r in RUNS if r.skip]
    assert len(scoreable(RUNS)) + len(skipped) == 180
    reasons = {r.skip.split(" '")[0].split(":")[0] for r in skipped}
    # Only modelling reasons, applied to every run alike.
    assert reasons <= {"GPU", "model dimension not printed", "precision not printed", "parallel degrees not printed"}
    assert len(skipped) <= 26


def test_leave_one_source_out_overall(loso):
    errors, folds = loso
    assert set(folds) == {r.source_id for r in scoreable(RUNS) if r.source_id in held_out_sources()}
    s = summary(errors)
    assert s["count"] == 120
    assert s["mean"] <= 0.100, s
    assert s["median"] <= 0.075, s
    assert s["within_25"] >= 0.945, s


def test_leave_one_source_out_per_source(loso):
    """Per-source mean |error| bounds at today's figures (+~1 point); the one HF-transformers
    fine-tuning run (NeMo AutoModel LoRA, 70B tp2 pp4) is ~2.4x slower than predicted, and
    KempnerForge (torch.compile, planned with fused ops) still ~15% faster."""
    errors, _ = loso
    by_id = {r.id: r for r in RUNS}
    bound = {"dgxc-bench": 0.045, "nemo-perf": 0.09, "megatron-bridge-perf": 0.125, "torchtitan-perf": 0.095,
             "llm-foundry-bench": 0.12, "fms-fsdp": 0.12, "kempnerforge-bench": 0.16, "tinyllama": 0.115,
             "nemo-automodel-perf": 1.45}
    for source, limit in bound.items():
        errs = [abs(e) for k, e in errors.items() if by_id[k].source_id == source]
        assert errs and sum(errs) / len(errs) <= limit, (source, sum(errs) / len(errs))


def test_megatron_family_within_target(loso):
    """Megatron-Core runs (NeMo, DGX Cloud, Megatron-Bridge) held out: mean within the 8% target
    (5.9% today)."""
    errors, _ = loso
    by_id = {r.id: r for r in RUNS}
    meg = [abs(e) for k, e in errors.items() if by_id[k].model.implementation == "megatron"]
    assert len(meg) >= 60 and sum(meg) / len(meg) <= 0.065


def test_defaults_are_the_fit_on_all_held_out_sources():
    """SpeedConstants' defaults are bench/speed_validation.py's fit on every held-out source
    (from the same neutral start as each LOSO fold), to the grid's resolution."""
    from planner.speed.step import SpeedConstants
    from tests.planner.speed_runs import FITTED, fit_constants

    pool = [r for r in scoreable(RUNS) if r.source_id in held_out_sources()]
    fitted, defaults = fit_constants(pool), SpeedConstants()
    for name in FITTED:
        assert getattr(defaults, name) == pytest.approx(getattr(fitted, name), abs=1e-9), name
