"""Tensor parallelism (DeepSpeed AutoTP) and pipeline parallelism (DeepSpeed PipelineModule) in
`orch launch`: end-to-end runs of the debug model on an embedded Ray cluster (2 CPU workers, gloo)
that train for real; fast checks of what the launcher refuses; and the pipeline layers against the
Hugging Face model they are cut from.

Measured on gloo with DeepSpeed 0.19 (2 ranks, same weights and batches; the loss after 20 steps
equals the unsplit model's to 4 decimals): AutoTP trains with ZeRO 0-3 in bf16 and fp32 (also
tp2 x dp2 on 4 ranks); the pipeline trains with ZeRO 0-1 in bf16 and fp32 (DeepSpeed asserts
"ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism"), but a bf16 pipeline's checkpoint
without ZeRO does not load back (BF16_Optimizer: KeyError 0), so bf16 pipelines take ZeRO 1;
AutoTP inside a PipelineModule fails (no AutoTP policy for it; with the Llama preset a gloo
collective mismatch), so the two are never combined. Checkpoints of both resume exactly, and both
also train with the optimizer offloaded (tp2 with ZeRO 2/3, pp2 with ZeRO 1).

Only the tests that start DeepSpeed ranks are marked e2e; the plan and layer checks are fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.pipeline_model import CausalLMLoss, pipeline_layers, sequential_loss
from launch.synthetic import batch
from launch.trainer import build_model
from orchestrator.inputs import load_model, resolve_cluster
from orchestrator.launch_plan import choose_plan
from planner.errors import PlanInputError
from planner.specs.hardware import dgx_cluster, gpu_by_name
from planner.search.pinned import Pinned
from planner.structure.presets import preset
from planner.search.engine import search
from planner.specs.training import TrainingSpec

CPU2 = resolve_cluster("cpu-2", None, None, None)
TRAINING = TrainingSpec(seq_len=64)
ORCH = [sys.executable, "-c", "from orchestrator.cli import main; main()"]
COMMON = ["launch", "--model", "debug", "--cluster", "cpu-2", "--steps", "20", "--seq-len", "64", "--lr", "1e-3", "--json"]


# --- the plan: what runs is chosen, what does not is refused -----------------------------------


@pytest.mark.parametrize("pinned, precision, shape", [
    (Pinned(tp=2), "bf16", (1, 2, 1)),
    (Pinned(tp=2, zero_stage=3), "fp32", (1, 2, 1)),
    (Pinned(pp=2), "bf16", (1, 1, 2)),
    (Pinned(pp=2, zero_stage=0), "fp32", (1, 1, 2)),
])
def test_tensor_and_pipeline_parallel_plans_on_gloo(pinned: Pinned, precision: str, shape: tuple[int, int, int]) -> None:
    plan = choose_plan(load_model("debug"), CPU2, TrainingSpec(seq_len=64, precision=precision), pinned)
    assert (plan.dp, plan.tp, plan.pp) == shape
    assert plan.pp == 1 or plan.zero_stage in ((0, 1) if precision == "fp32" else (1,))


@pytest.mark.parametrize("model, pinned, message", [
    ("debug", Pinned(tp=2, pp=2), "--tp 2 with --pp 2: DeepSpeed AutoTP and PipelineModule do not combine"),
    ("debug", Pinned(pp=2, zero_stage=2), "--pp 2 with --zero 2: DeepSpeed's pipeline engine runs ZeRO 0, 1 only"),
    ("debug", Pinned(pp=2, zero_stage=3), "--pp 2 with --zero 3: DeepSpeed's pipeline engine runs ZeRO 0, 1 only"),
    ("debug", Pinned(pp=2, zero_stage=0), "--pp 2 with --zero 0 in bf16: DeepSpeed cannot load the checkpoints"),
    ("gpt3-1.7b", Pinned(tp=2), "--tp 2: DeepSpeed AutoTP does not shard gpt2 models"),
    ("mixtral-8x7b", Pinned(tp=2), "--tp 2: DeepSpeed AutoTP does not shard mixtral models"),
    ("gpt3-1.7b", Pinned(pp=2), "--pp 2: orch's pipeline layers cut Llama-like models with untied embeddings"),
    ("debug", Pinned(cp=2), "--cp 2: orch launch does not run context parallelism"),
    ("debug", Pinned(interleave=2), "--interleave 2: DeepSpeed's pipeline engine has no interleaved schedule"),
    ("debug", Pinned(sp=True), "--sp: DeepSpeed AutoTP has no sequence parallelism"),
])
def test_what_the_trainer_cannot_run_is_refused(model: str, pinned: Pinned, message: str) -> None:
    with pytest.raises(PlanInputError, match=message.replace("(", r"\(")) as err:
        choose_plan(load_model(model), CPU2, TRAINING, pinned)
    assert err.value.fix  # one line with "To fix: ..."


def test_deepspeed_search_never_combines_tensor_and_pipeline() -> None:
    model, cluster = preset("llama3.1-70b"), dgx_cluster(gpu_by_name("h100-80gb"), 64)
    found = search(model, cluster, TrainingSpec(seq_len=4096, global_batch=512))
    assert found.ranked and all(c.plan.tp == 1 or c.plan.pp == 1 for c in found.ranked)
    assert found.rejected["invalid: tensor with pipeline parallelism on deepspeed"] > 0
    assert all(c.plan.pp == 1 or c.plan.zero_stage == 1 for c in found.ranked)  # bf16: no ZeRO-0 pipeline
    megatron = search(model, cluster, TrainingSpec(seq_len=4096, global_batch=512), backend="megatron")
    assert any(c.plan.tp > 1 and c.plan.pp > 1 for c in megatron.ranked)


# --- the pipeline layers compute the Hugging Face model's loss -----------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_pipeline_layers_give_the_models_loss_and_gradients(attention: str) -> None:
    """Chained in one process, the layers a PipelineModule spreads over stages compute the model's
    own loss and gradients on the same weights (the causal mask and rotary embeddings included:
    without them the loss differs)."""
    torch.manual_seed(0)
    model = build_model(preset("debug").hf_config)
    model.config._attn_implementation = attention
    x = batch(1, 0, 4, 64, int(model.config.vocab_size))
    expected = model(input_ids=x, labels=x).loss
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = sequential_loss(pipeline_layers(model), CausalLMLoss(model), x, x)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)


def test_pipeline_layers_refuse_other_layouts() -> None:
    gpt2 = build_model({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 32})
    with pytest.raises(ValueError, match="not 'gpt2'"):
        pipeline_layers(gpt2)
    tied = build_model({**preset("debug").hf_config, "tie_word_embeddings": True})
    with pytest.raises(ValueError, match="untied"):
        pipeline_layers(tied)


# --- the trainer's tp and pp paths against each other (2 local ranks, no Ray) --------------------


def _train_ranks(rank: int, port: int, pinned: dict, out: str, resume: str | None = None) -> None:
    """One of 2 gloo ranks running launch.trainer.train for 6 steps (fp32), saving a checkpoint
    after step 3 into ``out/ckpt`` (both ranks' files, as Ray Train merges them) or resuming from
    ``resume``; rank 0 writes its losses by step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import shutil

    import torch.distributed as dist

    from launch.context import WorkerContext
    from launch.deepspeed_config import deepspeed_config
    from launch.job import JobSpec, job_ds_config
    from launch.trainer import train

    dist.init_process_group("gloo", rank=rank, world_size=2)
    model, training = load_model("debug"), TrainingSpec(seq_len=64, global_batch=8, precision="fp32")
    plan = choose_plan(model, CPU2, training, Pinned(**pinned))
    ds_config = job_ds_config(deepspeed_config(plan, training), 6, 1e-3)
    job = JobSpec(name="tp-pp", run_dir=out, hf_config=model.hf_config or {}, ds_config=ds_config, steps=6,
                  plan=plan.model_dump(), seq_len=64, checkpoint_every=3)
    losses: dict[int, float] = {}

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        losses[metrics["step"]] = metrics["loss"]
        if checkpoint_dir and metrics["step"] == 3 and resume is None:
            shutil.copytree(checkpoint_dir, Path(out, "ckpt"), dirs_exist_ok=True)

    @contextlib.contextmanager
    def latest():  # type: ignore[no-untyped-def]
        yield resume

    ctx = WorkerContext(job=job, rank=rank, world_size=2, local_rank=rank, _report=report, _latest=latest)
    train(plan.model_dump(), ds_config, ctx)
    if rank == 0:
        Path(out, "losses.json").write_text(json.dumps({"plan": plan.describe(), "losses": losses}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(out: Path, pinned: dict, resume: Path | None = None) -> dict:
    import torch.multiprocessing as mp

    out.mkdir()
    mp.spawn(_train_ranks, args=(_free_port(), pinned, str(out), str(resume) if resume else None), nprocs=2)
    run = json.loads((out / "losses.json").read_text())
    return {"plan": run["plan"], "losses": {int(k): v for k, v in run["losses"].items()}}


@pytest.mark.e2e
def test_tp2_and_pp2_train_the_same_model_and_resume(tmp_path: Path) -> None:
    """fp32, ZeRO 0, one data-parallel replica, the same 8 sequences per step, gradient clipping
    on: AutoTP (2 ranks hold halves of each projection) and the pipeline (2 stages) give the same
    loss at every step, as the unsplit model would. (Without the trainer's model-parallel mark,
    DeepSpeed's fp32 clipping leaves the last stage out of the gradient norm and the pipeline's
    losses drift from step 2.) The pipeline resumed from its step-3 checkpoint repeats steps 4-6
    exactly."""
    tp = _run_ranks(tmp_path / "tp", {"tp": 2, "zero_stage": 0, "micro_batch": 4})
    pp = _run_ranks(tmp_path / "pp", {"pp": 2, "zero_stage": 0, "micro_batch": 4})
    assert tp["plan"] == "dp1 tp2 pp1 zero0 mb4 ga2" and pp["plan"] == "dp1 tp1 pp2 zero0 mb4 ga2"
    assert list(tp["losses"]) == list(pp["losses"]) == [1, 2, 3, 4, 5, 6]
    assert list(pp["losses"].values()) == pytest.approx(list(tp["losses"].values()), rel=1e-5)
    assert tp["losses"][6] < tp["losses"][1] - 0.2
    resumed = _run_ranks(tmp_path / "pp-resumed", {"pp": 2, "zero_stage": 0, "micro_batch": 4}, resume=tmp_path / "pp" / "ckpt")
    assert resumed["losses"] == {step: pp["losses"][step] for step in (4, 5, 6)}


# --- end to end ----------------------------------------------------------------------------------


def _launch(tmp_path: Path, *extra: str) -> tuple[dict, list[dict]]:
    log = tmp_path / "steps.jsonl"
    args = [*COMMON, "--checkpoint-dir", str(tmp_path / "ckpt"), "--log-jsonl", str(log), *extra]
    proc = subprocess.run([*ORCH, *args], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary, [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.e2e
def test_tp2_autotp_trains(tmp_path: Path) -> None:
    """Both workers hold half of every attention and MLP projection (AutoTP), see the same batches
    and train one data-parallel replica."""
    summary, records = _launch(tmp_path, "--tp", "2", "--zero", "1", "--micro-batch", "4")
    assert summary["status"] == "succeeded" and summary["steps"] == 20
    plan = summary["plan"]
    assert (plan["dp"], plan["tp"], plan["pp"], plan["zero_stage"]) == (1, 2, 1, 1)
    assert summary["final_loss"] < summary["initial_loss"] - 0.5
    assert [r["step"] for r in records] == list(range(1, 21))


@pytest.mark.e2e
def test_pp2_pipeline_trains(tmp_path: Path) -> None:
    """Two pipeline stages (embedding + layer 0 | layer 1 + head), 4 micro-batches of 2 per step
    (bf16, so ZeRO 1), each stage's checkpoint files saved into the job's storage at steps 10 and 20."""
    summary, records = _launch(tmp_path, "--pp", "2", "--global-batch", "8", "--micro-batch", "2", "--checkpoint-every", "10")
    assert summary["status"] == "succeeded" and summary["steps"] == 20
    plan = summary["plan"]
    assert (plan["dp"], plan["tp"], plan["pp"], plan["zero_stage"], plan["grad_accum"]) == (1, 1, 2, 1, 4)
    assert summary["final_loss"] < summary["initial_loss"] - 0.5
    assert [r["step"] for r in records] == list(range(1, 21))
    assert {p.name for p in Path(summary["checkpoint_dir"]).rglob("layer_*-model_states.pt")} >= {
        f"layer_0{i}-model_states.pt" for i in range(4)
    }
