"""`orch plan` as a user runs it, timed end to end (process start, imports, tracing, search,
output): Llama 3.1 70B on 64 H100s, every dimension searched. The first call for a config that
is new to the cache (a fresh $ORCH_CACHE_DIR: the layout and activation profile are traced) and
the repeated call (read from the cache). Issue 12's targets on a 2-core machine: first <= 5 s,
repeated <= 1 s. Prints figures; never fails a build."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ORCH = Path(sys.executable).with_name("orch")
CASES = [
    ["--model", "llama3.1-70b", "--gpu", "h100-80gb", "--gpus", "64"],
    ["--model", "mixtral-8x7b", "--gpu", "h100-80gb", "--gpus", "64"],
    ["--model", "llama3.1-8b", "--gpu", "a100-80gb", "--gpus", "8", "--method", "qlora"],
]


def _timed(args: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(ORCH), "plan", *args], env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    print(f"{'case':62s} {'first s':>8s} {'repeat s (median of 3)':>23s}")
    for args in CASES:
        firsts, repeats = [], []
        for _ in range(2):
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "ORCH_CACHE_DIR": cache}
                firsts.append(_timed(args, env))
                repeats += [_timed(args, env) for _ in range(3)]
        print(f"{' '.join(args):62s} {min(firsts):8.2f} {statistics.median(repeats):23.2f}")


if __name__ == "__main__":
    main()
