"""For every published run: the predicted step time of the published plan, the free search's best
plan on the same cluster and batch, and why it is faster (the test records the same)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.search.pinned import Pinned  # noqa: E402
from planner.search.engine import search  # noqa: E402
from planner.speed.step import step_time  # noqa: E402
from tests.planner.published import load_runs  # noqa: E402
from tests.planner.test_published_runs import why_faster  # noqa: E402


def main() -> None:
    print(f"{'run':48s} {'published s':>11s} {'found s':>8s} {'gain':>6s} {'search s':>8s}  why")
    for run in load_runs():
        published = step_time(run.model, run.cluster, run.training, run.plan).step_time_s
        t0 = time.perf_counter()
        found = search(run.model, run.cluster, run.training, Pinned(), backend="megatron")
        elapsed = time.perf_counter() - t0
        best = found.ranked[0]
        gain = published / best.speed.step_time_s - 1
        print(f"{run.id:48s} {published:11.2f} {best.speed.step_time_s:8.2f} {gain:6.1%} {elapsed:8.2f}  {why_faster(run, best)}")


if __name__ == "__main__":
    main()
