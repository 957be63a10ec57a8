"""The dimensions a user pinned, and the plan that fills the rest with simple defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from planner.specs.hardware import ClusterSpec
from planner.specs.training import Offload, ParallelPlan, Recompute, TrainingSpec


class Pinned(BaseModel):
    """Plan dimensions fixed by flags; None means free (the search or a default chooses)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dp: int | None = Field(default=None, gt=0)
    tp: int | None = Field(default=None, gt=0)
    pp: int | None = Field(default=None, gt=0)
    cp: int | None = Field(default=None, gt=0)
    ep: int | None = Field(default=None, gt=0)
    sp: bool | None = None
    interleave: int | None = Field(default=None, gt=0)
    zero_stage: Literal[0, 1, 2, 3] | None = None
    offload: Offload | None = None
    micro_batch: int | None = Field(default=None, gt=0)
    recompute: Recompute | None = None

    def given(self) -> dict[str, object]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


def default_plan(pinned: Pinned, cluster: ClusterSpec, training: TrainingSpec) -> tuple[ParallelPlan, list[str]]:
    """Pinned dimensions as given; the others take simple defaults: dp fills the cluster, ZeRO 0
    (the lowest stage a pinned offload allows), micro-batch 1, no recompute, accumulation to reach
    the global batch. Returns the plan and the names of the defaulted dimensions."""
    given = pinned.given()
    tp, pp, cp = given.get("tp", 1), given.get("pp", 1), given.get("cp", 1)
    dp = given.get("dp") or max(1, cluster.num_gpus // (tp * pp * cp))  # type: ignore[operator]
    mb = given.get("micro_batch", 1)
    accum = max(1, training.global_batch // (mb * dp)) if training.global_batch else 1  # type: ignore[operator]
    zero = {"optimizer": 1, "optimizer+params": 3}.get(given.get("offload", "none"), 0)  # type: ignore[arg-type]
    fields = {"dp": dp, "tp": tp, "pp": pp, "cp": cp, "micro_batch": mb, "grad_accum": accum, "zero_stage": zero, **given}
    defaulted = [k for k in ("dp", "zero_stage", "micro_batch", "recompute") if k not in given]
    return ParallelPlan(**fields), defaulted  # type: ignore[arg-type]
