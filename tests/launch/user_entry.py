"""A user's own training function for `orch launch --entrypoint tests.launch.user_entry:main`:
plain torch.distributed (no DeepSpeed), a linear regression whose loss falls, checkpoints through
the context and resumes from them."""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any


def main(plan: dict[str, Any], ds_config: dict[str, Any], ctx: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.manual_seed(0)
    target = torch.randn(8, 1)
    model = torch.nn.Linear(8, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start = 0
    with ctx.latest_checkpoint() as path:
        if path is not None:
            state = torch.load(os.path.join(path, "state.pt"))
            model.load_state_dict(state["model"])
            start = state["step"]
    for step in range(start + 1, ctx.job.steps + 1):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(step * 100 + ctx.rank)
        x = torch.randn(16, 8, generator=gen)
        loss = ((model(x) - x @ target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= ctx.world_size
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        metrics = {"step": step, "loss": float(mean) / ctx.world_size, "tokens": 16 * ctx.world_size,
                   "step_time_s": time.perf_counter() - t0,
                   "plan_dp": plan["dp"], "ds_batch": ds_config["train_batch_size"]}
        if ctx.job.checkpoint_every and step % ctx.job.checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save({"model": model.state_dict(), "step": step}, os.path.join(tmp, "state.pt"))
                with open(os.path.join(tmp, f"rank{ctx.rank}.json"), "w") as fh:
                    json.dump({"rank": ctx.rank}, fh)
                ctx.report(metrics, tmp)
        else:
            ctx.report(metrics)
        time.sleep(0.05)
