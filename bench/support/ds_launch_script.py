"""The training script of bench/launch_vs_deepspeed.py as DeepSpeed's own launcher runs it:
`deepspeed --num_gpus 2 bench/support/ds_launch_script.py --job job.json --steps-file steps.jsonl`.

It runs the same training function orch's Ray Train workers run (launch.trainer.train) on the
same JobSpec, with a WorkerContext backed by a file instead of Ray Train.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch.distributed as dist

from launch.context import WorkerContext
from launch.job import JobSpec
from launch.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True)
    parser.add_argument("--steps-file", required=True)
    parser.add_argument("--ranks-file", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    job = JobSpec.model_validate_json(open(args.job).read())
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with open(args.ranks_file, "a") as fh:  # as orch's worker does on entering the training function
        fh.write(json.dumps({"rank": rank, "pid": os.getpid(), "started_at": time.time()}) + "\n")

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        if rank == 0:
            with open(args.steps_file, "a") as fh:
                fh.write(json.dumps({**metrics, "time": time.time()}) + "\n")

    ctx = WorkerContext(job=job, rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                        _report=report)
    train(job.plan, job.ds_config, ctx)


if __name__ == "__main__":
    main()
