"""Held-out validation of the step-time model: leave-one-source-out (LOSO) over
tests/data/speed_runs.json. For each held-out source, the constants in
tests/planner/speed_runs.FITTED are fitted (coordinate descent) on the other held-out sources
only and the source is predicted with them; the sources that overlap tests/data/published_runs.json
(narayanan2021, korthikanti2022, llama3-paper) are scored with the defaults and never fitted on.
Prints per-run errors, per-source and overall figures, and the runs that cannot be scored and why.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.planner.speed_runs import (  # noqa: E402
    FITTED, held_out_sources, leave_one_source_out, load_speed_runs, scoreable, signed_errors, summary,
)


def _line(name: str, errs: list[float]) -> str:
    a = [abs(e) for e in errs]
    bias = statistics.mean(errs)
    return (f"{name:26s} {len(a):4d} {statistics.mean(a):7.1%} {statistics.median(a):7.1%} {max(a):7.1%} "
            f"{sum(x <= 0.25 for x in a) / len(a):7.0%} {bias:+7.1%}")


def main() -> None:
    runs = load_speed_runs()
    print("Cannot be scored:")
    for r in runs:
        if r.skip:
            print(f"  {r.id:55s} {r.skip}")
    errors, folds = leave_one_source_out(runs)
    by_id = {r.id: r for r in runs}
    print(f"\n{'run':55s} {'prec':5s} {'category':24s} {'LOSO err':>8s}")
    for run_id, e in errors.items():
        r = by_id[run_id]
        print(f"{run_id:55s} {r.precision:5s} {r.category:24s} {e:+8.1%}")
    print(f"\nLeave-one-source-out, held-out sources (predicted/measured tokens/s/GPU - 1):")
    print(f"{'source':26s} {'runs':>4s} {'mean':>7s} {'median':>7s} {'max':>7s} {'<=25%':>7s} {'bias':>7s}")
    for source in sorted(folds):
        print(_line(source, [e for k, e in errors.items() if by_id[k].source_id == source]))
    print(_line("ALL held-out", list(errors.values())))
    print(_line("  bf16/fp16 only", [e for k, e in errors.items() if by_id[k].precision != "fp8"]))
    print(_line("  fp8 only", [e for k, e in errors.items() if by_id[k].precision == "fp8"]))
    for task in sorted({by_id[k].task for k in errors}):
        print(_line(f"  task {task}", [e for k, e in errors.items() if by_id[k].task == task]))
    for impl in ("megatron", "huggingface"):
        print(_line(f"  {impl} kernels", [e for k, e in errors.items() if by_id[k].model.implementation == impl]))
    for cat in sorted({by_id[k].category for k in errors}):
        print(_line(f"  {cat}", [e for k, e in errors.items() if by_id[k].category == cat]))
    s = summary(errors)
    print(f"\ntargets: mean <= 8% (got {s['mean']:.1%}), every run within 25% (got {s['within_25']:.0%}, max {s['max']:.1%})")
    print("\nConstants fitted per fold:")
    print(f"{'held out':26s} " + " ".join(f"{k[:12]:>12s}" for k in FITTED))
    for source, c in folds.items():
        print(f"{source:26s} " + " ".join(f"{getattr(c, k):12.3g}" for k in FITTED))
    overlap = [r for r in scoreable(runs) if r.source_id not in held_out_sources()]
    oe = signed_errors(overlap)
    print("\nOverlapping sources (also in published_runs.json), default constants:")
    for source in sorted({r.source_id for r in overlap}):
        print(_line(source, [oe[r.id] for r in overlap if r.source_id == source]))


if __name__ == "__main__":
    main()
