"""Grid search of the speed model's efficiency constants against the published runs
(tests/data/published_runs.json): prints mean and worst throughput error for each setting, and the
current defaults' per-run ratios (predicted / published tokens per second). The defaults are no
longer fitted here but on the held-out runs (bench/speed_validation.py); this shows how the
calibration set would pull them. gemm_efficiency is a fraction of the GPU's maximum achievable
matmul rate (GPUSpec.matmul_achievable_fraction)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.speed.step import SpeedConstants, step_time  # noqa: E402
from tests.planner.published import load_runs  # noqa: E402


def errors(runs, c: SpeedConstants) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return {r.id: step_time(r.model, r.cluster, r.training, r.plan, c).tokens_per_s / r.tokens_per_s for r in runs}


def main() -> None:
    runs = load_runs()
    print("gemm  elementwise  attention   mean_err  worst_err  worst_run")
    for ge, ew, ae in itertools.product([0.85, 0.88, 0.91, 0.94, 0.97], [80, 110, 140], [0.60, 0.70]):
        ratios = errors(runs, SpeedConstants(gemm_efficiency=ge, elementwise_bytes_per_token_per_hidden=ew,
                                             megatron_attention_efficiency=ae))
        err = {k: abs(v - 1) for k, v in ratios.items()}
        worst = max(err, key=err.get)
        print(f"{ge:.2f}  {ew:11.0f}  {ae:9.2f}  {sum(err.values()) / len(err):8.1%}  {err[worst]:9.1%}  {worst}")
    print("\ndefaults, per run (predicted/published tokens per second):")
    for run_id, ratio in errors(runs, SpeedConstants()).items():
        print(f"  {run_id:48s} {ratio:6.3f}")


if __name__ == "__main__":
    main()
