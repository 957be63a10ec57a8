"""Published configurations that really ran (tests/data/published_fits.json: sources, quotes and
assumptions per run) are judged to fit by `orch plan`, pinned to what each source states. Runs
whose memory rests on kernels or recipes orch does not model are listed in
tests/orchestrator/published_fits.py UNMODELLED with the reason, and skipped with it."""

from __future__ import annotations

import json

import pytest

from planner.structure.hf_config import spec_from_hf_config
from planner.structure.params import total_params
from tests.orchestrator.inprocess import run_orch
from tests.orchestrator.published_fits import RUNS, UNMODELLED, hf_config, plan_argv, published_params, write_config


def test_the_collection_is_large_and_cited():
    judged = [r for r in RUNS if r["id"] not in UNMODELLED]
    sources = {r["source"]["url_or_repo_path"].split()[0] for r in judged}
    assert len(judged) >= 30, len(judged)
    assert len(sources) >= 4, sources
    for run in RUNS:
        assert run["source"]["quote"] and run["source"]["where"] and run["source"]["title"], run["id"]
    assert set(UNMODELLED) <= {r["id"] for r in RUNS}


@pytest.mark.parametrize("run", [r for r in RUNS if published_params(r)], ids=lambda r: r["id"])
def test_mpt_benchmark_models_are_gpt2_blocks_exactly(run):
    """The GPT-2 rendering of llm-foundry's MPT configs has the benchmark table's parameter count."""
    assert total_params(spec_from_hf_config(hf_config(run), name=run["id"])) == published_params(run)


@pytest.mark.parametrize("run", RUNS, ids=lambda r: r["id"])
def test_judged_to_fit(run, tmp_path):
    if run["id"] in UNMODELLED:
        pytest.skip(UNMODELLED[run["id"]])
    argv = plan_argv(run, write_config(run, tmp_path))
    code, out, err = run_orch(argv)
    assert code in (0, 1), (argv, err)
    best = json.loads(out)["plans"][0]
    mem = best["memory"]
    assert code == 0 and best["fits"], (
        f"{run['id']} ran, but is judged not to fit: peak {mem['total'] / 2**30:.2f} GiB "
        f"({' '.join(argv)})")
