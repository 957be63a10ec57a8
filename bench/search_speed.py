"""How long a full search takes: a 1T-parameter model on 3072 A100s (issue target: well under a
second on a 2-core machine), and a few everyday cases. Prints figures; never fails a build."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.specs.hardware import dgx_cluster, gpu_by_name  # noqa: E402
from planner.structure.presets import preset  # noqa: E402
from planner.search.engine import search  # noqa: E402
from planner.specs.training import TrainingSpec  # noqa: E402

CASES = [
    ("gpt3-1t", "a100-80gb", 3072, 2048, 3072, "megatron"),
    ("gpt3-1t", "a100-80gb", 3072, 2048, 3072, "deepspeed"),
    ("llama3.1-405b", "h100-80gb", 1024, 8192, 1024, "megatron"),
    ("llama3.1-70b", "h100-80gb", 64, 4096, 512, "deepspeed"),
    ("mixtral-8x7b", "h100-80gb", 64, 4096, 512, "megatron"),
]


def main() -> None:
    print(f"{'model':15s} {'gpus':>5s} {'backend':9s} {'plans':>6s} {'fit':>5s} {'median s':>9s} {'max s':>7s}  best")
    for name, gpu, n, seq, gbs, backend in CASES:
        model, cluster = preset(name), dgx_cluster(gpu_by_name(gpu), n)
        training = TrainingSpec(seq_len=seq, global_batch=gbs)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            found = search(model, cluster, training, backend=backend)
            times.append(time.perf_counter() - t0)
        best = found.ranked[0].plan.describe() if found.ranked else "-"
        print(f"{name:15s} {n:5d} {backend:9s} {found.evaluated:6d} {len(found.ranked):5d} "
              f"{statistics.median(times):9.3f} {max(times):7.3f}  {best}")


if __name__ == "__main__":
    main()
